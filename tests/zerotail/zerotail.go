// Package zerotail gives the fuzz tests of qcow and qcow/inspect a file
// that is the fuzzer's bytes followed by zeros, like a sparse file, so
// that the tables of an image may point far past the bytes given. Test
// helper only: no production code imports it.
package zerotail

import (
	"errors"
	"io"
)

// File is Size bytes: B, then zeros.
type File struct {
	B    []byte
	Size int64
}

// ReadAt reads as os.File does: io.EOF at or past Size, and with a short
// count at the end.
func (f File) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, errors.New("negative offset")
	}
	if off >= f.Size {
		return 0, io.EOF
	}
	n := int(min(int64(len(p)), f.Size-off))
	clear(p[:n])
	if off < int64(len(f.B)) {
		copy(p[:n], f.B[off:])
	}
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

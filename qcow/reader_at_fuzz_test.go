package qcow

import (
	"bytes"
	"errors"
	"io"
	"testing"

	"github.com/xapi-project/xapi-qcow-tool/tests/zerotail"
)

// guestPages decodes a whole image and returns its non-zero content in
// 4 KiB pages of the guest disk; ok is false when the decoder refused the
// image at any point. Extents are checked as fuzzDecode does.
func guestPages(t *testing.T, r *Reader, err error) (pages map[uint64][]byte, ok bool) {
	if err != nil {
		return nil, false
	}
	size := r.Header().Size
	pages = map[uint64][]byte{}
	var total uint64
	for n := 0; n <= 1<<22; n++ {
		e, err := r.Next()
		if errors.Is(err, io.EOF) {
			return pages, true
		}
		if err != nil {
			return nil, false
		}
		if e.Length == 0 || e.Offset >= size || e.Length > size-e.Offset {
			t.Fatalf("extent %#x+%#x outside the virtual size %#x", e.Offset, e.Length, size)
		}
		if total += e.Length; total > size {
			t.Fatalf("extents cover %#x bytes, more than the virtual size %#x", total, size)
		}
		if e.Kind != ExtentData {
			continue
		}
		if uint64(len(e.Data)) != e.Length {
			t.Fatalf("data extent with %d bytes for length %d", len(e.Data), e.Length)
		}
		for i := 0; i < len(e.Data); {
			off := e.Offset + uint64(i)
			page, in := off&^4095, int(off&4095)
			k := min(4096-in, len(e.Data)-i)
			if chunk := e.Data[i : i+k]; !allZero(chunk) {
				p := pages[page]
				if p == nil {
					p = make([]byte, 4096)
					pages[page] = p
				}
				copy(p[in:], chunk)
			}
			i += k
		}
	}
	t.Fatal("too many extents")
	return nil, false
}

func allZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// FuzzReaderAt is the import from a file (NewReaderAt): the fuzzer's
// bytes, followed by up to 4 GiB of zeros (a sparse file), so that tables
// may point anywhere. Whatever the image, the reader must not panic, must
// keep every extent inside the virtual size, and, when the image is also
// accepted as a stream, must yield the same guest content as the stream
// decoder. Run it with -fuzzminimizetime (see FuzzReader).
func FuzzReaderAt(f *testing.F) {
	for _, s := range fuzzSeeds(f) {
		f.Add(s, uint32(0))
		f.Add(s, uint32(1<<20))
	}
	opts := ReaderOptions{MaxBuffered: 1 << 20, AllowBacking: true}
	f.Fuzz(func(t *testing.T, b []byte, tail uint32) {
		file := zerotail.File{B: b, Size: int64(len(b)) + int64(tail)}
		r, err := NewReaderAt(file, file.Size, opts)
		fromFile, fileOK := guestPages(t, r, err)
		if tail != 0 {
			return // the stream has no sparse tail to compare with
		}
		r, err = NewReader(streamOnly{bytes.NewReader(b)}, opts)
		fromStream, streamOK := guestPages(t, r, err)
		if !fileOK || !streamOK {
			return
		}
		for page, p := range fromFile {
			if q := fromStream[page]; !bytes.Equal(p, q) {
				t.Fatalf("guest page %#x differs between the file and the stream decoder", page)
			}
		}
		for page := range fromStream {
			if fromFile[page] == nil {
				t.Fatalf("guest page %#x holds data in the stream only", page)
			}
		}
	})
}

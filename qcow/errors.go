package qcow

import (
	"errors"
	"fmt"
)

// Every error of the package is here. Sentinels and plain errors read
// "qcow: ..."; the two typed errors say what they judged and where:
// FormatError "qcow2 image|stream: offset N: ..." and HeaderError "bad
// qcow2 header: FIELD: ...", the text xapi shows its user, which the
// support guide (docs/SUPPORT.md) lists.

// ErrTooLarge is returned (wrapped) when a disk cannot be described with
// the chosen cluster size within qemu's limits.
var ErrTooLarge = errors.New("qcow: image too large")

// ErrDataOverrun is returned by Writer.Write when more data is written than
// the layout has room for.
var ErrDataOverrun = errors.New("qcow: more data written than the image allocates")

// ErrNeedRandomAccess is wrapped by the error returned when a stream holds
// more out-of-order data than ReaderOptions.MaxBuffered allows, or more
// pending references than the decoder keeps.
var ErrNeedRandomAccess = errors.New("qcow: " + needRandomAccess)

// needRandomAccess ends the reason of a FormatError wrapping
// ErrNeedRandomAccess.
const needRandomAccess = "the image must be given as a file (random access)"

// FormatError reports an image the decoder refuses, with the offset in the
// image where the problem was found. Err, when set, is a wrapped cause such
// as io.ErrUnexpectedEOF, ErrNeedRandomAccess or a *HeaderError.
type FormatError struct {
	Stream bool  // found by the stream decoder (NewReader)
	Offset int64 // image offset at which the problem was seen
	Reason string
	Err    error
}

func (e *FormatError) Error() string {
	what := "qcow2 image"
	if e.Stream {
		what = "qcow2 stream"
	}
	return fmt.Sprintf("%s: offset %#x: %s", what, e.Offset, e.Reason)
}

func (e *FormatError) Unwrap() error { return e.Err }

// HeaderError reports a header that cannot be used. Field names the header
// field at fault.
type HeaderError struct {
	Field  string
	Reason string
}

func (e *HeaderError) Error() string {
	if e.Field == "" {
		return "bad qcow2 header: " + e.Reason
	}
	return fmt.Sprintf("bad qcow2 header: %s: %s", e.Field, e.Reason)
}

func herr(field, format string, args ...any) error {
	return &HeaderError{Field: field, Reason: fmt.Sprintf(format, args...)}
}

// SnapshotTableError reports a snapshot table qemu would refuse to open,
// or one the image ends before; a decoder wraps it in a FormatError.
type SnapshotTableError struct {
	Offset int64 // image offset of the entry at fault
	Reason string
	Err    error // io.ErrUnexpectedEOF when the table runs past the image
}

func (e *SnapshotTableError) Unwrap() error { return e.Err }

func (e *SnapshotTableError) Error() string {
	return fmt.Sprintf("bad qcow2 snapshot table: offset %#x: %s", e.Offset, e.Reason)
}

// The zstd frame walker's reasons, inside a FormatError.
var (
	errZstdNotAFrame = errors.New("not a zstd frame")
	errZstdReserved  = errors.New("zstd frame header has its reserved bit set")
	errZstdTruncated = errors.New("zstd frame truncated")
	errZstdBlockType = errors.New("zstd block of reserved type")
)

// errorf is a plain error of the package.
func errorf(format string, args ...any) error {
	return fmt.Errorf("qcow: "+format, args...)
}

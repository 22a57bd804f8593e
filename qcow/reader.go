package qcow

import (
	"fmt"
	"io"
)

// ReaderOptions bound what a hostile stream can make the decoder hold.
type ReaderOptions struct {
	// MaxBuffered is the number of bytes of data (and tables) that may be
	// held in memory because they arrive before anything maps them. 0 means
	// DefaultMaxBuffered (64 MiB).
	MaxBuffered int64
	// AllowBacking accepts images that name a backing file (import with
	// --delta applies a diff); otherwise such images are refused with an
	// error.
	AllowBacking bool
	// Lend, when set, is asked where the bytes of a run of data
	// clusters read from a stream (NewReader) should land: it returns
	// memory for up to n bytes of the guest disk from off. The decoder
	// reads the stream straight into it, and the next extent Next returns
	// is that run, with Data in that memory (shorter than asked at the
	// end of the disk or of a truncated stream). A caller that writes
	// from its own buffer saves a copy of every byte. Returning less than
	// a cluster (or nil) makes the decoder use its own buffer.
	Lend func(off uint64, n int) []byte
}

// DefaultMaxBuffered is the default ReaderOptions.MaxBuffered. With the
// bitmaps' cap it keeps what any image makes the decoder hold within the
// process's memory limit (vhdcompat.MemoryLimit, docs/RELIABILITY.md).
const DefaultMaxBuffered = 64 << 20

// ExtentKind says how an extent of the guest disk reads.
type ExtentKind uint8

// Extent kinds.
const (
	ExtentData        ExtentKind = iota // Data holds the bytes
	ExtentZero                          // reads as zero: zero flag (or zero subclusters)
	ExtentUnallocated                   // not allocated in the image: reads as zero, or as the backing file
)

func (k ExtentKind) String() string {
	switch k {
	case ExtentData:
		return "data"
	case ExtentZero:
		return "zero"
	case ExtentUnallocated:
		return "unallocated"
	}
	return fmt.Sprintf("ExtentKind(%d)", uint8(k))
}

// Extent is a piece of the guest disk. Extents come in stream order, not
// guest order; together they cover [0, virtual size) exactly once, and never
// extend past the virtual size (a partial last cluster is clipped).
type Extent struct {
	Kind   ExtentKind
	Offset uint64 // guest offset
	Length uint64
	Data   []byte // ExtentData only; valid until the next call to Next
	// HostOffset is, for data, where the bytes sit in the image (compressed:
	// the compressed bytes' offset); 0 otherwise.
	HostOffset uint64
	Compressed bool
}

// Reader decodes a qcow2 image into extents of the guest disk. See
// NewReader and NewReaderAt.
type Reader struct {
	d    *decoder
	step func() (Extent, error) // the stream or random-access decoder's
	err  error
	s    *streamState // the stream decoder (nil for random access)
}

// Header returns the image header.
func (r *Reader) Header() *Header { return r.d.h }

// Next returns the next extent, or io.EOF after the last one. After an
// error other than io.EOF the Reader is unusable and returns that error.
func (r *Reader) Next() (Extent, error) {
	if r.err != nil {
		return Extent{}, r.err
	}
	ext, err := r.step()
	if err != nil {
		r.err = err
	}
	return ext, err
}

// NewReader reads and validates the header cluster of an image that
// arrives as a stream, front to back, never seeking. Tables and data that
// arrive before anything maps them are held up to opts.MaxBuffered bytes;
// images needing more must be read with NewReaderAt.
func NewReader(r io.Reader, opts ReaderOptions) (*Reader, error) {
	pos := uint64(0)
	d, err := newDecoder(true, opts, func(buf []byte) error {
		n, err := io.ReadFull(r, buf[pos:])
		pos += uint64(n)
		return err
	})
	if err != nil {
		return nil, err
	}
	s := newStream(d, watchSnapshots(r, d, d.cs), opts)
	return &Reader{d: d, step: s.step, s: s}, nil
}

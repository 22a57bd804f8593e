package importer

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"os"
	"time"

	"github.com/xapi-project/xapi-qcow-tool/qcow"
	"github.com/xapi-project/xapi-qcow-tool/vhdcompat/rawdisk"
)

// Options describe one import.
type Options struct {
	// Source carries the qcow2 image. A regular file is read with random
	// access from its current position (any layout); anything else — a
	// pipe, a socket — is read front to back, never seeked.
	Source     *os.File
	SourceName string

	// The destination: an open descriptor, or else a path (a regular
	// file, created if missing, or a block device).
	Destination     *os.File
	DestinationPath string
	DestinationName string // for messages; defaults to the path
	// DestinationSize, when non-zero, declares the destination's size: a
	// larger image is refused before any write.
	DestinationSize int64

	// Disk says how the destination is opened: O_DIRECT or the page
	// cache (rawdisk.IOAuto: O_DIRECT on a block device), and whom to
	// tell when O_DIRECT is refused.
	Disk      rawdisk.Options
	Delta     bool // leave unallocated clusters untouched; accept a backing file
	Prezeroed bool // the destination already reads as zeros
	// MaxBuffered bounds the stream data the decoder may hold before it
	// knows where it goes; 0 is the decoder's default.
	MaxBuffered int64

	// Progress, when set, is called with the bytes of the virtual disk
	// done and its size.
	Progress func(done, total uint64)
	Log      *slog.Logger
}

// Result reports what an import did.
type Result struct {
	VirtualSize int64
	Stats       Stats
	Elapsed     time.Duration
}

// SizeError refuses an image that does not fit its destination: larger by
// a cluster or more (less is an unaligned disk, see fitEnd).
type SizeError struct {
	Destination string
	VirtualSize int64
	Size        int64
	Why         string
}

func (e *SizeError) Error() string {
	return fmt.Sprintf("the image's virtual size (%d bytes) is larger than %s (%d bytes%s) by a cluster or more: nothing was written",
		e.VirtualSize, e.Destination, e.Size, e.Why)
}

// BackingFileError refuses an image that names a backing file outside
// delta mode: its unallocated clusters would read as the backing file's
// data, which the import does not have.
type BackingFileError struct{ Name string }

func (e *BackingFileError) Error() string {
	return fmt.Sprintf("the image has a backing file (%q): importing it alone would lose the backing data; apply it with --delta (stream_decode) on top of a copy of its base", e.Name)
}

// Run imports opt.Source into the destination. Everything that can be
// checked — the header, the backing file, the sizes — is checked before
// the first write; the destination is synced before Run returns nil.
func Run(ctx context.Context, opt Options) (*Result, error) {
	log := opt.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if opt.DestinationName == "" {
		opt.DestinationName = opt.DestinationPath
	}
	start := time.Now()
	fail := func(err error) (*Result, error) {
		var de *rawdisk.DiskError
		if errors.As(err, &de) && de.Path == opt.DestinationName && de.Op != "" {
			// Name the destination once: "into PATH: write at offset N: EIO".
			return nil, fmt.Errorf("import from %s into %s: %s: %w", opt.SourceName, opt.DestinationName, de.Op, de.Err)
		}
		return nil, fmt.Errorf("import from %s into %s: %w", opt.SourceName, opt.DestinationName, err)
	}

	// The stream decoder reads data runs straight into the sink's pending
	// write (see qcow.ReaderOptions.Lend): set once the sink exists.
	var sink *Sink
	lend := func(off uint64, n int) []byte {
		if sink == nil || off > math.MaxInt64 {
			return nil
		}
		return sink.Lend(int64(off), n)
	}
	r, err := openReader(ctx, opt, lend)
	if err != nil {
		return fail(err)
	}
	hdr := r.Header()
	if hdr.BackingFile != "" && !opt.Delta {
		return fail(&BackingFileError{Name: hdr.BackingFile})
	}
	if hdr.Size > math.MaxInt64 {
		return fail(fmt.Errorf("virtual size %d is too large", hdr.Size))
	}
	vsize := int64(hdr.Size)
	// end is where writing stops: the virtual size, or the end of a
	// destination that the image overshoots by less than a cluster.
	end := vsize
	if opt.DestinationSize > 0 {
		if end, err = fitEnd(vsize, 1<<hdr.ClusterBits, opt.DestinationSize, opt.DestinationName, ", from --destination-size"); err != nil {
			return fail(err)
		}
	}

	disk, err := openDestination(opt)
	if err != nil {
		return fail(err)
	}
	defer disk.Close()
	knownZeroFrom := vsize
	switch {
	case disk.Kind() == rawdisk.BlockDevice:
		devEnd, err := fitEnd(vsize, 1<<hdr.ClusterBits, disk.Size(), opt.DestinationName, ", a block device")
		if err != nil {
			return fail(err)
		}
		end = min(end, devEnd)
	case disk.Size() < end:
		// A regular file grows (to the declared size, else the virtual
		// size: a file has no size of its own to keep, and a diff applied
		// onto a copy of a shorter base must grow it); the new part reads
		// as zeros without being written.
		knownZeroFrom = disk.Size()
		if err := disk.Truncate(end); err != nil {
			return fail(err)
		}
	}
	if opt.Prezeroed {
		knownZeroFrom = 0
	}

	attrs := []any{"source", opt.SourceName, "destination", opt.DestinationName, "virtual_size", vsize,
		"delta", opt.Delta, "prezeroed", opt.Prezeroed, "direct", disk.Direct()}
	if end < vsize {
		attrs = append(attrs, "destination_end", end)
	}
	log.Info("import started", attrs...)

	target := newAsyncTarget(disk)
	defer target.Close()
	sink = NewSink(target, SinkOptions{Size: vsize, End: end, Delta: opt.Delta, KnownZeroFrom: min(knownZeroFrom, end)})
	var done uint64
	for {
		if err := ctx.Err(); err != nil {
			return fail(fmt.Errorf("interrupted: %w", context.Cause(ctx)))
		}
		ext, err := r.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return fail(err)
		}
		if err := apply(sink, ext); err != nil {
			var te *TailError
			if errors.As(err, &te) {
				return fail(keepWritten(sink, disk, te))
			}
			return fail(err)
		}
		done += ext.Length
		if opt.Progress != nil {
			opt.Progress(min(done, hdr.Size), hdr.Size)
		}
	}
	if done != hdr.Size {
		return fail(fmt.Errorf("the decoder covered %d of %d bytes", done, hdr.Size))
	}
	if err := sink.Finish(); err != nil {
		return fail(err)
	}
	if err := disk.Sync(); err != nil {
		return fail(err)
	}
	res := &Result{VirtualSize: vsize, Stats: sink.Stats, Elapsed: time.Since(start)}
	log.Info("import finished", append(attrs, "bytes_written", res.Stats.Written, "bytes_zeroed", res.Stats.Zeroed,
		"elapsed_ms", res.Elapsed.Milliseconds())...)
	return res, nil
}

// fitEnd returns where an image of vsize bytes (clusters of cs bytes) is
// written on a destination of size bytes: the virtual size when it fits; the destination's size when the image is larger by less
// than a cluster (an unaligned disk whose image was rounded up: the bytes
// past the end must then read as zeros); else a *SizeError, before any
// write.
func fitEnd(vsize, cs, size int64, dest, why string) (int64, error) {
	switch {
	case vsize <= size:
		return vsize, nil
	case vsize-size < cs:
		return size, nil
	}
	return 0, &SizeError{Destination: dest, VirtualSize: vsize, Size: size, Why: why}
}

// keepWritten makes what the stream carried before non-zero data past the
// destination's end reach the destination, and says so.
func keepWritten(s *Sink, disk *rawdisk.Disk, te *TailError) error {
	if err := s.Finish(); err != nil {
		return err
	}
	if err := disk.Sync(); err != nil {
		return err
	}
	return fmt.Errorf("%w: the stream's data before it was written, nothing after", te)
}

func apply(s *Sink, e qcow.Extent) error {
	if e.Offset > math.MaxInt64 || e.Length > math.MaxInt64 {
		return &BoundsError{Off: -1, Len: -1, Size: s.opt.Size}
	}
	off, n := int64(e.Offset), int64(e.Length)
	switch e.Kind {
	case qcow.ExtentData:
		if int64(len(e.Data)) != n {
			return fmt.Errorf("internal error: data extent at %d has %d bytes for a length of %d", off, len(e.Data), n)
		}
		return s.Data(off, e.Data)
	case qcow.ExtentZero:
		return s.Zero(off, n)
	case qcow.ExtentUnallocated:
		return s.Unallocated(off, n)
	}
	return fmt.Errorf("internal error: extent kind %d", e.Kind)
}

// streamBuffer is the buffer for the stream's small reads (the header,
// tables of small clusters). Reads of a cluster or more bypass it: data
// runs land in the sink's memory (see Run), and tables in the decoder's.
const streamBuffer = 64 << 10

// inputPipeSize is asked of F_SETPIPE_SZ for a pipe on our input, so that
// the sender can run up to a megabyte ahead of our reads while we write.
const inputPipeSize = 1 << 20

func openReader(ctx context.Context, opt Options, lend func(off uint64, n int) []byte) (*qcow.Reader, error) {
	ropts := qcow.ReaderOptions{MaxBuffered: opt.MaxBuffered, AllowBacking: opt.Delta}
	f := opt.Source
	if f == nil {
		return nil, errors.New("no source")
	}
	if st, err := f.Stat(); err == nil && st.Mode().IsRegular() {
		// A file: random access from where it stands (stdin redirected
		// from a file may have been read a little already).
		pos, err := f.Seek(0, io.SeekCurrent)
		if err == nil && pos <= st.Size() {
			size := st.Size() - pos
			return qcow.NewReaderAt(io.NewSectionReader(f, pos, size), size, ropts)
		}
	}
	rawdisk.GrowPipe(f, inputPipeSize)
	ropts.Lend = lend
	// A read blocked on a silent sender is not interrupted by a signal:
	// the command line ends the run after a grace period (wrapper).
	return qcow.NewReader(bufio.NewReaderSize(ctxReader{ctx, f}, streamBuffer), ropts)
}

// ctxReader stops reading once the context is cancelled (SIGTERM).
type ctxReader struct {
	ctx context.Context
	r   io.Reader
}

func (c ctxReader) Read(p []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, fmt.Errorf("interrupted: %w", context.Cause(c.ctx))
	}
	n, err := c.r.Read(p)
	if err != nil && c.ctx.Err() != nil {
		return n, fmt.Errorf("interrupted: %w", context.Cause(c.ctx))
	}
	return n, err
}

func openDestination(opt Options) (*rawdisk.Disk, error) {
	if opt.Destination != nil {
		return rawdisk.FromFileWith(opt.Destination, opt.DestinationName, opt.Disk)
	}
	if opt.DestinationPath == "" {
		return nil, errors.New("no destination")
	}
	return rawdisk.OpenFileWith(opt.DestinationPath, 0o644, opt.Disk)
}

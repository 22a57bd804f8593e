// Package importer writes a decoded qcow2 image to a raw disk: the sink
// turns the decoder's extents (data, zeros, unallocated) into large
// writes and cheap zeroing, and Run drives a whole import — opening the
// source and destination, validating everything before the first write,
// and fsync before success. It is shared by `serve` and `stream_decode`.
package importer

import (
	"bytes"
	"fmt"
	"slices"

	"github.com/xapi-project/xapi-qcow-tool/vhdcompat/rawdisk"
)

// Target is where a sink writes; *rawdisk.Disk is one.
type Target interface {
	// WriteAtAnyAlignment writes all of p at off (see rawdisk).
	WriteAtAnyAlignment(p []byte, off int64) error
	// Zero makes [off, off+n) read as zeros.
	Zero(off, n int64) error
	Direct() bool
}

var _ Target = (*rawdisk.Disk)(nil)

// Writebacker is a Target whose written ranges can be written back to the
// device by range. Through the page cache a device error otherwise
// surfaces only at the final fsync, without the offset it happened at.
type Writebacker interface {
	StartWriteback(off, n int64) error
	WaitWriteback(off, n int64) error
}

var _ Writebacker = (*rawdisk.Disk)(nil)

// checkpointBytes is how much is written between write-back checkpoints:
// small enough to place an I/O error within a few tens of MiB and to bound
// dirty memory, large enough that waiting is rare.
const checkpointBytes = 32 << 20

const (
	// DefaultMaxWrite is the largest write the sink coalesces extents into.
	DefaultMaxWrite = 4 << 20
	// block is the granularity of all-zero detection: a file system block
	// and the O_DIRECT alignment.
	block = rawdisk.Alignment
	// smallZero is the length below which a range that must be zeroed is
	// written as zeros with its neighbours rather than zeroed on its own:
	// one large write beats a write, a hole punch and another write.
	smallZero = 64 << 10
)

// SinkOptions say what the destination already holds and what to do with
// clusters the image does not allocate.
type SinkOptions struct {
	// Size bounds every extent: [0, Size) (the image's virtual size).
	Size int64
	// End, when non-zero and below Size, is where the destination ends:
	// an image whose virtual size was rounded up past an unaligned disk
	// (Xen Orchestra rounds to 64 KiB). Nothing is written at or past End;
	// data there must be all zeros (a *TailError otherwise), zero and
	// unallocated ranges there are dropped.
	End int64
	// Delta leaves what the image does not allocate untouched (applying a
	// diff on top of a copy of its base). Zero-flag clusters are still
	// zeroed.
	Delta bool
	// KnownZeroFrom is where the destination starts to read as zeros
	// already (a regular file extended from that size by this import):
	// zeros there are neither written nor punched. Size or more for none.
	KnownZeroFrom int64
	// MaxWrite bounds a coalesced write; 0 means DefaultMaxWrite.
	MaxWrite int
}

// Stats counts what a sink did, in bytes.
type Stats struct {
	Written int64 // bytes written (data, and zeros written with it)
	Zeroed  int64 // bytes zeroed by Target.Zero
	Skipped int64 // zeros neither written nor zeroed: already zero, or untouched in delta mode
	Writes  int64 // number of write calls
}

// Sink writes extents to a Target. Extents may come in any order, but
// must not overlap (the decoder covers each byte once): writes are
// coalesced only when an extent starts where the pending one ends.
type Sink struct {
	t   Target
	opt SinkOptions

	// buf holds pending bytes for the disk range [pend, end). buf[0]
	// stands for bufStart, pend rounded down to the block size, so that
	// the buffer's alignment in memory matches the disk's (O_DIRECT).
	buf      []byte
	bufStart int64
	pend     int64
	end      int64

	Stats Stats

	// Write-back checkpoints (buffered targets only): cur is the range
	// written since the last checkpoint, prev the range whose write-back
	// was started at the last checkpoint and is waited for at the next, so
	// the device works on one range while the next is being written.
	wb        Writebacker
	cur, prev span
	curBytes  int64

	// With an asyncTarget, the pool of buffers (see Flush).
	async *asyncTarget
	free  chan []byte

	// lent is the pending room handed out by Lend, until the next call.
	lent    []byte
	lentOff int64
}

// span is a range [lo, hi) of the destination; empty when hi <= lo.
type span struct{ lo, hi int64 }

func (r *span) add(off, n int64) {
	if r.hi <= r.lo {
		r.lo, r.hi = off, off+n
		return
	}
	r.lo, r.hi = min(r.lo, off), max(r.hi, off+n)
}

// NewSink returns a sink writing to t.
func NewSink(t Target, opt SinkOptions) *Sink {
	if opt.MaxWrite <= 0 {
		opt.MaxWrite = DefaultMaxWrite
	}
	opt.MaxWrite = (opt.MaxWrite + block - 1) &^ (block - 1)
	if opt.KnownZeroFrom < 0 {
		opt.KnownZeroFrom = 0
	}
	if opt.End <= 0 || opt.End > opt.Size {
		opt.End = opt.Size
	}
	s := &Sink{t: t, opt: opt, pend: -1, end: -1}
	if a, ok := t.(*asyncTarget); ok {
		// Buffers handed to the target are in use until written: keep a
		// pool and fill one while the others are written.
		s.async, s.free = a, newBufferPool(asyncBuffers, opt.MaxWrite+block)
		s.buf = <-s.free
	} else {
		s.buf = rawdisk.AlignedBuffer(opt.MaxWrite + block)
	}
	if wb, ok := t.(Writebacker); ok && !t.Direct() {
		s.wb = wb
	}
	return s
}

// checkpoint waits for the write-back started at the previous checkpoint
// and starts the write-back of what was written since.
func (s *Sink) checkpoint() error {
	if s.wb == nil {
		return nil
	}
	if s.prev.hi > s.prev.lo {
		if err := s.wb.WaitWriteback(s.prev.lo, s.prev.hi-s.prev.lo); err != nil {
			return err
		}
	}
	s.prev, s.cur, s.curBytes = s.cur, span{}, 0
	if s.prev.hi > s.prev.lo {
		return s.wb.StartWriteback(s.prev.lo, s.prev.hi-s.prev.lo)
	}
	return nil
}

// Finish flushes the pending write and waits for every range written so
// far to reach the device, so that an I/O error names its range. The
// caller still fsyncs (device caches, metadata).
func (s *Sink) Finish() error {
	if err := s.Flush(); err != nil {
		return err
	}
	if err := s.checkpoint(); err != nil {
		return err
	}
	if err := s.checkpoint(); err != nil {
		return err
	}
	if s.async != nil {
		return s.async.Wait()
	}
	return nil
}

// BoundsError is an extent outside [0, Size).
type BoundsError struct {
	Off, Len, Size int64
}

func (e *BoundsError) Error() string {
	return fmt.Sprintf("extent of %d bytes at offset %d lies outside the destination's %d bytes", e.Len, e.Off, e.Size)
}

func (s *Sink) check(off, n int64) error {
	if off < 0 || n < 0 || off > s.opt.Size || n > s.opt.Size-off {
		return &BoundsError{Off: off, Len: n, Size: s.opt.Size}
	}
	return nil
}

func (s *Sink) knownZero(off int64) bool { return off >= s.opt.KnownZeroFrom }

// TailError is non-zero data past the destination's end, in an image
// whose virtual size exceeds the destination by less than a cluster.
type TailError struct {
	Off int64 // guest offset of the first non-zero byte past the end
	End int64 // the destination's size
}

func (e *TailError) Error() string {
	return fmt.Sprintf("non-zero data at guest offset %d, past the destination's end (%d bytes; an image larger by less than a cluster imports only while the excess reads as zeros)", e.Off, e.End)
}

// clip returns how much of [off, off+n) lies before the destination's end
// (the caller checked the range is inside the image).
func (s *Sink) clip(off, n int64) int64 {
	if off >= s.opt.End {
		return 0
	}
	return min(n, s.opt.End-off)
}

// checkTail accepts data past the destination's end (tail, at off) only
// when it is all zeros.
func (s *Sink) checkTail(off int64, tail []byte) error {
	if i := slices.IndexFunc(tail, func(b byte) bool { return b != 0 }); i >= 0 {
		return &TailError{Off: off + int64(i), End: s.opt.End}
	}
	s.Stats.Skipped += int64(len(tail))
	return nil
}

// Lend lends the memory of the pending write that the n bytes of the
// disk at off would be copied into (or the first bytes of them: fewer
// when the write is nearly full): a caller that fills it and passes that
// memory to Data, as its next call, saves the copy. Any other next call
// takes the lent memory back. Nil when off is outside the disk.
func (s *Sink) Lend(off int64, n int) []byte {
	s.settle()
	if n <= 0 || s.check(off, 0) != nil || off >= s.opt.End {
		return nil
	}
	dst, err := s.room(off, min(int64(n), s.opt.End-off))
	if err != nil {
		return nil // the error is the target's: its next write reports it
	}
	s.lent, s.lentOff = dst, off
	return dst
}

// settle ends memory lent by Lend that Data did not use: the pending write
// ends where it did before.
func (s *Sink) settle() {
	if s.lent != nil {
		s.end -= int64(len(s.lent))
		s.lent = nil
	}
}

// Data writes p at off (all-zero blocks in it are skipped or zeroed
// instead of written, when the pending write is flushed).
func (s *Sink) Data(off int64, p []byte) error {
	if lent := s.lent; lent != nil && off == s.lentOff && len(p) > 0 && len(p) <= len(lent) && &p[0] == &lent[0] {
		// Filled in place: keep what was filled of the lent memory.
		s.lent = nil
		s.end -= int64(len(lent) - len(p))
		return nil
	}
	s.settle()
	if err := s.check(off, int64(len(p))); err != nil {
		return err
	}
	// Past the destination's end: the bytes before it are written first,
	// so that an error there leaves everything before it in place.
	keep := s.clip(off, int64(len(p)))
	tail, tailOff := p[keep:], off+keep
	p = p[:keep]
	for len(p) > 0 {
		dst, err := s.room(off, int64(len(p)))
		if err != nil {
			return err
		}
		n := copy(dst, p)
		off += int64(n)
		p = p[n:]
	}
	return s.checkTail(tailOff, tail)
}

// Zero makes [off, off+n) read as zeros (a zero-flag cluster).
func (s *Sink) Zero(off, n int64) error {
	s.settle()
	if err := s.check(off, n); err != nil {
		return err
	}
	return s.zero(off, s.clip(off, n), n)
}

// Unallocated handles [off, off+n) that the image does not allocate:
// zeroed, or left untouched in delta mode.
func (s *Sink) Unallocated(off, n int64) error {
	s.settle()
	if err := s.check(off, n); err != nil {
		return err
	}
	if s.opt.Delta {
		s.Stats.Skipped += n
		return nil
	}
	return s.zero(off, s.clip(off, n), n)
}

// zero makes [off, off+n) read as zeros, n the part before the
// destination's end of the whole bytes asked for (the rest is dropped).
func (s *Sink) zero(off, n, whole int64) error {
	s.Stats.Skipped += whole - n
	if n == 0 {
		return nil
	}
	if s.knownZero(off) {
		s.Stats.Skipped += n
		return nil
	}
	if n < smallZero && s.end == off {
		// Short and next to pending data: ride along with it (Flush
		// still zeroes it cheaply if the run of zeros grows long).
		for n > 0 {
			dst, err := s.room(off, n)
			if err != nil {
				return err
			}
			clear(dst)
			off += int64(len(dst))
			n -= int64(len(dst))
		}
		return nil
	}
	s.Stats.Zeroed += n
	return s.t.Zero(off, n)
}

// room returns buffer space for the disk range starting at off, at most n
// bytes, flushing the pending write when off does not continue it or the
// buffer is full.
func (s *Sink) room(off, n int64) ([]byte, error) {
	if s.end != off || s.end-s.bufStart >= int64(s.opt.MaxWrite) {
		if err := s.Flush(); err != nil {
			return nil, err
		}
		s.bufStart = off &^ (block - 1)
		s.pend, s.end = off, off
	}
	i := s.end - s.bufStart
	l := min(n, int64(s.opt.MaxWrite)-i)
	s.end += l
	return s.buf[i : i+l], nil
}

var zeroBlock [block]byte

// Flush writes the pending range. Runs of whole all-zero blocks in it are
// skipped where the destination already reads as zero, zeroed cheaply when
// long, and written with their neighbours when short.
func (s *Sink) Flush() error {
	s.settle()
	had := s.end > s.pend
	err := s.flush()
	if had && s.async != nil {
		// The writes just queued read s.buf: it goes back to the pool
		// once they are done, and filling goes on in another buffer.
		s.async.release(s.buf, s.free)
		s.buf = <-s.free
	}
	return err
}

func (s *Sink) flush() error {
	if s.end <= s.pend {
		s.pend, s.end = -1, -1
		return nil
	}
	pend, end := s.pend, s.end
	s.pend, s.end = -1, -1
	buf := func(a, b int64) []byte { return s.buf[a-s.bufStart : b-s.bufStart] }

	// Walk whole blocks; w is the start of what is still to be written.
	w := pend
	first := (pend + block - 1) &^ (block - 1)
	for b := first; b+block <= end; {
		if !bytes.Equal(buf(b, b+block), zeroBlock[:]) {
			b += block
			continue
		}
		z := b + block
		for z+block <= end && bytes.Equal(buf(z, z+block), zeroBlock[:]) {
			z += block
		}
		switch {
		case s.knownZero(b):
			if err := s.write(buf(w, b), w); err != nil {
				return err
			}
			s.Stats.Skipped += z - b
			w = z
		case z-b >= smallZero:
			if err := s.write(buf(w, b), w); err != nil {
				return err
			}
			if err := s.t.Zero(b, z-b); err != nil {
				return err
			}
			s.Stats.Zeroed += z - b
			w = z
		}
		b = z
	}
	return s.write(buf(w, end), w)
}

func (s *Sink) write(p []byte, off int64) error {
	if len(p) == 0 {
		return nil
	}
	if err := s.t.WriteAtAnyAlignment(p, off); err != nil {
		return err
	}
	s.Stats.Written += int64(len(p))
	s.Stats.Writes++
	s.cur.add(off, int64(len(p)))
	if s.curBytes += int64(len(p)); s.curBytes >= checkpointBytes {
		return s.checkpoint()
	}
	return nil
}

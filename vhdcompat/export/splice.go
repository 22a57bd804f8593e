package export

import (
	"errors"
	"fmt"
	"io"
	"os"
	"sync"

	"github.com/xapi-project/xapi-qcow-tool/qcow"
	"github.com/xapi-project/xapi-qcow-tool/qcow/bitmap"
	"github.com/xapi-project/xapi-qcow-tool/vhdcompat/rawdisk"
	"golang.org/x/sys/unix"
)

// The O_DIRECT data pass through the kernel. Reading a direct window into
// our memory and writing it to the output pipe costs a copy on our core
// that the reader of the pipe then repeats; splicing from the device into
// a pipe instead makes the kernel read each chunk with O_DIRECT straight
// into fresh pages that the pipe owns, and splicing that pipe into the
// output moves the pages without copying. Pages are never reused by us,
// so whatever holds them downstream (a socket waiting for an ACK) sees the
// bytes we read. Several lanes — a goroutine and a private pipe each —
// keep several direct reads in flight; the writer drains the lanes in
// turn, so the output stays in guest order. What this saves against a
// pass through memory is in docs/PERFORMANCE.md.

// spliceLanes is the number of direct reads in flight. Two already keep
// the device busy (as in the allocation pass); three measured no faster,
// with more wakeups.
const spliceLanes = 2

// piece is a run of the output's data area: n bytes of the source at off,
// or n zero bytes.
type piece struct {
	off, n int64
	zero   bool
	lane   *lane // the lane reading it, nil for zeros and bounce reads
}

// lane reads its chunks into its own pipe, one at a time, in the order
// the writer will drain them. It starts a chunk only once the writer has
// drained the previous one: splice holds the pipe's lock for the whole
// direct read, so a read into a pipe still being drained stalls the writer
// (see docs/PERFORMANCE.md).
type lane struct {
	r, w    int           // the pipe's ends
	jobs    chan piece    // chunks to read, in order
	done    chan error    // one result per chunk, in order
	drained chan struct{} // the writer emptied the pipe
}

// pieces yields the data area of the image, stored clusters in guest
// order, as source reads of at most chunk bytes and zero runs. Reads the
// kernel cannot do with O_DIRECT (not sector-aligned) come out with a nil
// lane for the writer to read itself.
func (e *exporter) pieces(data *bitmap.Bitmap, chunk int64) func() (piece, bool) {
	next := e.stored(data, int64(window))
	var queue []piece
	return func() (piece, bool) {
		for len(queue) == 0 {
			s, ok := next()
			if !ok {
				return piece{}, false
			}
			pos, end := s.off, s.off+s.n
			for _, x := range overlapping(e.srcExt, s.off, end) {
				a, b := max(x.Start, s.off), min(x.End, end)
				if a > pos {
					queue = append(queue, piece{off: pos, n: a - pos, zero: true})
				}
				for ; a < b; a += chunk {
					queue = append(queue, piece{off: a, n: min(chunk, b-a)})
				}
				pos = b
			}
			if pos < end {
				queue = append(queue, piece{off: pos, n: end - pos, zero: true})
			}
		}
		p := queue[0]
		queue = queue[1:]
		return p, true
	}
}

// newLanes makes the lanes' pipes; ok is false when a pipe cannot be
// made or grown to a useful size (the caller copies through memory).
func newLanes(n int) (lanes []*lane, chunk int64, err error) {
	chunk = pipeSize
	for range n {
		var p [2]int
		if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
			closeLanes(lanes)
			return nil, 0, err
		}
		l := &lane{r: p[0], w: p[1], jobs: make(chan piece, 4), done: make(chan error, 4), drained: make(chan struct{}, 1)}
		lanes = append(lanes, l)
		got, err := unix.FcntlInt(uintptr(p[1]), unix.F_SETPIPE_SZ, pipeSize)
		if err != nil {
			got, err = unix.FcntlInt(uintptr(p[1]), unix.F_GETPIPE_SZ, 0)
		}
		if err != nil {
			closeLanes(lanes)
			return nil, 0, err
		}
		chunk = min(chunk, int64(got))
	}
	return lanes, chunk, nil
}

func closeLanes(lanes []*lane) {
	for _, l := range lanes {
		unix.Close(l.r)
		unix.Close(l.w)
	}
}

// spliceable reports whether the kernel splices into out: a pipe, a
// socket, or a regular file not opened for appending.
func spliceable(out *os.File) bool {
	var st unix.Stat_t
	if unix.Fstat(int(out.Fd()), &st) != nil {
		return false
	}
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFIFO, unix.S_IFSOCK:
		return true
	case unix.S_IFREG:
		fl, err := unix.FcntlInt(out.Fd(), unix.F_GETFL, 0)
		return err == nil && fl&unix.O_APPEND == 0
	}
	return false
}

// probeSplice reports whether the kernel splices from the source: it
// reads the first sector into a lane's pipe and drains it again.
func probeSplice(srcFd int, l *lane, sector int64) bool {
	off := int64(0)
	n, err := unix.Splice(srcFd, &off, l.w, nil, int(sector), 0)
	if err != nil || n <= 0 {
		return false
	}
	buf := make([]byte, n)
	for got := 0; got < len(buf); {
		k, err := unix.Read(l.r, buf[got:])
		if err != nil || k <= 0 {
			return false
		}
		got += k
	}
	return true
}

// errNoSplice reports that the kernel refused the first splice: nothing
// was written, the caller may take another path.
var errNoSplice = errors.New("splice not supported between these files")

// copySpliced is the data pass of an O_DIRECT source to an output file
// (pipe, socket or regular file) through the lanes. It returns
// errNoSplice, having written nothing, when the kernel cannot splice from
// the source or into the output.
func (e *exporter) copySpliced(w *qcow.Writer, out *os.File, data *bitmap.Bitmap) error {
	lanes, chunk, err := newLanes(spliceLanes)
	if err != nil {
		return errNoSplice
	}
	sector := int64(rawdisk.Alignment)
	chunk &^= sector - 1
	if chunk < sector {
		closeLanes(lanes)
		return errNoSplice
	}
	src := e.opt.Source
	srcFd := int(src.File().Fd())
	if !spliceable(out) || !probeSplice(srcFd, lanes[0], sector) {
		closeLanes(lanes)
		return errNoSplice
	}

	// The dispatcher walks the pieces ahead of the writer: a source piece
	// goes to the next lane, and every piece to the writer, in order.
	order := make(chan piece, 4*spliceLanes)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		defer close(order)
		next := e.pieces(data, chunk)
		i := 0
		for p, ok := next(); ok; p, ok = next() {
			if !p.zero && p.off%sector == 0 && p.n%sector == 0 {
				p.lane = lanes[i%len(lanes)]
				i++
				select {
				case p.lane.jobs <- p:
				case <-stop:
					return
				}
			}
			select {
			case order <- p:
			case <-stop:
				return
			}
		}
	}()
	for _, l := range lanes {
		wg.Add(1)
		go func(l *lane) {
			defer wg.Done()
			for first := true; ; first = false {
				var p piece
				select {
				case p = <-l.jobs:
				case <-stop:
					return
				}
				if !first {
					select {
					case <-l.drained:
					case <-stop:
						return
					}
				}
				err := spliceIn(srcFd, l.w, p.off, p.n)
				if err != nil {
					err = sourceSpliceError(src, p.off, err)
				}
				select {
				case l.done <- err:
				case <-stop:
					return
				}
				if err != nil {
					return
				}
			}
		}(l)
	}

	err = e.drain(w, out, order)
	close(stop)
	// A lane blocked in splice on a full pipe wakes with EPIPE once the
	// read ends are closed; one blocked on a direct read finishes it.
	for _, l := range lanes {
		unix.Close(l.r)
	}
	wg.Wait()
	for _, l := range lanes {
		unix.Close(l.w)
	}
	return err
}

// drain writes the pieces to out in order: source pieces from their lane's
// pipe, zeros and unaligned pieces through memory.
func (e *exporter) drain(w *qcow.Writer, out *os.File, order <-chan piece) error {
	outFd := int(out.Fd())
	var buf []byte
	for p := range order {
		if err := e.ctx.Err(); err != nil {
			return err
		}
		switch {
		case p.zero:
			if err := writeZeros(out, p.n); err != nil {
				return err
			}
		case p.lane == nil:
			if buf == nil {
				buf = rawdisk.AlignedBuffer(window)
			}
			if err := e.copyThrough(out, buf, p.off, p.n); err != nil {
				return err
			}
		default:
			if err := <-p.lane.done; err != nil {
				return err
			}
			if err := spliceOut(p.lane.r, outFd, p.n); err != nil {
				return err
			}
			p.lane.drained <- struct{}{} // never blocks: one chunk per lane is out at a time
		}
		if err := w.Account(uint64(p.n)); err != nil {
			return err
		}
		e.progress(uint64(p.n))
	}
	return nil
}

// copyThrough copies n bytes of the source at off to out through buf,
// widening O_DIRECT reads to the alignment.
func (e *exporter) copyThrough(out io.Writer, buf []byte, off, n int64) error {
	for n > 0 {
		k := min(n, int64(len(buf)))
		if err := readMasked(e.opt.Source, e.srcExt, buf[:k], off); err != nil {
			return err
		}
		if _, err := out.Write(buf[:k]); err != nil {
			return outputError(err)
		}
		off += k
		n -= k
	}
	return nil
}

func writeZeros(out io.Writer, n int64) error {
	for n > 0 {
		k := min(n, int64(len(zeroWindow)))
		if _, err := out.Write(zeroWindow[:k]); err != nil {
			return outputError(err)
		}
		n -= k
	}
	return nil
}

// spliceIn reads n bytes of the source at off into a lane's pipe. The pipe
// holds a whole chunk, so this waits only for the writer to drain the
// previous one.
func spliceIn(srcFd, pipeW int, off, n int64) error {
	for n > 0 {
		k, err := unix.Splice(srcFd, &off, pipeW, nil, int(n), unix.SPLICE_F_MOVE)
		switch {
		case err == unix.EINTR:
			continue
		case err != nil:
			return err
		case k == 0:
			return io.ErrUnexpectedEOF
		}
		n -= k
	}
	return nil
}

func sourceSpliceError(src *rawdisk.Disk, off int64, err error) error {
	if err == io.ErrUnexpectedEOF {
		return errShrank(src, off)
	}
	return &rawdisk.DiskError{Path: src.Path(), Op: fmt.Sprintf("read at offset %d", off), Err: err}
}

// spliceOut moves n bytes from a lane's pipe to the output.
func spliceOut(pipeR, outFd int, n int64) error {
	for n > 0 {
		k, err := unix.Splice(pipeR, nil, outFd, nil, int(n), unix.SPLICE_F_MOVE|unix.SPLICE_F_MORE)
		switch {
		case err == unix.EINTR:
			continue
		case err == unix.EAGAIN:
			if err := waitWritable(outFd); err != nil {
				return &OutputError{err}
			}
			continue
		case err != nil:
			return &OutputError{err}
		case k == 0:
			return &OutputError{io.ErrShortWrite}
		}
		n -= k
	}
	return nil
}

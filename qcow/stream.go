package qcow

import (
	"container/heap"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// run is a pending reference to n consecutive host clusters mapped to n
// consecutive guest clusters (n is 1 when mask is partial).
type run struct {
	host, g, n uint64
	mask       uint32
}

type runHeap []run

func (h runHeap) Len() int           { return len(h) }
func (h runHeap) Less(i, j int) bool { return h[i].host < h[j].host }
func (h runHeap) Swap(i, j int)      { h[i], h[j] = h[j], h[i] }
func (h *runHeap) Push(x any)        { *h = append(*h, x.(run)) }
func (h *runHeap) Pop() any {
	old := *h
	x := old[len(old)-1]
	*h = old[:len(old)-1]
	return x
}

type streamState struct {
	d   *decoder
	r   io.Reader
	pos uint64 // stream offset of the next byte to read
	eof bool

	maxBuf, buffered int64
	maxPending       int
	buffer           map[uint64][]byte // clusters nothing mapped yet, by host offset
	allL2Known       bool

	l1Tab  []byte // the L1 cluster being walked
	l1At   uint64
	l1I    uint64 // next L1 entry index
	l1N    uint64 // end of the entries in l1Tab
	l1Seen uint64 // L1 entries read so far

	l2Pending runHeap // L2 tables not yet read: host, g = L1 index
	l2Work    []run   // L2 tables found in the buffer, to walk
	l2        *l2cursor
	runs      runHeap // pending data clusters
	open      run     // the run being extended (n == 0: none)
	comps     compHeap
	active    []*compWant

	q   queue
	acc accumulator

	rbuf  []byte                         // data read buffer (grown by readData)
	lend  func(off uint64, n int) []byte // ReaderOptions.Lend
	l2buf []byte                         // L2 table read buffer
	l1buf []byte                         // L1 cluster read buffer
}

func newStream(d *decoder, r io.Reader, opts ReaderOptions) *streamState {
	s := &streamState{d: d, r: r, pos: d.cs, maxBuf: opts.MaxBuffered, buffer: map[uint64][]byte{}, lend: opts.Lend}
	if s.maxBuf <= 0 {
		s.maxBuf = DefaultMaxBuffered
	}
	s.maxPending = int(max(s.maxBuf/128, minPending))
	if d.l1Need == 0 {
		s.l1Seen = uint64(d.h.L1Size)
	}
	return s
}

func (s *streamState) pending() int {
	return len(s.l2Pending) + len(s.runs) + len(s.comps) + len(s.active) + len(s.l2Work)
}

func (s *streamState) checkPending() error {
	if s.pending() > s.maxPending {
		return s.d.wrapf(ErrNeedRandomAccess, s.pos, "more than %d references to clusters not yet seen; "+needRandomAccess, s.maxPending)
	}
	return nil
}

func (s *streamState) l1Done() bool { return s.l1Seen >= s.d.l1Need && s.l1Tab == nil }

func (s *streamState) l2Known() bool {
	return s.l1Done() && len(s.l2Pending) == 0 && len(s.l2Work) == 0 && s.l2 == nil
}

func (s *streamState) step() (Extent, error) {
	d := s.d
	for {
		if !s.q.empty() {
			it := s.q.pop()
			if !it.comp {
				return it.ext, nil
			}
			s.buffered -= it.charged
			return d.compressedExtent(it.coff, it.g, it.src)
		}
		if s.l2 != nil {
			if err := s.stepL2(); err != nil {
				return Extent{}, err
			}
			continue
		}
		if len(s.l2Work) > 0 {
			w := s.l2Work[0]
			s.l2Work = s.l2Work[1:]
			tab := s.buffer[w.host]
			delete(s.buffer, w.host)
			s.buffered -= int64(len(tab))
			if uint64(len(tab)) < d.cs {
				return Extent{}, d.wrapf(io.ErrUnexpectedEOF, w.host, "stream ended inside the L2 table at %#x", w.host)
			}
			s.startL2(tab, w.host, w.g)
			continue
		}
		if s.l1Tab != nil {
			if err := s.stepL1(); err != nil {
				return Extent{}, err
			}
			continue
		}
		if !s.allL2Known && s.l2Known() {
			s.allL2Known = true
			s.buffer, s.buffered = nil, s.buffered-s.bufferBytes()
		}
		if s.acc.ext.Length > 0 {
			s.acc.flush(&s.q)
			continue
		}
		if s.allL2Known && len(s.runs) == 0 && s.open.n == 0 && len(s.comps) == 0 && len(s.active) == 0 {
			// Everything is out: drain the rest without holding it.
			if !s.eof {
				_, err := io.Copy(io.Discard, s.r)
				s.eof = true
				if fe := (*FormatError)(nil); errors.As(err, &fe) {
					return Extent{}, err // the snapshot table, after the data
				}
			}
			if err := s.snapshotsRead(); err != nil {
				return Extent{}, err
			}
			return Extent{}, io.EOF
		}
		if s.eof {
			return Extent{}, s.missing()
		}
		if err := s.advance(); err != nil {
			return Extent{}, err
		}
	}
}

func (s *streamState) bufferBytes() int64 {
	var n int64
	for _, b := range s.buffer {
		n += int64(len(b))
	}
	return n
}

// missing names the first thing the stream ended before.
func (s *streamState) missing() error {
	d := s.d
	what, off := "", uint64(1<<64-1)
	if !s.l1Done() {
		what, off = "the L1 table", d.h.L1TableOffset+s.l1Seen*8
	}
	if len(s.l2Pending) > 0 && s.l2Pending[0].host < off {
		off = s.l2Pending[0].host
		what = fmt.Sprintf("the L2 table for guest %#x", s.l2Pending[0].g*d.h.L2Entries()<<d.cb)
	}
	if r, ok := s.peekRun(); ok && r.host < off {
		off = r.host
		what = fmt.Sprintf("the data cluster for guest %#x", r.g<<d.cb)
	}
	if len(s.comps) > 0 && s.comps[0].off < off {
		off = s.comps[0].off
		what = fmt.Sprintf("the compressed cluster for guest %#x", s.comps[0].g<<d.cb)
	}
	if what == "" {
		what, off = "the end of the image", s.pos
	}
	return d.wrapf(io.ErrUnexpectedEOF, s.pos, "stream ended before %s at %#x", what, off)
}

// peekRun returns the pending data run with the lowest host offset.
func (s *streamState) peekRun() (run, bool) {
	if len(s.runs) > 0 && (s.open.n == 0 || s.runs[0].host < s.open.host) {
		return s.runs[0], true
	}
	return s.open, s.open.n > 0
}

// takeRun removes k clusters from the head of the pending run with the
// lowest host offset.
func (s *streamState) takeRun(k uint64) {
	if s.open.n > 0 && (len(s.runs) == 0 || s.open.host < s.runs[0].host) {
		s.open.host += k << s.d.cb
		s.open.g += k
		s.open.n -= k
		return
	}
	r := &s.runs[0]
	r.host += k << s.d.cb
	r.g += k
	r.n -= k
	if r.n == 0 {
		heap.Pop(&s.runs)
	} else {
		heap.Fix(&s.runs, 0)
	}
}

// stepL1 handles one L1 entry of the current L1 cluster.
func (s *streamState) stepL1() error {
	d := s.d
	if s.l1I >= s.l1N {
		s.l1Tab = nil
		return nil
	}
	i := s.l1I
	s.l1I++
	at := s.l1At + (i%(d.cs/8))*8
	raw := binary.BigEndian.Uint64(s.l1Tab[(i%(d.cs/8))*8:])
	off, err := d.l1Entry(at, i, raw)
	if err != nil {
		return err
	}
	span := d.h.L2Entries() << d.cb
	if off == 0 {
		s.acc.add(&s.q, ExtentUnallocated, i*span, min(span, d.h.Size-i*span))
		return nil
	}
	w := run{host: off, g: i}
	if off < s.pos {
		if _, ok := s.buffer[off]; !ok {
			return d.errf(at, "can't read non-sequential clusters: the L2 table for guest %#x at %#x was already passed", i*span, off)
		}
		s.l2Work = append(s.l2Work, w)
		return nil
	}
	heap.Push(&s.l2Pending, w)
	return s.checkPending()
}

func (s *streamState) startL2(tab []byte, at, l1idx uint64) {
	s.l2 = s.d.newL2Cursor(tab, at, l1idx)
}

// stepL2 handles one entry of the L2 table being walked.
func (s *streamState) stepL2() error {
	d := s.d
	e, at, ok, err := d.nextL2(&s.l2)
	if !ok {
		return err
	}
	if e.compressed {
		return s.wantCompressed(at, &e)
	}
	d.subRuns(&e, func(kind ExtentKind, guest, _, length uint64) {
		if kind != ExtentData {
			s.acc.add(&s.q, kind, guest, length)
		}
	})
	if e.alloc == 0 {
		return nil
	}
	if e.host < s.pos {
		b, ok := s.buffer[e.host]
		if !ok {
			return d.errf(at, "can't read non-sequential clusters: the data for guest %#x at %#x was already passed", e.g<<d.cb, e.host)
		}
		if uint64(len(b)) < d.needBytes(e.g, e.alloc) {
			return d.wrapf(io.ErrUnexpectedEOF, at, "stream ended inside the data cluster for guest %#x at %#x", e.g<<d.cb, e.host)
		}
		delete(s.buffer, e.host)
		s.buffered -= int64(len(b))
		s.acc.flush(&s.q)
		s.emitData(b, e.host, e.g, e.alloc)
		return nil
	}
	if s.open.n > 0 && e.alloc == d.full && s.open.mask == d.full &&
		e.host == s.open.host+s.open.n<<d.cb && e.g == s.open.g+s.open.n {
		s.open.n++
		return nil
	}
	if s.open.n > 0 {
		heap.Push(&s.runs, s.open)
	}
	s.open = run{host: e.host, g: e.g, n: 1, mask: e.alloc}
	return s.checkPending()
}

// emitData queues the data extents of n clusters read at host for guest
// clusters from g, with allocation mask mask (n is 1 when it is partial).
func (s *streamState) emitData(b []byte, host, g uint64, mask uint32) {
	d := s.d
	if mask == d.full {
		off := g << d.cb
		length := min(uint64(len(b)), d.h.Size-off)
		s.q.push(item{ext: Extent{Kind: ExtentData, Offset: off, Length: length, Data: b[:length], HostOffset: host}})
		return
	}
	e := entry{g: g, alloc: mask}
	d.subRuns(&e, func(kind ExtentKind, guest, within, length uint64) {
		if kind == ExtentData {
			s.q.push(item{ext: Extent{Kind: ExtentData, Offset: guest, Length: length,
				Data: b[within : within+length], HostOffset: host + within}})
		}
	})
}

// read reads n bytes at the current position into buf. Short reads at the
// end of the stream set eof and return what there is.
func (s *streamState) read(buf []byte) ([]byte, error) {
	n, err := io.ReadFull(s.r, buf)
	s.pos += uint64(n)
	if err == io.EOF || err == io.ErrUnexpectedEOF {
		s.eof = true
		err = nil
	}
	if err != nil {
		return nil, s.readFailed(err)
	}
	return buf[:n], nil
}

// readData reads up to n bytes at the current position into s.rbuf, like
// read. The buffer grows only as the bytes arrive, so a run of clusters
// declared longer than the stream costs no more memory than the stream
// holds.
func (s *streamState) readData(n uint64) ([]byte, error) {
	have := uint64(0)
	for have < n && !s.eof {
		if have == uint64(len(s.rbuf)) {
			grown := make([]byte, min(n, max(2*have, s.d.cs)))
			copy(grown, s.rbuf[:have])
			s.rbuf = grown
		}
		b, err := s.read(s.rbuf[have:min(n, uint64(len(s.rbuf)))])
		if err != nil {
			return nil, err
		}
		have += uint64(len(b))
	}
	return s.rbuf[:have], nil
}

// lendBatch bounds a run read into the caller's memory (Lend): as
// large as the caller's writes, so that each becomes one read.
const lendBatch = 4 << 20

// readRun reads the first clusters of the data run r: k of them into the
// decoder's buffer or, for whole clusters when the caller lends memory
// (Lend), as many as fit there; lent says which. The queue and the
// accumulator are empty when advance runs, so the run's extent is the
// next one the caller receives, unless these bytes also finish compressed
// clusters (advance then takes the bytes back).
func (s *streamState) readRun(r run, k uint64) (b []byte, lent bool, err error) {
	d := s.d
	if s.lend == nil || r.mask != d.full {
		b, err = s.readData(k << d.cb)
		return b, false, err
	}
	want := min(r.n, max(uint64(lendBatch)>>d.cb, 1)) << d.cb
	if end := d.h.Size - r.g<<d.cb; want > end {
		want = end // the last cluster: only its guest part is lent
	}
	dst := s.lend(r.g<<d.cb, int(want))
	if uint64(len(dst)) >= want {
		dst = dst[:want]
	} else {
		dst = dst[:uint64(len(dst))&^(d.cs-1)] // whole clusters
	}
	if len(dst) == 0 {
		b, err = s.readData(k << d.cb)
		return b, false, err
	}
	b, err = s.read(dst)
	return b, true, err
}

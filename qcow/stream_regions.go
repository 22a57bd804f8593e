package qcow

import (
	"bytes"
	"container/heap"
	"encoding/binary"
	"io"
)

// advance reads the next piece of the stream. What lies at the current
// position decides how: each region of an image has its function below.
func (s *streamState) advance() error {
	d := s.d
	p := s.pos
	defer s.endEOF()
	switch {
	case !s.allL2Known && p >= d.h.RefcountTableOffset && p < d.rtEnd:
		return s.readRefcountTable(p)
	case d.h.L1Size > 0 && p >= d.h.L1TableOffset && p < d.l1End:
		return s.readL1(p)
	case len(s.l2Pending) > 0 && s.l2Pending[0].host == p:
		return s.readL2(p)
	}
	if r, ok := s.peekRun(); ok && r.host == p {
		return s.readDataRun(p, r)
	}
	return s.readUnmapped(p)
}

// readRefcountTable reads a cluster of the refcount table at p, to learn
// where the refcount blocks are.
func (s *streamState) readRefcountTable(p uint64) error {
	d := s.d
	b, err := s.readData(d.cs)
	if err != nil {
		return err
	}
	if _, err := s.feed(p, b); err != nil {
		return err
	}
	for i := 0; i+8 <= len(b); i += 8 {
		if err := d.markRefcountBlock(p+uint64(i), binary.BigEndian.Uint64(b[i:])); err != nil {
			return err
		}
		if off := binary.BigEndian.Uint64(b[i:]); off != 0 && off < p {
			if blk, ok := s.buffer[off]; ok {
				delete(s.buffer, off)
				s.buffered -= int64(len(blk))
			}
		}
	}
	return nil
}

// readL1 reads a cluster of the L1 table at p; step then walks its entries.
func (s *streamState) readL1(p uint64) error {
	d := s.d
	cs := d.cs
	if s.l1buf == nil {
		s.l1buf = make([]byte, cs)
	}
	b, err := s.read(s.l1buf)
	if err != nil {
		return err
	}
	first := (p - d.h.L1TableOffset) / 8
	if first < d.l1Need {
		// An image may end right after the entries it needs.
		end := min(first+cs/8, d.l1Need)
		if uint64(len(b)) < (end-first)*8 {
			return d.wrapf(io.ErrUnexpectedEOF, s.pos, "stream ended inside the L1 table")
		}
		s.l1Tab, s.l1At, s.l1I, s.l1N = b, p, first, end
	}
	s.l1Seen = first + cs/8
	return nil
}

// readL2 reads the pending L2 table at p; step then walks its entries.
func (s *streamState) readL2(p uint64) error {
	d := s.d
	w := heap.Pop(&s.l2Pending).(run)
	if s.l2buf == nil {
		s.l2buf = make([]byte, d.cs)
	}
	b, err := s.read(s.l2buf)
	if err != nil {
		return err
	}
	if uint64(len(b)) < d.cs {
		return d.wrapf(io.ErrUnexpectedEOF, s.pos, "stream ended inside the L2 table at %#x", p)
	}
	if _, err := s.feed(p, b); err != nil {
		return err
	}
	s.startL2(b, p, w.g)
	return nil
}

// readDataRun reads the first clusters of the pending data run r, which
// starts at p, and queues their extents.
func (s *streamState) readDataRun(p uint64, r run) error {
	d := s.d
	k := min(r.n, max(uint64(batchBytes)>>d.cb, 1))
	if r.mask != d.full {
		k = 1
	}
	b, lent, err := s.readRun(r, k)
	if err != nil {
		return err
	}
	if _, err := s.feed(p, b); err != nil {
		return err
	}
	if lent && !s.q.empty() {
		// Compressed clusters finished by these very bytes (a hostile
		// image: they overlap the run) come out first, and lent memory
		// serves the next extent only: keep the bytes ourselves.
		if uint64(cap(s.rbuf)) < uint64(len(b)) {
			s.rbuf = make([]byte, len(b))
		}
		b = s.rbuf[:copy(s.rbuf[:len(b)], b)]
	}
	got := uint64(len(b)) >> d.cb
	if rest := uint64(len(b)) - got<<d.cb; got < r.n && rest > 0 && rest >= d.needBytes(r.g+got, r.mask) {
		got++ // a partial last cluster is enough if it holds the guest part
	}
	if got == 0 {
		return d.wrapf(io.ErrUnexpectedEOF, s.pos, "stream ended inside the data cluster for guest %#x at %#x", r.g<<d.cb, p)
	}
	s.takeRun(got)
	s.emitData(b[:min(uint64(len(b)), got<<d.cb)], p, r.g, r.mask)
	return nil
}

// readUnmapped handles bytes at p that nothing maps (yet): once every
// table is known they are skipped up to the next thing wanted; before,
// a cluster of them is kept (up to MaxBuffered) in case a table read
// later maps it.
func (s *streamState) readUnmapped(p uint64) error {
	d := s.d
	if s.allL2Known && len(s.active) == 0 {
		next := uint64(1<<64 - 1)
		if r, ok := s.peekRun(); ok {
			next = r.host
		}
		if len(s.comps) > 0 {
			next = min(next, s.comps[0].off&^(d.cs-1))
		}
		if next > p {
			return s.skip(next - p)
		}
	}
	if len(s.l2Pending) > 0 && s.l2Pending[0].host < p {
		return d.errf(p, "internal error: L2 table at %#x passed", s.l2Pending[0].host)
	}
	b, err := s.readData(d.cs)
	if err != nil {
		return err
	}
	covered, err := s.feed(p, b)
	if err != nil {
		return err
	}
	c := p >> d.cb
	if !s.allL2Known && !covered && len(b) > 0 && !d.claimed.test(c) && !d.meta.test(c) && d.region(p) == "" {
		if err := s.charge(int64(len(b))); err != nil {
			return err
		}
		s.buffer[p] = bytes.Clone(b)
	}
	return nil
}

// skip reads and drops n bytes of the stream (fewer when it ends first).
func (s *streamState) skip(n uint64) error {
	got, err := io.CopyN(io.Discard, s.r, int64(min(n, 1<<62)))
	s.pos += uint64(got)
	if err == io.EOF {
		s.eof = true
		err = nil
	}
	if err != nil {
		return s.readFailed(err)
	}
	return nil
}

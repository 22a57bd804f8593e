package qcow

import (
	"container/heap"
)

// compWant is a compressed cluster whose bytes are being collected.
type compWant struct {
	g, off, length uint64
	at             uint64 // L2 entry offset, for errors
	// buf holds the bytes collected from off (have of them); it grows as
	// they arrive, as the length is only an upper bound declared by the
	// image. The full length is charged to MaxBuffered all the same.
	buf  []byte
	have uint64
}

type compHeap []*compWant

func (h compHeap) Len() int           { return len(h) }
func (h compHeap) Less(i, j int) bool { return h[i].off < h[j].off }
func (h compHeap) Swap(i, j int)      { h[i], h[j] = h[j], h[i] }
func (h *compHeap) Push(x any)        { *h = append(*h, x.(*compWant)) }
func (h *compHeap) Pop() any {
	old := *h
	x := old[len(old)-1]
	old[len(old)-1] = nil
	*h = old[:len(old)-1]
	return x
}

func (s *streamState) wantCompressed(at uint64, e *entry) error {
	d := s.d
	w := &compWant{g: e.g, off: e.coff, length: e.clen, at: at}
	if w.off >= s.pos {
		heap.Push(&s.comps, w)
		return s.checkPending()
	}
	// Some bytes were already passed: they must be in the buffer.
	if err := s.charge(int64(w.length) + compOverhead); err != nil {
		return err
	}
	for c := w.off &^ (d.cs - 1); c < s.pos && c < w.off+w.length; c += d.cs {
		b, ok := s.buffer[c]
		lo, hi := max(c, w.off), min(c+uint64(len(b)), w.off+w.length)
		if !ok || lo != w.off+w.have || lo >= hi {
			return d.errf(at, "can't read non-sequential clusters: the compressed data for guest %#x at %#x was already passed", e.g<<d.cb, w.off)
		}
		w.buf = append(w.buf, b[lo-c:hi-c]...)
		w.have = hi - w.off
	}
	if w.off+w.length <= s.pos || s.eof {
		s.finishComp(w)
		return nil
	}
	s.active = append(s.active, w)
	return s.checkPending()
}

func (s *streamState) finishComp(w *compWant) {
	s.acc.flush(&s.q)
	s.q.push(item{comp: true, g: w.g, src: w.buf, coff: w.off, clen: w.length, charged: int64(w.length) + compOverhead})
}

func (s *streamState) charge(n int64) error {
	s.buffered += n
	if s.buffered > s.maxBuf {
		return s.d.wrapf(ErrNeedRandomAccess, s.pos, "more than %d bytes arrive before the tables that map them; "+needRandomAccess, s.maxBuf)
	}
	return nil
}

// feed hands the bytes b read at host offset p to the compressed clusters
// they belong to. It reports whether those clusters cover all of b.
func (s *streamState) feed(p uint64, b []byte) (bool, error) {
	end := p + uint64(len(b))
	for len(s.comps) > 0 && s.comps[0].off < end {
		w := heap.Pop(&s.comps).(*compWant)
		if err := s.charge(int64(w.length) + compOverhead); err != nil {
			return false, err
		}
		s.active = append(s.active, w)
	}
	if len(s.active) == 0 {
		return false, nil
	}
	covered := p // how far from p the active clusters cover b, contiguously
	kept := s.active[:0]
	for _, w := range s.active {
		if w.off+w.have < p {
			return false, s.d.errf(p, "internal error: compressed data for guest %#x at %#x missed", w.g<<s.d.cb, w.off)
		}
		lo, hi := max(p, w.off+w.have), min(end, w.off+w.length) // lo is w.off+w.have
		if lo < hi {
			w.buf = append(w.buf, b[lo-p:hi-p]...)
			w.have = hi - w.off
		}
		if w.off <= covered && w.off+w.length > covered {
			covered = min(end, w.off+w.length)
		}
		if w.off+w.have >= w.off+w.length {
			s.finishComp(w)
		} else {
			kept = append(kept, w)
		}
	}
	clear(s.active[len(kept):])
	s.active = kept
	return covered >= end, nil
}

// endEOF finishes the compressed clusters still collecting bytes when the
// stream ends: their upper bound may run past the end of the image.
func (s *streamState) endEOF() {
	if !s.eof {
		return
	}
	for _, w := range s.active {
		s.finishComp(w)
	}
	s.active = nil
}

package inspect

import (
	"errors"
	"fmt"
	"io"

	"github.com/xapi-project/xapi-qcow-tool/qcow"
)

// streamBuffer bounds what the decoder may hold to reorder a stream.
const streamBuffer = 64 << 20

// walkStream reads a whole stream through the decoder and calls emit for
// every guest range in guest order, after begin with the header. The
// decoder yields stream order; guestOrder puts it back in guest order as
// it comes. An error from emit stops the walk and is returned.
func walkStream(r io.Reader, begin func(*qcow.Header), emit func(piece) error) error {
	d, err := qcow.NewReader(r, qcow.ReaderOptions{MaxBuffered: streamBuffer, AllowBacking: true})
	if err != nil {
		return err
	}
	h := d.Header()
	begin(h)
	g := &guestOrder{size: h.Size, emit: emit}
	for {
		x, err := d.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return err
		}
		p := piece{start: x.Offset, length: x.Length, kind: x.Kind, host: x.HostOffset, hasHost: x.HostOffset != 0, compressed: x.Compressed}
		if x.Kind == qcow.ExtentData {
			p.hasHost = !x.Compressed
		}
		if err := g.add(p); err != nil {
			return err
		}
	}
	return g.done()
}

// maxHeld bounds the pieces guestOrder holds: 2^19 of them, 16 MiB (32 MiB
// while the heap grows). A stream in the layout of this tool's export (all
// L2 tables, then the data) makes it hold about one piece per pending data
// run, which the decoder itself bounds lower (MaxBuffered/128); streams
// written as qemu-img writes files (each L2 table just before its data)
// make it hold one L2 table's worth.
const maxHeld = 1 << 19

// guestOrder hands pieces that arrive in stream order to emit in guest
// order. It emits every piece that continues what was emitted at once, and
// holds the others (merged when they continue each other) until the range
// before them arrives.
type guestOrder struct {
	pos, size uint64 // everything before pos has been emitted
	held      pieceHeap
	tail      piece // the piece held last, still growing
	emit      func(piece) error
}

func (g *guestOrder) add(p piece) error {
	if p.length == 0 || p.start >= g.size {
		return nil
	}
	p.length = min(p.length, g.size-p.start)
	switch {
	case p.start < g.pos:
		return fmt.Errorf("stream describes guest offset %#x twice", p.start)
	case p.start == g.pos:
		if err := g.put(p); err != nil {
			return err
		}
		return g.drain()
	case g.tail.length > 0 && g.tail.continuedBy(p):
		g.tail.length += p.length
		return nil
	}
	if g.tail.length > 0 {
		g.held.push(g.tail)
	}
	g.tail = p
	if len(g.held) >= maxHeld {
		return fmt.Errorf("%w: this stream's order makes map hold more than %d ranges that arrive before the ranges in front of them (map the file instead)", qcow.ErrNeedRandomAccess, maxHeld)
	}
	return nil
}

func (g *guestOrder) put(p piece) error {
	g.pos = p.start + p.length
	return g.emit(p)
}

// drain emits the held pieces that now continue what was emitted.
func (g *guestOrder) drain() error {
	for {
		var p piece
		switch {
		case len(g.held) > 0 && g.held[0].start <= g.pos:
			p = g.held.pop()
		case g.tail.length > 0 && g.tail.start <= g.pos:
			p, g.tail = g.tail, piece{}
		default:
			return nil
		}
		if p.start < g.pos {
			return fmt.Errorf("stream describes guest offset %#x twice", p.start)
		}
		if err := g.put(p); err != nil {
			return err
		}
	}
}

// done emits what is left. The decoder covers the disk exactly once, so
// nothing should be; a range nothing described reads as unallocated.
func (g *guestOrder) done() error {
	if g.tail.length > 0 {
		g.held.push(g.tail)
		g.tail = piece{}
	}
	for {
		if err := g.drain(); err != nil {
			return err
		}
		next := g.size
		if len(g.held) > 0 {
			next = g.held[0].start
		}
		if g.pos >= next {
			return nil
		}
		if err := g.put(piece{start: g.pos, length: next - g.pos, kind: qcow.ExtentUnallocated}); err != nil {
			return err
		}
	}
}

// pieceHeap is a min-heap of pieces by guest start (container/heap would
// box every piece).
type pieceHeap []piece

func (h *pieceHeap) push(p piece) {
	*h = append(*h, p)
	a := *h
	for i := len(a) - 1; i > 0; {
		parent := (i - 1) / 2
		if a[parent].start <= a[i].start {
			break
		}
		a[parent], a[i] = a[i], a[parent]
		i = parent
	}
}

func (h *pieceHeap) pop() piece {
	a := *h
	top := a[0]
	n := len(a) - 1
	a[0] = a[n]
	a = a[:n]
	for i := 0; ; {
		least, l, r := i, 2*i+1, 2*i+2
		if l < n && a[l].start < a[least].start {
			least = l
		}
		if r < n && a[r].start < a[least].start {
			least = r
		}
		if least == i {
			break
		}
		a[i], a[least] = a[least], a[i]
		i = least
	}
	if n == 0 && cap(a) > 1<<12 {
		a = nil // let a heap grown by a badly ordered stretch go
	}
	*h = a
	return top
}

// MapStream calls emit with each entry of the allocation map of the image
// streamed from r, in guest order, merged as qemu-img map merges them. The
// host offsets are those of the stream, as they would be in a file of it.
// An error from emit stops the walk and is returned.
func MapStream(r io.Reader, emit func(MapEntry) error) error {
	m := &mapper{m: MapMerger{Emit: emit}}
	err := walkStream(r, func(h *qcow.Header) { m.backing = h.BackingFile != "" }, m.add)
	if err != nil {
		return err
	}
	return m.m.Flush()
}

// InfoStream describes the image streamed from r, reading all of it.
func InfoStream(r io.Reader) (*Info, error) {
	var in *Info
	var c *allocCounter
	err := walkStream(r, func(h *qcow.Header) {
		in = infoFromHeader(h)
		c = &allocCounter{cs: h.ClusterSize()}
	}, func(p piece) error { c.add(p); return nil })
	if err != nil {
		return nil, err
	}
	in.Allocation = c.done()
	return in, nil
}

// CheckStream checks what one pass over a stream can: the decoder refuses
// references out of range, unaligned, into metadata or claimed twice, and
// tables or data missing from the stream. Refcounts cannot be compared
// without random access. An error is returned when the header cannot be
// read, the stream ends early or cannot be read (nothing conclusive could
// be checked); faults of the image are in the result.
func CheckStream(r io.Reader) (*CheckResult, error) {
	d, err := qcow.NewReader(r, qcow.ReaderOptions{MaxBuffered: streamBuffer, AllowBacking: true})
	if err != nil {
		return nil, err
	}
	h := d.Header()
	res := &CheckResult{Format: "qcow2", Errors: []string{}, Stream: true, TotalClusters: h.VirtualClusters()}
	cs := h.ClusterSize()
	var end uint64
	for {
		x, err := d.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			var fe *qcow.FormatError
			switch {
			case errors.Is(err, io.ErrUnexpectedEOF):
				return nil, err
			case errors.Is(err, qcow.ErrNeedRandomAccess):
				res.failed("%v", err)
			case errors.As(err, &fe):
				res.corrupt("%v", err)
			default:
				return nil, err
			}
			break
		}
		if x.Kind != qcow.ExtentData {
			continue
		}
		n := (x.Length + cs - 1) / cs
		res.AllocatedClusters += n
		if x.Compressed {
			res.CompressedClusters += n
		} else if e := x.HostOffset + n*cs; e > end {
			end = e
		}
	}
	res.ImageEndOffset = end
	return res, nil
}

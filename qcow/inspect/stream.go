package inspect

import (
	"errors"
	"fmt"
	"io"
	"sort"

	"github.com/xapi-project/xapi-qcow-tool/qcow"
)

// streamBuffer bounds what the decoder may hold to reorder a stream.
const streamBuffer = 64 << 20

// walkStream reads a whole stream through the decoder and calls emit for
// every guest range in guest order. The decoder yields stream order, so the
// pieces are collected (without their data) and sorted; gaps are
// unallocated.
func walkStream(r io.Reader, emit func(piece)) (*qcow.Header, error) {
	d, err := qcow.NewReader(r, qcow.ReaderOptions{MaxBuffered: streamBuffer, AllowBacking: true})
	if err != nil {
		return nil, err
	}
	h := d.Header()
	var ps []piece
	for {
		x, err := d.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return h, err
		}
		p := piece{start: x.Offset, length: x.Length, kind: x.Kind, host: x.HostOffset, hasHost: x.HostOffset != 0, compressed: x.Compressed}
		if x.Kind == qcow.ExtentData {
			p.hasHost = !x.Compressed
		}
		if p.kind == qcow.ExtentUnallocated && !p.hasHost {
			continue // gaps are filled below
		}
		if ps = appendMerged(ps, p); len(ps) > maxRuns {
			return h, errTooManyRuns
		}
	}
	sort.Slice(ps, func(i, j int) bool { return ps[i].start < ps[j].start })
	var pos uint64
	for _, p := range ps {
		if p.start < pos {
			return h, fmt.Errorf("stream describes guest offset %#x twice", p.start)
		}
		if p.start > pos {
			emit(piece{start: pos, length: p.start - pos, kind: qcow.ExtentUnallocated})
		}
		if p.start+p.length > h.Size {
			if p.start >= h.Size {
				continue
			}
			p.length = h.Size - p.start
		}
		emit(p)
		pos = p.start + p.length
	}
	if pos < h.Size {
		emit(piece{start: pos, length: h.Size - pos, kind: qcow.ExtentUnallocated})
	}
	return h, nil
}

// MapStream returns the allocation map of the image streamed from r. The
// host offsets are those of the stream, as they would be in a file of it.
func MapStream(r io.Reader) ([]MapEntry, error) {
	m := &mapper{}
	var ps []piece
	h, err := walkStream(r, func(p piece) { ps = append(ps, p) })
	if err != nil {
		return nil, err
	}
	m.backing = h.BackingFile != ""
	for _, p := range ps {
		m.add(p)
	}
	return m.out, m.err
}

// InfoStream describes the image streamed from r, reading all of it.
func InfoStream(r io.Reader) (*Info, error) {
	var c *allocCounter
	var ps []piece
	h, err := walkStream(r, func(p piece) { ps = append(ps, p) })
	if err != nil {
		return nil, err
	}
	in := infoFromHeader(h)
	c = &allocCounter{cs: h.ClusterSize()}
	for _, p := range ps {
		c.add(p)
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

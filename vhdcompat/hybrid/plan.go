package hybrid

import (
	"fmt"

	"github.com/xapi-project/xapi-qcow-tool/qcow/bitmap"
	"github.com/xapi-project/xapi-qcow-tool/vhdcompat/hints"
)

// Plan is what an export reads, in whole output clusters.
type Plan struct {
	// Source is where the source chain may hold data: every cluster with a
	// byte some layer stores and no layer above it covers. Outside it the
	// device reads as zeros and is never read.
	Source hints.Extents
	// Base is the same for the base chain (with a base).
	Base hints.Extents
	// Compare, with a base whose chain shares images with the source's, is
	// the clusters either chain writes (data or zeros) above the images
	// they share, and the source's beyond the base's end: only these may
	// differ. nil when the chains share nothing: then every cluster either
	// chain holds may.
	Compare hints.Extents
	// Shared is the number of images the chains share.
	Shared int
}

// NewPlan maps the allocation of the source chain (and of the base chain,
// when base is not nil) onto clusters of 1<<clusterBits bytes of disks of
// size and baseSize bytes. Memory is a few bits per cluster.
func NewPlan(src, base *Chain, clusterBits uint32, size, baseSize int64) (*Plan, error) {
	p := &Plan{}
	var err error
	if p.Source, err = src.extents(src.Layers, clusterBits, size, false); err != nil {
		return nil, err
	}
	if base == nil {
		return p, nil
	}
	if p.Base, err = base.extents(base.Layers, clusterBits, baseSize, false); err != nil {
		return nil, err
	}
	i, j, ok := commonAncestor(src, base)
	if !ok {
		return p, nil
	}
	p.Shared = len(src.Layers) - i
	span := max(size, baseSize)
	a, err := src.extents(src.Layers[:i], clusterBits, span, true)
	if err != nil {
		return nil, err
	}
	b, err := base.extents(base.Layers[:j], clusterBits, span, true)
	if err != nil {
		return nil, err
	}
	p.Compare = hints.Union(a, b, span)
	if size > baseSize {
		// A disk grown since the base: what the base does not reach
		// differs wherever the source holds data.
		from := baseSize >> clusterBits << clusterBits
		_, tail := p.Source.Split(hints.Extents{{Start: 0, End: from}})
		p.Compare = hints.Union(p.Compare, tail, span)
	}
	return p, nil
}

// commonAncestor finds the first image of src that is also in base: from
// there down the chains are the same files.
func commonAncestor(src, base *Chain) (int, int, bool) {
	for i, a := range src.Layers {
		for j, b := range base.Layers {
			if sameFile(a.f, b.f) {
				return i, j, true
			}
		}
	}
	return 0, 0, false
}

// extents returns the clusters of [0, size) that the layers (top first)
// give data to or, with touched, write at all (data or zero). A cluster
// that upper layers cover entirely hides the layers below it; one covered
// in part keeps them (reading a cluster that turns out to hold zeros costs
// a read, never correctness).
func (c *Chain) extents(layers []*Layer, clusterBits uint32, size int64, touched bool) (hints.Extents, error) {
	cs := int64(1) << clusterBits
	n := uint64((size + cs - 1) / cs)
	data := bitmap.New(n)
	hidden := bitmap.New(n) // covered entirely by the layers above
	for _, l := range layers {
		cover := bitmap.New(n)
		var runStart, runEnd int64 = -1, -1
		endRun := func() {
			if runStart < 0 {
				return
			}
			first := uint64((runStart + cs - 1) / cs)
			last := uint64(runEnd / cs)
			if runEnd == size {
				last = n // a partial last cluster is covered when its bytes are
			}
			if first < last {
				cover.SetRange(first, last)
			}
			runStart = -1
		}
		err := l.Walk(size, func(start, end int64, k Kind) error {
			if k == Unallocated {
				endRun()
				return nil
			}
			if runStart >= 0 && runEnd == start {
				runEnd = end
			} else {
				endRun()
				runStart, runEnd = start, end
			}
			if k == Data || touched {
				setVisible(data, hidden, uint64(start/cs), uint64((end+cs-1)/cs))
			}
			return nil
		})
		if err != nil {
			return nil, fmt.Errorf("%s: %w", l.Path, err)
		}
		endRun()
		for g, ok := cover.NextSet(0); ok; g, ok = cover.NextSet(g) {
			e := cover.NextClear(g)
			hidden.SetRange(g, e)
			g = e
		}
	}
	return toExtents(data, cs, size)
}

// setVisible sets the clusters [first, end) of data that hidden does not.
func setVisible(data, hidden *bitmap.Bitmap, first, end uint64) {
	for g := first; g < end; {
		h, ok := hidden.NextSet(g)
		if !ok || h >= end {
			data.SetRange(g, end)
			return
		}
		if h > g {
			data.SetRange(g, h)
		}
		g = hidden.NextClear(h)
	}
}

// toExtents turns set clusters into byte extents clipped to size, within
// hints.MaxExtents.
func toExtents(b *bitmap.Bitmap, cs, size int64) (hints.Extents, error) {
	out := hints.Extents{}
	for g, ok := b.NextSet(0); ok; g, ok = b.NextSet(g) {
		e := b.NextClear(g)
		if len(out) >= hints.MaxExtents {
			return nil, fmt.Errorf("allocation is split into more than %d extents", hints.MaxExtents)
		}
		out = append(out, hints.Extent{Start: int64(g) * cs, End: min(int64(e)*cs, size)})
		g = e
	}
	return out, nil
}

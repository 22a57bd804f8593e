// Package hints reads allocation hints: what parts of a raw disk may hold
// data, so that an export reads only those. Hints come from the file system
// (SEEK_DATA/SEEK_HOLE, in rawdisk), from `qemu-img map --output=json` and
// `qemu-img info --output=json` of the qcow2 file behind a device (xapi's
// drop-in descriptors), from xapi's older JSON header, and from changed
// block tracking bitmaps (XenAPI VDI.list_changed_blocks).
package hints

import (
	"fmt"
	"sort"
)

// Extent is a byte range [Start, End) of a disk.
type Extent struct {
	Start, End int64
}

// MaxExtents bounds the number of separate extents a hint may describe,
// so that a hostile or broken hint cannot exhaust memory: 16 bytes each,
// 64 MiB (docs/RELIABILITY.md, "Resource bounds"). Neighbouring extents
// are merged as they are read, so only runs separated by holes count.
const MaxExtents = 4 << 20

// Extents is a sorted list of disjoint, non-adjacent extents.
type Extents []Extent

// Normalize sorts, clips to [0, size) and merges overlapping or adjacent
// extents, in place: the result uses in's memory (a hint may hold
// MaxExtents of them).
func Normalize(in []Extent, size int64) Extents {
	sort.Slice(in, func(i, j int) bool { return in[i].Start < in[j].Start })
	// Never nil: an empty hint means "nothing allocated", while nil means
	// "no hint" to the exporter, which would then read the whole disk.
	out := Extents(in[:0])
	if out == nil {
		out = Extents{}
	}
	for _, e := range in {
		e.Start, e.End = max(e.Start, 0), min(e.End, size)
		if e.End <= e.Start {
			continue
		}
		if n := len(out); n > 0 && e.Start <= out[n-1].End {
			out[n-1].End = max(out[n-1].End, e.End)
			continue
		}
		out = append(out, e)
	}
	return out
}

// Bytes is the total length covered.
func (x Extents) Bytes() int64 {
	var n int64
	for _, e := range x {
		n += e.End - e.Start
	}
	return n
}

// Union merges two extent lists.
func Union(a, b Extents, size int64) Extents {
	all := make([]Extent, 0, len(a)+len(b))
	all = append(append(all, a...), b...)
	return Normalize(all, size)
}

// Split cuts x along by: in is the parts of x that by covers, out the
// rest. Both are sorted and disjoint, like x.
func (x Extents) Split(by Extents) (in, out Extents) {
	in, out = Extents{}, Extents{}
	j := 0
	for _, e := range x {
		pos := e.Start
		for j < len(by) && by[j].End <= pos {
			j++
		}
		for k := j; k < len(by) && by[k].Start < e.End; k++ {
			a, b := max(by[k].Start, pos), min(by[k].End, e.End)
			if a > pos {
				out = append(out, Extent{pos, a})
			}
			in = append(in, Extent{a, b})
			pos = b
		}
		if pos < e.End {
			out = append(out, Extent{pos, e.End})
		}
	}
	return in, out
}

// AlignOut widens every extent to whole blocks of the given size, merging
// those that then touch. size clips the result.
func (x Extents) AlignOut(block, size int64) Extents {
	out := make([]Extent, len(x))
	for i, e := range x {
		out[i] = Extent{e.Start / block * block, (e.End + block - 1) / block * block}
	}
	return Normalize(out, size)
}

// Collect gathers the extents reported by a walker such as
// rawdisk.Disk.DataExtents, with the MaxExtents bound.
func Collect(walk func(fn func(start, end int64) error) error, size int64) (Extents, error) {
	var out []Extent
	err := walk(func(start, end int64) error {
		if len(out) >= MaxExtents {
			return fmt.Errorf("more than %d allocated extents", MaxExtents)
		}
		out = append(out, Extent{start, end})
		return nil
	})
	if err != nil {
		return nil, err
	}
	return Normalize(out, size), nil
}

package inspect

import (
	"fmt"
	"io"

	"github.com/xapi-project/xapi-qcow-tool/qcow"
)

// MapEntry is one extent of the allocation map, with the field names and
// meaning of qemu-img map --output=json.
type MapEntry struct {
	Start   uint64  `json:"start"`
	Length  uint64  `json:"length"`
	Depth   int     `json:"depth"`
	Present bool    `json:"present"`
	Zero    bool    `json:"zero"`
	Data    bool    `json:"data"`
	Offset  *uint64 `json:"offset,omitempty"`
}

// Holes is implemented by inputs that know where the host file has holes
// (an *os.File, through SEEK_DATA and SEEK_HOLE). qemu reports clusters of
// an image preallocated with metadata only as zero where the file has a
// hole, and Map does the same when it can ask.
type Holes interface {
	// DataAt returns whether off is in data (not a hole) and where that run
	// of data or hole ends (at most end).
	DataAt(off, end int64) (data bool, runEnd int64, err error)
	// AllocatedBytes is the space the file occupies on its file system.
	AllocatedBytes() (int64, error)
}

// entryFor describes a piece as qemu-img map does. An image without a
// backing file reads as zeros where it is unallocated; with one, those
// ranges come from the backing chain (depth 1), which is not inspected.
func entryFor(p piece, backing bool) MapEntry {
	e := MapEntry{Start: p.start, Length: p.length}
	switch p.kind {
	case qcow.ExtentData:
		e.Present, e.Data = true, true
	case qcow.ExtentZero:
		e.Present, e.Zero = true, true
	case qcow.ExtentUnallocated:
		if backing {
			e.Depth = 1
			return e // the backing file's offsets are not ours to report
		}
		e.Zero = true
	}
	if p.hasHost && !p.compressed {
		off := p.host
		e.Offset = &off
	}
	return e
}

// MergesWith reports whether qemu-img map merges next into a, the entry
// before it: next starts where a ends, with the same flags and depth, and
// for entries with an offset, host offsets that continue each other.
// Every map this tool prints (qcow2 and VHD) merges by this rule.
func (a MapEntry) MergesWith(next MapEntry) bool {
	b := next
	if a.Start+a.Length != b.Start || a.Depth != b.Depth || a.Present != b.Present ||
		a.Zero != b.Zero || a.Data != b.Data || (a.Offset == nil) != (b.Offset == nil) {
		return false
	}
	return a.Offset == nil || *a.Offset+a.Length == *b.Offset
}

// MapMerger merges a map's entries as qemu-img map does (MergesWith) while
// they come, in guest order, and hands each merged entry to Emit once the
// next one cannot extend it: it holds one entry, whatever the length of
// the map. Every map this tool prints goes through it.
type MapMerger struct {
	Emit func(MapEntry) error
	cur  MapEntry
	off  uint64 // *cur.Offset, copied: the caller's may be reused
	have bool
}

// Add merges e into the entry held, or emits that one and holds e. It
// returns Emit's error.
func (m *MapMerger) Add(e MapEntry) error {
	if e.Length == 0 {
		return nil
	}
	if m.have && m.cur.MergesWith(e) {
		m.cur.Length += e.Length
		return nil
	}
	if err := m.Flush(); err != nil {
		return err
	}
	m.cur, m.have = e, true
	if e.Offset != nil {
		m.off = *e.Offset
		m.cur.Offset = &m.off
	}
	return nil
}

// Flush emits the entry held, if any: call it after the last Add. The
// entry emitted is Emit's to keep (its Offset is not reused).
func (m *MapMerger) Flush() error {
	if !m.have {
		return nil
	}
	m.have = false
	e := m.cur
	if e.Offset != nil {
		off := m.off
		e.Offset = &off
	}
	return m.Emit(e)
}

// mapper turns pieces into entries of the map.
type mapper struct {
	m       MapMerger
	backing bool
	holes   Holes // set for a metadata-preallocated file: data on its holes reads as zeros
}

func (m *mapper) add(p piece) error {
	if p.length == 0 {
		return nil
	}
	if m.holes != nil && p.kind == qcow.ExtentData && p.hasHost && !p.compressed {
		ps, err := splitAtHoles(p, m.holes)
		if err != nil {
			return err
		}
		for _, q := range ps {
			if err := m.addEntry(q); err != nil {
				return err
			}
		}
		return nil
	}
	return m.addEntry(p)
}

func (m *mapper) addEntry(p piece) error {
	e := entryFor(p, m.backing)
	if p.holeZero {
		e.Zero = true
	}
	return m.m.Add(e)
}

// MapFile calls emit with each entry of the allocation map of the image in
// r (size bytes long), in guest order, merged as qemu-img map merges them,
// as the image is walked: memory does not grow with the number of entries.
// holes may be nil. An error from emit stops the walk and is returned.
func MapFile(r io.ReaderAt, size int64, holes Holes, emit func(MapEntry) error) error {
	im, err := openImage(r, size)
	if err != nil {
		return err
	}
	m := &mapper{m: MapMerger{Emit: emit}, backing: im.h.BackingFile != ""}
	if holes != nil {
		pre, err := im.metadataPreallocated(holes)
		if err != nil {
			return err
		}
		if pre {
			m.holes = holes
		}
	}
	if err := walkFile(im, m.add); err != nil {
		return err
	}
	return m.m.Flush()
}

// splitAtHoles cuts a data piece where the host file changes between data
// and hole; the hole parts read as zeros.
func splitAtHoles(p piece, holes Holes) ([]piece, error) {
	var out []piece
	pos, end := int64(p.host), int64(p.host+p.length)
	for pos < end {
		data, runEnd, err := holes.DataAt(pos, end)
		if err != nil {
			return []piece{p}, err
		}
		if runEnd <= pos || runEnd > end {
			runEnd = end
		}
		q := p
		q.start = p.start + uint64(pos) - p.host
		q.host = uint64(pos)
		q.length = uint64(runEnd - pos)
		q.holeZero = !data
		out = append(out, q)
		pos = runEnd
	}
	return out, nil
}

// metadataPreallocated is qemu's test for an image created with
// preallocation=metadata: many more clusters in use than the file occupies
// on disk. Only then does qemu look at the holes of the file.
func (im *image) metadataPreallocated(holes Holes) (bool, error) {
	alloc, err := holes.AllocatedBytes()
	if err != nil {
		return false, nil // cannot tell: report as qemu does for normal images
	}
	real := uint64(alloc) / im.cs
	threshold := real * 10 / 9
	if real+2 > threshold {
		threshold = real + 2
	}
	rc, err := im.refcounts()
	if err != nil {
		return false, err
	}
	var used uint64
	for c := uint64(0); c < im.fileClusters(); c++ {
		n, err := rc.get(c)
		if err != nil {
			return false, fmt.Errorf("refcount of cluster %d: %w", c, err)
		}
		if n > 0 {
			if used++; used > threshold {
				return true, nil
			}
		}
	}
	return false, nil
}

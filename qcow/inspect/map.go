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

// mapper merges entries as they come, in guest order.
type mapper struct {
	out     []MapEntry
	backing bool
	holes   func(p piece) []piece // splits preallocated data at holes, or nil
	err     error                 // errTooManyRuns
}

func (m *mapper) add(p piece) {
	if p.length == 0 {
		return
	}
	if m.holes != nil && p.kind == qcow.ExtentData && p.hasHost && !p.compressed {
		for _, q := range m.holes(p) {
			m.addEntry(q)
		}
		return
	}
	m.addEntry(p)
}

func (m *mapper) addEntry(p piece) {
	e := entryFor(p, m.backing)
	if p.holeZero {
		e.Zero = true
	}
	if n := len(m.out); n > 0 && m.out[n-1].MergesWith(e) {
		m.out[n-1].Length += e.Length
		return
	}
	if len(m.out) >= maxRuns {
		m.err = errTooManyRuns
		return
	}
	m.out = append(m.out, e)
}

// MapFile returns the allocation map of the image in r (size bytes long).
// holes may be nil.
func MapFile(r io.ReaderAt, size int64, holes Holes) (_ []MapEntry, err error) {
	im, err := openImage(r, size)
	if err != nil {
		return nil, err
	}
	m := &mapper{backing: im.h.BackingFile != ""}
	if holes != nil {
		pre, err := im.metadataPreallocated(holes)
		if err != nil {
			return nil, err
		}
		if pre {
			var herr error
			m.holes = func(p piece) []piece {
				ps, err := splitAtHoles(p, holes)
				if err != nil && herr == nil {
					herr = err
				}
				return ps
			}
			defer func() {
				if herr != nil && err == nil {
					err = herr
				}
			}()
		}
	}
	if err := walkFile(im, m.add); err != nil {
		return nil, err
	}
	return m.out, m.err
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

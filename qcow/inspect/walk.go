package inspect

import (
	"fmt"

	"github.com/xapi-project/xapi-qcow-tool/qcow"
)

// piece is a guest range of one kind (qcow.ExtentKind: what it reads as,
// according to the image alone). hasHost is set when a host offset is
// attached (data, zero clusters with a preallocated host cluster,
// unallocated subclusters of an allocated extended-L2 cluster).
type piece struct {
	start, length uint64
	kind          qcow.ExtentKind
	host          uint64
	hasHost       bool
	compressed    bool
	holeZero      bool // data on a hole of a metadata-preallocated file
}

// BadReferenceError is a table entry that cannot be followed.
type BadReferenceError struct{ Msg string }

func (e *BadReferenceError) Error() string { return e.Msg }

func badRef(format string, args ...any) error {
	return &BadReferenceError{Msg: fmt.Sprintf(format, args...)}
}

// decodeL2 turns one L2 entry (and, for extended L2, its subcluster bitmap)
// into pieces for the guest cluster at start, clipped to the virtual size.
func decodeL2(h *qcow.Header, start uint64, e qcow.L2Entry, bm qcow.SubclusterBitmap, emit func(piece) error) error {
	cs := h.ClusterSize()
	size := h.Size
	clip := func(p piece) error {
		if p.start >= size {
			return nil
		}
		if p.start+p.length > size {
			p.length = size - p.start
		}
		return emit(p)
	}
	if e.Compressed() {
		off, _ := e.CompressedExtent(h.ClusterBits)
		return clip(piece{start: start, length: cs, kind: qcow.ExtentData, host: off, compressed: true})
	}
	host := e.Offset()
	if !h.ExtendedL2() {
		switch {
		case e.Zero():
			return clip(piece{start: start, length: cs, kind: qcow.ExtentZero, host: host, hasHost: host != 0})
		case host != 0:
			return clip(piece{start: start, length: cs, kind: qcow.ExtentData, host: host, hasHost: true})
		default:
			return clip(piece{start: start, length: cs, kind: qcow.ExtentUnallocated})
		}
	}
	sc := cs / 32
	for i := uint(0); i < 32; i++ {
		p := piece{start: start + uint64(i)*sc, length: sc, host: host + uint64(i)*sc, hasHost: host != 0}
		switch {
		case bm.Allocated(i) && host != 0:
			p.kind = qcow.ExtentData
		case bm.ReadsZero(i):
			p.kind = qcow.ExtentZero
		default:
			p.kind = qcow.ExtentUnallocated
		}
		if !p.hasHost {
			p.host = 0
		}
		if err := clip(p); err != nil {
			return err
		}
	}
	return nil
}

// walkFile calls emit for every guest range of the image in guest order.
// A table it cannot follow is an error: Check is the command that reports
// every fault; here one is enough to stop. An error from emit stops the
// walk and is returned. It holds the L1 table and one L2 table at a time,
// whatever the number of ranges.
func walkFile(im *image, emit func(piece) error) error {
	h := im.h
	l1, err := im.l1()
	if err != nil {
		return err
	}
	span := h.L2Entries() * im.cs
	// The active L1 table never names one L2 table twice; refusing it also
	// keeps a hostile image from making us read one table millions of times.
	seen := map[uint64]bool{}
	for i, raw := range l1 {
		start := uint64(i) * span
		if start >= h.Size {
			break
		}
		e := qcow.L1Entry(raw)
		if e.Offset() == 0 {
			length := span
			if start+length > h.Size {
				length = h.Size - start
			}
			if err := emit(piece{start: start, length: length, kind: qcow.ExtentUnallocated}); err != nil {
				return err
			}
			continue
		}
		if e.Offset()%im.cs != 0 || !im.inFile(e.Offset(), im.cs) {
			return badRef("L1 entry %d: L2 table at %#x is outside the file or unaligned", i, e.Offset())
		}
		if seen[e.Offset()] {
			return badRef("L1 entry %d: L2 table at %#x is already used by another entry", i, e.Offset())
		}
		seen[e.Offset()] = true
		l2, err := im.l2(e.Offset())
		if err != nil {
			return fmt.Errorf("L1 entry %d: %w", i, err)
		}
		step := 1
		if h.ExtendedL2() {
			step = 2
		}
		for j := 0; j < len(l2); j += step {
			gs := start + uint64(j/step)*im.cs
			if gs >= h.Size {
				break
			}
			var bm qcow.SubclusterBitmap
			if step == 2 {
				bm = qcow.SubclusterBitmap(l2[j+1])
			}
			if err := decodeL2(h, gs, qcow.L2Entry(l2[j]), bm, emit); err != nil {
				return err
			}
		}
	}
	// An L1 table shorter than the disk (allowed when the tail is
	// unallocated) leaves the rest undescribed.
	if end := uint64(len(l1)) * span; end < h.Size {
		return emit(piece{start: end, length: h.Size - end, kind: qcow.ExtentUnallocated})
	}
	return nil
}

// continuedBy reports whether p starts where q ends and reads the same way
// (same kind, and host offsets that continue each other).
func (q piece) continuedBy(p piece) bool {
	return q.kind == p.kind && q.compressed == p.compressed && q.hasHost == p.hasHost && q.holeZero == p.holeZero &&
		q.start+q.length == p.start && (!q.hasHost || q.host+q.length == p.host)
}

// Package inspect answers a support engineer's questions about a qcow2
// image: what it is (Info), where its data lives (Map, in the shape of
// qemu-img map), whether its structure holds together (Check, in the shape
// of qemu-img check), and whether two disks hold the same bytes (Compare).
//
// Files are read through io.ReaderAt with random access; streams through the
// qcow package's decoder in one pass. Nothing here writes to its input.
package inspect

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"

	"github.com/xapi-project/xapi-qcow-tool/qcow"
)

var be = binary.BigEndian

// image is an opened qcow2 file: its header and the means to read tables.
type image struct {
	r    io.ReaderAt
	size uint64 // length of the file in bytes
	h    *qcow.Header
	cs   uint64
}

// ErrTruncated reports a structure that runs past the end of the file.
var ErrTruncated = errors.New("truncated image")

// openImage reads and validates the header of the image in r.
func openImage(r io.ReaderAt, size int64) (*image, error) {
	im, _, err := openImageFor(r, size, false)
	return im, err
}

// openImageFor is openImage; for a check, it also opens the images
// qemu-img check opens (qcow.ReadHeaderForCheck) and returns its notes.
func openImageFor(r io.ReaderAt, size int64, check bool) (*image, []string, error) {
	var h *qcow.Header
	var notes []string
	var err error
	if check {
		h, notes, err = qcow.ReadHeaderForCheck(r, size)
	} else {
		h, err = qcow.ReadHeader(r, size)
	}
	if err != nil {
		return nil, nil, err
	}
	return &image{r: r, size: uint64(size), h: h, cs: h.ClusterSize()}, notes, nil
}

// readFull reads len(buf) bytes at off; a short read is ErrTruncated.
func readFull(r io.ReaderAt, buf []byte, off uint64) error {
	n, err := r.ReadAt(buf, int64(off))
	if n == len(buf) {
		return nil
	}
	if err == nil || errors.Is(err, io.EOF) {
		return ErrTruncated
	}
	return err
}

// readPadded reads len(buf) bytes at off, which must lie inside the file;
// what lies past its end reads as zeros, as qemu reads a structure the file
// ends inside (qemu does not pad the last structure of an image to a
// cluster: a snapshot table, an L1 copy, compressed data).
func (im *image) readPadded(buf []byte, off uint64) error {
	if off >= im.size {
		return ErrTruncated
	}
	n := min(uint64(len(buf)), im.size-off)
	clear(buf[n:])
	return readFull(im.r, buf[:n], off)
}

// inFile reports whether [off, off+length) lies inside the file.
func (im *image) inFile(off, length uint64) bool {
	return off <= im.size && length <= im.size-off
}

// readTable reads a table of n big-endian 64-bit entries at off.
func (im *image) readTable(off, n uint64) ([]uint64, error) {
	if off >= im.size || n*8 > im.size {
		return nil, fmt.Errorf("table at %#x (%d bytes) runs past the end of the file (%d bytes)", off, n*8, im.size)
	}
	buf := make([]byte, n*8)
	if err := im.readPadded(buf, off); err != nil {
		return nil, fmt.Errorf("reading table at %#x: %w", off, err)
	}
	t := make([]uint64, n)
	for i := range t {
		t[i] = be.Uint64(buf[i*8:])
	}
	return t, nil
}

// l1 reads the active L1 table.
func (im *image) l1() ([]uint64, error) {
	t, err := im.readTable(im.h.L1TableOffset, uint64(im.h.L1Size))
	if err != nil {
		return nil, fmt.Errorf("L1 table: %w", err)
	}
	return t, nil
}

// l2 reads one L2 table: for extended L2 the entries alternate descriptor
// and subcluster bitmap.
func (im *image) l2(off uint64) ([]uint64, error) {
	return im.readTable(off, im.cs/8)
}

// clusters returns the number of clusters [off, off+length) touches.
func (im *image) clusters(length uint64) uint64 { return (length + im.cs - 1) / im.cs }

// fileClusters is the number of clusters the file holds, counting a partial
// last one.
func (im *image) fileClusters() uint64 { return im.clusters(im.size) }

// refcounts reads refcount entries with a one-block cache.
type refcounts struct {
	im       *image
	table    []uint64
	perBlock uint64
	bits     uint64
	cacheOff uint64
	cache    []byte
}

func (im *image) refcounts() (*refcounts, error) {
	n := uint64(im.h.RefcountTableClusters) * im.cs / 8
	t, err := im.readTable(im.h.RefcountTableOffset, n)
	if err != nil {
		return nil, fmt.Errorf("refcount table: %w", err)
	}
	bits := im.h.RefcountBits()
	return &refcounts{im: im, table: t, perBlock: im.cs * 8 / bits, bits: bits}, nil
}

// block loads the refcount block at off into the cache.
func (rc *refcounts) block(off uint64) ([]byte, error) {
	if rc.cache != nil && rc.cacheOff == off {
		return rc.cache, nil
	}
	if off >= rc.im.size {
		return nil, fmt.Errorf("refcount block at %#x is past the end of the file", off)
	}
	if rc.cache == nil {
		rc.cache = make([]byte, rc.im.cs)
	}
	if err := rc.im.readPadded(rc.cache, off); err != nil {
		rc.cache = nil
		return nil, err
	}
	rc.cacheOff = off
	return rc.cache, nil
}

// entry decodes refcount entry i of a block.
func (rc *refcounts) entry(b []byte, i uint64) uint64 {
	switch rc.bits {
	case 64:
		return be.Uint64(b[i*8:])
	case 32:
		return uint64(be.Uint32(b[i*4:]))
	case 16:
		return uint64(be.Uint16(b[i*2:]))
	case 8:
		return uint64(b[i])
	}
	// 1, 2 and 4 bits: entries fill each byte from its least significant bit.
	per := 8 / rc.bits
	v := b[i/per] >> ((i % per) * rc.bits)
	return uint64(v) & (1<<rc.bits - 1)
}

// blockOffset returns the valid offset of refcount block i, 0 when there is
// none or it is unusable.
func (rc *refcounts) blockOffset(i uint64) uint64 {
	if i >= uint64(len(rc.table)) {
		return 0
	}
	off := rc.table[i] & 0xfffffffffffffe00 // bits 9-63: offset
	if off == 0 || off%rc.im.cs != 0 || off >= rc.im.size {
		return 0
	}
	return off
}

// unreadable reports whether refcount block i is named but cannot be used
// (not cluster aligned): qemu's check cannot read the refcounts it holds.
func (rc *refcounts) unreadable(i uint64) bool {
	if i >= uint64(len(rc.table)) {
		return false
	}
	off := rc.table[i] & 0xfffffffffffffe00
	return off != 0 && off%rc.im.cs != 0
}

// get returns the refcount of host cluster c (0 where no block covers it).
func (rc *refcounts) get(c uint64) (uint64, error) {
	off := rc.blockOffset(c / rc.perBlock)
	if off == 0 {
		if rc.unreadable(c / rc.perBlock) {
			return 0, fmt.Errorf("its refcount block at %#x is not cluster aligned", rc.table[c/rc.perBlock]&0xfffffffffffffe00)
		}
		return 0, nil
	}
	b, err := rc.block(off)
	if err != nil {
		return 0, err
	}
	return rc.entry(b, c%rc.perBlock), nil
}

// counter counts references per host cluster without one counter per
// cluster of the address space: chunks of counters are allocated on first
// use, so memory is bounded by the clusters actually referenced, which the
// caller bounds by the file's size. Each counter also remembers the role of
// what the cluster holds, to tell a shared data cluster (snapshots) from an
// overlap.
type counter struct {
	chunks map[uint64]*[chunkLen]uint32
}

// role is what a referenced cluster holds.
type role uint32

const (
	roleNone role = iota
	roleData
	roleHeader
	roleRefTable
	roleRefBlock
	roleL1
	roleL2
	roleSnapshots
	roleBitmap
)

var roleNames = [...]string{"nothing", "guest data", "the header", "the refcount table", "a refcount block",
	"an L1 table", "an L2 table", "the snapshot table", "bitmap metadata"}

func (r role) String() string { return roleNames[r] }

const (
	chunkLen  = 4096
	roleShift = 28
	countMax  = 1<<roleShift - 1
)

// maxCounterChunks bounds the counters: 2^13 chunks of 16 KiB (128 MiB)
// count the references to 2^25 host clusters, a 2 TiB image of 64 KiB
// clusters, however a sparse file spreads them.
const maxCounterChunks = 1 << 13

func newCounter() *counter { return &counter{chunks: map[uint64]*[chunkLen]uint32{}} }

// add records one reference to cluster c holding r and returns the count
// and role it had before. Metadata wins over data as the remembered role.
// ok is false when c needs a chunk past maxCounterChunks: nothing was
// recorded.
func (k *counter) add(c uint64, r role) (_ uint64, _ role, ok bool) {
	ch := k.chunks[c/chunkLen]
	if ch == nil {
		if len(k.chunks) >= maxCounterChunks {
			return 0, roleNone, false
		}
		ch = new([chunkLen]uint32)
		k.chunks[c/chunkLen] = ch
	}
	p := &ch[c%chunkLen]
	n, old := uint64(*p&countMax), role(*p>>roleShift)
	keep := old
	if old == roleNone || old == roleData {
		keep = r
	}
	next := n
	if next < countMax {
		next++
	}
	*p = uint32(next) | uint32(keep)<<roleShift
	return n, old, true
}

// get returns the reference count of c.
func (k *counter) get(c uint64) uint64 {
	ch := k.chunks[c/chunkLen]
	if ch == nil {
		return 0
	}
	return uint64(ch[c%chunkLen] & countMax)
}

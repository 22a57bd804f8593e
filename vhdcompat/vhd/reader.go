package vhd

import (
	"encoding/binary"
	"fmt"
	"io"
	"math/bits"
)

// unallocated is the BAT entry of a block the image does not store.
const unallocated = 0xffffffff

var le = binary.LittleEndian

// Reader reads the metadata of one VHD image.
type Reader struct {
	r      io.ReaderAt
	size   int64
	Footer *Footer
	Header *Header // nil for a fixed disk

	bat         []uint32
	bitmapBytes int64 // the sector bitmap in front of each block, sector aligned
	bitmap      []byte
	lsb         bool // tap 0.1: bitmaps least significant bit first
	// full is blktap's batmap when the image has a valid one: block i is
	// fully allocated, and tapdisk reads all of it from this image.
	full    []byte
	parents []string // what the parent locators name, in order
}

// NewReader reads and checks the footers, the dynamic header, the block
// allocation table, the parent locators and the batmap of the image in r
// (size bytes long), and refuses the image at the first corruption Check
// would report, in the same words. The footer is taken from the start of
// the image when a valid copy is there (a VHD in a logical volume ends
// before the volume does), else from its end; a 511-byte footer at the end
// and early tapdisk's footer checksums are accepted, as blktap's libvhd
// accepts them.
func NewReader(r io.ReaderAt, size int64) (*Reader, error) {
	c := &validator{strict: true}
	v, err := c.open(r, size)
	switch {
	case err != nil:
		return nil, err
	case c.first != nil:
		return nil, c.first
	}
	return v, nil
}

func readAt(r io.ReaderAt, buf []byte, off int64) error {
	n, err := r.ReadAt(buf, off)
	if n == len(buf) {
		return nil
	}
	if err == nil || err == io.EOF {
		err = io.ErrUnexpectedEOF
	}
	return err
}

// VirtualSize is the size of the disk the image describes, in bytes.
func (v *Reader) VirtualSize() int64 { return int64(v.Footer.CurrentSize) }

// BlockSize is the allocation unit (0 for a fixed disk).
func (v *Reader) BlockSize() int64 {
	if v.Header == nil {
		return 0
	}
	return int64(v.Header.BlockSize)
}

// Blocks is the number of blocks mapping the virtual size.
func (v *Reader) Blocks() int { return len(v.bat) }

// AllocatedBlocks counts the blocks the image stores.
func (v *Reader) AllocatedBlocks() int {
	n := 0
	for _, e := range v.bat {
		if e != unallocated {
			n++
		}
	}
	return n
}

// Extent is a run of sectors of the guest disk that the image either stores
// (Stored, at HostOffset in the image) or leaves to its parent (a
// differencing disk) or to zeros (a dynamic disk).
type Extent struct {
	Start, Length int64
	Stored        bool
	HostOffset    int64
}

// Extents calls fn for runs of the guest disk in order, covering the
// virtual size exactly once. A block's sector bitmap decides which of its
// sectors are stored (all of them when the batmap marks the block full, as
// tapdisk reads it); runs that continue each other (in the guest and in
// the image) are merged. An error from fn stops the walk.
func (v *Reader) Extents(fn func(Extent) error) error {
	size := v.VirtualSize()
	if v.Header == nil {
		if size == 0 {
			return nil
		}
		return fn(Extent{Start: 0, Length: size, Stored: true})
	}
	var cur Extent
	emit := func(e Extent) error {
		if e.Start+e.Length > size {
			e.Length = size - e.Start
		}
		if e.Length <= 0 {
			return nil
		}
		if cur.Length > 0 && cur.Stored == e.Stored && cur.Start+cur.Length == e.Start &&
			(!e.Stored || cur.HostOffset+cur.Length == e.HostOffset) {
			cur.Length += e.Length
			return nil
		}
		if cur.Length > 0 {
			if err := fn(cur); err != nil {
				return err
			}
		}
		cur = e
		return nil
	}
	bs := v.BlockSize()
	for i, e := range v.bat {
		start := int64(i) * bs
		if e == unallocated {
			if err := emit(Extent{Start: start, Length: bs}); err != nil {
				return err
			}
			continue
		}
		bm, err := v.readBitmap(i)
		if err != nil {
			return err
		}
		data := int64(e)*SectorSize + v.bitmapBytes
		sectors := bs / SectorSize
		for s := int64(0); s < sectors; {
			set := v.bitSet(bm, s)
			run := v.runLength(bm, s, sectors, set)
			ext := Extent{Start: start + s*SectorSize, Length: run * SectorSize, Stored: set}
			if set {
				ext.HostOffset = data + s*SectorSize
			}
			if err := emit(ext); err != nil {
				return err
			}
			s += run
		}
	}
	if cur.Length > 0 {
		return fn(cur)
	}
	return nil
}

// readBitmap reads the sector bitmap of allocated block i into v.bitmap.
// A block the batmap marks full reads as all sectors stored, and its
// bitmap must say so too: otherwise tapdisk and every other reader would
// read different data.
func (v *Reader) readBitmap(i int) ([]byte, error) {
	host := int64(v.bat[i]) * SectorSize
	if err := readAt(v.r, v.bitmap, host); err != nil {
		return nil, fmt.Errorf("reading the sector bitmap of block %d at %#x: %w", i, host, err)
	}
	if !v.batmapFull(i) {
		return v.bitmap, nil
	}
	sectors := v.BlockSize() / SectorSize
	if n := v.runLength(v.bitmap, 0, sectors, true); n < sectors {
		return nil, formatErr(host, "sector bitmap", "block %d: the batmap marks the block full, but its bitmap leaves sector %d unmarked (tapdisk would read the whole block from this image, other readers only the marked sectors)", i, n)
	}
	return v.bitmap, nil
}

// batmapFull reports whether the batmap marks block i full.
func (v *Reader) batmapFull(i int) bool {
	return v.full != nil && i>>3 < len(v.full) && v.full[i>>3]&(0x80>>(i&7)) != 0
}

// bitSet reports sector s of a block bitmap: most significant bit first,
// or least significant first in the images of tap 0.1 (32-bit
// little-endian words, whose bytes hold sectors 8k to 8k+7 from bit 0 up).
func (v *Reader) bitSet(bm []byte, s int64) bool {
	if v.lsb {
		return bm[s>>3]&(1<<(s&7)) != 0
	}
	return bm[s>>3]&(0x80>>(s&7)) != 0
}

// runLength is how many sectors from s on have the bit value set, up to n;
// whole words are skipped at a time.
func (v *Reader) runLength(bm []byte, s, n int64, set bool) int64 {
	i := s
	for i < n {
		if i&63 == 0 && i+64 <= n {
			var w uint64
			if v.lsb {
				w = le.Uint64(bm[i>>3:])
			} else {
				w = be.Uint64(bm[i>>3:])
			}
			if (set && w == ^uint64(0)) || (!set && w == 0) {
				i += 64
				continue
			}
			if !set {
				w = ^w
			}
			// The run ends at the first bit, in reading order, that
			// differs.
			if v.lsb {
				i += int64(bits.TrailingZeros64(^w))
			} else {
				i += int64(bits.LeadingZeros64(^w))
			}
			return i - s
		}
		if v.bitSet(bm, i) != set {
			break
		}
		i++
	}
	return i - s
}

// ParentPaths returns the paths named by the parent locators, in locator
// order, skipping locators that name no path.
// They are read and checked when the image is opened.
func (v *Reader) ParentPaths() []string {
	return v.parents
}

// ParentNames lists the names under which a differencing image knows its
// parent, best first: the parent locators, then the parent's unicode name.
func (v *Reader) ParentNames() []string {
	if v.Header == nil || v.Footer.DiskType != Differencing {
		return nil
	}
	names := append([]string(nil), v.parents...)
	if n := v.Header.ParentName; n != "" {
		names = append(names, n)
	}
	return names
}

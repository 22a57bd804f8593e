package vhd

import (
	"errors"
	"io"
	"math/bits"
)

// unallocated is the BAT entry of a block the image does not store.
const unallocated = 0xffffffff

// Reader reads the metadata of one VHD image.
type Reader struct {
	r      io.ReaderAt
	size   int64
	Footer *Footer
	Header *Header // nil for a fixed disk

	bat         []uint32
	bitmapBytes int64 // the sector bitmap in front of each block, sector aligned
	bitmap      []byte
}

// NewReader reads and checks the footer, the dynamic header and the block
// allocation table of the image in r (size bytes long). The footer is taken
// from the start of the image when a valid copy is there (a VHD in a
// logical volume ends before the volume does), else from its end.
func NewReader(r io.ReaderAt, size int64) (*Reader, error) {
	if size < FooterSize {
		return nil, ErrNotVHD
	}
	buf := make([]byte, HeaderSize)
	f, err := readFooter(r, buf[:FooterSize], 0)
	if err != nil || f.DiskType == Fixed {
		// A fixed disk keeps its footer only at the end; so does a
		// dynamic disk whose first copy is damaged.
		end, endErr := readFooter(r, buf[:FooterSize], size-FooterSize)
		switch {
		case endErr == nil:
			f = end
		case errors.Is(err, ErrNotVHD) || err == nil:
			return nil, endErr
		default:
			return nil, err
		}
	}
	v := &Reader{r: r, size: size, Footer: f}
	if f.DiskType == Fixed {
		if int64(f.CurrentSize) > size-FooterSize || int64(f.CurrentSize) < 0 {
			return nil, formatErr(size-FooterSize, "footer", "fixed disk of %d bytes does not fit in a file of %d bytes", f.CurrentSize, size)
		}
		return v, nil
	}
	if f.DataOffset > uint64(size) || uint64(size)-f.DataOffset < HeaderSize {
		return nil, formatErr(0, "footer", "dynamic header offset %#x is outside the file (%d bytes)", f.DataOffset, size)
	}
	if err := readAt(r, buf, int64(f.DataOffset)); err != nil {
		return nil, formatErr(int64(f.DataOffset), "dynamic header", "%v", err)
	}
	h, err := ParseHeader(buf, int64(f.DataOffset))
	if err != nil {
		return nil, err
	}
	v.Header = h
	bs := uint64(h.BlockSize)
	if need := (f.CurrentSize + bs - 1) / bs; uint64(h.MaxTableEntries) < need {
		return nil, formatErr(int64(f.DataOffset), "dynamic header", "%d BAT entries cannot map %d bytes in blocks of %d", h.MaxTableEntries, f.CurrentSize, bs)
	}
	batBytes := uint64(h.MaxTableEntries) * 4
	if h.TableOffset > uint64(size) || uint64(size)-h.TableOffset < batBytes {
		return nil, formatErr(int64(h.TableOffset), "BAT", "%d entries at %#x run past the end of the file (%d bytes)", h.MaxTableEntries, h.TableOffset, size)
	}
	v.bitmapBytes = int64((bs/SectorSize/8 + SectorSize - 1) / SectorSize * SectorSize)
	// Only the entries that map the virtual size matter; the table is
	// read in pieces so a huge one is not held twice.
	n := (f.CurrentSize + bs - 1) / bs
	v.bat = make([]uint32, n)
	chunk := make([]byte, min(batBytes, 1<<20))
	for i := uint64(0); i < n; {
		k := min(n-i, uint64(len(chunk))/4)
		at := int64(h.TableOffset + i*4)
		if err := readAt(r, chunk[:k*4], at); err != nil {
			return nil, formatErr(at, "BAT", "%v", err)
		}
		for j := uint64(0); j < k; j++ {
			e := be.Uint32(chunk[j*4:])
			if e != unallocated {
				start := int64(e) * SectorSize
				if start+v.bitmapBytes+int64(bs) > size {
					return nil, formatErr(at+int64(j*4), "BAT", "entry %d: block at %#x runs past the end of the file (%d bytes)", i+j, start, size)
				}
				if uint64(start) < h.TableOffset+batBytes && uint64(start)+uint64(v.bitmapBytes)+bs > h.TableOffset {
					return nil, formatErr(at+int64(j*4), "BAT", "entry %d: block at %#x overlaps the BAT", i+j, start)
				}
			}
			v.bat[i+j] = e
		}
		i += k
	}
	v.bitmap = make([]byte, v.bitmapBytes)
	return v, nil
}

func readFooter(r io.ReaderAt, buf []byte, off int64) (*Footer, error) {
	if err := readAt(r, buf, off); err != nil {
		return nil, ErrNotVHD
	}
	return ParseFooter(buf, off)
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
// sectors are stored; runs that continue each other (in the guest and in
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
		host := int64(e) * SectorSize
		if err := readAt(v.r, v.bitmap, host); err != nil {
			return formatErr(host, "sector bitmap", "block %d: %v", i, err)
		}
		data := host + v.bitmapBytes
		sectors := bs / SectorSize
		for s := int64(0); s < sectors; {
			set := bitSet(v.bitmap, s)
			run := runLength(v.bitmap, s, sectors, set)
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

// bitSet reports sector s of a block bitmap: most significant bit first.
func bitSet(bm []byte, s int64) bool { return bm[s>>3]&(0x80>>(s&7)) != 0 }

// runLength is how many sectors from s on have the bit value set, up to n;
// whole bytes and words are skipped at a time.
func runLength(bm []byte, s, n int64, set bool) int64 {
	i := s
	for i < n {
		if i&63 == 0 && i+64 <= n {
			w := be.Uint64(bm[i>>3:])
			if (set && w == ^uint64(0)) || (!set && w == 0) {
				i += 64
				continue
			}
			if !set {
				w = ^w
			}
			// The run ends at the first bit (from the most significant)
			// that differs.
			i += int64(bits.LeadingZeros64(^w))
			return i - s
		}
		if bitSet(bm, i) != set {
			break
		}
		i++
	}
	return i - s
}

// ParentPaths returns the paths named by the parent locators, in locator
// order, skipping locators that name no path.
func (v *Reader) ParentPaths() ([]string, error) {
	if v.Header == nil || v.Footer.DiskType != Differencing {
		return nil, nil
	}
	var out []string
	for i, l := range v.Header.Locators {
		if l.Code == PlatformNone || l.DataLength == 0 {
			continue
		}
		if l.DataLength > MaxLocatorBytes {
			return nil, formatErr(int64(v.Footer.DataOffset), "parent locator", "locator %d: %d bytes of platform data is more than %d", i, l.DataLength, MaxLocatorBytes)
		}
		if l.DataOffset > uint64(v.size) || uint64(v.size)-l.DataOffset < uint64(l.DataLength) {
			return nil, formatErr(int64(v.Footer.DataOffset), "parent locator", "locator %d: data at %#x+%d is outside the file", i, l.DataOffset, l.DataLength)
		}
		b := make([]byte, l.DataLength)
		if err := readAt(v.r, b, int64(l.DataOffset)); err != nil {
			return nil, formatErr(int64(l.DataOffset), "parent locator", "locator %d: %v", i, err)
		}
		if p, ok := LocatorPath(l.Code, b); ok {
			out = append(out, p)
		}
	}
	return out, nil
}

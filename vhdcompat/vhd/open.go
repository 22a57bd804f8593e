package vhd

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"slices"
)

// open reads the metadata of the image and records what is wrong with it.
// It returns an error only for what is no finding: no VHD at all, or a
// read that failed. In strict mode it stops at the first corruption (the
// caller returns c.first); in check mode it goes on wherever the rest can
// still be read, and returns a nil Reader where it cannot.
func (c *validator) open(r io.ReaderAt, size int64) (*Reader, error) {
	if size < FooterSize-1 {
		return nil, ErrNotVHD
	}
	// The footer at the end: 512 bytes, or 511 when the file is one byte
	// short of a sector, as early tapdisk left it (libvhd reads both).
	endAt, short := size-FooterSize, false
	if size%SectorSize == SectorSize-1 {
		endAt, short = size-(FooterSize-1), true
	}
	end, endErr := readFooter(r, endAt, FooterSize-btoi(short))
	start, startErr := (*Footer)(nil), error(ErrNotVHD)
	if size >= FooterSize {
		start, startErr = readFooter(r, 0, FooterSize)
	}
	for _, err := range []error{startErr, endErr} {
		if !isFinding(err) {
			return nil, err
		}
	}
	var f *Footer
	switch {
	case start != nil && start.DiskType != Fixed:
		f = start
	case end != nil:
		f = end
	default:
		// No footer to read the image by.
		if !isFormat(startErr) && !isFormat(endErr) {
			return nil, ErrNotVHD
		}
		for _, err := range []error{startErr, endErr} {
			if isFormat(err) && !c.corruptErr(err) {
				break
			}
		}
		return nil, nil
	}
	v := &Reader{r: r, size: size, Footer: f, lsb: f.LSBBitmaps()}
	// The two copies of a dynamic disk's footer must agree.
	if f.DiskType != Fixed {
		switch {
		case start != nil && end != nil:
			c.compareFooters(start, end, endAt)
		case f == start && errors.Is(endErr, ErrNotVHD):
			c.warn(endAt, "footer", "no footer at the end of the image, only its copy at offset 0: a VHD in a logical volume larger than itself ends before the volume does; a file has been cut short")
		case f == start:
			c.corruptErr(endErr)
		case errors.Is(startErr, ErrNotVHD):
			c.corrupt(0, "footer copy", "missing: a %s disk keeps a copy of its footer at offset 0, and there is no \"conectix\" cookie there", f.DiskType)
		default:
			c.corruptErr(startErr)
		}
	}
	if c.stopped() {
		return nil, nil
	}
	if end != nil && short {
		c.warn(endAt, "footer", "511 bytes long at the end of the file, as early tapdisk wrote it; blktap's libvhd reads it")
	}
	for _, x := range []struct {
		f  *Footer
		at int64
	}{{start, 0}, {end, endAt}} {
		if x.f != nil && x.f.ChecksumWithoutHidden && (x.f == f || f.DiskType != Fixed) {
			c.warn(x.at, "footer", "checksum %#08x leaves out the hidden flag (%d), as early tapdisk (tap %d.%d) wrote it; blktap's libvhd accepts it",
				x.f.Checksum, x.f.Hidden, x.f.CreatorVersion>>16, x.f.CreatorVersion&0xffff)
		}
	}
	// Where the image's last structure may end: its footer at the end of
	// the file, or the end of the file when it has none there.
	limit := size
	if end != nil {
		limit = endAt
	}
	if f.DiskType == Fixed {
		if int64(f.CurrentSize) > limit || int64(f.CurrentSize) < 0 {
			c.corrupt(endAt, "footer", "fixed disk of %d bytes does not fit in a file of %d bytes", f.CurrentSize, size)
			return nil, nil
		}
		return v, nil
	}
	if !c.header(v, f) {
		return nil, nil
	}
	h := v.Header
	bs := uint64(h.BlockSize)
	batBytes := uint64(h.MaxTableEntries) * 4
	regions := []region{
		{0, FooterSize, "footer copy"},
		{int64(f.DataOffset), HeaderSize, "dynamic header"},
		{int64(h.TableOffset), int64(roundUp(batBytes, SectorSize)), "BAT"},
	}
	for _, m := range regions[:2] {
		if overlaps(regions[2], m) && !c.corrupt(int64(f.DataOffset), "dynamic header", "the BAT at %#x (%d entries) overlaps the %s at %#x", h.TableOffset, h.MaxTableEntries, m.what, m.start) {
			return nil, nil
		}
	}
	locs, ok := c.locators(v, limit)
	if !ok {
		return nil, nil
	}
	regions = append(regions, locs...)
	maps, ok := c.batmap(v, limit)
	if !ok {
		return nil, nil
	}
	regions = append(regions, maps...)
	v.bitmapBytes = int64(roundUp((bs/SectorSize+7)/8, SectorSize))
	if !c.bat(v, limit, regions) {
		return nil, nil
	}
	v.bitmap = make([]byte, v.bitmapBytes)
	return v, nil
}

// dataEnd names where an image's structures must end: its footer at the
// end of the file, or the end of the file when there is none there.
func dataEnd(limit, size int64) string {
	if limit < size {
		return fmt.Sprintf("the footer at %#x", limit)
	}
	return fmt.Sprintf("%d bytes", size)
}

func btoi(b bool) int {
	if b {
		return 1
	}
	return 0
}

func roundUp(n, to uint64) uint64 { return (n + to - 1) / to * to }

// isFormat reports whether err is a finding about the image's bytes.
func isFormat(err error) bool {
	var fe *FormatError
	return errors.As(err, &fe)
}

// isFinding reports whether err is nil, no VHD or a damaged structure, as
// opposed to a read that failed.
func isFinding(err error) bool { return err == nil || errors.Is(err, ErrNotVHD) || isFormat(err) }

// readFooter reads the footer at off, n bytes of it (511 for a short one:
// the last byte, reserved, reads as zero).
func readFooter(r io.ReaderAt, off int64, n int) (*Footer, error) {
	buf := make([]byte, FooterSize)
	if err := readAt(r, buf[:n], off); err != nil {
		return nil, fmt.Errorf("reading the footer at %#x: %w", off, err)
	}
	return ParseFooter(buf, off)
}

// footerFields names the fields of a footer by their offset, for a
// mismatch between the two copies.
var footerFields = []struct {
	at   int
	name string
}{
	{0, "cookie"}, {8, "features"}, {12, "file format version"}, {16, "data offset"},
	{24, "time stamp"}, {28, "creator application"}, {32, "creator version"},
	{36, "creator host OS"}, {40, "original size"}, {48, "current size"},
	{56, "disk geometry"}, {60, "disk type"}, {64, "checksum"}, {68, "unique id"},
	{84, "saved state"}, {85, "hidden flag"}, {86, "reserved bytes"},
}

// compareFooters checks the copy at offset 0 against the footer at the
// end. Early tapdisk set the hidden flag in the copy at 0 only, without
// recomputing its checksum: libvhd accepts the two when they are the same
// but for that flag, and so does this.
func (c *validator) compareFooters(start, end *Footer, endAt int64) {
	if start.raw == end.raw {
		return
	}
	if a := start.raw; start.Hidden != 0 && start.earlyTapdisk() {
		a[footerHiddenAt] = 0
		if a == end.raw {
			c.warn(0, "footer copy", "hidden flag %d is not in the footer at %#x, as early tapdisk (tap %d.%d) marked the copy only; blktap's libvhd accepts it",
				start.Hidden, endAt, start.CreatorVersion>>16, start.CreatorVersion&0xffff)
			return
		}
	}
	field := ""
	for i, fl := range footerFields {
		next := FooterSize
		if i+1 < len(footerFields) {
			next = footerFields[i+1].at
		}
		if !bytes.Equal(start.raw[fl.at:next], end.raw[fl.at:next]) {
			field = fl.name
			break
		}
	}
	c.corrupt(0, "footer copy", "differs from the footer at %#x in its %s", endAt, field)
}

// header reads and checks the dynamic header.
func (c *validator) header(v *Reader, f *Footer) bool {
	if f.DataOffset > uint64(v.size) || uint64(v.size)-f.DataOffset < HeaderSize {
		c.corrupt(0, "footer", "dynamic header offset %#x is outside the file (%d bytes)", f.DataOffset, v.size)
		return false
	}
	buf := make([]byte, HeaderSize)
	if err := readAt(v.r, buf, int64(f.DataOffset)); err != nil {
		c.corrupt(int64(f.DataOffset), "dynamic header", "%v", err)
		return false
	}
	h, err := ParseHeader(buf, int64(f.DataOffset))
	if err != nil {
		c.corruptErr(err)
		return false
	}
	if v.lsb {
		// tap 0.1 wrote the parent's name in the host's order.
		h.ParentName = decodeUTF16BOM(buf[64:576], binary.LittleEndian)
	}
	v.Header = h
	at := int64(f.DataOffset)
	if h.BlockSize < 4096 {
		c.warn(at, "dynamic header", "block size %d: its sector bitmap is less than a byte, padded to a sector as the specification and blktap's libvhd pad it; libvhdi reads no block under 4096 bytes", h.BlockSize)
	}
	if v.lsb {
		c.warn(0, "footer", "written by tap 0.1: its sector bitmaps are least significant bit first in 32-bit words, as blktap's libvhd wrote and reads them; qemu and libvhdi read them the other way round and see other data")
	}
	bs := uint64(h.BlockSize)
	if need := (f.CurrentSize + bs - 1) / bs; uint64(h.MaxTableEntries) < need {
		c.corrupt(int64(f.DataOffset), "dynamic header", "%d BAT entries cannot map %d bytes in blocks of %d", h.MaxTableEntries, f.CurrentSize, bs)
		return false
	}
	batBytes := uint64(h.MaxTableEntries) * 4
	if h.TableOffset > uint64(v.size) || uint64(v.size)-h.TableOffset < batBytes {
		c.corrupt(int64(h.TableOffset), "BAT", "%d entries at %#x run past the end of the file (%d bytes)", h.MaxTableEntries, h.TableOffset, v.size)
		return false
	}
	return true
}

// decodeUTF16BOM decodes UTF-16 in the order its byte order mark gives,
// else in order.
func decodeUTF16BOM(b []byte, order binary.ByteOrder) string {
	switch {
	case len(b) >= 2 && b[0] == 0xfe && b[1] == 0xff:
		return decodeUTF16(b[2:], binary.BigEndian)
	case len(b) >= 2 && b[0] == 0xff && b[1] == 0xfe:
		return decodeUTF16(b[2:], binary.LittleEndian)
	}
	return decodeUTF16(b, order)
}

// region is a structure of the file no block may overlap.
type region struct {
	start, length int64
	what          string
}

func overlaps(a, b region) bool {
	return a.start < b.start+b.length && b.start < a.start+a.length
}

// locators reads the parent locators of a differencing disk: each one's
// data inside the image, and at least one name for the parent.
func (c *validator) locators(v *Reader, limit int64) ([]region, bool) {
	h := v.Header
	if v.Footer.DiskType != Differencing {
		return nil, true
	}
	at := int64(v.Footer.DataOffset)
	var out []region
	for i, l := range h.Locators {
		if l.Code == PlatformNone || l.DataLength == 0 {
			continue
		}
		switch l.Code {
		case PlatformWi2r, PlatformWi2k, PlatformW2ru, PlatformW2ku, PlatformMac, PlatformMacX:
		default:
			c.warn(at+576+24*int64(i), "parent locator", "locator %d: unknown platform code %#08x, ignored", i, l.Code)
			continue
		}
		if l.DataLength > MaxLocatorBytes {
			if !c.corrupt(at, "parent locator", "locator %d: %d bytes of platform data is more than %d", i, l.DataLength, MaxLocatorBytes) {
				return nil, false
			}
			continue
		}
		if l.DataOffset > uint64(limit) || uint64(limit)-l.DataOffset < uint64(l.DataLength) {
			if !c.corrupt(at, "parent locator", "locator %d: data at %#x+%d is outside the image (it ends at %#x)", i, l.DataOffset, l.DataLength, limit) {
				return nil, false
			}
			continue
		}
		b := make([]byte, l.DataLength)
		if err := readAt(v.r, b, int64(l.DataOffset)); err != nil {
			c.corrupt(int64(l.DataOffset), "parent locator", "locator %d: %v", i, err)
			return nil, false
		}
		out = append(out, region{int64(l.DataOffset), int64(roundUp(uint64(l.DataLength), SectorSize)), fmt.Sprintf("data of parent locator %d", i)})
		if p, ok := LocatorPath(l.Code, b); ok {
			v.parents = append(v.parents, p)
		}
	}
	if len(v.parents) == 0 && h.ParentName == "" {
		if !c.corrupt(at, "dynamic header", "differencing VHD names no parent (no parent name, no parent locator)") {
			return nil, false
		}
	}
	return out, true
}

// Offsets in blktap's batmap header.
const (
	batmapCookie = "tdbatmap"
	batmapMaxVer = 1<<16 | 2 // 1.2
)

// batmap reads blktap's batmap (tap 1.1 and later): a header after the
// BAT, then one bit per block, set where the block is fully allocated.
// tapdisk reads a block the batmap marks full entirely from this image, so
// a batmap must be valid to be used; a damaged one is a corruption, as for
// vhd-util check.
func (c *validator) batmap(v *Reader, limit int64) ([]region, bool) {
	always, maybe := v.Footer.HasBatmap()
	if !maybe {
		return nil, true
	}
	h := v.Header
	at := int64(h.TableOffset + roundUp(uint64(h.MaxTableEntries)*4, SectorSize))
	hdr := make([]byte, SectorSize)
	if at > limit-SectorSize || readAt(v.r, hdr, at) != nil || !bytes.Equal(hdr[:8], []byte(batmapCookie)) {
		if always {
			return nil, c.corrupt(at, "batmap header", "missing (no %q cookie after the BAT): tap %d.%d images carry one", batmapCookie, v.Footer.CreatorVersion>>16, v.Footer.CreatorVersion&0xffff)
		}
		return nil, true // tap 1.1 converted from 0.1 has none
	}
	off, secs, ver, sum := be.Uint64(hdr[8:]), be.Uint32(hdr[16:]), be.Uint32(hdr[20:]), be.Uint32(hdr[24:])
	// libvhd sums the bytes one bit per 2 MiB of the disk needs, in whole
	// sectors, whatever the block size.
	mapBytes := max(roundUp(v.Footer.CurrentSize>>24, SectorSize), SectorSize)
	bs := uint64(h.BlockSize)
	blocks := (v.Footer.CurrentSize + bs - 1) / bs
	switch {
	case ver > batmapMaxVer:
		return nil, c.corrupt(at, "batmap header", "version %d.%d is newer than 1.2", ver>>16, ver&0xffff)
	case secs == 0:
		return nil, c.corrupt(at, "batmap header", "batmap size is zero")
	case uint64(secs)<<12 < uint64(h.MaxTableEntries):
		return nil, c.corrupt(at, "batmap header", "a batmap of %d sectors holds fewer bits than the %d BAT entries", secs, h.MaxTableEntries)
	case off == 0 || off%SectorSize != 0:
		return nil, c.corrupt(at, "batmap header", "batmap offset %#x is not a sector of the file", off)
	case off > uint64(limit) || uint64(limit)-off < uint64(secs)*SectorSize:
		return nil, c.corrupt(at, "batmap header", "the batmap at %#x (%d sectors) runs past the end of the image (%#x)", off, secs, limit)
	case mapBytes > uint64(secs)*SectorSize:
		return nil, c.corrupt(at, "batmap header", "a batmap of %d sectors is smaller than the %d bytes the disk needs", secs, mapBytes)
	}
	// Sum the batmap a MiB at a time; keep the bits of the blocks.
	keep := make([]byte, (blocks+7)/8)
	chunk := make([]byte, min(mapBytes, 1<<20))
	var s uint32
	for pos := uint64(0); pos < mapBytes; {
		n := min(uint64(len(chunk)), mapBytes-pos)
		if err := readAt(v.r, chunk[:n], int64(off+pos)); err != nil {
			return nil, c.corrupt(int64(off+pos), "batmap", "%v", err)
		}
		for _, b := range chunk[:n] {
			if ver == 1<<16|1 {
				s += uint32(int32(int8(b))) // batmap 1.1 summed signed chars
			} else {
				s += uint32(b)
			}
		}
		if pos < uint64(len(keep)) {
			copy(keep[pos:], chunk[:n])
		}
		pos += n
	}
	if ^s != sum {
		return nil, c.corrupt(int64(off), "batmap", "bad checksum %#08x (the batmap sums to %#08x)", sum, ^s)
	}
	if uint64(len(keep)) > mapBytes {
		// Blocks past what libvhd sums read as not full.
		clear(keep[mapBytes:])
	}
	v.full = keep
	return []region{{at, SectorSize, "batmap header"}, {int64(off), int64(secs) * SectorSize, "batmap"}}, true
}

// bat reads the BAT entries that map the virtual size and checks that
// each block (bitmap and data) lies inside the image, clear of its
// metadata and of every other block.
func (c *validator) bat(v *Reader, limit int64, regions []region) bool {
	h, f := v.Header, v.Footer
	bs := uint64(h.BlockSize)
	n := (f.CurrentSize + bs - 1) / bs
	span := v.bitmapBytes + int64(bs)
	v.bat = make([]uint32, n)
	chunk := make([]byte, min(n*4, 1<<20))
	entryAt := func(i uint64) int64 { return int64(h.TableOffset + i*4) }
	var allocated []uint32 // indices, sorted by offset below
	for i := uint64(0); i < n; {
		k := min(n-i, uint64(len(chunk))/4)
		if err := readAt(v.r, chunk[:k*4], entryAt(i)); err != nil {
			c.corrupt(entryAt(i), "BAT", "%v", err)
			return false
		}
		for j := uint64(0); j < k; j++ {
			e := be.Uint32(chunk[j*4:])
			v.bat[i+j] = e
			if e == unallocated {
				if v.batmapFull(int(i+j)) && !c.corrupt(entryAt(i+j), "batmap", "marks block %d full, but the BAT does not allocate it", i+j) {
					return false
				}
				continue
			}
			b := region{int64(e) * SectorSize, span, ""}
			bad := b.start+b.length > limit
			if bad && !c.corrupt(entryAt(i+j), "BAT", "entry %d: block at %#x runs past the end of the image (%s)", i+j, b.start, dataEnd(limit, v.size)) {
				return false
			}
			for _, m := range regions {
				if !bad && overlaps(b, m) {
					bad = true
					if !c.corrupt(entryAt(i+j), "BAT", "entry %d: block at %#x overlaps the %s at %#x", i+j, b.start, m.what, m.start) {
						return false
					}
				}
			}
			c.rep.AllocatedBlocks++
			if bad {
				v.bat[i+j] = unallocated // left out of the walk of the bitmaps
				continue
			}
			allocated = append(allocated, uint32(i+j))
		}
		i += k
	}
	// blktap allocates blocks at the end of the file: the table is
	// usually in order already, and then not sorted again.
	byOffset := func(a, b uint32) int {
		if x, y := v.bat[a], v.bat[b]; x != y {
			if x < y {
				return -1
			}
			return 1
		}
		return int(a) - int(b)
	}
	if !slices.IsSortedFunc(allocated, byOffset) {
		slices.SortFunc(allocated, byOffset)
	}
	for k := 1; k < len(allocated); k++ {
		p, q := allocated[k-1], allocated[k]
		ps, qs := int64(v.bat[p])*SectorSize, int64(v.bat[q])*SectorSize
		if ps+span > qs && !c.corrupt(entryAt(uint64(q)), "BAT", "entry %d: block at %#x overlaps the block of entry %d at %#x", q, qs, p, ps) {
			return false
		}
	}
	c.rep.Blocks = int(n)
	return true
}

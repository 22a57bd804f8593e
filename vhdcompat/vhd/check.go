package vhd

import "io"

// Check checks the structure of the image in r (size bytes long) and
// reports every finding: the footer's and the dynamic header's cookies and
// checksums, the footer copy at offset 0 against the one at the end, the
// BAT inside the file, each block (bitmap and data) inside the image and
// clear of the metadata and of every other block, the parent locators,
// blktap's batmap against the BAT and the bitmaps, and early tapdisk's
// quirks (as warnings). NewReader refuses an image at the first corruption
// Check reports, in the same words.
//
// The error is ErrNotVHD when r holds no VHD, or the error of a read that
// failed: then the check could not be completed.
func Check(r io.ReaderAt, size int64) (*Report, error) {
	c := &validator{}
	v, err := c.open(r, size)
	if err != nil {
		return nil, err
	}
	c.rep.Reader = v
	if v == nil || v.Header == nil {
		if v != nil {
			c.rep.MarkedBytes = v.VirtualSize()
		}
		return &c.rep, nil
	}
	// Every allocated block's bitmap: readable, and full where the
	// batmap says so.
	bs := v.BlockSize()
	sectors := bs / SectorSize
	for i, e := range v.bat {
		if e == unallocated {
			continue
		}
		bm, err := v.readBitmap(i)
		if err != nil {
			if !isFormat(err) {
				return nil, err
			}
			c.corruptErr(err)
			continue
		}
		// Sectors past the virtual size do not count.
		n := min(sectors, (v.VirtualSize()-int64(i)*bs+SectorSize-1)/SectorSize)
		for s := int64(0); s < n; {
			set := v.bitSet(bm, s)
			run := v.runLength(bm, s, n, set)
			if set {
				c.rep.MarkedBytes += run * SectorSize
			}
			s += run
		}
	}
	return &c.rep, nil
}

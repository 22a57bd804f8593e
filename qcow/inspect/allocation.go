package inspect

import (
	"io"

	"github.com/xapi-project/xapi-qcow-tool/qcow"
)

// Walk calls fn for every guest range of the qcow2 image in r, in guest
// order, with what the image alone says the range reads as: data, zero
// (zero clusters and subclusters) or unallocated (left to the backing file).
// It reads the header and the L1 and L2 tables only, never data. Ranges of
// one kind that follow each other are merged; an error from fn stops the
// walk and is returned.
func Walk(r io.ReaderAt, size int64, fn func(start, length uint64, kind qcow.ExtentKind) error) error {
	im, err := openImage(r, size)
	if err != nil {
		return err
	}
	var cur piece
	err = walkFile(im, func(p piece) error {
		if cur.length > 0 && cur.kind == p.kind && cur.start+cur.length == p.start {
			cur.length += p.length
			return nil
		}
		if cur.length > 0 {
			if err := fn(cur.start, cur.length, cur.kind); err != nil {
				return err
			}
		}
		cur = piece{start: p.start, length: p.length, kind: p.kind}
		return nil
	})
	if err != nil || cur.length == 0 {
		return err
	}
	return fn(cur.start, cur.length, cur.kind)
}

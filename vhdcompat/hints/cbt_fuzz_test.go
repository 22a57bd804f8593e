package hints

import (
	"bytes"
	"encoding/base64"
	"testing"
)

// FuzzParseChangedBlocks: the base64 bitmap of VDI.list_changed_blocks.
// A cluster must be flagged exactly when a 64 KiB block in it is.
func FuzzParseChangedBlocks(f *testing.F) {
	seedFiles(f, "cbt/*.b64", func(b []byte) {
		for _, cb := range []uint8{9, 16, 21} {
			f.Add(b, cb, uint32(16<<20>>cb))
		}
	})
	f.Fuzz(func(t *testing.T, text []byte, clusterBits uint8, clusters uint32) {
		cb := 9 + uint32(clusterBits)%13
		bm, err := ParseChangedBlocks(bytes.NewReader(text), cb, uint64(clusters))
		if err != nil {
			return
		}
		if bm.Len() != uint64(clusters) {
			t.Fatalf("bitmap of %d clusters for %d", bm.Len(), clusters)
		}
		if clusters > 1<<16 {
			return
		}
		raw, err := base64.StdEncoding.DecodeString(string(bytes.Join(bytes.Fields(text), nil)))
		if err != nil {
			t.Fatalf("accepted text that is not base64: %v", err)
		}
		cs := uint64(1) << cb
		for c := uint64(0); c < uint64(clusters); c++ {
			want := false
			for blk := c * cs / CBTBlockSize; blk*CBTBlockSize < (c+1)*cs; blk++ {
				want = want || raw[blk/8]&(0x80>>(blk%8)) != 0
			}
			if bm.Test(c) != want {
				t.Fatalf("cluster %d (of %d bytes): flagged %v, its blocks say %v", c, cs, bm.Test(c), want)
			}
		}
	})
}

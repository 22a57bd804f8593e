package hints

import (
	"bytes"
	"encoding/base64"
	"fmt"
	"io"

	"github.com/xapi-project/xapi-qcow-tool/qcow/bitmap"
)

// CBTBlockSize is the granularity of XenServer's changed block tracking:
// one bit per 64 KiB block.
const CBTBlockSize = 64 << 10

// ParseChangedBlocks decodes the base64 bitmap of VDI.list_changed_blocks
// into a bitmap of clusters of size 1<<clusterBits for a disk of the given
// number of clusters. Bits are most significant first: block i is
// (byte[i/8] >> (7 - i%8)) & 1. A cluster is flagged if any block in it is.
// The bitmap must cover the whole disk.
func ParseChangedBlocks(r io.Reader, clusterBits uint32, clusters uint64) (*bitmap.Bitmap, error) {
	cs := uint64(1) << clusterBits
	diskBytes := clusters * cs
	blocks := (diskBytes + CBTBlockSize - 1) / CBTBlockSize
	// Base64 of the bitmap, with slack for padding and line breaks.
	limit := int64((blocks+7)/8*4/3) + 4096 + int64(blocks/8/32)
	text, err := io.ReadAll(io.LimitReader(r, limit+1))
	if err != nil {
		return nil, err
	}
	if int64(len(text)) > limit {
		return nil, fmt.Errorf("changed block bitmap is longer than a disk of %d bytes needs", diskBytes)
	}
	text = bytes.Join(bytes.Fields(text), nil)
	raw := make([]byte, base64.StdEncoding.DecodedLen(len(text)))
	n, err := base64.StdEncoding.Decode(raw, text)
	if err != nil {
		return nil, fmt.Errorf("changed block bitmap is not valid base64: %v", err)
	}
	raw = raw[:n]
	if uint64(len(raw))*8 < blocks {
		return nil, fmt.Errorf("changed block bitmap covers %d bytes of a %d-byte disk", uint64(len(raw))*8*CBTBlockSize, diskBytes)
	}
	bm := bitmap.New(clusters)
	for i := uint64(0); i < blocks; i++ {
		if raw[i/8]&(0x80>>(i%8)) == 0 {
			continue
		}
		first := i * CBTBlockSize / cs
		last := ((i+1)*CBTBlockSize + cs - 1) / cs
		bm.SetRange(first, min(last, clusters))
	}
	return bm, nil
}

package qcow

import (
	"bytes"
	"compress/flate"
	"encoding/binary"
	"io"

	"github.com/klauspost/compress/zstd"
)

// compressedExtent is the data extent of the compressed cluster of guest
// cluster g whose bytes src were found at host offset at.
func (d *decoder) compressedExtent(at, g uint64, src []byte) (Extent, error) {
	out, err := d.decompress(at, g, src)
	if err != nil {
		return Extent{}, err
	}
	length := min(d.cs, d.h.Size-g<<d.cb)
	return Extent{Kind: ExtentData, Offset: g << d.cb, Length: length, Data: out[:length],
		HostOffset: at, Compressed: true}, nil
}

// decompress inflates one compressed cluster from src into d.cbuf.
func (d *decoder) decompress(at uint64, g uint64, src []byte) ([]byte, error) {
	if d.cbuf == nil {
		d.cbuf = make([]byte, d.cs)
	}
	out := d.cbuf
	var r io.Reader
	br := bytes.NewReader(src)
	switch d.h.CompressionType {
	case CompressionDeflate:
		if d.fdec == nil {
			d.fdec = flate.NewReader(br)
		} else if err := d.fdec.(flate.Resetter).Reset(br, nil); err != nil {
			return nil, d.errf(at, "compressed cluster for guest %#x: %v", g<<d.cb, err)
		}
		r = d.fdec
	case CompressionZstd:
		// The bytes after the frame may be the next cluster's frame, which
		// a zstd stream decoder would carry on into: decode exactly one.
		n, err := zstdFrameLen(src)
		if err != nil {
			return nil, d.errf(at, "compressed cluster for guest %#x is corrupt: %v", g<<d.cb, err)
		}
		if d.zdec == nil {
			z, err := zstd.NewReader(nil, zstd.WithDecoderConcurrency(1), zstd.WithDecoderLowmem(true),
				zstd.WithDecoderMaxWindow(max(2*d.cs, zstd.MinWindowSize)), zstd.WithDecoderMaxMemory(d.cs))
			if err != nil {
				return nil, d.errf(at, "compressed cluster for guest %#x: %v", g<<d.cb, err)
			}
			d.zdec = z
		}
		res, err := d.zdec.DecodeAll(src[:n], out[:0])
		if err != nil {
			return nil, d.errf(at, "compressed cluster for guest %#x is corrupt: %v", g<<d.cb, err)
		}
		if uint64(len(res)) != d.cs {
			return nil, d.errf(at, "compressed cluster for guest %#x decompresses to %d bytes, not one cluster", g<<d.cb, len(res))
		}
		return res, nil
	}
	if n, err := io.ReadFull(r, out); err != nil {
		if err == io.EOF || err == io.ErrUnexpectedEOF {
			return nil, d.errf(at, "compressed cluster for guest %#x decompresses to %d bytes, not a whole cluster", g<<d.cb, n)
		}
		return nil, d.errf(at, "compressed cluster for guest %#x is corrupt: %v", g<<d.cb, err)
	}
	// The compressed length is only an upper bound: what follows the end
	// of the compressed data is not ours to judge, but more output is.
	var one [1]byte
	if n, _ := r.Read(one[:]); n > 0 {
		return nil, d.errf(at, "compressed cluster for guest %#x decompresses to more than a cluster", g<<d.cb)
	}
	return out, nil
}

// zstdFrameLen returns the length of the zstd frame at the start of src,
// walking its block headers (RFC 8878).
func zstdFrameLen(src []byte) (int, error) {
	if len(src) < 6 || binary.LittleEndian.Uint32(src) != 0xFD2FB528 {
		return 0, errZstdNotAFrame
	}
	fhd := src[4]
	if fhd&0x08 != 0 {
		return 0, errZstdReserved
	}
	single := fhd>>5&1 != 0
	pos := 5
	if !single {
		pos++
	}
	pos += [4]int{0, 1, 2, 4}[fhd&3]
	fcs := [4]int{0, 2, 4, 8}[fhd>>6]
	if fhd>>6 == 0 && single {
		fcs = 1
	}
	pos += fcs
	for {
		if pos+3 > len(src) {
			return 0, errZstdTruncated
		}
		bh := int(src[pos]) | int(src[pos+1])<<8 | int(src[pos+2])<<16
		pos += 3
		size := bh >> 3
		switch bh >> 1 & 3 {
		case 1: // RLE: one byte repeated
			size = 1
		case 3:
			return 0, errZstdBlockType
		}
		pos += size
		if pos > len(src) {
			return 0, errZstdTruncated
		}
		if bh&1 != 0 {
			break
		}
	}
	if fhd&0x04 != 0 {
		pos += 4
	}
	if pos > len(src) {
		return 0, errZstdTruncated
	}
	return pos, nil
}

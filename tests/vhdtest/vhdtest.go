// Package vhdtest builds VHD images for tests, dynamic and differencing,
// from the VHD specification: qemu-img cannot make differencing disks, so
// tests make their own and prove each with libvhdi before judging with it.
package vhdtest

import (
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"unicode/utf16"
)

var be = binary.BigEndian

// Image is a VHD being built. Writes are held in memory, block by block,
// until Save.
type Image struct {
	Size      int64  // virtual size, a multiple of 512
	BlockSize uint32 // default 2 MiB
	UniqueID  [16]byte
	Timestamp uint32
	// Parent, when set, makes a differencing disk naming it by ParentName
	// (its file name, as blktap writes) in the header and in a MacX and a
	// W2ru locator ("./name").
	Parent     *Image
	ParentName string

	blocks map[int64]*block
}

type block struct {
	bitmap []byte
	data   []byte
}

// New returns a dynamic image of size bytes.
func New(size int64) *Image {
	im := &Image{Size: size, BlockSize: 2 << 20, Timestamp: 0x2a000000, blocks: map[int64]*block{}}
	if _, err := rand.Read(im.UniqueID[:]); err != nil {
		panic(err)
	}
	return im
}

// Child returns a differencing image over parent, saved as parentName.
func Child(parent *Image, parentName string) *Image {
	im := New(parent.Size)
	im.BlockSize = parent.BlockSize
	im.Parent, im.ParentName = parent, parentName
	return im
}

// Write stores p at off; both must be whole sectors.
func (im *Image) Write(off int64, p []byte) {
	if off%512 != 0 || len(p)%512 != 0 || off+int64(len(p)) > im.Size {
		panic(fmt.Sprintf("vhdtest: write of %d bytes at %d", len(p), off))
	}
	bs := int64(im.BlockSize)
	for len(p) > 0 {
		i, within := off/bs, off%bs
		b := im.blocks[i]
		if b == nil {
			b = &block{bitmap: make([]byte, bitmapBytes(bs)), data: make([]byte, bs)}
			im.blocks[i] = b
		}
		n := min(int64(len(p)), bs-within)
		copy(b.data[within:], p[:n])
		for s := within / 512; s < (within+n)/512; s++ {
			b.bitmap[s/8] |= 0x80 >> (s % 8)
		}
		p, off = p[n:], off+n
	}
}

func bitmapBytes(bs int64) int64 { return (bs/512/8 + 511) / 512 * 512 }

func checksum(b []byte) uint32 {
	var s uint32
	for _, c := range b {
		s += uint32(c)
	}
	return ^s
}

func (im *Image) footer(dataOffset uint64) []byte {
	f := make([]byte, 512)
	copy(f, "conectix")
	be.PutUint32(f[8:], 2)
	be.PutUint32(f[12:], 0x00010000)
	be.PutUint64(f[16:], dataOffset)
	be.PutUint32(f[24:], im.Timestamp)
	copy(f[28:], "tap\x00")
	be.PutUint32(f[32:], 0x00010003)
	copy(f[36:], "Wi2k")
	be.PutUint64(f[40:], uint64(im.Size))
	be.PutUint64(f[48:], uint64(im.Size))
	be.PutUint32(f[56:], 0xffff10ff)
	typ := uint32(3)
	if im.Parent != nil {
		typ = 4
	}
	be.PutUint32(f[60:], typ)
	copy(f[68:], im.UniqueID[:])
	be.PutUint32(f[64:], checksum(f))
	return f
}

func utf16Bytes(s string, order binary.ByteOrder) []byte {
	u := utf16.Encode([]rune(s))
	b := make([]byte, 2*len(u))
	for i, c := range u {
		order.PutUint16(b[2*i:], c)
	}
	return b
}

// Save writes the image to path: footer copy, dynamic header, BAT,
// locator data, blocks in guest order, footer.
func (im *Image) Save(path string) error {
	bs := int64(im.BlockSize)
	entries := (im.Size + bs - 1) / bs
	const headerAt, batAt = 512, 1536
	batLen := (entries*4 + 511) / 512 * 512
	next := int64(batAt) + batLen

	hdr := make([]byte, 1024)
	copy(hdr, "cxsparse")
	be.PutUint64(hdr[8:], ^uint64(0))
	be.PutUint64(hdr[16:], batAt)
	be.PutUint32(hdr[24:], 0x00010000)
	be.PutUint32(hdr[28:], uint32(entries))
	be.PutUint32(hdr[32:], im.BlockSize)
	var locData [][2]any
	if im.Parent != nil {
		copy(hdr[40:], im.Parent.UniqueID[:])
		be.PutUint32(hdr[56:], im.Parent.Timestamp)
		copy(hdr[64:576], utf16Bytes(im.ParentName, binary.BigEndian))
		macx := []byte("file://./" + im.ParentName)
		w2ru := utf16Bytes(`.\`+im.ParentName, binary.LittleEndian)
		for i, l := range []struct {
			code uint32
			data []byte
		}{{0x4d616358, macx}, {0x57327275, w2ru}} {
			e := hdr[576+24*i:]
			space := (int64(len(l.data)) + 511) / 512 * 512
			be.PutUint32(e, l.code)
			be.PutUint32(e[4:], uint32(space))
			be.PutUint32(e[8:], uint32(len(l.data)))
			be.PutUint64(e[16:], uint64(next))
			locData = append(locData, [2]any{next, l.data})
			next += space
		}
	}
	be.PutUint32(hdr[36:], checksum(hdr))

	bat := make([]byte, batLen)
	for i := range bat {
		bat[i] = 0xff
	}
	idx := make([]int64, 0, len(im.blocks))
	for i := range im.blocks {
		idx = append(idx, i)
	}
	sort.Slice(idx, func(a, b int) bool { return idx[a] < idx[b] })
	blockAt := map[int64]int64{}
	for _, i := range idx {
		be.PutUint32(bat[4*i:], uint32(next/512))
		blockAt[i] = next
		next += bitmapBytes(bs) + bs
	}

	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	defer f.Close()
	foot := im.footer(headerAt)
	writes := [][2]any{{int64(0), foot}, {int64(headerAt), hdr}, {int64(batAt), bat}}
	writes = append(writes, locData...)
	for _, i := range idx {
		b := im.blocks[i]
		writes = append(writes, [2]any{blockAt[i], b.bitmap}, [2]any{blockAt[i] + bitmapBytes(bs), b.data})
	}
	writes = append(writes, [2]any{next, foot})
	for _, w := range writes {
		if _, err := f.WriteAt(w[1].([]byte), w[0].(int64)); err != nil {
			return err
		}
	}
	return f.Close()
}

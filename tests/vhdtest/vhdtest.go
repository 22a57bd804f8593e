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
	// ParentTimestamp, when not zero, is recorded instead of the parent's
	// footer time stamp.
	ParentTimestamp uint32

	// CreatorApp and CreatorVersion are the footer's (default "tap" 1.3,
	// what blktap writes). tap 1.2 and later images get blktap's batmap
	// (a bit per block, set where the block is full); tap 0.1 images get
	// least-significant-bit-first sector bitmaps, as libvhd wrote them.
	CreatorApp     string
	CreatorVersion uint32
	// Hidden is blktap's hidden flag; with HiddenUnsummed the footer's
	// checksum leaves it out, as early tapdisk (tap 0.1, 1.1) wrote it,
	// and only the copy at offset 0 carries it.
	Hidden         byte
	HiddenUnsummed bool
	// ShortFooter writes the footer at the end 511 bytes long.
	ShortFooter bool

	blocks map[int64]*block
}

type block struct {
	bitmap []byte
	data   []byte
}

// New returns a dynamic image of size bytes.
func New(size int64) *Image {
	im := &Image{Size: size, BlockSize: 2 << 20, Timestamp: 0x2a000000, CreatorApp: "tap", CreatorVersion: 0x00010003, blocks: map[int64]*block{}}
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
			if im.lsbBitmaps() {
				b.bitmap[s/8] |= 1 << (s % 8)
			} else {
				b.bitmap[s/8] |= 0x80 >> (s % 8)
			}
		}
		p, off = p[n:], off+n
	}
}

func (im *Image) lsbBitmaps() bool { return im.CreatorApp == "tap" && im.CreatorVersion == 1 }

func (im *Image) hasBatmap() bool { return im.CreatorApp == "tap" && im.CreatorVersion >= 0x00010002 }

// full reports whether every sector of the block is written.
func (im *Image) full(b *block) bool {
	for s := int64(0); s < int64(im.BlockSize)/512; s++ {
		bit := byte(0x80 >> (s % 8))
		if im.lsbBitmaps() {
			bit = 1 << (s % 8)
		}
		if b.bitmap[s/8]&bit == 0 {
			return false
		}
	}
	return true
}

func bitmapBytes(bs int64) int64 { return ((bs/512+7)/8 + 511) / 512 * 512 }

func checksum(b []byte) uint32 {
	var s uint32
	for _, c := range b {
		s += uint32(c)
	}
	return ^s
}

func (im *Image) footer(dataOffset uint64, hidden byte) []byte {
	f := make([]byte, 512)
	copy(f, "conectix")
	be.PutUint32(f[8:], 2)
	be.PutUint32(f[12:], 0x00010000)
	be.PutUint64(f[16:], dataOffset)
	be.PutUint32(f[24:], im.Timestamp)
	copy(f[28:32], im.CreatorApp+"\x00\x00\x00\x00")
	be.PutUint32(f[32:], im.CreatorVersion)
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
	if !im.HiddenUnsummed {
		f[85] = hidden
	}
	be.PutUint32(f[64:], checksum(f))
	f[85] = hidden
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
	var batmap []byte
	batmapAt := next
	if im.hasBatmap() {
		mapBytes := max((im.Size>>24+511)/512*512, 512)
		secs := max(mapBytes, ((entries+7)/8+511)/512*512) / 512
		batmap = make([]byte, 512+secs*512)
		copy(batmap, "tdbatmap")
		be.PutUint64(batmap[8:], uint64(next+512))
		be.PutUint32(batmap[16:], uint32(secs))
		be.PutUint32(batmap[20:], 0x00010002)
		for i, b := range im.blocks {
			if im.full(b) {
				batmap[512+i/8] |= 0x80 >> (i % 8)
			}
		}
		var sum uint32
		for _, c := range batmap[512 : 512+mapBytes] {
			sum += uint32(c)
		}
		be.PutUint32(batmap[24:], ^sum)
		next += int64(len(batmap))
	}
	if im.Parent != nil {
		copy(hdr[40:], im.Parent.UniqueID[:])
		ts := im.Parent.Timestamp
		if im.ParentTimestamp != 0 {
			ts = im.ParentTimestamp
		}
		be.PutUint32(hdr[56:], ts)
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
	writes := [][2]any{{int64(0), im.footer(headerAt, im.Hidden)}, {int64(headerAt), hdr}, {int64(batAt), bat}}
	if batmap != nil {
		writes = append(writes, [2]any{batmapAt, batmap})
	}
	writes = append(writes, locData...)
	for _, i := range idx {
		b := im.blocks[i]
		writes = append(writes, [2]any{blockAt[i], b.bitmap}, [2]any{blockAt[i] + bitmapBytes(bs), b.data})
	}
	// Early tapdisk hid an image in the copy at offset 0 only.
	hidden := im.Hidden
	if im.HiddenUnsummed {
		hidden = 0
	}
	foot := im.footer(headerAt, hidden)
	if im.ShortFooter {
		foot = foot[:511]
	}
	writes = append(writes, [2]any{next, foot})
	for _, w := range writes {
		if _, err := f.WriteAt(w[1].([]byte), w[0].(int64)); err != nil {
			return err
		}
	}
	return f.Close()
}

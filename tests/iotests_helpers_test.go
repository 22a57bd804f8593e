package tests

import (
	"encoding/binary"
	"os"
	"os/exec"
	"testing"
)

// Byte-level editing of qcow2 files for the qemu-iotests corpus: the
// iotests damage images with poke_file and qcow2.py; these are the same
// operations, written for this package.

// Header field offsets (docs/interop/qcow2.txt).
const (
	hdrVersion       = 4
	hdrBackingOffset = 8
	hdrBackingSize   = 16
	hdrClusterBits   = 20
	hdrSize          = 24
	hdrL1Size        = 36
	hdrL1Offset      = 40
	hdrRTOffset      = 48
	hdrRTClusters    = 56
	hdrNbSnapshots   = 60
	hdrSnapOffset    = 64
	hdrIncompat      = 72
	hdrCompat        = 80
	hdrAutoclear     = 88
	hdrRefcountOrder = 96
	hdrHeaderLength  = 100

	offsetMask = 0x00fffffffffffe00 // bits 9-55 of a table entry
)

// poke writes b at off of path, extending it if needed.
func poke(t testing.TB, path string, off int64, b ...byte) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(b, off); err != nil {
		t.Fatal(err)
	}
}

// pokeBE writes v big-endian in width bytes (2, 4 or 8) at off.
func pokeBE(t testing.TB, path string, off int64, width int, v uint64) {
	t.Helper()
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], v)
	poke(t, path, off, b[8-width:]...)
}

// peekBE reads a big-endian value of width bytes at off.
func peekBE(t testing.TB, path string, off int64, width int) uint64 {
	t.Helper()
	b := readAt(t, path, off, int64(width))
	var v [8]byte
	copy(v[8-width:], b)
	return binary.BigEndian.Uint64(v[:])
}

// qcowLayout is where the first structures of an image are.
type qcowLayout struct {
	cs       int64
	rt, rb   int64 // refcount table, first refcount block
	l1, l2   int64 // L1 table, L2 table of L1 entry 0 (0: none)
	snapshot int64 // snapshot table
}

func layoutOf(t testing.TB, img string) qcowLayout {
	t.Helper()
	l := qcowLayout{
		cs:       1 << peekBE(t, img, hdrClusterBits, 4),
		rt:       int64(peekBE(t, img, hdrRTOffset, 8)),
		l1:       int64(peekBE(t, img, hdrL1Offset, 8)),
		snapshot: int64(peekBE(t, img, hdrSnapOffset, 8)),
	}
	l.rb = int64(peekBE(t, img, l.rt, 8) & offsetMask)
	l.l2 = int64(peekBE(t, img, l.l1, 8) & offsetMask)
	return l
}

// qemuMay runs a qemu tool whose failure is part of the iotest (a snapshot
// refused for lack of refcount bits, a process killed on purpose).
func qemuMay(tool string, args ...string) {
	exec.Command(tool, args...).Run()
}

// headerExts returns the start of the header extensions and the raw
// extensions (type, data) of img, up to the end marker.
func headerExts(t testing.TB, img string) (start int64, exts [][2][]byte, backing []byte) {
	t.Helper()
	start = 72
	if peekBE(t, img, hdrVersion, 4) == 3 {
		start = int64(peekBE(t, img, hdrHeaderLength, 4))
	}
	cs := int64(1) << peekBE(t, img, hdrClusterBits, 4)
	cluster := readAt(t, img, 0, cs)
	if bo, bs := peekBE(t, img, hdrBackingOffset, 8), peekBE(t, img, hdrBackingSize, 4); bo != 0 {
		backing = append([]byte(nil), cluster[bo:bo+bs]...)
	}
	for off := start; off+8 <= cs; {
		typ, n := cluster[off:off+4], int64(binary.BigEndian.Uint32(cluster[off+4:]))
		if binary.BigEndian.Uint32(typ) == 0 {
			break
		}
		exts = append(exts, [2][]byte{append([]byte(nil), typ...), append([]byte(nil), cluster[off+8:off+8+n]...)})
		off += 8 + (n+7)&^7
	}
	return start, exts, backing
}

// rewriteHeaderExts writes exts, the end marker and the backing file name
// (moved behind them) into cluster 0 of img.
func rewriteHeaderExts(t testing.TB, img string, start int64, exts [][2][]byte, backing []byte) {
	t.Helper()
	var b []byte
	for _, e := range exts {
		var h [8]byte
		copy(h[:4], e[0])
		binary.BigEndian.PutUint32(h[4:], uint32(len(e[1])))
		b = append(b, h[:]...)
		b = append(b, e[1]...)
		b = append(b, make([]byte, (8-len(e[1])%8)%8)...)
	}
	b = append(b, make([]byte, 8)...)
	if backing != nil {
		pokeBE(t, img, hdrBackingOffset, 8, uint64(start)+uint64(len(b)))
		b = append(b, backing...)
	}
	if cs := int64(1) << peekBE(t, img, hdrClusterBits, 4); start+int64(len(b)) > cs {
		t.Fatalf("header extensions do not fit in cluster 0")
	}
	poke(t, img, start, b...)
}

// addHeaderExt appends a header extension of type typ to img.
func addHeaderExt(t testing.TB, img string, typ uint32, data []byte) {
	t.Helper()
	start, exts, backing := headerExts(t, img)
	var ty [4]byte
	binary.BigEndian.PutUint32(ty[:], typ)
	rewriteHeaderExts(t, img, start, append(exts, [2][]byte{ty[:], data}), backing)
}

// delHeaderExt removes the header extensions of type typ from img.
func delHeaderExt(t testing.TB, img string, typ uint32) {
	t.Helper()
	start, exts, backing := headerExts(t, img)
	kept := exts[:0]
	for _, e := range exts {
		if binary.BigEndian.Uint32(e[0]) != typ {
			kept = append(kept, e)
		}
	}
	rewriteHeaderExts(t, img, start, kept, backing)
}

// setFeatureBit sets a feature bit of a version 3 header: field is
// hdrIncompat, hdrCompat or hdrAutoclear.
func setFeatureBit(t testing.TB, img string, field int64, bit uint) {
	t.Helper()
	pokeBE(t, img, field, 8, peekBE(t, img, field, 8)|1<<bit)
}

// snapshotEntries returns the offset and length (padded to 8) of each
// entry of the snapshot table of img.
func snapshotEntries(t testing.TB, img string) [][2]int64 {
	t.Helper()
	off := int64(peekBE(t, img, hdrSnapOffset, 8))
	var out [][2]int64
	for i := uint64(0); i < peekBE(t, img, hdrNbSnapshots, 4); i++ {
		n := 40 + int64(peekBE(t, img, off+36, 4)+peekBE(t, img, off+12, 2)+peekBE(t, img, off+14, 2))
		n = (n + 7) &^ 7
		out = append(out, [2]int64{off, n})
		off += n
	}
	return out
}

// setSnapshotExtra rewrites the snapshot table of img with new extra data
// for each entry (nil: unchanged), as iotest 261 builds its tables.
func setSnapshotExtra(t testing.TB, img string, extra ...[]byte) {
	t.Helper()
	var table []byte
	for i, e := range snapshotEntries(t, img) {
		b := readAt(t, img, e[0], e[1])
		old := int64(binary.BigEndian.Uint32(b[36:]))
		names := b[40+old : 40+old+int64(binary.BigEndian.Uint16(b[12:])+binary.BigEndian.Uint16(b[14:]))]
		x := b[40 : 40+old]
		if i < len(extra) && extra[i] != nil {
			x = extra[i]
		}
		var fixed [40]byte
		copy(fixed[:], b[:40])
		binary.BigEndian.PutUint32(fixed[36:], uint32(len(x)))
		entry := append(append(fixed[:], x...), names...)
		table = append(table, entry...)
		table = append(table, make([]byte, (8-len(entry)%8)%8)...)
	}
	off := int64(peekBE(t, img, hdrSnapOffset, 8))
	poke(t, img, off, table...)
}

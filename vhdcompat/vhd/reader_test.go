package vhd_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/xapi-project/xapi-qcow-tool/tests/qemutest"
	"github.com/xapi-project/xapi-qcow-tool/tests/vhdtest"
	"github.com/xapi-project/xapi-qcow-tool/vhdcompat/vhd"
)

func open(t testing.TB, path string) (*vhd.Reader, error) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	fi, _ := f.Stat()
	return vhd.NewReader(f, fi.Size())
}

func stored(t testing.TB, v *vhd.Reader) []vhd.Extent {
	t.Helper()
	var out []vhd.Extent
	var pos int64
	if err := v.Extents(func(e vhd.Extent) error {
		if e.Start != pos || e.Length <= 0 {
			t.Fatalf("extent %+v does not follow %d", e, pos)
		}
		pos += e.Length
		if e.Stored {
			out = append(out, e)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if pos != v.VirtualSize() {
		t.Fatalf("extents cover %d bytes of %d", pos, v.VirtualSize())
	}
	return out
}

// TestQemuDynamicVHD: what qemu-img writes and maps, we read the same way:
// the same stored ranges at the same offsets in the file.
func TestQemuDynamicVHD(t *testing.T) {
	qemutest.Need(t)
	img := filepath.Join(t.TempDir(), "d.vhd")
	qemutest.Img(t, "create", "-q", "-f", "vpc", "-o", "subformat=dynamic,force_size=on", img, "20M")
	qemutest.Run(t, "qemu-io", "-f", "vpc", "-c", "write -P 7 0 4k", "-c", "write -P 9 6M 3M", "-c", "write 19M 512", img)
	v, err := open(t, img)
	if err != nil {
		t.Fatal(err)
	}
	if v.VirtualSize() != 20<<20 || v.Footer.DiskType != vhd.Dynamic || v.BlockSize() != 2<<20 {
		t.Fatalf("size %d type %v block %d", v.VirtualSize(), v.Footer.DiskType, v.BlockSize())
	}
	m := qemutest.Map(t, img)
	var want []vhd.Extent
	for _, e := range m {
		if e.Data {
			want = append(want, vhd.Extent{Start: e.Start, Length: e.Length, Stored: true, HostOffset: *e.Offset})
		}
	}
	// qemu maps block by block; merge runs contiguous in the file.
	var merged []vhd.Extent
	for _, e := range want {
		if n := len(merged); n > 0 && merged[n-1].Start+merged[n-1].Length == e.Start && merged[n-1].HostOffset+merged[n-1].Length == e.HostOffset {
			merged[n-1].Length += e.Length
			continue
		}
		merged = append(merged, e)
	}
	if got := stored(t, v); !equalExtents(got, merged) {
		t.Fatalf("stored extents %+v, qemu-img map says %+v", got, merged)
	}
}

func equalExtents(a, b []vhd.Extent) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// TestBuiltChain: a three-deep differencing chain, proved by libvhdi, is
// read sector by sector from the bitmaps, and each child names its parent.
func TestBuiltChain(t *testing.T) {
	dir := t.TempDir()
	const size = 9 << 20
	raw := make([]byte, size)
	r := rand.New(rand.NewSource(1))
	write := func(im *vhdtest.Image, off, n int64) {
		b := make([]byte, n)
		r.Read(b)
		im.Write(off, b)
		copy(raw[off:], b)
	}
	base := vhdtest.New(size)
	write(base, 0, 1<<20)
	write(base, 5<<20, 4096)
	mid := vhdtest.Child(base, "base.vhd")
	// Inside a block the parent stores. libvhdi (20210425) reads the rest
	// of a bitmap byte from the child once a run of set bits ends inside
	// it, so the chains it proves are written in whole 4 KiB (one bitmap
	// byte); TestSectorGranularity covers runs of single sectors.
	write(mid, 4096, 8192)
	write(mid, 3<<20, 64<<10)
	top := vhdtest.Child(mid, "mid.vhd")
	write(top, size-512, 512)
	for name, im := range map[string]*vhdtest.Image{"base.vhd": base, "mid.vhd": mid, "top.vhd": top} {
		if err := im.Save(filepath.Join(dir, name)); err != nil {
			t.Fatal(err)
		}
	}
	rawPath := filepath.Join(dir, "raw")
	if err := os.WriteFile(rawPath, raw, 0o644); err != nil {
		t.Fatal(err)
	}
	vhdtest.ProveWithLibvhdi(t, rawPath, []string{filepath.Join(dir, "top.vhd"), filepath.Join(dir, "mid.vhd"), filepath.Join(dir, "base.vhd")})

	v, err := open(t, filepath.Join(dir, "mid.vhd"))
	if err != nil {
		t.Fatal(err)
	}
	if v.Footer.DiskType != vhd.Differencing || v.Header.ParentName != "base.vhd" {
		t.Fatalf("type %v parent %q", v.Footer.DiskType, v.Header.ParentName)
	}
	paths := v.ParentPaths()
	if len(paths) != 2 || paths[0] != "./base.vhd" || paths[1] != "./base.vhd" {
		t.Fatalf("parent paths %q", paths)
	}
	got := stored(t, v)
	if len(got) != 2 || got[0].Start != 4096 || got[0].Length != 8192 || got[1].Start != 3<<20 || got[1].Length != 64<<10 {
		t.Fatalf("mid stores %+v", got)
	}
}

// TestSectorGranularity: the bitmap is read sector by sector, most
// significant bit first, across bytes and words.
func TestSectorGranularity(t *testing.T) {
	im := vhdtest.Child(vhdtest.New(4<<20), "p.vhd")
	one := make([]byte, 512)
	want := []vhd.Extent{{Start: 512, Length: 1024}, {Start: 7 * 512, Length: 2 * 512}, {Start: 64 * 512, Length: 65 * 512}, {Start: 2<<20 + 511*512, Length: 512}}
	for _, e := range want {
		for off := e.Start; off < e.Start+e.Length; off += 512 {
			im.Write(off, one)
		}
	}
	p := filepath.Join(t.TempDir(), "c.vhd")
	if err := im.Save(p); err != nil {
		t.Fatal(err)
	}
	v, err := open(t, p)
	if err != nil {
		t.Fatal(err)
	}
	got := stored(t, v)
	if len(got) != len(want) {
		t.Fatalf("stored %+v, want %+v", got, want)
	}
	for i := range got {
		if got[i].Start != want[i].Start || got[i].Length != want[i].Length {
			t.Fatalf("stored %+v, want %+v", got, want)
		}
	}
}

// damage returns a copy of img with b written at off.
func damage(img []byte, off int, b ...byte) []byte {
	out := bytes.Clone(img)
	copy(out[off:], b)
	return out
}

func fixChecksum(b []byte, at int) {
	binary.BigEndian.PutUint32(b[at:], 0)
	var s uint32
	for _, c := range b {
		s += uint32(c)
	}
	binary.BigEndian.PutUint32(b[at:], ^s)
}

func TestRefusals(t *testing.T) {
	dir := t.TempDir()
	im := vhdtest.New(4 << 20)
	im.Write(2<<20, make([]byte, 512))
	p := filepath.Join(dir, "d.vhd")
	if err := im.Save(p); err != nil {
		t.Fatal(err)
	}
	good, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	end := len(good) - 512
	hugeBAT := bytes.Clone(good)
	binary.BigEndian.PutUint32(hugeBAT[512+28:], 1<<30)
	fixChecksum(hugeBAT[512:512+1024], 36)
	oddBlock := bytes.Clone(good)
	binary.BigEndian.PutUint32(oddBlock[512+32:], 3<<20)
	fixChecksum(oddBlock[512:512+1024], 36)
	for _, c := range []struct {
		name string
		img  []byte
		want string
	}{
		{"not a VHD", bytes.Repeat([]byte{1}, 4096), "not a VHD"},
		{"bad cookie in both footers", damage(damage(good, 0, 'x'), end, 'x'), "not a VHD"},
		{"bad checksum in both footers", damage(damage(good, 40, 9), end+40, 9), "bad checksum"},
		{"bad header cookie", damage(good, 512, 'x'), "bad cookie"},
		{"bad header checksum", damage(good, 512+40, 9), "bad checksum"},
		{"BAT entry outside the file", damage(good, 1536+4, 0x7f, 0, 0, 0), "past the end of the image"},
		{"BAT larger than the limit", hugeBAT, "BAT entries"},
		{"block size not a power of two", oddBlock, "block size"},
		{"truncated", good[:2048], "BAT"},
	} {
		t.Run(c.name, func(t *testing.T) {
			_, err := vhd.NewReader(bytes.NewReader(c.img), int64(len(c.img)))
			if err == nil || !bytes.Contains([]byte(err.Error()), []byte(c.want)) {
				t.Fatalf("got %v, want an error about %q", err, c.want)
			}
			var fe *vhd.FormatError
			if !errors.Is(err, vhd.ErrNotVHD) && !errors.As(err, &fe) {
				t.Fatalf("%v is not a typed error", err)
			}
		})
	}
	// One damaged footer is a corruption Check reports, and refused; a
	// footer missing at the end only (a VHD in a logical volume larger
	// than itself) is not.
	for _, off := range []int{0, end} {
		if _, err := vhd.NewReader(bytes.NewReader(damage(good, off+40, 9)), int64(len(good))); err == nil || !strings.Contains(err.Error(), fmt.Sprintf("footer at offset %#x: bad checksum", off)) {
			t.Fatalf("footer at %d damaged: %v", off, err)
		}
	}
	if _, err := vhd.NewReader(bytes.NewReader(damage(good, end, 'x')), int64(len(good))); err != nil {
		t.Fatalf("no footer at the end: %v", err)
	}
}

func FuzzNewReader(f *testing.F) {
	// Small blocks keep the seeds a few KiB: the fuzzer mutates all of it.
	im := vhdtest.New(64 << 10)
	im.BlockSize = 4096
	im.Write(0, bytes.Repeat([]byte{1}, 1024))
	child := vhdtest.Child(im, "p.vhd")
	child.Write(8192, bytes.Repeat([]byte{2}, 512))
	for _, x := range []*vhdtest.Image{im, child} {
		p := filepath.Join(f.TempDir(), "seed.vhd")
		if err := x.Save(p); err != nil {
			f.Fatal(err)
		}
		b, _ := os.ReadFile(p)
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		v, err := vhd.NewReader(bytes.NewReader(b), int64(len(b)))
		if err != nil {
			return
		}
		var pos int64
		_ = v.Extents(func(e vhd.Extent) error {
			if e.Start != pos || e.Length <= 0 {
				t.Fatalf("extent %+v does not follow %d", e, pos)
			}
			pos += e.Length
			return nil
		})
		_ = v.ParentPaths()
	})
}

package vhd_test

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/xapi-project/xapi-qcow-tool/tests/vhdtest"
	"github.com/xapi-project/xapi-qcow-tool/vhdcompat/vhd"
)

// The hostile corpus of check: testdata/check holds small images, each
// with the finding it must produce in testdata/check/MANIFEST. The files
// are built (from a few good images, damaged at known offsets) by
// buildCorpus; `go test ./vhdcompat/vhd -run TestCorpus -update` rewrites
// them, and TestCorpus fails when what is committed is not what it builds.

var update = flag.Bool("update", false, "rewrite testdata/check from buildCorpus")

const corpusDir = "testdata/check"

// Layout of the images vhdtest writes: footer copy, dynamic header, BAT,
// then (tap 1.2 and later) the batmap header and map.
const (
	headerAt       = 512
	batAt          = 1536
	batmapHeaderAt = 2048
	batmapAt       = 2560
)

func id(b byte) [16]byte {
	var u [16]byte
	for i := range u {
		u[i] = b + byte(i)
	}
	return u
}

func fill(b byte, n int) []byte { return bytes.Repeat([]byte{b}, n) }

// small is a 32 KiB dynamic image in 4 KiB blocks (the smallest libvhdi
// reads): block 0 full, block 2 half written, block 5 one sector.
func small(uid byte) *vhdtest.Image {
	im := vhdtest.New(32 << 10)
	im.BlockSize = 4096
	im.UniqueID = id(uid)
	im.Write(0, fill(1, 4096))
	im.Write(2*4096, fill(2, 2048))
	im.Write(5*4096+512, fill(3, 512))
	return im
}

func imageBytes(t testing.TB, im *vhdtest.Image) []byte {
	t.Helper()
	p := filepath.Join(t.TempDir(), "x.vhd")
	if err := im.Save(p); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func sum(b []byte, at int) {
	binary.BigEndian.PutUint32(b[at:], 0)
	var s uint32
	for _, c := range b {
		s += uint32(c)
	}
	binary.BigEndian.PutUint32(b[at:], ^s)
}

// edit returns a copy of img changed by fn.
func edit(img []byte, fn func(b []byte)) []byte {
	out := bytes.Clone(img)
	fn(out)
	return out
}

// footers applies fn to both copies of the footer and fixes their
// checksums.
func footers(fn func(f []byte)) func([]byte) {
	return func(b []byte) {
		for _, at := range []int{0, len(b) - 512} {
			fn(b[at : at+512])
			sum(b[at:at+512], 64)
		}
	}
}

// header applies fn to the dynamic header and fixes its checksum.
func header(fn func(h []byte)) func([]byte) {
	return func(b []byte) {
		fn(b[headerAt : headerAt+1024])
		sum(b[headerAt:headerAt+1024], 36)
	}
}

func bat(i int, v uint32) func([]byte) {
	return func(b []byte) { binary.BigEndian.PutUint32(b[batAt+4*i:], v) }
}

// batmapSum fixes the batmap's checksum (one sector of map).
func batmapSum(b []byte) {
	var s uint32
	for _, c := range b[batmapAt : batmapAt+512] {
		s += uint32(c)
	}
	binary.BigEndian.PutUint32(b[batmapHeaderAt+24:], ^s)
}

type corpusFile struct {
	name string
	data []byte
}

// buildCorpus builds every file of the corpus and its MANIFEST.
func buildCorpus(t testing.TB) ([]corpusFile, string) {
	var files []corpusFile
	var manifest strings.Builder
	manifest.WriteString("# path|exit status of check|--path (chain cases)|piece of the finding's line (empty: clean)\n")
	add := func(name string, exit int, search, want string, data []byte) {
		files = append(files, corpusFile{name, data})
		if exit >= 0 {
			fmt.Fprintf(&manifest, "%s|%d|%s|%s\n", name, exit, search, want)
		}
	}
	good := imageBytes(t, small(0x10))
	end := len(good) - 512
	// The first allocated block (block 0) and its entry.
	blk0 := int(binary.BigEndian.Uint32(good[batAt:])) * 512

	add("clean-dynamic.vhd", 0, "", "", good)
	for _, bs := range []uint32{512, 2048, 8192} {
		im := vhdtest.New(16 << 10)
		im.BlockSize = bs
		im.UniqueID = id(byte(bs >> 8))
		// Whole bitmap bytes where libvhdi judges: it misreads a run of
		// set bits that starts inside a byte in some blocks.
		im.Write(0, fill(4, 1024))
		im.Write(8192, fill(5, 4096))
		if bs < 4096 {
			im.Write(12288+512, fill(6, 512))
		}
		want := fmt.Sprintf("Warning: VHD dynamic header at offset 0x200: block size %d", bs)
		if bs >= 4096 {
			want = ""
		}
		add(fmt.Sprintf("block-%d.vhd", bs), 0, "", want, imageBytes(t, im))
	}
	q := small(0x11)
	q.CreatorApp, q.CreatorVersion = "qemu", 0x00050003
	add("clean-qemu-creator.vhd", 0, "", "", imageBytes(t, q))

	// Footers.
	add("footer-copy-cookie.vhd", 2, "", "missing: a dynamic disk keeps a copy of its footer at offset 0", edit(good, func(b []byte) { b[0] = 'x' }))
	add("footer-copy-checksum.vhd", 2, "", "VHD footer at offset 0x0: bad checksum", edit(good, func(b []byte) { b[40] ^= 1 }))
	add("footer-end-checksum.vhd", 2, "", fmt.Sprintf("VHD footer at offset %#x: bad checksum", end), edit(good, func(b []byte) { b[end+40] ^= 1 }))
	add("footer-end-missing.vhd", 0, "", fmt.Sprintf("Warning: VHD footer at offset %#x: no footer at the end of the image", end), edit(good, func(b []byte) { b[end] = 'x' }))
	// A VHD in a logical volume larger than itself (LVHD): zeros after
	// its footer, to the end of the volume.
	add("lv-larger-than-vhd.vhd", 0, "", fmt.Sprintf("Warning: VHD footer at offset %#x: no footer at the end of the image", len(good)+64<<10-512), append(bytes.Clone(good), make([]byte, 64<<10)...))
	add("footer-copies-differ.vhd", 2, "", fmt.Sprintf("VHD footer copy at offset 0x0: differs from the footer at %#x in its time stamp", end), edit(good, func(b []byte) {
		b[24] ^= 1
		sum(b[:512], 64)
	}))
	add("footer-both-checksums.vhd", 2, "", "VHD footer at offset 0x0: bad checksum", edit(good, func(b []byte) { b[40] ^= 1; b[end+40] ^= 1 }))
	add("footer-version.vhd", 2, "", "file format version 0x00020000 is not 1.x", edit(good, footers(func(f []byte) { f[12], f[13] = 0, 2 })))
	add("footer-disk-type.vhd", 2, "", "disk type 5 is not fixed (2), dynamic (3) or differencing (4)", edit(good, footers(func(f []byte) { f[63] = 5 })))
	add("footer-header-offset.vhd", 2, "", "dynamic header offset 0x10000000 is outside the file", edit(good, footers(func(f []byte) { binary.BigEndian.PutUint64(f[16:], 1<<28) })))
	add("not-a-vhd.img", 1, "", "not a VHD image", fill(7, 8192))

	// Dynamic header.
	add("header-cookie.vhd", 2, "", "VHD dynamic header at offset 0x200: bad cookie", edit(good, func(b []byte) { b[headerAt] = 'x' }))
	add("header-checksum.vhd", 2, "", "VHD dynamic header at offset 0x200: bad checksum", edit(good, func(b []byte) { b[headerAt+100] ^= 1 }))
	add("header-block-size.vhd", 2, "", "block size 3072 is not a power of two", edit(good, header(func(h []byte) { binary.BigEndian.PutUint32(h[32:], 3072) })))
	add("header-version.vhd", 2, "", "header version 0x00030000 is not 1.x", edit(good, header(func(h []byte) { binary.BigEndian.PutUint32(h[24:], 0x00030000) })))

	// BAT.
	add("bat-outside-file.vhd", 2, "", "run past the end of the file", edit(good, header(func(h []byte) { binary.BigEndian.PutUint64(h[16:], uint64(len(good))) })))
	add("bat-too-small.vhd", 2, "", "4 BAT entries cannot map 32768 bytes in blocks of 4096", edit(good, header(func(h []byte) { binary.BigEndian.PutUint32(h[28:], 4) })))
	add("bat-unaligned.vhd", 2, "", "BAT offset 0x601 is not sector aligned", edit(good, header(func(h []byte) { binary.BigEndian.PutUint64(h[16:], batAt+1) })))
	add("bat-entry-past-end.vhd", 2, "", "VHD BAT at offset 0x608: entry 2: block at", edit(good, bat(2, uint32(end/512))))
	add("bat-entry-over-header.vhd", 2, "", "entry 2: block at 0x200 overlaps the dynamic header at 0x200", edit(good, bat(2, 1)))
	add("bat-entry-over-bat.vhd", 2, "", "entry 2: block at 0x600 overlaps the BAT at 0x600", edit(good, bat(2, batAt/512)))
	add("bat-entry-over-batmap.vhd", 2, "", "entry 2: block at 0x800 overlaps the batmap header at 0x800", edit(good, bat(2, batmapHeaderAt/512)))
	add("bat-entries-overlap.vhd", 2, "", fmt.Sprintf("entry 2: block at %#x overlaps the block of entry 0 at %#x", blk0+512, blk0), edit(good, bat(2, uint32(blk0/512+1))))

	// Batmap (tap 1.2 and later).
	add("batmap-missing.vhd", 2, "", "VHD batmap header at offset 0x800: missing", edit(good, func(b []byte) { b[batmapHeaderAt] = 'x' }))
	add("batmap-checksum.vhd", 2, "", "VHD batmap at offset 0xa00: bad checksum", edit(good, func(b []byte) { b[batmapAt+1] ^= 1 }))
	add("batmap-version.vhd", 2, "", "version 1.3 is newer than 1.2", edit(good, func(b []byte) { b[batmapHeaderAt+23] = 3 }))
	add("batmap-outside.vhd", 2, "", "the batmap at 0x10000000 (1 sectors) runs past the end of the image", edit(good, func(b []byte) { binary.BigEndian.PutUint64(b[batmapHeaderAt+8:], 1<<28) }))
	add("batmap-unallocated-full.vhd", 2, "", "marks block 3 full, but the BAT does not allocate it", edit(good, func(b []byte) { b[batmapAt] |= 0x10; batmapSum(b) }))
	add("batmap-bitmap-partial.vhd", 2, "", "block 2: the batmap marks the block full, but its bitmap leaves sector 4 unmarked", edit(good, func(b []byte) { b[batmapAt] |= 0x20; batmapSum(b) }))

	// Early tapdisk: warnings, never corruption.
	early := small(0x12)
	early.CreatorVersion, early.Hidden, early.HiddenUnsummed = 0x00010001, 1, true
	add("early-hidden-checksum.vhd", 0, "", "Warning: VHD footer at offset 0x0: checksum", imageBytes(t, early))
	short := small(0x13)
	short.ShortFooter = true
	add("early-short-footer.vhd", 0, "", "511 bytes long at the end of the file", imageBytes(t, short))
	lsb := small(0x14)
	lsb.CreatorVersion = 1
	add("early-tap-0.1-lsb.vhd", 0, "", "least significant bit first", imageBytes(t, lsb))

	// Fixed disks.
	fixed := edit(good[:512], func(f []byte) {
		binary.BigEndian.PutUint32(f[60:], 2)
		binary.BigEndian.PutUint64(f[16:], ^uint64(0))
		binary.BigEndian.PutUint64(f[40:], 8192)
		binary.BigEndian.PutUint64(f[48:], 8192)
		sum(f, 64)
	})
	add("clean-fixed.vhd", 0, "", "", append(fill(9, 8192), fixed...))
	add("fixed-too-small.vhd", 2, "", "fixed disk of 8192 bytes does not fit in a file of 4608 bytes", append(fill(9, 4096), fixed...))

	// Differencing disks and chains, each in a directory of its own.
	parent := small(0x20)
	pb := imageBytes(t, parent)
	child := vhdtest.Child(parent, "parent.vhd")
	child.UniqueID = id(0x21)
	child.Write(4096, fill(6, 4096))
	cb := imageBytes(t, child)
	add("chain-clean/parent.vhd", -1, "", "", pb)
	add("chain-clean/child.vhd", 0, "", "", cb)
	add("locator-outside/child.vhd", 2, "", "locator 0: data at 0x10000000+", edit(cb, header(func(h []byte) { binary.BigEndian.PutUint64(h[576+16:], 1<<28) })))
	add("locator-outside/parent.vhd", -1, "", "", pb)
	add("locator-too-big/child.vhd", 2, "", "locator 0: 16777216 bytes of platform data is more than 65536", edit(cb, header(func(h []byte) { binary.BigEndian.PutUint32(h[576+8:], 16<<20) })))
	add("locator-too-big/parent.vhd", -1, "", "", pb)
	add("locator-unknown-code/child.vhd", 0, "", "Warning: VHD parent locator at offset 0x440: locator 0: unknown platform code 0x41424344", edit(cb, header(func(h []byte) { copy(h[576:], "ABCD") })))
	add("locator-unknown-code/parent.vhd", -1, "", "", pb)
	add("no-parent-name/child.vhd", 2, "", "differencing VHD names no parent", edit(cb, header(func(h []byte) {
		clear(h[64:576])
		clear(h[576:768])
	})))
	add("parent-missing/child.vhd", 1, "", "parent \"./parent.vhd\" of", cb)
	// The parent's unique id is not the one the child names: a file of
	// the right name from another chain.
	other := small(0x30)
	add("parent-wrong-id/child.vhd", 2, "", "is not the parent of", cb)
	add("parent-wrong-id/parent.vhd", -1, "", "", imageBytes(t, other))
	// The true parent sits in a later --path directory.
	add("parent-in-path/vdi/child.vhd", 0, "parent-in-path/other:parent-in-path/lib", "", cb)
	add("parent-in-path/vdi/parent.vhd", -1, "", "", imageBytes(t, other))
	add("parent-in-path/other/parent.vhd", -1, "", "", imageBytes(t, small(0x31)))
	add("parent-in-path/lib/parent.vhd", -1, "", "", pb)
	// The parent's footer time stamp is not the one the child records:
	// tapdisk does not compare them, check warns.
	ts := vhdtest.Child(parent, "parent.vhd")
	ts.UniqueID, ts.ParentTimestamp = id(0x22), 0x1234
	add("parent-timestamp/child.vhd", 0, "", "time stamp", imageBytes(t, ts))
	add("parent-timestamp/parent.vhd", -1, "", "", pb)
	// A loop: a's parent is b, b's parent is a.
	a, b := small(0x40), small(0x41)
	a.Parent, a.ParentName = b, "b.vhd"
	b.Parent, b.ParentName = a, "a.vhd"
	add("chain-loop/a.vhd", 2, "", "chain has a loop", imageBytes(t, a))
	add("chain-loop/b.vhd", -1, "", "", imageBytes(t, b))
	// A parent whose own image is damaged.
	add("parent-damaged/child.vhd", 2, "", "parent.vhd: VHD dynamic header at offset 0x200: bad checksum", cb)
	add("parent-damaged/parent.vhd", -1, "", "", edit(pb, func(b []byte) { b[headerAt+100] ^= 1 }))
	return files, manifest.String()
}

// TestCorpus checks that the committed corpus is what buildCorpus builds,
// and that Check gives each image of one file its finding (the chain cases
// are run by the hybrid package and the command line tests).
func TestCorpus(t *testing.T) {
	files, manifest := buildCorpus(t)
	if *update {
		os.RemoveAll(corpusDir)
		for _, f := range files {
			p := filepath.Join(corpusDir, f.name)
			os.MkdirAll(filepath.Dir(p), 0o755)
			if err := os.WriteFile(p, f.data, 0o644); err != nil {
				t.Fatal(err)
			}
		}
		if err := os.WriteFile(filepath.Join(corpusDir, "MANIFEST"), []byte(manifest), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	for _, f := range files {
		b, err := os.ReadFile(filepath.Join(corpusDir, f.name))
		if err != nil || !bytes.Equal(b, f.data) {
			t.Fatalf("%s is not what buildCorpus builds (run go test -run TestCorpus -update): %v", f.name, err)
		}
	}
	if m, _ := os.ReadFile(filepath.Join(corpusDir, "MANIFEST")); string(m) != manifest {
		t.Fatal("MANIFEST is not what buildCorpus builds (run go test -run TestCorpus -update)")
	}
	for _, c := range vhdtest.ReadManifest(t, corpusDir, 40) {
		if strings.Contains(c.Path, "/") {
			continue // a chain: the hybrid package's
		}
		t.Run(c.Path, func(t *testing.T) {
			b, _ := os.ReadFile(filepath.Join(corpusDir, c.Path))
			rep, err := vhd.Check(bytes.NewReader(b), int64(len(b)))
			lines := []string{}
			if err != nil {
				lines = append(lines, err.Error())
			} else {
				for _, f := range rep.Findings {
					prefix := ""
					if f.Severity == vhd.Warning {
						prefix = "Warning: "
					}
					lines = append(lines, prefix+f.String())
				}
			}
			exit := 0
			switch {
			case err != nil:
				exit = 1
			case rep.Corruptions > 0:
				exit = 2
			}
			text := strings.Join(lines, "\n")
			if exit != c.Exit || (c.Want == "" && len(lines) > 0) || !strings.Contains(text, c.Want) {
				t.Fatalf("exit %d, findings:\n%s\nwant exit %d and %q", exit, text, c.Exit, c.Want)
			}
			// NewReader (or, for the bitmaps, the walk of the
			// extents) refuses exactly the corrupt ones, with the
			// words of the first corruption.
			v, nerr := vhd.NewReader(bytes.NewReader(b), int64(len(b)))
			if nerr == nil {
				nerr = v.Extents(func(vhd.Extent) error { return nil })
			}
			switch {
			case exit == 2 && (nerr == nil || nerr.Error() != firstCorruption(rep)):
				t.Fatalf("NewReader: %v, want the first corruption %q", nerr, firstCorruption(rep))
			case exit == 0 && nerr != nil:
				t.Fatalf("NewReader refuses a clean image: %v", nerr)
			}
		})
	}
}

func firstCorruption(rep *vhd.Report) string {
	for _, f := range rep.Findings {
		if f.Severity == vhd.Corruption {
			return f.String()
		}
	}
	return ""
}

// libvhdiCannot are the warnings about what libvhdi (20210425) does not
// read as blktap does: blocks under 4 KiB, a file without a 512-byte
// footer at its end, tap 0.1's bitmaps.
var libvhdiCannot = []string{"Warning: VHD dynamic header at offset 0x200: block size", "no footer at the end", "511 bytes long", "least significant bit first"}

// TestCleanImagesReadByLibvhdi: every image of the corpus check passes
// (exit 0) libvhdi reads, as we read it (the stored sectors from the
// image, the rest from the parent, found next to the child, or zeros),
// but for what check warns libvhdi cannot read.
func TestCleanImagesReadByLibvhdi(t *testing.T) {
	n := 0
	for _, c := range vhdtest.ReadManifest(t, corpusDir, 40) {
		if c.Exit != 0 || len(c.Search) > 0 || slices.ContainsFunc(libvhdiCannot, func(w string) bool { return strings.Contains(c.Want, w) }) {
			continue
		}
		n++
		t.Run(c.Path, func(t *testing.T) {
			chain := []string{filepath.Join(corpusDir, c.Path)}
			content := readChain(t, chain[0], &chain)
			got, err := vhdtest.ReadWithLibvhdi(t, chain...)
			if err != nil {
				t.Fatal(err)
			}
			if want := fmt.Sprintf("%x", sha256.Sum256(content)); got != want {
				t.Fatalf("libvhdi reads %s, we read %s", got, want)
			}
		})
	}
	if n < 5 {
		t.Fatalf("only %d clean images in the corpus", n)
	}
}

// readChain reads the disk the image at path describes, appending each
// parent it opens to chain.
func readChain(t *testing.T, path string, chain *[]string) []byte {
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	v, err := vhd.NewReader(bytes.NewReader(b), int64(len(b)))
	if err != nil {
		t.Fatal(err)
	}
	out := make([]byte, v.VirtualSize())
	if names := v.ParentNames(); len(names) > 0 {
		p := filepath.Join(filepath.Dir(path), filepath.Base(names[0]))
		*chain = append(*chain, p)
		copy(out, readChain(t, p, chain))
	}
	err = v.Extents(func(e vhd.Extent) error {
		if e.Stored {
			copy(out[e.Start:e.Start+e.Length], b[e.HostOffset:])
		} else if v.Footer.DiskType != vhd.Differencing {
			clear(out[e.Start : e.Start+e.Length])
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

package tests

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"math/rand"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/xapi-project/xapi-qcow-tool/tests/qemutest"
)

// fill patterns of the export matrix.
var fills = map[string]func(r *rand.Rand, buf []byte, cs int){
	"empty": func(r *rand.Rand, buf []byte, cs int) {},
	"full":  func(r *rand.Rand, buf []byte, cs int) { r.Read(buf) },
	"scattered": func(r *rand.Rand, buf []byte, cs int) {
		for off := 0; off < len(buf); off += cs {
			if r.Intn(3) == 0 {
				r.Read(buf[off:min(off+cs, len(buf))])
			}
		}
	},
	"one-byte-per-cluster": func(r *rand.Rand, buf []byte, cs int) {
		for off := 0; off < len(buf); off += cs {
			buf[min(off+r.Intn(cs), len(buf)-1)] = byte(1 + r.Intn(255))
		}
	},
	"last-partial-cluster": func(r *rand.Rand, buf []byte, cs int) {
		buf[len(buf)-1] = 0xff
		buf[len(buf)-700] = 0x01
	},
}

// TestExportMatrix exports files across cluster sizes, refcount widths,
// sizes that are not cluster aligned (nor 512 aligned) and fill patterns,
// and lets qemu-img judge every image.
func TestExportMatrix(t *testing.T) {
	qemutest.Need(t)
	dir := t.TempDir()
	r := rand.New(rand.NewSource(7))
	sizes := []int64{3<<20 + 1000, 1<<20 + 512}
	for _, cs := range []int{512, 4096, 65536, 2 << 20} {
		for _, rb := range []int{1, 16, 64} {
			for name, fill := range fills {
				size := sizes[r.Intn(len(sizes))]
				t.Run(fmt.Sprintf("c%d/r%d/%s/%d", cs, rb, name, size), func(t *testing.T) {
					raw := filepath.Join(dir, "src.img")
					buf := make([]byte, size)
					fill(r, buf, cs)
					if err := os.WriteFile(raw, buf, 0o644); err != nil {
						t.Fatal(err)
					}
					img := filepath.Join(dir, "out.qcow2")
					exportToFile(t, img, "stream", "--source", raw, "--cluster-size", fmt.Sprint(cs), "--refcount-bits", fmt.Sprint(rb))
					qemutest.Check(t, img)
					qemutest.Compare(t, img, raw)
					info := qemutest.InfoOf(t, img)
					if want := (size + 511) &^ 511; info.VirtualSize != want || info.ClusterSize != int64(cs) {
						t.Fatalf("qemu-img info: virtual size %d cluster %d, want %d %d", info.VirtualSize, info.ClusterSize, want, cs)
					}
					checkPackedInGuestOrder(t, img, buf, int64(cs))
				})
			}
		}
	}
}

// checkPackedInGuestOrder checks the layout contract xapi's streaming
// importers rely on: exactly the non-zero clusters are allocated, and their
// data is packed in guest order at the end of the file, right after the
// metadata (L2 tables end where data starts).
func checkPackedInGuestOrder(t *testing.T, img string, raw []byte, cs int64) {
	t.Helper()
	st, err := os.Stat(img)
	if err != nil {
		t.Fatal(err)
	}
	var nonZero int64
	zero := make([]byte, cs)
	for off := int64(0); off < int64(len(raw)); off += cs {
		c := raw[off:min(off+cs, int64(len(raw)))]
		if !bytes.Equal(c, zero[:len(c)]) {
			nonZero++
		}
	}
	var next, dataBytes int64 = -1, 0
	for _, e := range qemutest.Map(t, img) {
		if !e.Data || e.Depth != 0 {
			continue
		}
		if e.Offset == nil {
			t.Fatalf("data extent at %d without offset", e.Start)
		}
		if next >= 0 && *e.Offset != next {
			t.Fatalf("data at guest %d is at host %d, expected %d: not packed in guest order", e.Start, *e.Offset, next)
		}
		next = *e.Offset + (e.Length+cs-1)/cs*cs
		dataBytes += (e.Length + cs - 1) / cs * cs
	}
	if dataBytes != nonZero*cs {
		t.Fatalf("%d bytes allocated, %d non-zero clusters", dataBytes, nonZero)
	}
	if next >= 0 && next != st.Size() {
		t.Fatalf("data ends at %d, file at %d", next, st.Size())
	}
	// The header says where the metadata is; data must start right after
	// the last L2 table, i.e. file size - data bytes must be the end of
	// the metadata, which is cluster aligned.
	if (st.Size()-dataBytes)%cs != 0 {
		t.Fatalf("metadata end %d not cluster aligned", st.Size()-dataBytes)
	}
	hdr := readHeader(t, img)
	if hdr.l1Offset+((hdr.l1Size*8+cs-1)/cs)*cs > st.Size()-dataBytes {
		t.Fatalf("L1 table ends after the data starts")
	}
}

type rawHeader struct {
	version, clusterBits int64
	l1Offset, l1Size     int64
	refOffset            int64
	backingOffset        int64
	backingSize          int64
}

func readHeader(t testing.TB, img string) rawHeader {
	t.Helper()
	f, err := os.Open(img)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, 112)
	if _, err := f.ReadAt(b, 0); err != nil {
		t.Fatal(err)
	}
	be := binary.BigEndian
	return rawHeader{
		version: int64(be.Uint32(b[4:])), clusterBits: int64(be.Uint32(b[20:])),
		l1Offset: int64(be.Uint64(b[40:])), l1Size: int64(be.Uint32(b[36:])), refOffset: int64(be.Uint64(b[48:])),
		backingOffset: int64(be.Uint64(b[8:])), backingSize: int64(be.Uint32(b[16:])),
	}
}

// seedDisk is the disk of the walk-through the project started from: a
// sparse disk of size bytes whose first three 64 KiB clusters hold random
// data, and its full export. It returns both paths.
func seedDisk(t *testing.T, dir string, r *rand.Rand, size int64) (disk, export string) {
	t.Helper()
	disk = filepath.Join(dir, "a.img")
	sparseFile(t, disk, size)
	for i := int64(0); i < 3; i++ {
		writeRandom(t, r, disk, i<<16, 1<<16)
	}
	export = filepath.Join(dir, "full.qcow2")
	exportToFile(t, export, "stream", "--source", disk)
	return disk, export
}

// TestSeedWalkthrough is the walk-through the project started from.
func TestSeedWalkthrough(t *testing.T) {
	qemutest.Need(t)
	dir := t.TempDir()
	r := rand.New(rand.NewSource(3))
	a, full := seedDisk(t, dir, r, 100<<20)
	qemutest.Check(t, full)
	if got := dataExtents(t, full); len(got) != 1 || got[0] != [2]int64{0, 0x30000} {
		t.Fatalf("full export data extents %v, want [[0 0x30000]]", got)
	}
	b := filepath.Join(dir, "b.img")
	copyFile(t, a, b)
	writeRandom(t, r, b, 1<<16, 2<<16)
	diff := filepath.Join(dir, "diff.qcow2")
	exportToFile(t, diff, "stream", "--source", b, "--relative-to", a)
	qemutest.Check(t, diff)
	if got := dataExtents(t, diff); len(got) != 1 || got[0] != [2]int64{0x10000, 0x20000} {
		t.Fatalf("diff data extents %v, want [[0x10000 0x20000]]", got)
	}
	// Rebuild b: convert the full export, then apply the diff on top.
	rebuilt := filepath.Join(dir, "rebuilt.img")
	qemutest.Img(t, "convert", "-O", "raw", full, rebuilt)
	qemutest.Img(t, "convert", "-n", "--target-is-zero", "-O", "raw", diff, rebuilt)
	sameFiles(t, rebuilt, b)
}

// span is a byte range of a disk: off, then n bytes.
type span struct{ off, n int64 }

// changedSince makes dir/src.img, a sparse disk of size bytes with random
// bytes (from seed) at before, copies it to dir/base.img, then writes
// random bytes at after into the source: a disk and the base it changed
// from, for diff exports.
func changedSince(t testing.TB, dir string, seed, size int64, before []span, after ...span) (src, base string) {
	t.Helper()
	r := rand.New(rand.NewSource(seed))
	src = filepath.Join(dir, "src.img")
	sparseFile(t, src, size)
	for _, s := range before {
		writeRandom(t, r, src, s.off, s.n)
	}
	base = filepath.Join(dir, "base.img")
	copyFile(t, src, base)
	for _, s := range after {
		writeRandom(t, r, src, s.off, s.n)
	}
	return src, base
}

func copyFile(t testing.TB, from, to string) {
	t.Helper()
	b, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(to, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

func sameFiles(t testing.TB, a, b string) {
	t.Helper()
	x, err := os.ReadFile(a)
	if err != nil {
		t.Fatal(err)
	}
	y, err := os.ReadFile(b)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(x, y) {
		n := 0
		for n < len(x) && n < len(y) && x[n] == y[n] {
			n++
		}
		t.Fatalf("%s and %s differ at offset %d (sizes %d, %d)", a, b, n, len(x), len(y))
	}
}

// TestExportDiffBaseSizes: the base may be shorter or longer than the
// source; with --backing-file the diff names it and qemu-img reads the
// new disk whole through it.
func TestExportDiffBaseSizes(t *testing.T) {
	qemutest.Need(t)
	dir := t.TempDir()
	r := rand.New(rand.NewSource(4))
	for _, baseSize := range []int64{1 << 20, 4<<20 + 4096, 8 << 20} {
		t.Run(fmt.Sprint(baseSize), func(t *testing.T) {
			base := filepath.Join(dir, "base.img")
			os.Remove(base)
			sparseFile(t, base, baseSize)
			for i := int64(0); i < baseSize; i += 256 << 10 {
				writeRandom(t, r, base, i, 4096)
			}
			src := filepath.Join(dir, "src.img")
			os.Remove(src)
			sparseFile(t, src, 4<<20+4096)
			bb, _ := os.ReadFile(base)
			f, _ := os.OpenFile(src, os.O_WRONLY, 0)
			f.WriteAt(bb[:min(len(bb), 4<<20+4096)], 0)
			f.Close()
			writeRandom(t, r, src, 512<<10, 100) // changed
			writeRandom(t, r, src, 4<<20, 4096)  // the tail
			zeroRange(t, src, 0, 4096)           // became zero
			diff := filepath.Join(dir, "diff.qcow2")
			exportToFile(t, diff, "stream", "--source", src, "--relative-to", base, "--backing-file", base)
			qemutest.Check(t, diff)
			// qemu-img reads the diff through its backing file: compare the
			// overlapping part with the source.
			if baseSize >= 4<<20+4096 {
				qemutest.Compare(t, diff, src)
			}
			// Only clusters that differ are stored.
			for _, e := range dataExtents(t, diff) {
				for off := e[0]; off < e[0]+e[1]; off += 65536 {
					s := readAt(t, src, off, 65536)
					b := readAt(t, base, off, 65536)
					if bytes.Equal(s, b) {
						t.Fatalf("cluster at %d stored but equal to the base; extents %v", off, dataExtents(t, diff))
					}
				}
			}
			h := readHeader(t, diff)
			if h.backingSize != int64(len(base)) {
				t.Fatalf("backing file name length %d", h.backingSize)
			}
		})
	}
}

func zeroRange(t testing.TB, path string, off, n int64) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(make([]byte, n), off); err != nil {
		t.Fatal(err)
	}
}

// readAt reads n bytes at off; bytes past the end read as zero.
func readAt(t testing.TB, path string, off, n int64) []byte {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, n)
	f.ReadAt(b, off)
	return b
}

// TestExportBlockDevice exports a loop device, with and without O_DIRECT,
// and checks the result against the file behind it.
func TestExportBlockDevice(t *testing.T) {
	qemutest.Need(t)
	dir := t.TempDir()
	var before []span
	for i := int64(0); i < 6<<20; i += 700 << 10 {
		before = append(before, span{i, 5000})
	}
	file, base := changedSince(t, dir, 5, 6<<20+512, before, span{3 << 20, 70000})
	for _, direct := range []bool{false, true} {
		t.Run(fmt.Sprintf("direct=%v", direct), func(t *testing.T) {
			dev := loopDevice(t, file, direct)
			baseDev := loopDevice(t, base, direct)
			args := []string{"stream", "--source", dev}
			if direct {
				args = append(args, "--direct")
			}
			img := filepath.Join(dir, "dev.qcow2")
			exportToFile(t, img, args...)
			qemutest.Check(t, img)
			qemutest.Compare(t, img, file)
			if got := qemutest.InfoOf(t, img).VirtualSize; got != 6<<20+512 {
				t.Fatalf("virtual size %d", got)
			}
			diff := filepath.Join(dir, "devdiff.qcow2")
			exportToFile(t, diff, append(args, "--relative-to", baseDev)...)
			qemutest.Check(t, diff)
			ext := dataExtents(t, diff)
			if len(ext) != 1 || ext[0][0] != 3<<20 || ext[0][1] != 2<<16 {
				t.Fatalf("diff of a block device: data extents %v", ext)
			}
		})
	}
}

// TestExportDirectOddSize: O_DIRECT on a file whose size is not a multiple
// of 512.
func TestExportDirectOddSize(t *testing.T) {
	qemutest.Need(t)
	dir := t.TempDir()
	src := filepath.Join(dir, "odd.img")
	sparseFile(t, src, 2<<20+777)
	r := rand.New(rand.NewSource(6))
	writeRandom(t, r, src, 0, 3000)
	writeRandom(t, r, src, 2<<20, 777)
	img := filepath.Join(dir, "odd.qcow2")
	exportToFile(t, img, "stream", "--source", src, "--direct", "--cluster-size", "4096")
	qemutest.Check(t, img)
	qemutest.Compare(t, img, src)
	base := filepath.Join(dir, "base.img")
	sparseFile(t, base, 1000)
	exportToFile(t, img, "stream", "--source", src, "--direct", "--relative-to", base)
	qemutest.Check(t, img)
}

// TestExportRefusals: bad flags and sizes are refused before anything is
// written, with one line naming the reason (paths that are not disks:
// TestFaultNotDisks).
func TestExportRefusals(t *testing.T) {
	dir := t.TempDir()
	big := filepath.Join(dir, "big.img")
	sparseFile(t, big, 1<<40)
	ok := filepath.Join(dir, "ok.img")
	sparseFile(t, ok, 1<<20)
	cases := []struct {
		args []string
		want string
	}{
		{[]string{"stream", "--source", big, "--cluster-size", "512"}, "use a cluster size of"},
		{[]string{"stream", "--source", ok, "--cluster-size", "1000"}, "power of two"},
		{[]string{"stream", "--source", ok, "--refcount-bits", "128"}, "power of two"},
		{[]string{"stream", "--source", ok, "--source-format", "vhd"}, "raw"},
		{[]string{"stream", "--source", ok, "--destination-format", "vhd"}, "qcow2"},
		{[]string{"stream", "--source", ok, "--destination-protocol", "tar"}, "not supported"},
	}
	for _, c := range cases {
		t.Run(strings.Join(c.args[1:], " "), func(t *testing.T) {
			checkOneLineError(t, runTool(t, nil, c.args...), c.want)
		})
	}
}

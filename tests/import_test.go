package tests

import (
	"bytes"
	"fmt"
	"io"
	"math/rand"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"

	"github.com/xapi-project/xapi-qcow-tool/tests/qemutest"
)

func mustRunPiped(t testing.TB, img string, args ...string) result {
	t.Helper()
	r := runPiped(t, img, nil, args...)
	if r.Code != 0 {
		t.Fatalf("cat %s | xapi-qcow-tool %s: exit %d: %s", filepath.Base(img), strings.Join(args, " "), r.Code, r.Stderr)
	}
	return r
}

// toRaw is qemu-img's reading of img: the reference for every import.
func toRaw(t testing.TB, img, raw string) {
	t.Helper()
	qemutest.Img(t, "convert", "-O", "raw", img, raw)
}

func fill(t testing.TB, path string, size int64, b byte) {
	t.Helper()
	if err := os.WriteFile(path, bytes.Repeat([]byte{b}, int(size)), 0o644); err != nil {
		t.Fatal(err)
	}
}

// scattered are writes in every flavour qemu-io has: data, zero writes
// over data and over nothing, discards, unaligned lengths.
var scattered = []string{
	"write -P 0x11 0 64k",
	"write -P 0x22 100k 300k",
	"write -P 0x33 1M 1M",
	"write -z 1280k 128k",
	"discard 1536k 64k",
	"write -z 3M 64k",
	"write -P 0x44 3200k 2k",
	"write -P 0x55 4095k 1k",
	"write -P 0x66 6M 512",
	"write -P 0x77 7M 1M",
	"write -z 7M 256k",
	"discard 7680k 128k",
}

// TestImportQemuShapes imports images in the shapes qemu-img writes,
// through a pipe with serve and stream_decode and from a file, and
// compares with qemu-img's own conversion to raw.
func TestImportQemuShapes(t *testing.T) {
	qemutest.Need(t)
	dir := t.TempDir()
	// A raw source for the converted shapes: random data, zeros, holes.
	src := filepath.Join(dir, "src.img")
	sparseFile(t, src, 8<<20)
	r := rand.New(rand.NewSource(10))
	for _, off := range []int64{0, 70 << 10, 1 << 20, 3<<20 + 512, 5 << 20, 8<<20 - 4096} {
		writeRandom(t, r, src, off, 40<<10)
	}
	zeroRange(t, src, 5<<20+4096, 8192)

	created := func(opts string, extra ...string) func(t *testing.T, img string) {
		return func(t *testing.T, img string) {
			qemutest.Img(t, "create", "-f", "qcow2", "-o", opts, img, "8M")
			qemutest.IO(t, img, append(scattered, extra...)...)
		}
	}
	converted := func(args ...string) func(t *testing.T, img string) {
		return func(t *testing.T, img string) {
			qemutest.Img(t, append(append([]string{"convert", "-O", "qcow2"}, args...), src, img)...)
		}
	}
	shapes := []struct {
		name string
		make func(t *testing.T, img string)
	}{
		{"compat0.10", created("compat=0.10")},
		{"compat1.1", created("compat=1.1")},
		{"cluster512", created("cluster_size=512")},
		{"cluster64k", created("cluster_size=65536")},
		{"cluster2M", created("cluster_size=2097152")},
		{"refcount1", created("refcount_bits=1")},
		{"refcount64", created("refcount_bits=64")},
		{"extended_l2", created("extended_l2=on,cluster_size=65536", "write -P 0x88 2050k 2k", "write -z 2052k 4k")},
		{"lazy_refcounts", created("lazy_refcounts=on")},
		{"prealloc_metadata", created("preallocation=metadata")},
		{"convert", converted()},
		{"convert_cluster512", converted("-o", "cluster_size=512")},
		{"compressed_zlib", converted("-c", "-o", "compression_type=zlib")},
		{"compressed_zstd", converted("-c", "-o", "compression_type=zstd")},
		{"snapshots", func(t *testing.T, img string) {
			created("compat=1.1")(t, img)
			qemutest.Img(t, "snapshot", "-c", "s1", img)
			qemutest.IO(t, img, "write -P 0x99 0 128k", "write -z 1M 64k", "discard 7M 1M")
			qemutest.Img(t, "snapshot", "-c", "s2", img)
			qemutest.IO(t, img, "write -P 0xaa 2M 64k")
		}},
	}
	for _, sh := range shapes {
		t.Run(sh.name, func(t *testing.T) {
			t.Parallel()
			d := t.TempDir()
			img := filepath.Join(d, "img.qcow2")
			sh.make(t, img)
			want := filepath.Join(d, "want.raw")
			toRaw(t, img, want)

			served := filepath.Join(d, "served.raw")
			mustRunPiped(t, img, "serve", "--source-format", "qcow2", "--destination", "file://"+served)
			sameFiles(t, served, want)

			decoded := filepath.Join(d, "decoded.raw")
			if r := runPiped(t, img, nil, "stream_decode", decoded); r.Code != 0 || len(r.Stdout) != 0 {
				t.Fatalf("stream_decode: exit %d, %d bytes on stdout: %s", r.Code, len(r.Stdout), r.Stderr)
			}
			sameFiles(t, decoded, want)

			// From a file (random access), over old content that must
			// be zeroed where the image reads as zero.
			fromFile := filepath.Join(d, "fromfile.raw")
			fill(t, fromFile, 8<<20, 0xEE)
			mustRun(t, nil, "serve", "--source", img, "--destination", fromFile)
			sameFiles(t, fromFile, want)
		})
	}
}

// allocated returns the bytes a file allocates on disk.
func allocated(t testing.TB, path string) int64 {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks * 512
}

// TestImportPast4TiB round-trips our own export of a 5 TiB sparse disk
// (the L1 table spans several clusters) with data above 4 TiB.
func TestImportPast4TiB(t *testing.T) {
	dir := t.TempDir()
	const size = 5 << 40
	src := filepath.Join(dir, "src.img")
	sparseFile(t, src, size)
	r := rand.New(rand.NewSource(11))
	offs := []int64{0, 4<<40 - 65536, 4 << 40, 4<<40 + 3<<20 + 65536, size - 65536}
	for _, off := range offs {
		writeRandom(t, r, src, off, 65536)
	}
	img := filepath.Join(dir, "img.qcow2")
	exportToFile(t, img, "stream", "--source", src)
	for _, how := range []string{"pipe", "file"} {
		t.Run(how, func(t *testing.T) {
			dst := filepath.Join(t.TempDir(), "dst.img")
			if how == "pipe" {
				mustRunPiped(t, img, "serve", "--destination", dst)
			} else {
				mustRun(t, nil, "serve", "--source", "file://"+img, "--destination", dst)
			}
			st, err := os.Stat(dst)
			if err != nil {
				t.Fatal(err)
			}
			if st.Size() != size {
				t.Fatalf("destination size %d, want %d", st.Size(), int64(size))
			}
			if a := allocated(t, dst); a > 4<<20 {
				t.Fatalf("destination allocates %d bytes for %d bytes of data", a, len(offs)*65536)
			}
			for _, off := range offs {
				if !bytes.Equal(readAt(t, dst, off, 65536), readAt(t, src, off, 65536)) {
					t.Fatalf("data at %d differs", off)
				}
				if !bytes.Equal(readAt(t, dst, off+65536, 4096), readAt(t, src, off+65536, 4096)) {
					t.Fatalf("bytes after the data at %d differ", off)
				}
			}
		})
	}
}

// deltaImage makes a 4 MiB qcow2 with data, zero-flag clusters (over data
// and over nothing) and unallocated clusters, and returns what an import
// must produce on top of a disk full of 0xAA in delta and default modes.
func deltaImage(t *testing.T, dir string) (img string, delta, full []byte) {
	img = filepath.Join(dir, "delta.qcow2")
	qemutest.Img(t, "create", "-f", "qcow2", img, "4M")
	qemutest.IO(t, img, "write -P 0x11 0 64k", "write -P 0x22 1M 64k", "write -z 1M 64k", "write -z 2M 128k")
	delta = bytes.Repeat([]byte{0xAA}, 4<<20)
	copy(delta, bytes.Repeat([]byte{0x11}, 64<<10))
	clear(delta[1<<20 : 1<<20+64<<10])
	clear(delta[2<<20 : 2<<20+128<<10])
	full = make([]byte, 4<<20)
	copy(full, bytes.Repeat([]byte{0x11}, 64<<10))
	return img, delta, full
}

func TestImportDeltaAndDefault(t *testing.T) {
	qemutest.Need(t)
	dir := t.TempDir()
	img, delta, full := deltaImage(t, dir)
	for _, tc := range []struct {
		name string
		args []string
		want []byte
	}{
		{"serve --delta", []string{"serve", "--delta", "--destination"}, delta},
		{"stream_decode", []string{"stream_decode"}, delta},
		{"serve", []string{"serve", "--destination"}, full},
		{"serve --direct", []string{"serve", "--direct", "--destination"}, full},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dst := filepath.Join(t.TempDir(), "dst.img")
			fill(t, dst, 4<<20, 0xAA)
			mustRunPiped(t, img, append(tc.args, dst)...)
			got, _ := os.ReadFile(dst)
			if !bytes.Equal(got, tc.want) {
				n := 0
				for n < len(got) && n < len(tc.want) && got[n] == tc.want[n] {
					n++
				}
				t.Fatalf("content differs at %d (sizes %d, %d)", n, len(got), len(tc.want))
			}
		})
	}
}

// TestImportXapiCommandLine runs serve the way xapi's vhd_tool_wrapper runs
// vhd-tool: descriptor 5, machine progress on stdout, O_DIRECT, a declared
// size and --prezeroed.
func TestImportXapiCommandLine(t *testing.T) {
	qemutest.Need(t)
	dir := t.TempDir()
	img, _, full := deltaImage(t, dir)
	dst := filepath.Join(dir, "vdi.img")
	sparseFile(t, dst, 4<<20)
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	go func() {
		defer pw.Close()
		f, _ := os.Open(img)
		defer f.Close()
		io.Copy(pw, f)
	}()
	r := runPiped(t, os.DevNull, []*os.File{nil, nil, pr},
		"serve", "--source-format", "qcow2", "--source-protocol", "none", "--source-fd", "5",
		"--tar-filename-prefix", "", "--destination", "file://"+dst, "--destination-format", "raw",
		"--progress", "--machine", "--direct", "--destination-size", fmt.Sprint(4<<20), "--prezeroed")
	pr.Close()
	if r.Code != 0 {
		t.Fatalf("exit %d: %s", r.Code, r.Stderr)
	}
	if !regexp.MustCompile(`^([0-9]{3})*100$`).Match(r.Stdout) {
		t.Fatalf("progress %q: want three-digit groups ending with 100", r.Stdout)
	}
	if got, _ := os.ReadFile(dst); !bytes.Equal(got, full) {
		t.Fatal("content differs")
	}
	// Other formats are vhd-tool's: refused, naming what is supported.
	r = runTool(t, nil, "serve", "--source-format", "vhd", "--destination", dst)
	checkOneLineError(t, r, "supported: qcow2")
	if r.Code != 2 {
		t.Fatalf("exit %d, want 2 (usage)", r.Code)
	}
}

// TestImportLoopDevice imports into a block device: never resized, the
// bytes past the image untouched.
func TestImportLoopDevice(t *testing.T) {
	qemutest.Need(t)
	dir := t.TempDir()
	img, delta, full := deltaImage(t, dir)
	back := filepath.Join(dir, "back.img")
	fill(t, back, 8<<20, 0xAA)
	dev := loopDevice(t, back, false)
	check := func(what string, want []byte) {
		t.Helper()
		f, err := os.Open(dev)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		got := make([]byte, 8<<20)
		if _, err := io.ReadFull(f, got); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got[:4<<20], want) || !bytes.Equal(got[4<<20:], bytes.Repeat([]byte{0xAA}, 4<<20)) {
			t.Fatalf("%s: device content differs", what)
		}
	}
	mustRunPiped(t, img, "stream_decode", dev)
	check("stream_decode", delta)
	mustRunPiped(t, img, "serve", "--destination", "file://"+dev, "--direct")
	check("serve --direct", full)
}

// TestImportRefusesBackingFileAndTruncation: a diff naming a backing file
// is refused outside delta mode; a truncated stream ends with one line.
func TestImportRefusals(t *testing.T) {
	qemutest.Need(t)
	dir := t.TempDir()
	base := filepath.Join(dir, "base.img")
	sparseFile(t, base, 4<<20)
	src := filepath.Join(dir, "src.img")
	sparseFile(t, src, 4<<20)
	writeRandom(t, rand.New(rand.NewSource(12)), src, 0, 2<<20)
	diff := filepath.Join(dir, "diff.qcow2")
	exportToFile(t, diff, "stream", "--source", src, "--relative-to", base, "--backing-file", base)
	dst := filepath.Join(dir, "dst.img")
	fill(t, dst, 4<<20, 0xAA)
	before := fileSum(t, dst)
	checkOneLineError(t, runPiped(t, diff, nil, "serve", "--destination", dst), "backing file")
	if fileSum(t, dst) != before {
		t.Fatal("a refused import changed the destination")
	}
	copyFile(t, base, dst)
	mustRunPiped(t, diff, "serve", "--delta", "--destination", dst)
	sameFiles(t, dst, src)

	full := filepath.Join(dir, "full.qcow2")
	exportToFile(t, full, "stream", "--source", src)
	st, _ := os.Stat(full)
	cut := filepath.Join(dir, "cut.qcow2")
	b, _ := os.ReadFile(full)
	for _, n := range []int64{100, 65536 + 10, st.Size() / 2, st.Size() - 1} {
		os.WriteFile(cut, b[:n], 0o644)
		r := runPiped(t, cut, nil, "serve", "--destination", filepath.Join(dir, "cut.raw"))
		checkOneLineError(t, r, "import from stdin")
	}
}

// TestImportSeedWalkthroughWithOurImport is the seed's walk-through, with
// our import: the full export, then the diff applied with stream_decode on
// a copy of the base rebuilds the new disk — including a cluster that
// became all zero, which qemu-img convert --target-is-zero loses.
func TestImportSeedWalkthroughWithOurImport(t *testing.T) {
	dir := t.TempDir()
	r := rand.New(rand.NewSource(13))
	a, full := seedDisk(t, dir, r, 20<<20)
	b := filepath.Join(dir, "b.img")
	copyFile(t, a, b)
	writeRandom(t, r, b, 1<<16, 1<<16)  // changed
	writeRandom(t, r, b, 10<<20, 1<<16) // new
	zeroRange(t, b, 2<<16, 1<<16)       // became all zero
	diff := filepath.Join(dir, "diff.qcow2")
	exportToFile(t, diff, "stream", "--source", b, "--relative-to", a)

	rebuilt := filepath.Join(dir, "rebuilt.img")
	mustRunPiped(t, full, "serve", "--destination", rebuilt)
	sameFiles(t, rebuilt, a)
	mustRunPiped(t, diff, "stream_decode", rebuilt)
	sameFiles(t, rebuilt, b)
}

// TestImportDestinationFDDirect: --direct applies to a destination given
// as an open descriptor too (xapi opens the VDI and passes it), and an odd
// virtual size still imports exactly.
func TestImportDestinationFDDirect(t *testing.T) {
	qemutest.Need(t)
	dir := t.TempDir()
	src := filepath.Join(dir, "src.img")
	sparseFile(t, src, 3<<20+512)
	writeRandom(t, rand.New(rand.NewSource(77)), src, 100000, 300000)
	writeRandom(t, rand.New(rand.NewSource(78)), src, 3<<20, 512)
	img := filepath.Join(dir, "src.qcow2")
	exportToFile(t, img, "stream", "--source", src)
	dst := filepath.Join(dir, "dst.img")
	f, err := os.OpenFile(dst, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	data, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	r := runWithFiles(t, bin, data, "", []*os.File{f}, "serve", "--source-format", "qcow2", "--source-protocol", "none",
		"--source", "stdin:", "--destination-fd", "3", "--destination-format", "raw", "--direct")
	if r.Code != 0 {
		t.Fatalf("serve --destination-fd 3 --direct: exit %d: %s", r.Code, r.Stderr)
	}
	sameFiles(t, dst, src)
}

package tests

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/xapi-project/xapi-qcow-tool/tests/qemutest"
)

// hintedImage is a qcow2 file, its raw view (what the block device behind
// a VDI shows) and the qemu-img map/info JSON xapi pipes to the tool.
type hintedImage struct {
	qcow2, raw string
	mapJSON    []byte
	infoJSON   []byte
	size       int64
	cs         int64
}

// makeHintedImage creates a qcow2 image with qemu-io writes, converts it
// to raw, then writes stray bytes into the raw view where the map says
// nothing is allocated: an export that trusts the hints must not see them.
func makeHintedImage(t *testing.T, dir, name string, cs, size int64, writes []string, stray []int64) *hintedImage {
	t.Helper()
	h := &hintedImage{qcow2: filepath.Join(dir, name+".qcow2"), raw: filepath.Join(dir, name+".raw"), size: size, cs: cs}
	qemutest.Img(t, "create", "-q", "-f", "qcow2", "-o", fmt.Sprintf("cluster_size=%d", cs), h.qcow2, fmt.Sprint(size))
	qemutest.IO(t, h.qcow2, writes...)
	qemutest.Img(t, "convert", "-f", "qcow2", "-O", "raw", h.qcow2, h.raw)
	h.mapJSON = qemutest.Img(t, "map", "--output=json", h.qcow2)
	h.infoJSON = qemutest.Img(t, "info", "--output=json", h.qcow2)
	r := rand.New(rand.NewSource(int64(len(name))))
	for _, off := range stray {
		for _, e := range qemutest.Map(t, h.qcow2) {
			if e.Data && off < e.Start+e.Length && off+4096 > e.Start {
				t.Fatalf("stray bytes at %d would land in allocated data", off)
			}
		}
		writeRandom(t, r, h.raw, off, 4096)
	}
	return h
}

// legacyHeader builds older xapi's --json-header object from the map: the
// allocated clusters as [first, last] intervals, or as a flat list.
func (h *hintedImage) legacyHeader(t *testing.T, flat bool) []byte {
	t.Helper()
	var intervals [][2]int64
	var indices []int64
	for _, e := range qemutest.Map(t, h.qcow2) {
		if !e.Data || e.Zero {
			continue
		}
		first, last := e.Start/h.cs, (e.Start+e.Length-1)/h.cs
		intervals = append(intervals, [2]int64{first, last})
		for c := first; c <= last; c++ {
			indices = append(indices, c)
		}
	}
	bits := 0
	for int64(1)<<bits < h.cs {
		bits++
	}
	obj := map[string]any{"virtual_size": h.size, "cluster_bits": bits}
	if flat {
		obj["data_clusters"] = indices
	} else {
		obj["data_clusters"] = intervals
	}
	if obj["data_clusters"] == nil {
		obj["data_clusters"] = []int{}
	}
	b, err := json.Marshal(obj)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestDropinExportWithHints runs xapi's export command line under the
// drop-in names, with the map and info on descriptors, and checks the
// export has the content of the qcow2 file — not the stray bytes of the
// raw view — and is the same, byte for byte, as `stream` with the same
// hints.
func TestDropinExportWithHints(t *testing.T) {
	qemutest.Need(t)
	dir := t.TempDir()
	// The virtual size is not a multiple of the cluster size: the last
	// map extent ends inside a cluster, which must still be exported.
	const size = 8<<20 + 1024
	h := makeHintedImage(t, dir, "src", 65536, size, []string{
		"write -P 0x11 0 100k", "write -P 0x22 3M 4k", "write -P 0x33 8M 1024", "write -z 5M 64k",
	}, []int64{2 << 20, 6<<20 + 12345})
	for _, name := range []string{"qcow2-to-stdout", "qcow2-to-stdout.py"} {
		t.Run(name, func(t *testing.T) {
			tool := linkAs(t, name)
			out := filepath.Join(dir, name+".qcow2")
			r := runWithFiles(t, tool, nil, out, []*os.File{hintPipe(t, h.mapJSON), hintPipe(t, h.infoJSON)},
				h.raw, "--json-header-map", "3", "--json-header-info", "4")
			mustSucceed(t, r, name)
			qemutest.Check(t, out)
			qemutest.Img(t, "compare", out, h.qcow2)
			if got := qemutest.InfoOf(t, out).VirtualSize; got != size {
				t.Fatalf("virtual size %d, want %d", got, size)
			}
		})
	}
	// Without the hints the stray bytes are exported: the test's raw view
	// really holds something the map excludes.
	plain := filepath.Join(dir, "plain.qcow2")
	mustSucceed(t, runWithFiles(t, linkAs(t, "qcow2-to-stdout.py"), nil, plain, nil, h.raw), "no hints")
	if err := exec.Command("qemu-img", "compare", plain, h.qcow2).Run(); err == nil {
		t.Fatal("export without hints equals the qcow2 file: the stray bytes are missing from the test setup")
	}
	// Byte-identical to stream with the same hints.
	viaDropin := filepath.Join(dir, "qcow2-to-stdout.py.qcow2")
	viaStream := filepath.Join(dir, "stream.qcow2")
	mustSucceed(t, runWithFiles(t, bin, nil, viaStream, []*os.File{hintPipe(t, h.mapJSON), hintPipe(t, h.infoJSON)},
		"stream", "--source", h.raw, "--allocation-map", "fd://3", "--allocation-info", "fd://4"), "stream")
	sameBytes(t, viaDropin, viaStream)
	// Both legacy forms give the same image.
	for _, flat := range []bool{false, true} {
		t.Run(fmt.Sprintf("json-header flat=%v", flat), func(t *testing.T) {
			out := filepath.Join(dir, fmt.Sprintf("legacy-%v.qcow2", flat))
			mustSucceed(t, runWithFiles(t, linkAs(t, "qcow2-to-stdout.py"), h.legacyHeader(t, flat), out, nil, "--json-header", h.raw), "--json-header")
			sameBytes(t, out, viaDropin)
			st := filepath.Join(dir, fmt.Sprintf("legacy-stream-%v.qcow2", flat))
			mustSucceed(t, runWithFiles(t, bin, h.legacyHeader(t, flat), st, nil, "stream", "--source", h.raw, "--allocation-header", "fd://0"), "stream --allocation-header")
			sameBytes(t, st, viaDropin)
		})
	}
}

// TestDropinHintClusterSize: the hints' cluster size (info cluster-size, or
// legacy cluster_bits) replaces the default, and an image whose map has
// nothing allocated exports as empty even when the raw view holds bytes.
func TestDropinHintClusterSize(t *testing.T) {
	qemutest.Need(t)
	dir := t.TempDir()
	h := makeHintedImage(t, dir, "small", 4096, 4<<20, []string{"write -P 0x44 4096 5000", "write -P 0x55 1M 512"}, []int64{2 << 20})
	tool := linkAs(t, "qcow2-to-stdout.py")
	out := filepath.Join(dir, "out.qcow2")
	mustSucceed(t, runWithFiles(t, tool, nil, out, []*os.File{hintPipe(t, h.mapJSON), hintPipe(t, h.infoJSON)},
		h.raw, "--json-header-map", "3", "--json-header-info", "4"), "4 KiB hints")
	if cs := qemutest.InfoOf(t, out).ClusterSize; cs != 4096 {
		t.Fatalf("cluster size %d, want the hints' 4096", cs)
	}
	qemutest.Img(t, "compare", out, h.qcow2)
	if got, want := dataExtents(t, out), [][2]int64{{4096, 8192}, {1 << 20, 4096}}; fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("data extents %v, want %v", got, want)
	}
	legacy := filepath.Join(dir, "legacy.qcow2")
	mustSucceed(t, runWithFiles(t, tool, h.legacyHeader(t, true), legacy, nil, h.raw, "--json-header"), "legacy 4 KiB")
	sameBytes(t, legacy, out)

	empty := makeHintedImage(t, dir, "empty", 65536, 2<<20, nil, []int64{0, 1 << 20})
	out = filepath.Join(dir, "empty-out.qcow2")
	mustSucceed(t, runWithFiles(t, tool, nil, out, []*os.File{hintPipe(t, empty.mapJSON), hintPipe(t, empty.infoJSON)},
		empty.raw, "--json-header-map", "3", "--json-header-info", "4"), "empty map")
	if ext := dataExtents(t, out); len(ext) != 0 {
		t.Fatalf("an image with nothing allocated exported data %v", ext)
	}
}

// TestDropinDiffWithHints: --diff with hints for both images, new and
// legacy forms. Clusters only the base allocates are compared like any
// other: stored when they differ (here: the source zeroed them), left out
// when equal (a base cluster of zeros). The diff applied with
// qcow-stream-tool stream_decode onto the base rebuilds the source.
func TestDropinDiffWithHints(t *testing.T) {
	qemutest.Need(t)
	dir := t.TempDir()
	const size = 8 << 20
	base := makeHintedImage(t, dir, "base", 65536, size, []string{
		"write -P 0x01 0 256k", // clusters 0-3
		"write -P 0x02 1M 64k", // cluster 16: the source zeroes it
		"write -P 0x00 2M 64k", // cluster 32: allocated zeros, only in the base
		"write -P 0x03 3M 64k", // cluster 48: same in both
	}, []int64{5 << 20})
	src := makeHintedImage(t, dir, "src", 65536, size, []string{
		"write -P 0x01 0 256k",
		"write -P 0x09 64k 100", // cluster 1 changed
		"write -P 0x03 3M 64k",
		"write -P 0x04 4M 64k", // cluster 64: new
	}, []int64{6 << 20})
	tool := linkAs(t, "qcow2-to-stdout")
	out := filepath.Join(dir, "diff.qcow2")
	// xapi's order: the path first, the base's descriptors before the source's.
	mustSucceed(t, runWithFiles(t, tool, nil, out,
		[]*os.File{hintPipe(t, base.mapJSON), hintPipe(t, base.infoJSON), hintPipe(t, src.mapJSON), hintPipe(t, src.infoJSON)},
		src.raw, "--diff", base.raw, "--json-header-diff-map", "3", "--json-header-diff-info", "4",
		"--json-header-map", "5", "--json-header-info", "6"), "diff")
	qemutest.Check(t, out)
	want := [][2]int64{{1 << 16, 1 << 16}, {1 << 20, 1 << 16}, {4 << 20, 1 << 16}}
	if got := dataExtents(t, out); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("diff data extents %v, want %v", got, want)
	}
	st := filepath.Join(dir, "stream-diff.qcow2")
	mustSucceed(t, runWithFiles(t, bin, nil, st, []*os.File{hintPipe(t, base.mapJSON), hintPipe(t, src.mapJSON), hintPipe(t, src.infoJSON)},
		"stream", "--source", src.raw, "--relative-to", base.raw, "--base-allocation-map", "3",
		"--allocation-map", "4", "--allocation-info", "5"), "stream diff")
	sameBytes(t, st, out)
	// Legacy: the source's header on stdin, the base's on a descriptor.
	legacy := filepath.Join(dir, "legacy-diff.qcow2")
	mustSucceed(t, runWithFiles(t, tool, src.legacyHeader(t, false), legacy, []*os.File{hintPipe(t, base.legacyHeader(t, true))},
		src.raw, "--diff", base.raw, "--json-header", "--json-header-diff", "3"), "legacy diff")
	sameBytes(t, legacy, out)

	// Apply the diff to a copy of the base (its qcow2 content, without the
	// stray bytes) with qcow-stream-tool, then compare with the source.
	target := filepath.Join(dir, "target.raw")
	qemutest.Img(t, "convert", "-O", "raw", base.qcow2, target)
	streamDecode(t, out, target)
	qemutest.Img(t, "compare", "-F", "raw", "-f", "qcow2", src.qcow2, target)
}

// streamDecode runs xapi's import command line (qcow-stream-tool
// stream_decode) with the image img on stdin into the raw disk dst.
func streamDecode(t *testing.T, img, dst string) {
	t.Helper()
	r := runAs(t, linkAs(t, "qcow-stream-tool"), readFile(t, img), "stream_decode", dst)
	mustSucceed(t, r, "stream_decode")
	if len(r.Stdout) != 0 {
		t.Fatalf("stream_decode wrote %d bytes on stdout", len(r.Stdout))
	}
}

// TestDropinStreamDecodeLoopDevice: xapi's import command line into a
// block device.
func TestDropinStreamDecodeLoopDevice(t *testing.T) {
	qemutest.Need(t)
	dir := t.TempDir()
	h := makeHintedImage(t, dir, "img", 65536, 4<<20, []string{"write -P 0x5a 64k 128k", "write -P 0xa5 3M 4k"}, nil)
	img := filepath.Join(dir, "export.qcow2")
	mustSucceed(t, runWithFiles(t, bin, nil, img, nil, "stream", "--source", h.raw), "export")
	disk := filepath.Join(dir, "disk.raw")
	sparseFile(t, disk, 4<<20)
	// Pre-fill a cluster the image does not allocate: stream_decode (delta
	// semantics) must leave it alone.
	writeRandom(t, rand.New(rand.NewSource(9)), disk, 2<<20, 65536)
	before := readAt(t, disk, 2<<20, 65536)
	dev := loopDevice(t, disk, false)
	streamDecode(t, img, dev)
	exec.Command("losetup", "-d", dev).Run()
	if !bytes.Equal(readAt(t, disk, 2<<20, 65536), before) {
		t.Fatal("stream_decode wrote a cluster the image does not allocate")
	}
	zeroRange(t, disk, 2<<20, 65536)
	qemutest.Img(t, "compare", "-F", "raw", "-f", "qcow2", h.qcow2, disk)
}

// TestDropinCommandLineForms: argparse's forms (options before the path,
// --opt=value, -cVALUE, "--") and the long program name give the same
// image as stream with the same options.
func TestDropinCommandLineForms(t *testing.T) {
	qemutest.Need(t)
	dir := t.TempDir()
	src, base := changedSince(t, dir, 11, 3<<20+512, []span{{5000, 70000}, {3 << 20, 512}}, span{1 << 20, 3000})
	want := filepath.Join(dir, "want.qcow2")
	exportToFile(t, want, "stream", "--source", src, "--relative-to", base, "--cluster-size", "4096", "--refcount-bits", "8")
	tool := linkAs(t, "qcow2-to-stdout.py")
	for i, args := range [][]string{
		{src, "--diff", base, "-c", "4096", "-r", "8"},
		{"--diff", base, "-c", "4096", "-r", "8", src},
		{"--diff=" + base, "-c4096", "-r8", src},
		{"-c", "4096", "--diff", base, "-r", "8", "--", src},
	} {
		out := filepath.Join(dir, fmt.Sprintf("out%d.qcow2", i))
		mustSucceed(t, runWithFiles(t, tool, nil, out, nil, args...), strings.Join(args, " "))
		sameBytes(t, out, want)
	}
	out := filepath.Join(dir, "long.qcow2")
	mustSucceed(t, runWithFiles(t, bin, nil, out, nil, "qcow2-to-stdout", src, "--diff", base, "-c", "4096", "-r", "8"), "long name")
	sameBytes(t, out, want)
}

// TestDropinErrors: one line, exit 2 for the command line, 1 otherwise.
func TestDropinErrors(t *testing.T) {
	dir := t.TempDir()
	ok := filepath.Join(dir, "ok.img")
	sparseFile(t, ok, 1<<20)
	tool := linkAs(t, "qcow2-to-stdout.py")
	cases := []struct {
		args []string
		code int
		want string
	}{
		// The parser's own refusals are in wrapper's TestParseDropinArgs:
		// one of them here for the exit status and the line.
		{[]string{ok, "--bogus"}, 2, "--bogus"},
		{[]string{ok, "-c", "1000"}, 2, "power of two"},
		{[]string{ok, "-r", "128"}, 2, "power of two"},
		{[]string{filepath.Join(dir, "missing")}, 1, "no such file"},
		{[]string{ok, "--diff", filepath.Join(dir, "nobase")}, 1, "nobase"},
		{[]string{ok, "--json-header-map", "9"}, 1, "descriptor 9"},
		{[]string{ok, "--json-header"}, 1, "--json-header"}, // stdin is /dev/null: no JSON
	}
	for _, c := range cases {
		t.Run(strings.Join(c.args, " "), func(t *testing.T) {
			r := runAs(t, tool, nil, c.args...)
			checkOneLineError(t, r, c.want)
			if r.Code != c.code {
				t.Fatalf("exit %d, want %d", r.Code, c.code)
			}
		})
	}
}

// TestHintsForAnotherDisk: hints written for a 10 GiB image are refused on
// a 1 MiB disk by both exporters, through the one hint loader: `stream`
// once accepted them and exported.
func TestHintsForAnotherDisk(t *testing.T) {
	dir := t.TempDir()
	small := filepath.Join(dir, "small.raw")
	sparseFile(t, small, 1<<20)
	info := []byte(`{"virtual-size": 10737418240, "cluster-size": 65536, "format": "qcow2"}`)
	mapJSON := []byte(`[{ "start": 0, "length": 10737418240, "depth": 0, "present": true, "zero": false, "data": true, "offset": 327680}]`)
	infoPath, mapPath := filepath.Join(dir, "i.json"), filepath.Join(dir, "m.json")
	writeFile(t, infoPath, info)
	writeFile(t, mapPath, mapJSON)
	cases := map[string]result{
		"stream --allocation-info --allocation-map": runTool(t, nil, "stream", "--source", small,
			"--allocation-info", infoPath, "--allocation-map", mapPath, "--destination", "null:"),
		"stream --allocation-map": runTool(t, nil, "stream", "--source", small,
			"--allocation-map", mapPath, "--destination", "null:"),
		"stream --base-allocation-info": runTool(t, nil, "stream", "--source", small, "--relative-to", small,
			"--base-allocation-info", infoPath, "--destination", "null:"),
		"qcow2-to-stdout --json-header-info --json-header-map": runWithFiles(t, linkAs(t, "qcow2-to-stdout.py"), nil, "",
			[]*os.File{hintPipe(t, mapJSON), hintPipe(t, info)}, small, "--json-header-map", "3", "--json-header-info", "4"),
	}
	for name, r := range cases {
		t.Run(name, func(t *testing.T) {
			checkOneLineError(t, r, "the hints are for another disk")
			if r.Code != 1 || len(r.Stdout) != 0 {
				t.Fatalf("exit %d with %d bytes on stdout, want 1 and nothing", r.Code, len(r.Stdout))
			}
		})
	}
}

// TestDropinHelp: every command xapi runs documents itself with the
// command line xapi uses.
func TestDropinHelp(t *testing.T) {
	for _, c := range []struct {
		tool string
		args []string
		want string
	}{
		{bin, []string{"stream", "--help"}, "--destination-fd"},
		{bin, []string{"serve", "--help"}, "serve"},
		{bin, []string{"stream_decode", "--help"}, "stream_decode"},
		{bin, []string{"qcow2-to-stdout", "--help"}, "--json-header-map"},
		{linkAs(t, "qcow2-to-stdout.py"), []string{"--help"}, "--json-header-map"},
		{linkAs(t, "qcow2-to-stdout.py"), []string{"/dev/x", "-h"}, "--json-header-map"},
		{linkAs(t, "qcow-stream-tool"), []string{"stream_decode", "--help"}, "stream_decode"},
	} {
		r := runAs(t, c.tool, nil, c.args...)
		what := filepath.Base(c.tool) + " " + strings.Join(c.args, " ")
		if r.Code != 0 {
			t.Errorf("%s: exit %d: %s", what, r.Code, r.Stderr)
			continue
		}
		if out := string(r.Stdout); !strings.Contains(out, "Example") || !strings.Contains(out, c.want) {
			t.Errorf("%s: no example of xapi's command line (%q) in:\n%s", what, c.want, out)
		}
	}
}

// machineProgress checks vhd-tool's machine progress: three digits per
// change, rising, ending at 100, nothing else.
func machineProgress(t *testing.T, out []byte) {
	t.Helper()
	s := string(out)
	if len(s) == 0 || len(s)%3 != 0 {
		t.Fatalf("progress %q is not groups of three digits", s)
	}
	last := -1
	for i := 0; i < len(s); i += 3 {
		var v int
		if _, err := fmt.Sscanf(s[i:i+3], "%03d", &v); err != nil || strings.Trim(s[i:i+3], "0123456789") != "" {
			t.Fatalf("progress %q: group %q is not three digits", s, s[i:i+3])
		}
		if v <= last || v > 100 {
			t.Fatalf("progress %q does not rise: %d after %d", s, v, last)
		}
		last = v
	}
	if last != 100 {
		t.Fatalf("progress %q does not end at 100", s)
	}
}

// TestDropinMachineProgress: stream with xapi's vhd-tool options, the data
// on a descriptor or in a file, progress on stdout.
func TestDropinMachineProgress(t *testing.T) {
	qemutest.Need(t)
	dir := t.TempDir()
	r := rand.New(rand.NewSource(12))
	src := filepath.Join(dir, "src.img")
	sparseFile(t, src, 16<<20)
	for off := int64(0); off < 16<<20; off += 1 << 20 {
		writeRandom(t, r, src, off, 300<<10)
	}
	common := []string{"--source-protocol", "none", "--source-format", "raw", "--source", src,
		"--destination-protocol", "none", "--destination-format", "qcow2",
		"--tar-filename-prefix", "", "--progress", "--machine", "--path", "/dev/mapper:.", "--unbuffered"}

	out := filepath.Join(dir, "fd.qcow2")
	f, err := os.Create(out)
	if err != nil {
		t.Fatal(err)
	}
	res := runWithFiles(t, bin, nil, "", []*os.File{f}, append([]string{"stream"}, append(common, "--destination-fd", "3")...)...)
	f.Close()
	mustSucceed(t, res, "stream --destination-fd")
	machineProgress(t, res.Stdout)
	qemutest.Compare(t, out, src)

	out2 := filepath.Join(dir, "file.qcow2")
	res = runWithFiles(t, bin, nil, "", nil, append([]string{"stream"}, append(common, "--destination", "file://"+out2, "-v")...)...)
	mustSucceed(t, res, "stream --destination file://")
	machineProgress(t, res.Stdout)
	sameBytes(t, out, out2)

	// stdout carries the data: no progress mixed into it.
	out3 := filepath.Join(dir, "stdout.qcow2")
	res = runWithFiles(t, bin, nil, out3, nil, append([]string{"stream"}, append(common, "--destination", "stdout:")...)...)
	mustSucceed(t, res, "stream to stdout with --machine")
	sameBytes(t, out, out3)

	// --source stdin: (a disk redirected onto stdin) and fd://N.
	sf, err := os.Open(src)
	if err != nil {
		t.Fatal(err)
	}
	defer sf.Close()
	out4 := filepath.Join(dir, "srcfd.qcow2")
	mustSucceed(t, runWithFiles(t, bin, nil, "", []*os.File{sf}, "stream", "--source", "fd://3", "--destination", "file://"+out4), "--source fd://3")
	sameBytes(t, out, out4)
	out5 := filepath.Join(dir, "srcfd2.qcow2")
	mustSucceed(t, runWithFiles(t, bin, nil, "", []*os.File{sf}, "stream", "--source-fd", "3", "--destination", "file://"+out5), "--source-fd 3")
	sameBytes(t, out, out5)

	// The tar and chunked protocols are refused clearly.
	for _, p := range []string{"tar", "chunked"} {
		res = runTool(t, nil, "stream", "--source", src, "--destination-protocol", p, "--destination", "null:")
		checkOneLineError(t, res, "not supported")
		if res.Code != 2 {
			t.Fatalf("--destination-protocol %s: exit %d, want 2", p, res.Code)
		}
	}
}

// TestStreamDecodeEmptyPath: an empty destination is a usage error.
func TestStreamDecodeEmptyPath(t *testing.T) {
	r := runTool(t, []byte{}, "stream_decode", "")
	checkOneLineError(t, r, "PATH is empty")
	if r.Code != 2 {
		t.Fatalf("exit %d, want 2", r.Code)
	}
}

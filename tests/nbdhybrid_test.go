package tests

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/xapi-project/xapi-qcow-tool/tests/nbdtest"
	"github.com/xapi-project/xapi-qcow-tool/tests/qemutest"
)

// The nbdhybrid source (vhd-tool's --source-format nbdhybrid
// RAW:SERVER:EXPORTNAME:SIZE): data from a loop device holding the disk's
// content, allocation from a server we did not write (qemu-nbd, nbdkit)
// serving the same disk. Each export must read as the disk (qemu-img
// compare), store exactly the clusters nbdinfo --map reports as data, and
// read from the device no more than that (/sys/block/loopN/stat).

// nbdSource is the --source of the nbdhybrid form for dev and s.
func nbdSource(dev string, s *nbdtest.Server, size int64) string {
	return fmt.Sprintf("%s:%s:%s:%d", dev, s.Socket, s.Export, size)
}

// nbdinfoClusters is the 64 KiB clusters nbdinfo --map reports as data
// (neither hole nor zero), as clusterList prints them, and their bytes on
// a disk of size bytes (the last cluster may be partial).
func nbdinfoClusters(t *testing.T, s *nbdtest.Server, size int64) (string, int64) {
	t.Helper()
	var regions [][2]int64
	for _, e := range nbdtest.Map(t, s) {
		if e.Type&3 == 0 {
			regions = append(regions, [2]int64{e.Offset, e.Length})
		}
	}
	bytes := clustersOf(regions)
	if tail := size % kib64; tail != 0 && len(regions) > 0 {
		if last := regions[len(regions)-1]; last[0]+last[1] > size-tail {
			bytes -= kib64 - tail
		}
	}
	return clusterList(regions), bytes
}

// nbdHybridExport exports raw's content from a loop device with the
// allocation from s, through the page cache and with O_DIRECT, and checks
// the result: the disk's content, exactly the clusters nbdinfo reports as
// data, each read once (direct: exactly, plus rawdisk's alignment probes).
func nbdHybridExport(t *testing.T, raw string, s *nbdtest.Server) {
	t.Helper()
	st, err := os.Stat(raw)
	if err != nil {
		t.Fatal(err)
	}
	want, alloc := nbdinfoClusters(t, s, st.Size())
	if alloc == 0 {
		t.Fatal("the server reports no data: the export would prove nothing")
	}
	for _, direct := range []bool{false, true} {
		dev := quietLoop(t, raw)
		out := filepath.Join(t.TempDir(), "out.qcow2")
		args := []string{"stream", "--source-format", "nbdhybrid", "--source", nbdSource(dev, s, st.Size())}
		if !direct {
			args = append(args, "--buffered")
		}
		before := sectorsRead(t, dev)
		exportToFile(t, out, args...)
		read := (sectorsRead(t, dev) - before) * 512
		qemutest.Compare(t, out, raw)
		if got := clusterList(dataExtents(t, out)); got != want {
			t.Fatalf("direct=%v: stored clusters %s, nbdinfo --map reports data in %s", direct, got, want)
		}
		limit := alloc
		if direct {
			limit += directProbes
		}
		if read > limit || direct && read != limit {
			t.Fatalf("direct=%v: read %d bytes of the device; the server reports %d allocated", direct, read, alloc)
		}
		t.Logf("direct=%v: read %d bytes, the server reports %d allocated", direct, read, alloc)
	}
}

// nbdTestImage is a 40 MiB qcow2 over a backing file: data in both layers,
// zero clusters hiding the backing file's data, a cluster of zeros written
// as data, data in the partial last cluster; and its raw content.
func nbdTestImage(t *testing.T, dir string) (img, raw string) {
	t.Helper()
	const size = 40<<20 + 512
	base := qemutest.Create(t, filepath.Join(dir, "base.qcow2"), "", strconv.Itoa(size), "write -P 7 8M 1M", "write -P 8 30M 64k")
	img = filepath.Join(dir, "top.qcow2")
	qemutest.Img(t, "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", img, strconv.Itoa(size))
	qemutest.IO(t, img, "write -P 1 0 4k", "write -z 8M 128k", "write -P 2 12M 3M", "write -P 0 20M 64k", "write -P 3 40M 512")
	raw = filepath.Join(dir, "top.raw")
	qemutest.Img(t, "convert", "-O", "raw", img, raw)
	return img, raw
}

// TestNBDHybridQemuNBD: qemu-nbd serving the qcow2 (with its backing file)
// and the raw content, with and without --allocation-depth.
func TestNBDHybridQemuNBD(t *testing.T) {
	qemutest.Need(t)
	nbdtest.Need(t, "qemu-nbd", "nbdinfo")
	img, raw := nbdTestImage(t, t.TempDir())
	for _, tc := range []struct {
		name, img, format string
		extra             []string
	}{
		{"qcow2", img, "qcow2", nil},
		{"qcow2 allocation depth", img, "qcow2", []string{"--allocation-depth"}},
		{"raw", raw, "raw", nil},
		{"raw allocation depth", raw, "raw", []string{"--allocation-depth"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			nbdHybridExport(t, raw, nbdtest.QemuNBD(t, tc.img, tc.format, "vdi", tc.extra...))
		})
	}
}

// TestNBDHybridNbdkit: nbdkit's memory plugin (written through NBD by
// qemu-io), sparse-random and file plugins; the raw side is qemu-img's
// copy of what the server serves.
func TestNBDHybridNbdkit(t *testing.T) {
	qemutest.Need(t)
	nbdtest.Need(t, "nbdkit", "nbdinfo")
	dir := t.TempDir()
	serve := func(t *testing.T, s *nbdtest.Server) string {
		raw := filepath.Join(t.TempDir(), "served.raw")
		qemutest.Img(t, "convert", "-f", "raw", "-O", "raw", s.URI(), raw)
		return raw
	}
	t.Run("memory", func(t *testing.T) {
		s := nbdtest.Nbdkit(t, "mem", true, "memory", "size=48M")
		qemutest.Run(t, "qemu-io", "-f", "raw", "-c", "write -P 5 1M 64k", "-c", "write -P 6 17M 200k", "-c", "write -P 7 50327552 4k", s.URI())
		nbdHybridExport(t, serve(t, s), s)
	})
	t.Run("sparse-random", func(t *testing.T) {
		s := nbdtest.Nbdkit(t, "sr", false, "sparse-random", "size=64M", "seed=7", "percent=5", "runlength=262144")
		nbdHybridExport(t, serve(t, s), s)
	})
	t.Run("file", func(t *testing.T) {
		_, raw := nbdTestImage(t, dir)
		nbdHybridExport(t, raw, nbdtest.Nbdkit(t, "file", false, "file", raw))
	})
}

// TestNBDHybridRelativeTo: diffs against a base disk, its allocation from
// its own server (BASE_RAW:SERVER:EXPORTNAME:SIZE) or SEEK_DATA of a base
// file (BASE_RAW alone), both compared where either holds data: applied
// onto the base they give the source.
func TestNBDHybridRelativeTo(t *testing.T) {
	qemutest.Need(t)
	nbdtest.Need(t, "qemu-nbd", "nbdinfo")
	dir := t.TempDir()
	const size = 32 << 20
	baseImg := qemutest.Create(t, filepath.Join(dir, "base.qcow2"), "", strconv.Itoa(size), "write -P 1 0 1M", "write -P 2 10M 256k", "write -P 3 20M 64k")
	srcImg := filepath.Join(dir, "src.qcow2")
	qemutest.Img(t, "convert", "-O", "qcow2", baseImg, srcImg)
	// Change a cluster, zero one the base holds, add one.
	qemutest.IO(t, srcImg, "write -P 9 10M 64k", "write -z 20M 64k", "write -P 4 30M 64k")
	baseRaw, srcRaw := filepath.Join(dir, "base.raw"), filepath.Join(dir, "src.raw")
	qemutest.Img(t, "convert", "-O", "raw", baseImg, baseRaw)
	qemutest.Img(t, "convert", "-O", "raw", srcImg, srcRaw)
	src := nbdtest.QemuNBD(t, srcImg, "qcow2", "src")
	base := nbdtest.QemuNBD(t, baseImg, "qcow2", "base")
	const want = "[160 320 480]" // the changed, the zeroed and the new cluster
	for _, tc := range []struct {
		name string
		base func(dev string) string
	}{
		{"base server", func(dev string) string { return nbdSource(dev, base, size) }},
		{"base disk alone", func(string) string { return baseRaw }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dev, baseDev := quietLoop(t, srcRaw), quietLoop(t, baseRaw)
			diff := filepath.Join(t.TempDir(), "diff.qcow2")
			exportToFile(t, diff, "stream", "--source-format", "nbdhybrid", "--source", nbdSource(dev, src, size), "--relative-to", tc.base(baseDev))
			if got := clusterList(dataExtents(t, diff)); got != want {
				t.Fatalf("the diff stores clusters %s, want %s", got, want)
			}
			applyDiff(t, diff, baseRaw, srcRaw)
		})
	}
}

// TestNBDHybridRefusals: what cannot be right is refused with one line
// before any output: sizes that disagree, a server that is not there, an
// export it does not have, forms that could mean something else.
func TestNBDHybridRefusals(t *testing.T) {
	qemutest.Need(t)
	nbdtest.Need(t, "qemu-nbd")
	dir := t.TempDir()
	img, raw := nbdTestImage(t, dir)
	st, _ := os.Stat(raw)
	size := st.Size()
	s := nbdtest.QemuNBD(t, img, "qcow2", "vdi")
	small := filepath.Join(dir, "small.raw")
	writeFile(t, small, make([]byte, 1<<20))
	vhdBase := filepath.Join(dir, "base.vhd")
	qemutest.Img(t, "create", "-q", "-f", "vpc", "-o", "subformat=dynamic,force_size=on", vhdBase, strconv.FormatInt(size, 10))
	source := func(sz int64) string { return fmt.Sprintf("%s:%s:vdi:%d", raw, s.Socket, sz) }
	for _, tc := range []struct {
		name string
		args []string
		code int
		want []string
	}{
		{"size not the device's", []string{"--source", source(size + 512)}, 1, []string{"source size", "not the size of the source device"}},
		{"size not the export's", []string{"--source", fmt.Sprintf("%s:%s:vdi:%d", small, s.Socket, 1<<20)}, 1, []string{"the export has", "not the 1048576"}},
		{"no server", []string{"--source", fmt.Sprintf("%s:%s:vdi:%d", raw, filepath.Join(dir, "none.sock"), size)}, 1, []string{"none.sock", "no such file"}},
		{"unknown export", []string{"--source", fmt.Sprintf("%s:%s:other:%d", raw, s.Socket, size)}, 1, []string{"unknown export"}},
		{"three fields", []string{"--source", raw + ":" + s.Socket + ":vdi"}, 2, []string{"RAW:SERVER:EXPORTNAME:SIZE", "3 fields"}},
		{"hex size", []string{"--source", raw + ":" + s.Socket + ":vdi:0x100"}, 2, []string{`SIZE "0x100"`}},
		{"source fd", []string{"--source-fd", "0"}, 2, []string{"not --source-fd"}},
		{"with a hint", []string{"--source", source(size), "--allocation-map", "/dev/null"}, 2, []string{"takes no --allocation"}},
		{"ambiguous base", []string{"--source", source(size), "--relative-to", small + ":" + vhdBase}, 2, []string{"ambiguous"}},
		{"image as base", []string{"--source", source(size), "--relative-to", vhdBase}, 2, []string{"holds a VHD or qcow2 image"}},
		{"base size", []string{"--source", source(size), "--relative-to", fmt.Sprintf("%s:%s:vdi:%d", small, s.Socket, size)}, 1, []string{"base size"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out := filepath.Join(t.TempDir(), "out.qcow2")
			args := append([]string{"stream", "--source-format", "nbdhybrid", "--destination", "file://" + out}, tc.args...)
			r := runTool(t, nil, args...)
			checkFailureLine(t, r.Code, string(r.Stderr), tc.want...)
			if r.Code != tc.code {
				t.Fatalf("exit %d, want %d", r.Code, tc.code)
			}
			if _, err := os.Stat(out); err == nil {
				t.Fatalf("the destination was created")
			}
		})
	}
}

// TestNBDHybridJournal: the export's journal entries name where its
// allocation came from: ALLOCATION=nbd, the server's socket and export.
func TestNBDHybridJournal(t *testing.T) {
	qemutest.Need(t)
	nbdtest.Need(t, "qemu-nbd")
	img, raw := nbdTestImage(t, t.TempDir())
	st, _ := os.Stat(raw)
	s := nbdtest.QemuNBD(t, img, "qcow2", "vdi")
	p, entries := startWithJournal(t, nil, nil, "stream", "--source-format", "nbdhybrid", "--source", nbdSource(raw, s, st.Size()), "--destination", "null:")
	if code := p.wait(t, 30*time.Second); code != 0 {
		t.Fatalf("exit %d: %s", code, p.stderr.String())
	}
	var started journalEntry
	for deadline := time.Now().Add(2 * time.Second); started == nil && time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		started = findEntry(entries(), "export started")
	}
	if started == nil || started["ALLOCATION"] != "nbd" || started["NBD_SERVER"] != s.Socket || started["NBD_EXPORT"] != "vdi" {
		t.Fatalf("export started entry: %v; want ALLOCATION=nbd NBD_SERVER=%s NBD_EXPORT=vdi", started, s.Socket)
	}
}

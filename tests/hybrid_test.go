package tests

import (
	"bytes"
	"fmt"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/xapi-project/xapi-qcow-tool/tests/qemutest"
	"github.com/xapi-project/xapi-qcow-tool/tests/vhdtest"
	"golang.org/x/sys/unix"
)

// The hybrid source (vhd-tool's --source-format hybrid DEVICE:IMAGE): data
// from a loop device over the disk's raw content, allocation from the VHD
// or qcow2 chain behind it. Each export must read as the device
// (qemu-img compare) and read from the device no more than the chain
// allocates, counted by the kernel (/sys/block/loopN/stat).

const kib64 = 64 << 10

// directProbes is what rawdisk reads of a device besides the data when it
// opens it with O_DIRECT: its alignment probes (two 4 KiB blocks).
const directProbes = 8192

// sectorsRead is field 3 of /sys/block/loopN/stat: sectors read from dev.
func sectorsRead(t testing.TB, dev string) int64 {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("/sys/block", filepath.Base(dev), "stat"))
	if err != nil {
		t.Fatal(err)
	}
	f := strings.Fields(string(b))
	n, err := strconv.ParseInt(f[2], 10, 64)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// quietLoop attaches a loop device over raw for counting: no read-ahead
// (a read of 512 bytes must not bring in 128 KiB more), nothing cached,
// and the probes udev makes of a new device finished.
func quietLoop(t testing.TB, raw string) string {
	t.Helper()
	dev := loopDevice(t, raw, false)
	for _, args := range [][]string{{"--setra", "0", dev}, {"--flushbufs", dev}} {
		if out, err := exec.Command("blockdev", args...).CombinedOutput(); err != nil {
			t.Skipf("SKIP: blockdev %v refused: %v: %s", args, err, out)
		}
	}
	for prev := int64(-1); ; time.Sleep(50 * time.Millisecond) {
		n := sectorsRead(t, dev)
		if n == prev {
			return dev
		}
		prev = n
	}
}

// allocatedBytes is what qemu-img map says the image (with its backing
// chain) holds as data, rounded out to 64 KiB clusters.
func allocatedBytes(t testing.TB, img string) int64 {
	t.Helper()
	var clusters = map[int64]bool{}
	for _, e := range qemutest.Map(t, img) {
		if e.Data {
			for c := e.Start / kib64; c*kib64 < e.Start+e.Length; c++ {
				clusters[c] = true
			}
		}
	}
	return int64(len(clusters)) * kib64
}

func clustersOf(regions [][2]int64) int64 {
	clusters := map[int64]bool{}
	for _, r := range regions {
		for c := r[0] / kib64; c*kib64 < r[0]+r[1]; c++ {
			clusters[c] = true
		}
	}
	return int64(len(clusters)) * kib64
}

// directProbe is the probe the O_DIRECT allocation pass reads of each
// allocated cluster: one 4 KiB block (the loop devices have 512-byte
// sectors; rawdisk's alignment is 4 KiB).
const directProbe = 4096

// nonZeroClusters counts raw's 64 KiB clusters that hold a non-zero byte
// (data) and those whose first directProbe bytes do (heads), reading only
// its SEEK_DATA extents. Outside the chain's allocation raw is zeros, so
// both are subsets of the allocated clusters.
func nonZeroClusters(t testing.TB, raw string) (data, heads int64) {
	t.Helper()
	f, err := os.Open(raw)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, kib64)
	zero := make([]byte, kib64)
	for off := int64(0); ; {
		start, err := unix.Seek(int(f.Fd()), off, unix.SEEK_DATA)
		if err != nil {
			return data, heads // ENXIO: no data past off
		}
		end, err := unix.Seek(int(f.Fd()), start, unix.SEEK_HOLE)
		if err != nil {
			t.Fatal(err)
		}
		for c := start / kib64 * kib64; c < end; c += kib64 {
			n, err := f.ReadAt(buf, c)
			if n == 0 && err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(buf[:n], zero[:n]) {
				data++
			}
			if h := min(n, directProbe); !bytes.Equal(buf[:h], zero[:h]) {
				heads++
			}
		}
		off = (end + kib64 - 1) / kib64 * kib64
	}
}

// hybridExport exports DEVICE:IMAGE (through the page cache with
// --buffered, then as block devices are read by default, O_DIRECT) and
// checks the result against raw and the device reads against alloc. By
// default the chain's allocation is trusted: each allocated cluster is
// read once, in the data pass, and stored as read. With --detect-zeros the
// allocation pass reads them first to leave all-zero clusters out:
// buffered, no byte more is read from the device (the data pass sends
// what the pass brought into the page cache); direct, exactly one probe
// block of each allocated cluster, the rest of the clusters whose probe is
// zeros, and the stored clusters (pass 2). Direct opens add directProbes.
func hybridExport(t *testing.T, raw, image string, alloc int64, extra ...string) {
	t.Helper()
	dir := t.TempDir()
	nonZero, heads := nonZeroClusters(t, raw)
	allocated := alloc / kib64
	for _, detect := range []bool{false, true} {
		for _, direct := range []bool{false, true} {
			dev := quietLoop(t, raw)
			args := append([]string{"stream", "--source-format", "hybrid", "--source", dev + ":" + image}, extra...)
			if !direct {
				args = append(args, "--buffered")
			}
			if detect {
				args = append(args, "--detect-zeros")
			}
			out := filepath.Join(dir, fmt.Sprintf("direct-%v-detect-%v.qcow2", direct, detect))
			before := sectorsRead(t, dev)
			exportToFile(t, out, args...)
			read := (sectorsRead(t, dev) - before) * 512
			qemutest.Compare(t, out, raw)
			stored := clustersOf(dataExtents(t, out))
			var want int64
			switch {
			case !detect:
				want = alloc
			case direct:
				want = allocated*directProbe + (allocated-heads)*(kib64-directProbe) + nonZero*kib64
			}
			if direct {
				want += directProbes
			}
			switch {
			case detect && stored != nonZero*kib64:
				t.Errorf("--detect-zeros: %d bytes stored, want the %d of the clusters that are not all zeros", stored, nonZero*kib64)
			case !detect && stored != alloc:
				t.Errorf("%d bytes stored, want every allocated cluster (%d bytes), as read", stored, alloc)
			case detect && !direct && read > alloc:
				t.Errorf("--detect-zeros --buffered: read %d bytes from the device; the chain allocates %d", read, alloc)
			case (!detect || direct) && read != want:
				t.Errorf("direct=%v detect=%v: read %d bytes from the device, want %d (the chain allocates %d, %d clusters of it not all zeros, %d with a non-zero first block)",
					direct, detect, read, want, alloc, nonZero, heads)
			case read == 0 && alloc > 0:
				t.Errorf("direct=%v: nothing read from the device (the counter is not counting?)", direct)
			}
			t.Logf("direct=%v detect=%v: read %d bytes, chain allocates %d", direct, detect, read, alloc)
		}
	}
}

func TestHybridDynamicVHD(t *testing.T) {
	qemutest.Need(t)
	dir := t.TempDir()
	img, raw := filepath.Join(dir, "d.vhd"), filepath.Join(dir, "d.raw")
	qemutest.Img(t, "create", "-q", "-f", "vpc", "-o", "subformat=dynamic,force_size=on", img, "40M")
	// A block of zeros written by the guest is allocated.
	qemutest.Run(t, "qemu-io", "-c", "write -P 0x11 0 4k", "-c", "write -P 0x22 9M 3M", "-c", "write -P 0 20M 64k", "-c", "write -P 0x33 41942528 512", img)
	qemutest.Img(t, "convert", "-f", "vpc", "-O", "raw", img, raw)
	hybridExport(t, raw, img, allocatedBytes(t, img))
	// The zero block is stored as read by default, left out with
	// --detect-zeros.
	dev := loopDevice(t, raw, false)
	for _, detect := range []bool{false, true} {
		out := filepath.Join(dir, "o.qcow2")
		args := []string{"stream", "--source-format", "hybrid", "--source", dev + ":" + img}
		if detect {
			args = append(args, "--detect-zeros")
		}
		exportToFile(t, out, args...)
		stored := false
		for _, e := range dataExtents(t, out) {
			stored = stored || e[0] < 21<<20 && e[0]+e[1] > 20<<20
		}
		if stored == detect {
			t.Fatalf("--detect-zeros %v: zero block stored %v: %v", detect, stored, dataExtents(t, out))
		}
	}
}

// vhdChain builds base ← mid ← top, each child naming its parent by a
// relative name, the parents in lib and the top in vdi, proves it with
// libvhdi, and returns the top's path and the raw content's.
func vhdChain(t *testing.T, dir string, size int64, writes [3][][2]int64) (top, raw string, regions [][2]int64) {
	t.Helper()
	r := rand.New(rand.NewSource(15))
	rawPath := filepath.Join(dir, "chain.raw")
	sparseFile(t, rawPath, size)
	f, err := os.OpenFile(rawPath, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var ims [3]*vhdtest.Image
	ims[0] = vhdtest.New(size)
	ims[1] = vhdtest.Child(ims[0], "base.vhd")
	ims[2] = vhdtest.Child(ims[1], "mid.vhd")
	for i, ws := range writes {
		for _, w := range ws {
			b := make([]byte, w[1])
			r.Read(b)
			ims[i].Write(w[0], b)
			if _, err := f.WriteAt(b, w[0]); err != nil {
				t.Fatal(err)
			}
			regions = append(regions, w)
		}
	}
	lib, vdi := filepath.Join(dir, "lib"), filepath.Join(dir, "vdi")
	paths := []string{filepath.Join(vdi, "top.vhd"), filepath.Join(lib, "mid.vhd"), filepath.Join(lib, "base.vhd")}
	for i, p := range []string{paths[2], paths[1], paths[0]} {
		if err := ims[i].Save(p); err != nil {
			t.Fatal(err)
		}
	}
	var prove [][2]int64
	if size > 1<<30 {
		prove = append(prove, regions...)
		prove = append(prove, [2]int64{0, 1 << 20}, [2]int64{size - 3<<20, 3 << 20})
	}
	vhdtest.ProveWithLibvhdi(t, rawPath, paths, prove...)
	return paths[0], rawPath, regions
}

func TestHybridDifferencingVHDChain(t *testing.T) {
	qemutest.Need(t)
	dir := t.TempDir()
	const size = 24 << 20
	top, raw, regions := vhdChain(t, dir, size, [3][][2]int64{
		{{0, 1 << 20}, {8 << 20, 4096}, {16 << 20, 2 << 20}},
		{{4096, 8192}, {8<<20 + 64<<10, 64 << 10}},
		{{12 << 20, 4096}, {size - 4096, 4096}},
	})
	alloc := clustersOf(regions)
	// Not found without the library in the path: one line naming the
	// parent and the search path, nothing on stdout.
	dev := loopDevice(t, raw, false)
	r := runTool(t, nil, "stream", "--source-format", "hybrid", "--source", dev+":"+top, "--path", "/nonexistent:.")
	checkOneLineError(t, r, `parent "./mid.vhd"`)
	if !strings.Contains(string(r.Stderr), "search path /nonexistent:.") {
		t.Fatalf("error does not name the search path: %s", r.Stderr)
	}
	hybridExport(t, raw, top, alloc, "--path", "/dev/mapper:"+filepath.Join(dir, "lib"))

	// Against a base given as BASE_DEVICE:BASE_IMAGE: the base is mid's
	// chain (mid and base shared), so only what top writes may differ.
	baseRaw := filepath.Join(dir, "base.raw")
	qemutest.Img(t, "convert", "-f", "vpc", "-O", "raw", filepath.Join(dir, "lib", "base.vhd"), baseRaw)
	// mid's content: base's plus mid's writes; build it from the raw of
	// the chain by undoing top's writes with base's bytes there.
	midRaw := filepath.Join(dir, "mid.raw")
	copyFile(t, raw, midRaw)
	for _, w := range [][2]int64{{12 << 20, 4096}, {size - 4096, 4096}} {
		zeroRange(t, midRaw, w[0], w[1])
	}
	vhdtest.ProveWithLibvhdi(t, midRaw, []string{filepath.Join(dir, "lib", "mid.vhd"), filepath.Join(dir, "lib", "base.vhd")})
	srcDev, baseDev := quietLoop(t, raw), quietLoop(t, midRaw)
	diff := filepath.Join(dir, "diff.qcow2")
	b0, s0 := sectorsRead(t, baseDev), sectorsRead(t, srcDev)
	exportToFile(t, diff, "stream", "--source-format", "hybrid", "--source", srcDev+":"+top,
		"--relative-to", baseDev+":"+filepath.Join(dir, "lib", "mid.vhd"), "--path", filepath.Join(dir, "lib"),
		"--backing-file", midRaw)
	qemutest.Img(t, "compare", diff, raw)
	// O_DIRECT (the default on devices): the two clusters top writes are
	// read once from the source, in the data pass (plus the direct open's
	// alignment probes); the base device is never read.
	srcRead, baseRead := (sectorsRead(t, srcDev)-s0)*512, (sectorsRead(t, baseDev)-b0)*512
	if srcRead != 2*kib64+directProbes || baseRead != 0 {
		t.Fatalf("diff read %d bytes of the source and %d of the base; only top's two clusters differ, read from the source", srcRead, baseRead)
	}
	applyDiff(t, diff, midRaw, raw)
	if got := dataExtents(t, diff); len(got) != 2 {
		t.Fatalf("diff stores %v", got)
	}
}

func TestHybridQcow2Chains(t *testing.T) {
	qemutest.Need(t)
	for _, c := range []struct {
		name, opts string
		writes     [][]string // per layer, qemu-io commands
	}{
		{"backing files", "cluster_size=64k", [][]string{
			{"write -P 1 0 3M", "write -P 2 10M 64k"},
			{"write -z 1M 1M", "write -P 3 20M 128k"},
			{"write -P 4 512k 4k", "write -P 0 30M 64k", "write -P 5 33550336 4k"}}},
		{"extended L2 subclusters", "cluster_size=128k,extended_l2=on", [][]string{
			{"write -P 1 0 1M"},
			{"write -z 128k 4k", "write -P 2 5M 4k"},
			{"write -P 3 9M 8k", "write -z 256k 256k"}}},
		{"2 MiB clusters", "cluster_size=2M", [][]string{
			{"write -P 1 2M 2M"},
			{"write -P 2 10M 4k"},
			{"write -z 2M 2M", "write -P 3 20M 64k"}}},
	} {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			var top string
			for i, ws := range c.writes {
				img := filepath.Join(dir, fmt.Sprintf("l%d.qcow2", i))
				args := []string{"create", "-q", "-f", "qcow2", "-o", c.opts}
				if top != "" {
					args = append(args, "-b", filepath.Base(top), "-F", "qcow2")
				}
				qemutest.Img(t, append(args, img, "32M")...)
				for _, w := range ws {
					qemutest.Run(t, "qemu-io", "-c", w, img)
				}
				top = img
			}
			raw := filepath.Join(dir, "disk.raw")
			qemutest.Img(t, "convert", "-O", "raw", top, raw)
			hybridExport(t, raw, top, allocatedBytes(t, top))
		})
	}
}

// TestHybridHugeSparseVHD: a VHD of 3 TiB with data near its end. The
// export reads only that data and finishes in seconds.
func TestHybridHugeSparseVHD(t *testing.T) {
	qemutest.Need(t)
	dir := t.TempDir()
	const size = 3 << 40
	top, raw, regions := vhdChain(t, dir, size, [3][][2]int64{
		{{0, 64 << 10}, {size - 8<<20, 1 << 20}},
		{{2<<40 + 4<<20, 4096}},
		{{size - 4096, 4096}},
	})
	start := time.Now()
	hybridExport(t, raw, top, clustersOf(regions), "--path", filepath.Join(dir, "lib"))
	if d := time.Since(start); d > 60*time.Second {
		t.Fatalf("3 TiB sparse export took %v", d)
	}
}

func TestHybridRefusals(t *testing.T) {
	qemutest.Need(t)
	dir := t.TempDir()
	img, raw := filepath.Join(dir, "d.vhd"), filepath.Join(dir, "d.raw")
	qemutest.Img(t, "create", "-q", "-f", "vpc", "-o", "subformat=dynamic,force_size=on", img, "8M")
	sparseFile(t, raw, 8<<20)
	small := filepath.Join(dir, "small.raw")
	sparseFile(t, small, 4<<20)
	bad := filepath.Join(dir, "bad.vhd")
	b, _ := os.ReadFile(img)
	b[len(b)-512+40]++ // end footer's checksum wrong
	b[40]++            // and the copy's
	os.WriteFile(bad, b, 0o644)
	batOut := filepath.Join(dir, "bat.vhd")
	b, _ = os.ReadFile(img)
	copy(b[1536:], []byte{0x7f, 0, 0, 0}) // BAT entry 0 far past the end
	os.WriteFile(batOut, b, 0o644)
	qc := filepath.Join(dir, "q.qcow2")
	qemutest.Img(t, "create", "-q", "-u", "-f", "qcow2", "-b", "gone.qcow2", "-F", "qcow2", qc, "8M")
	for _, c := range []struct {
		name   string
		source string
		want   string
	}{
		{"size differs", small + ":" + img, "describes a disk of 8388608 bytes"},
		{"bad checksum", raw + ":" + bad, "bad checksum"},
		{"BAT entry outside", raw + ":" + batOut, "past the end of the image"},
		{"not an image", raw + ":" + raw, "--source-format raw"},
		{"missing backing file", raw + ":" + qc, `parent "gone.qcow2"`},
		{"no image", raw, "DEVICE:IMAGE"},
	} {
		t.Run(c.name, func(t *testing.T) {
			out := filepath.Join(dir, "out.qcow2")
			os.Remove(out)
			r := runTool(t, nil, "stream", "--source-format", "hybrid", "--source", c.source, "--destination", "file://"+out)
			checkOneLineError(t, r, c.want)
			if _, err := os.Stat(out); err == nil {
				t.Fatalf("the destination was created before the refusal")
			}
		})
	}
}

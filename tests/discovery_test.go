package tests

import (
	"fmt"
	"math/rand"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/xapi-project/xapi-qcow-tool/tests/qemutest"
	"github.com/xapi-project/xapi-qcow-tool/tests/vhdtest"
)

// Discovery: xapi runs `qcow2-to-stdout DEVICE [--diff BASE_DEVICE]` with
// no hint for a VHD-backed VDI; the binary finds the image behind the
// device itself (vhdcompat/discover) and reads only what it allocates.
// Each test builds the host around the unchanged binary (xapiHost) and
// runs xapi's exact command line.

// layeredVHDs builds a VHD chain of len(writes) images (the first the
// bottom), each child naming its parent by a relative locator, saved at
// paths (bottom first), the disk's content in a raw file beside them with
// writes[i] stored in image i. The chain is proved with libvhdi. It
// returns the raw file and the regions written.
func layeredVHDs(t *testing.T, size int64, paths []string, writes [][][2]int64) (string, [][2]int64) {
	t.Helper()
	r := rand.New(rand.NewSource(19))
	raw := filepath.Join(t.TempDir(), "disk.raw")
	sparseFile(t, raw, size)
	var ims []*vhdtest.Image
	var regions [][2]int64
	for i, ws := range writes {
		im := vhdtest.New(size)
		if i > 0 {
			im = vhdtest.Child(ims[i-1], filepath.Base(paths[i-1]))
		}
		ims = append(ims, im)
		for _, w := range ws {
			b := make([]byte, w[1])
			r.Read(b)
			im.Write(w[0], b)
			poke(t, raw, w[0], b...)
			regions = append(regions, w)
		}
	}
	for i, im := range ims {
		if err := im.Save(paths[i]); err != nil {
			t.Fatal(err)
		}
	}
	top := slices.Clone(paths)
	slices.Reverse(top)
	vhdtest.ProveWithLibvhdi(t, raw, top)
	return raw, regions
}

// exportThrough runs xapi's command line args on the host, the image's
// content in raw behind the device dev, and checks the export: equal to
// raw, its allocation named as alloc with image, read from the device no
// more than the allocated bytes. It returns the "export started" entry
// and the bytes read.
func (h *xapiHost) exportThrough(dev, raw, out string, allocated int64, alloc, image string, args ...string) (journalEntry, int64) {
	h.t.Helper()
	before := sectorsRead(h.t, dev)
	started, warnings := h.export(out, args...)
	read := (sectorsRead(h.t, dev) - before) * 512
	qemutest.Compare(h.t, out, raw)
	checkAllocation(h.t, started, warnings, alloc, image)
	if read > hybridReadBound(allocated) {
		h.t.Fatalf("%s read %d bytes from the device; the image allocates %d", args[0], read, allocated)
	}
	return started, read
}

// checkDiff judges a diff with qemu-img: named onto the base's raw content
// as its backing file, it must read as the source's.
func checkDiff(t testing.TB, diff, baseRaw, raw string) {
	t.Helper()
	qemutest.Img(t, "rebase", "-u", "-b", baseRaw, "-F", "raw", diff)
	qemutest.Img(t, "compare", diff, raw)
}

// TestDiscoveryVHDFileSR: a file SR (ext, NFS): tapdisk serves the VDI from
// a VHD chain of files in the SR's mount, whose path holds a space. xapi's
// command line reads only what the chain allocates, names it in the
// journal, and --diff against the parent's device takes only what the top
// image writes.
func TestDiscoveryVHDFileSR(t *testing.T) {
	qemutest.Need(t)
	h := newXapiHost(t)
	sr := filepath.Join(h.dir, "sr-mount", "7f3c sr")
	paths := []string{filepath.Join(sr, "base.vhd"), filepath.Join(sr, "mid.vhd"), filepath.Join(sr, "top vdi.vhd")}
	const size = 24 << 20
	topWrites := [][2]int64{{12 << 20, 4096}, {size - 4096, 4096}}
	raw, regions := layeredVHDs(t, size, paths, [][][2]int64{
		{{0, 1 << 20}, {8 << 20, 4096}, {16 << 20, 2 << 20}},
		{{4096, 8192}, {8<<20 + 64<<10, 64 << 10}},
		topWrites,
	})
	dev := quietLoop(t, raw)
	vdi, minor := h.vdi(dev, "0b9e-vdi")
	h.tapdisk(901, minor+40, "0", "aio:/var/run/sr-mount/other sr/a b.img")
	h.tapdisk(4242, minor, "0", "vhd:"+paths[2])

	out := filepath.Join(h.dir, "full.qcow2")
	_, read := h.exportThrough(dev, raw, out, clustersOf(regions), "vhd", paths[2], "qcow2-to-stdout.py", vdi)
	if calls := h.tapCtlCalls(); !slices.Contains(calls, fmt.Sprintf("list -m %d", minor)) {
		t.Fatalf("tap-ctl was run as %q, want list -m %d", calls, minor)
	}

	// The diff against the parent: mid's content on its own device,
	// served by its own tapdisk.
	midRaw := filepath.Join(h.dir, "mid.raw")
	copyFile(t, raw, midRaw)
	for _, w := range topWrites {
		zeroRange(t, midRaw, w[0], w[1])
	}
	vhdtest.ProveWithLibvhdi(t, midRaw, []string{paths[1], paths[0]})
	baseDev := quietLoop(t, midRaw)
	baseVdi, baseMinor := h.vdi(baseDev, "5d21-base")
	h.tapdisk(4243, baseMinor, "0", "vhd:"+paths[1])
	diff := filepath.Join(h.dir, "diff.qcow2")
	s0, b0 := sectorsRead(t, dev), sectorsRead(t, baseDev)
	started, warnings := h.export(diff, "qcow2-to-stdout.py", vdi, "--diff", baseVdi)
	srcRead, baseRead := (sectorsRead(t, dev)-s0)*512, (sectorsRead(t, baseDev)-b0)*512
	checkAllocation(t, started, warnings, "vhd", paths[2])
	if started["BASE_IMAGE"] != paths[1] || started["BASE"] != baseVdi {
		t.Fatalf("export entry names base %q, base image %q; want %q, %q", started["BASE"], started["BASE_IMAGE"], baseVdi, paths[1])
	}
	checkDiff(t, diff, midRaw, raw)
	if got := dataExtents(t, diff); len(got) != 2 {
		t.Fatalf("diff stores %v; top writes two clusters", got)
	}
	// The diff comes from the chains: the top's clusters read once from
	// the source, nothing of the base device.
	if top := clustersOf(topWrites); srcRead > hybridReadBound(top) || baseRead != 0 {
		t.Fatalf("diff read %d bytes of the source and %d of the base; top writes %d", srcRead, baseRead, top)
	}
	t.Logf("full export read %d bytes; diff read %d of the source, %d of the base", read, srcRead, baseRead)

	// The base's image cannot be used (its tapdisk is paused): one warning
	// for the base; the source's chain still gives the allocation and the
	// base device is compared as it is.
	h.reset()
	h.tapdisk(4242, minor, "0", "vhd:"+paths[2])
	h.tapdisk(4243, baseMinor, "0x2a", "vhd:"+paths[1])
	os.Remove(diff)
	started, warnings = h.export(diff, "qcow2-to-stdout.py", vdi, "--diff", baseVdi)
	if len(warnings) != 1 || !strings.Contains(warnings[0], "base "+baseVdi) || !strings.Contains(warnings[0], "state 0x2a") {
		t.Fatalf("want one warning about the base, got %q", warnings)
	}
	if started["ALLOCATION"] != "vhd" || started["IMAGE"] != paths[2] || started["BASE_IMAGE"] != "" {
		t.Fatalf("export entry %v", started)
	}
	checkDiff(t, diff, midRaw, raw)

	// --no-discovery: today's export, tap-ctl not run.
	calls := len(h.tapCtlCalls())
	started, warnings = h.export(out, "qcow2-to-stdout.py", vdi, "--no-discovery")
	qemutest.Compare(t, out, raw)
	checkAllocation(t, started, warnings, "scan", "")
	if n := len(h.tapCtlCalls()); n != calls {
		t.Fatalf("--no-discovery ran tap-ctl")
	}
}

// TestDiscoveryLVM: the LVM shape of shared storage (LVHD on iSCSI, FC,
// local LVM): tapdisk's args name /dev/VG_XenStorage-SR/VHD-UUID, a
// symlink to a device-mapper node, a logical volume larger than the VHD in
// it (the footer copy at offset 0 is the one to trust: the volume's end is
// not the VHD's), whose parent is the volume beside it, named by a
// relative locator. Loop devices stand in for the volumes.
func TestDiscoveryLVM(t *testing.T) {
	qemutest.Need(t)
	h := newXapiHost(t)
	work := filepath.Join(h.dir, "volumes")
	const size = 20 << 20
	const sr = "VG_XenStorage-3b6e4a1c"
	parentUUID, topUUID := "VHD-1a2b3c4d-parent", "VHD-5e6f7a8b-leaf"
	paths := []string{filepath.Join(work, parentUUID), filepath.Join(work, topUUID)}
	raw, regions := layeredVHDs(t, size, paths, [][][2]int64{
		{{0, 2 << 20}, {10 << 20, 64 << 10}},
		{{1 << 20, 4096}, {size - 8192, 8192}},
	})
	var lvPaths []string
	for i, p := range paths {
		// LVM rounds a volume up to its extents (4 MiB) and beyond: the
		// VHD ends before the volume does.
		st, err := os.Stat(p)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.Truncate(p, (st.Size()/(4<<20)+2)*(4<<20)); err != nil {
			t.Fatal(err)
		}
		lv := "/dev/" + sr + "/" + filepath.Base(p)
		dm := "/dev/mapper/" + strings.ReplaceAll(sr, "-", "--") + "-" + strings.ReplaceAll(filepath.Base(p), "-", "--")
		h.node(fmt.Sprintf("/dev/dm-%d", i), loopDevice(t, p, false), dm)
		h.symlink(lv, "../dm-"+fmt.Sprint(i))
		lvPaths = append(lvPaths, lv)
	}
	dev := quietLoop(t, raw)
	vdi, minor := h.vdi(dev, "5e6f7a8b-leaf")
	h.tapdisk(3117, minor, "0", "vhd:"+lvPaths[1])
	h.exportThrough(dev, raw, filepath.Join(h.dir, "lvm.qcow2"), clustersOf(regions), "vhd", lvPaths[1], "qcow2-to-stdout.py", vdi)
}

// TestDiscoveryQcow2Chain: an XCP-ng qcow2 SR: tapdisk's driver qcow2, a
// chain made by qemu-img, the backing file named relative to the image.
func TestDiscoveryQcow2Chain(t *testing.T) {
	qemutest.Need(t)
	h := newXapiHost(t)
	sr := filepath.Join(h.dir, "qcow2 sr")
	if err := os.MkdirAll(sr, 0o755); err != nil {
		t.Fatal(err)
	}
	base, top := filepath.Join(sr, "base.qcow2"), filepath.Join(sr, "leaf.qcow2")
	qemutest.Img(t, "create", "-q", "-f", "qcow2", base, "32M")
	qemutest.Run(t, "qemu-io", "-c", "write -P 1 0 3M", "-c", "write -P 2 10M 64k", base)
	qemutest.Img(t, "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top, "32M")
	qemutest.Run(t, "qemu-io", "-c", "write -z 1M 1M", "-c", "write -P 3 20M 128k", "-c", "write -P 4 33550336 4k", top)
	raw := filepath.Join(h.dir, "disk.raw")
	qemutest.Img(t, "convert", "-O", "raw", top, raw)
	dev := quietLoop(t, raw)
	vdi, minor := h.vdi(dev, "c0ffee-vdi")
	h.tapdisk(77, minor, "0", "qcow2:"+top)
	out := filepath.Join(h.dir, "out.qcow2")
	alloc := allocatedBytes(t, top)
	h.exportThrough(dev, raw, out, alloc, "qcow2", top, "qcow2-to-stdout.py", vdi)
	// vhd-tool's command line (stream, raw source) discovers the same.
	os.Remove(out)
	h.exportThrough(dev, raw, out, alloc, "qcow2", top, "stream", "--source-protocol", "none", "--source-format", "raw", "--source", vdi,
		"--destination-protocol", "none", "--destination-format", "qcow2", "--destination", "file://"+out, "--direct", "--path", "/dev/mapper:.")
}

// TestDiscoveryAio: a raw VDI in a file (driver aio): the allocation is the
// file's SEEK_DATA, read through the device.
func TestDiscoveryAio(t *testing.T) {
	qemutest.Need(t)
	h := newXapiHost(t)
	img := filepath.Join(h.dir, "raw sr", "vdi.img")
	if err := os.MkdirAll(filepath.Dir(img), 0o755); err != nil {
		t.Fatal(err)
	}
	sparseFile(t, img, 32<<20)
	r := newRand(19)
	writeRandom(t, r, img, 0, 3*kib64)
	writeRandom(t, r, img, 20<<20, 1<<20)
	dev := quietLoop(t, img)
	vdi, minor := h.vdi(dev, "aio-vdi")
	h.tapdisk(55, minor, "0", "aio:"+img)
	h.exportThrough(dev, img, filepath.Join(h.dir, "out.qcow2"), allocated(t, img), "seek-data", img, "qcow2-to-stdout.py", vdi)
}

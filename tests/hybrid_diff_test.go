package tests

import (
	"fmt"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"testing"

	"github.com/xapi-project/xapi-qcow-tool/tests/qemutest"
	"github.com/xapi-project/xapi-qcow-tool/tests/vhdtest"
)

// Diffs of the hybrid source against a base image (vhd-tool's
// --relative-to BASE_IMAGE, what xapi passes): decided from the two
// chains' metadata, read from the source device only. Each diff is applied
// by our stream_decode onto a copy of the base's raw content and must then
// be the source's (cmp and qemu-img compare); the loop devices' read
// counters show what was read: each stored data cluster once, the base
// device never.

// applyDiff applies diff onto a copy of baseRaw with stream_decode and
// checks that the result is srcRaw, byte for byte (cmp) and for qemu-img.
func applyDiff(t *testing.T, diff, baseRaw, srcRaw string) {
	t.Helper()
	applied := filepath.Join(t.TempDir(), "applied.raw")
	copyFile(t, baseRaw, applied)
	if st, err := os.Stat(srcRaw); err != nil {
		t.Fatal(err)
	} else if err := os.Truncate(applied, st.Size()); err != nil {
		t.Fatal(err)
	}
	res := runTool(t, readFile(t, diff), "stream_decode", applied)
	mustSucceed(t, res, "stream_decode")
	if out, err := exec.Command("cmp", applied, srcRaw).CombinedOutput(); err != nil {
		t.Fatalf("the diff applied onto the base is not the source: %v: %s", err, out)
	}
	qemutest.Img(t, "compare", "-f", "raw", "-F", "raw", applied, srcRaw)
}

// clusterList is the 64 KiB clusters of regions, sorted, as fmt prints
// them.
func clusterList(regions [][2]int64) string {
	set := map[int64]bool{}
	for _, r := range regions {
		for c := r[0] / kib64; c*kib64 < r[0]+r[1]; c++ {
			set[c] = true
		}
	}
	var out []int64
	for c := range set {
		out = append(out, c)
	}
	sort.Slice(out, func(i, j int) bool { return out[i] < out[j] })
	return fmt.Sprint(out)
}

// hybridDiff exports DEVICE:IMAGE relative to base (O_DIRECT, the default
// on devices, then --buffered), with baseDev's counter watched when given,
// checks that the diff stores exactly the data clusters want and applies
// it onto baseRaw. The source device must be read for those clusters only
// (direct: exactly, plus the direct open's alignment probes; buffered: no
// more), the base device not at all.
func hybridDiff(t *testing.T, raw, image, base, baseRaw, baseDev, want string, extra ...string) {
	t.Helper()
	for _, direct := range []bool{true, false} {
		dev := quietLoop(t, raw)
		diff := filepath.Join(t.TempDir(), "diff.qcow2")
		args := append([]string{"stream", "--source-format", "hybrid", "--source", dev + ":" + image, "--relative-to", base}, extra...)
		if !direct {
			args = append(args, "--buffered")
		}
		s0 := sectorsRead(t, dev)
		var b0 int64
		if baseDev != "" {
			b0 = sectorsRead(t, baseDev)
		}
		exportToFile(t, diff, args...)
		read := (sectorsRead(t, dev) - s0) * 512
		if baseDev != "" {
			if n := sectorsRead(t, baseDev) - b0; n != 0 {
				t.Errorf("direct=%v: %d bytes read from the base device; the diff needs none", direct, n*512)
			}
		}
		got := dataExtents(t, diff)
		if s := clusterList(got); s != want {
			t.Fatalf("direct=%v: the diff stores data clusters %s, want %s", direct, s, want)
		}
		stored := clustersOf(got)
		applyDiff(t, diff, baseRaw, raw)
		switch {
		case direct && read != stored+directProbes:
			t.Errorf("direct: read %d bytes of the source device, want the %d stored plus %d", read, stored, directProbes)
		case !direct && read > stored:
			t.Errorf("buffered: read %d bytes of the source device, more than the %d stored", read, stored)
		}
		t.Logf("direct=%v: read %d bytes of the source, %d stored", direct, read, stored)
	}
}

// TestHybridRelativeToQcow2Image is issue 18's shape: a snapshot over a
// base, the snapshot zeroing a cluster the base holds and writing one of
// its own. Against the base's image (shared: only the snapshot's two
// clusters, the zeroed one sent as a zero cluster, unread), against a copy
// of the base that shares no file with the chain (everything either
// allocates), and in the BASE_DEVICE:BASE_IMAGE form (the base device
// never read).
func TestHybridRelativeToQcow2Image(t *testing.T) {
	qemutest.Need(t)
	dir := t.TempDir()
	base := qemutest.Create(t, filepath.Join(dir, "base.qcow2"), "", "64M", "write -P 1 0 1M", "write -P 2 8M 1M")
	snap := qemutest.Overlay(t, base, filepath.Join(dir, "snap.qcow2"), "", "write -z 8M 64k", "write -P 5 40M 64k")
	snapRaw, baseRaw := qemutest.Raw(t, snap), qemutest.Raw(t, base)

	t.Run("shared base image", func(t *testing.T) {
		hybridDiff(t, snapRaw, snap, base, baseRaw, "", clusterList([][2]int64{{40 << 20, kib64}}))
	})
	t.Run("unrelated base image", func(t *testing.T) {
		alone := filepath.Join(dir, "alone.qcow2")
		qemutest.Img(t, "convert", "-O", "qcow2", base, alone)
		hybridDiff(t, snapRaw, snap, alone, baseRaw, "",
			clusterList([][2]int64{{0, 1 << 20}, {8<<20 + kib64, 1<<20 - kib64}, {40 << 20, kib64}}))
	})
	t.Run("BASE_DEVICE:BASE_IMAGE", func(t *testing.T) {
		baseDev := quietLoop(t, baseRaw)
		hybridDiff(t, snapRaw, snap, baseDev+":"+base, baseRaw, baseDev, clusterList([][2]int64{{40 << 20, kib64}}))
	})
}

// TestHybridRelativeToVHDSibling: a dynamic parent with two differencing
// children, as a XenServer snapshot leaves them (the VDI's leaf and the
// snapshot's), built by vhdtest and proved by libvhdi. The VDI is diffed
// against the snapshot's image: the parent is their common ancestor, so
// only the clusters either child writes may differ; those the snapshot
// alone writes are read from the VDI where the parent holds data and sent
// as zero clusters where nothing does.
func TestHybridRelativeToVHDSibling(t *testing.T) {
	qemutest.Need(t)
	dir := t.TempDir()
	const size = 24 << 20
	parentW := [][2]int64{{0, 1 << 20}, {4 << 20, 2 << 20}, {16 << 20, 64 << 10}}
	vdiW := [][2]int64{{4096, 8192}, {5 << 20, 4096}, {20 << 20, 128 << 10}}
	snapW := [][2]int64{{512 << 10, 4096}, {10 << 20, 64 << 10}, {16 << 20, 4096}, {20<<20 + 64<<10, 4096}}
	parent := vhdtest.New(size)
	vdi, snap := vhdtest.Child(parent, "parent.vhd"), vhdtest.Child(parent, "parent.vhd")
	r := rand.New(rand.NewSource(18))
	vdiRaw, snapRaw, parentRaw := filepath.Join(dir, "vdi.raw"), filepath.Join(dir, "snap.raw"), filepath.Join(dir, "parent.raw")
	for _, p := range []string{vdiRaw, snapRaw, parentRaw} {
		sparseFile(t, p, size)
	}
	write := func(im *vhdtest.Image, raws []string, ws [][2]int64) {
		for _, w := range ws {
			b := make([]byte, w[1])
			r.Read(b)
			im.Write(w[0], b)
			for _, p := range raws {
				f, err := os.OpenFile(p, os.O_WRONLY, 0)
				if err != nil {
					t.Fatal(err)
				}
				_, err = f.WriteAt(b, w[0])
				f.Close()
				if err != nil {
					t.Fatal(err)
				}
			}
		}
	}
	write(parent, []string{vdiRaw, snapRaw, parentRaw}, parentW)
	write(vdi, []string{vdiRaw}, vdiW)
	write(snap, []string{snapRaw}, snapW)
	paths := map[string]string{}
	for name, im := range map[string]*vhdtest.Image{"parent.vhd": parent, "vdi.vhd": vdi, "snap.vhd": snap} {
		paths[name] = filepath.Join(dir, name)
		if err := im.Save(paths[name]); err != nil {
			t.Fatal(err)
		}
	}
	vhdtest.ProveWithLibvhdi(t, vdiRaw, []string{paths["vdi.vhd"], paths["parent.vhd"]})
	vhdtest.ProveWithLibvhdi(t, snapRaw, []string{paths["snap.vhd"], paths["parent.vhd"]})

	// Stored as data: the clusters either child writes where the VDI's
	// chain holds data (the VDI's own writes, and the parent's under the
	// snapshot's at 512 KiB and 16 MiB); at 10 MiB the VDI's chain holds
	// nothing: a zero cluster.
	want := clusterList([][2]int64{{0, 12288}, {5 << 20, 4096}, {20 << 20, 128 << 10}, {512 << 10, 4096}, {16 << 20, 4096}})
	hybridDiff(t, vdiRaw, paths["vdi.vhd"], paths["snap.vhd"], snapRaw, "", want)
	// The same with the snapshot's device named too: never read.
	snapDev := quietLoop(t, snapRaw)
	hybridDiff(t, vdiRaw, paths["vdi.vhd"], snapDev+":"+paths["snap.vhd"], snapRaw, snapDev, want)
	// Against the parent itself, the ancestor: only the VDI's writes.
	hybridDiff(t, vdiRaw, paths["vdi.vhd"], paths["parent.vhd"], parentRaw, "",
		clusterList(vdiW))
}

// TestHybridRelativeToAmbiguous: in hybrid mode a base without a colon is
// the base's image; anything that is not an image (a raw disk, the
// meaning --relative-to has with a raw source) and the source device
// itself are refused before any output, naming the forms to use.
func TestHybridRelativeToAmbiguous(t *testing.T) {
	qemutest.Need(t)
	dir := t.TempDir()
	img, raw := filepath.Join(dir, "d.qcow2"), filepath.Join(dir, "d.raw")
	qemutest.Img(t, "create", "-q", "-f", "qcow2", img, "8M")
	qemutest.IO(t, img, "write -P 7 0 64k")
	qemutest.Img(t, "convert", "-O", "raw", img, raw)
	rawBase, small := filepath.Join(dir, "base.raw"), filepath.Join(dir, "small.raw")
	sparseFile(t, rawBase, 8<<20)
	sparseFile(t, small, 4<<20)
	dev := loopDevice(t, raw, false)
	for _, c := range []struct{ name, base, want string }{
		{"raw disk", rawBase, "is neither a VHD nor a qcow2 image: with --source-format hybrid give the base's image, or BASE_DEVICE:BASE_IMAGE"},
		{"the source device", dev, "is the source device"},
		{"device without image", rawBase + ":", "give the base's VHD or qcow2 image (BASE_IMAGE), or BASE_DEVICE:BASE_IMAGE"},
		{"image without device", ":" + img, "BASE_DEVICE:BASE_IMAGE"},
		{"base device of another size", small + ":" + img, "describes a disk of 8388608 bytes, but the base device"},
	} {
		t.Run(c.name, func(t *testing.T) {
			out := filepath.Join(dir, "out.qcow2")
			os.Remove(out)
			r := runTool(t, nil, "stream", "--source-format", "hybrid", "--source", dev+":"+img, "--relative-to", c.base, "--destination", "file://"+out)
			checkOneLineError(t, r, c.want)
			if _, err := os.Stat(out); err == nil {
				t.Fatalf("the destination was created before the refusal")
			}
		})
	}
}

// TestHybridRelativeToDetectZeros: a snapshot that writes zeros as data
// over the base's data. Trusted, the cluster goes as a data cluster of
// zeros; with --detect-zeros as a zero cluster. Both diffs, applied onto
// the base, give the source.
func TestHybridRelativeToDetectZeros(t *testing.T) {
	qemutest.Need(t)
	dir := t.TempDir()
	base := qemutest.Create(t, filepath.Join(dir, "base.qcow2"), "", "16M", "write -P 1 0 1M")
	snap := qemutest.Overlay(t, base, filepath.Join(dir, "snap.qcow2"), "", "write -P 0 256k 64k", "write -P 3 8M 64k")
	snapRaw, baseRaw := qemutest.Raw(t, snap), qemutest.Raw(t, base)
	dev := loopDevice(t, snapRaw, false)
	for _, detect := range []bool{false, true} {
		diff := filepath.Join(dir, fmt.Sprintf("diff-%v.qcow2", detect))
		args := []string{"stream", "--source-format", "hybrid", "--source", dev + ":" + snap, "--relative-to", base}
		want := clusterList([][2]int64{{256 << 10, kib64}, {8 << 20, kib64}})
		if detect {
			args = append(args, "--detect-zeros")
			want = clusterList([][2]int64{{8 << 20, kib64}})
		}
		exportToFile(t, diff, args...)
		if got := clusterList(dataExtents(t, diff)); got != want {
			t.Fatalf("--detect-zeros %v: data clusters %s, want %s", detect, got, want)
		}
		applyDiff(t, diff, baseRaw, snapRaw)
	}
}

// TestHybridRelativeToShorterBase: the base's image is shorter than the
// ancestor it shares with the source (a qcow2 may be smaller than its
// backing file). Past the base's end the source's data from the ancestor
// differs from the base (which has nothing there) and must be in the diff.
func TestHybridRelativeToShorterBase(t *testing.T) {
	qemutest.Need(t)
	dir := t.TempDir()
	anc := qemutest.Create(t, filepath.Join(dir, "anc.qcow2"), "", "16M", "write -P 1 0 64k", "write -P 2 12M 64k")
	base := qemutest.Overlay(t, anc, filepath.Join(dir, "base.qcow2"), "8M")
	src := qemutest.Overlay(t, anc, filepath.Join(dir, "src.qcow2"), "", "write -P 3 1M 64k")
	srcRaw, baseRaw := qemutest.Raw(t, src), qemutest.Raw(t, base)
	hybridDiff(t, srcRaw, src, base, baseRaw, "", clusterList([][2]int64{{1 << 20, kib64}, {12 << 20, kib64}}))
}

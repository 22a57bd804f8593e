package hybrid

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/xapi-project/xapi-qcow-tool/tests/qemutest"
	"github.com/xapi-project/xapi-qcow-tool/tests/vhdtest"
	"github.com/xapi-project/xapi-qcow-tool/vhdcompat/hints"
)

const mib = 1 << 20

// ext builds extents from start, end pairs.
func ext(se ...int64) hints.Extents {
	out := hints.Extents{}
	for i := 0; i+1 < len(se); i += 2 {
		out = append(out, hints.Extent{Start: se[i], End: se[i+1]})
	}
	return out
}

func save(t testing.TB, im *vhdtest.Image, path string) string {
	t.Helper()
	if err := im.Save(path); err != nil {
		t.Fatal(err)
	}
	return path
}

func fill(b byte, n int) []byte {
	p := make([]byte, n)
	for i := range p {
		p[i] = b
	}
	return p
}

// TestVHDChainThroughSearchPath: parents are found in the search path
// (not only next to the child), and the allocation is the union of the
// chain's, in whole clusters.
func TestVHDChainThroughSearchPath(t *testing.T) {
	dir := t.TempDir()
	lib := filepath.Join(dir, "lib")
	base := vhdtest.New(16 * mib)
	base.Write(0, fill(1, 4096))
	mid := vhdtest.Child(base, "base.vhd")
	mid.Write(5*mib, fill(2, 512))
	top := vhdtest.Child(mid, "mid.vhd")
	top.Write(16*mib-4096, fill(3, 4096))
	save(t, base, filepath.Join(lib, "base.vhd"))
	save(t, mid, filepath.Join(lib, "mid.vhd"))
	save(t, top, filepath.Join(dir, "vdi", "top.vhd"))

	_, err := Open(filepath.Join(dir, "vdi", "top.vhd"), []string{"/nonexistent"})
	var mp *MissingParentError
	if !errors.As(err, &mp) || mp.Parent != "./mid.vhd" || !strings.Contains(err.Error(), "/nonexistent") {
		t.Fatalf("without the library in the path: %v", err)
	}
	c, err := Open(filepath.Join(dir, "vdi", "top.vhd"), []string{"/nonexistent", lib})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if len(c.Layers) != 3 {
		t.Fatalf("%d layers", len(c.Layers))
	}
	p, err := NewPlan(c, nil, 16, 16*mib, 0)
	if err != nil {
		t.Fatal(err)
	}
	want := ext(0, 64<<10, 5*mib, 5*mib+64<<10, 16*mib-64<<10, 16*mib)
	if fmt.Sprint(p.Source) != fmt.Sprint(want) {
		t.Fatalf("source extents %v, want %v", p.Source, want)
	}
}

func TestChainRefusals(t *testing.T) {
	dir := t.TempDir()
	// A loop: a's parent is b, b's parent is a.
	a, b := vhdtest.New(4*mib), vhdtest.New(4*mib)
	a.Parent, a.ParentName = b, "b.vhd"
	b.Parent, b.ParentName = a, "a.vhd"
	save(t, a, filepath.Join(dir, "a.vhd"))
	save(t, b, filepath.Join(dir, "b.vhd"))
	var le *LoopError
	if _, err := Open(filepath.Join(dir, "a.vhd"), nil); !errors.As(err, &le) {
		t.Fatalf("loop: %v", err)
	}

	// Too deep: MaxDepth+1 images.
	deep := filepath.Join(dir, "deep")
	prev := vhdtest.New(1 * mib)
	save(t, prev, filepath.Join(deep, "0.vhd"))
	for i := 1; i <= MaxDepth; i++ {
		im := vhdtest.Child(prev, fmt.Sprintf("%d.vhd", i-1))
		save(t, im, filepath.Join(deep, fmt.Sprintf("%d.vhd", i)))
		prev = im
	}
	if _, err := Open(filepath.Join(deep, fmt.Sprint(MaxDepth, ".vhd")), nil); !errors.Is(err, ErrTooDeep) {
		t.Fatalf("deep chain: %v", err)
	}
	if c, err := Open(filepath.Join(deep, fmt.Sprint(MaxDepth-1, ".vhd")), nil); err != nil {
		t.Fatalf("chain of %d: %v", MaxDepth, err)
	} else {
		c.Close()
	}

	// A parent of the right name from another chain.
	other := vhdtest.New(4 * mib)
	child := vhdtest.Child(vhdtest.New(4*mib), "p.vhd")
	save(t, other, filepath.Join(dir, "x", "p.vhd"))
	save(t, child, filepath.Join(dir, "x", "c.vhd"))
	if _, err := Open(filepath.Join(dir, "x", "c.vhd"), nil); err == nil || !strings.Contains(err.Error(), "unique id") {
		t.Fatalf("wrong parent: %v", err)
	}

	// Neither VHD nor qcow2.
	raw := filepath.Join(dir, "raw")
	if err := os.WriteFile(raw, make([]byte, 4096), 0o644); err != nil {
		t.Fatal(err)
	}
	var ni *NotImageError
	if _, err := Open(raw, nil); !errors.As(err, &ni) || !strings.Contains(err.Error(), "--source-format raw") {
		t.Fatalf("raw: %v", err)
	}
}

func qemuImg(t testing.TB, args ...string) {
	t.Helper()
	qemutest.Run(t, args[0], args[1:]...)
}

// TestQcow2ZeroHidesBacking: a zero cluster above data hides it; a
// zero subcluster hides only its part, so the cluster stays.
func TestQcow2ZeroHidesBacking(t *testing.T) {
	dir := t.TempDir()
	base, top := filepath.Join(dir, "base.qcow2"), filepath.Join(dir, "top.qcow2")
	qemuImg(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=64k", base, "8M")
	qemuImg(t, "qemu-io", "-c", "write -P 1 0 1M", "-c", "write -P 2 4M 64k", base)
	qemuImg(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=64k", "-b", base, "-F", "qcow2", top)
	// Cluster 0..512k zeroed whole; 1 MiB untouched; a subcluster of
	// 4M zeroed (the rest of that cluster keeps the base's data).
	qemuImg(t, "qemu-io", "-c", "write -z 0 512k", "-c", "write -z 4M 2k", "-c", "write -P 3 6M 2k", top)
	c, err := Open(top, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	p, err := NewPlan(c, nil, 16, 8*mib, 0)
	if err != nil {
		t.Fatal(err)
	}
	want := ext(512<<10, mib, 4*mib, 4*mib+64<<10, 6*mib, 6*mib+64<<10)
	if fmt.Sprint(p.Source) != fmt.Sprint(want) {
		t.Fatalf("source extents %v, want %v", p.Source, want)
	}
}

// TestPlanAgainstBase: with a shared ancestor only what either chain
// writes above it is compared; zero writes count.
func TestPlanAgainstBase(t *testing.T) {
	dir := t.TempDir()
	anc, snap, cur := filepath.Join(dir, "anc.qcow2"), filepath.Join(dir, "snap.qcow2"), filepath.Join(dir, "cur.qcow2")
	qemuImg(t, "qemu-img", "create", "-q", "-f", "qcow2", anc, "8M")
	qemuImg(t, "qemu-io", "-c", "write -P 1 0 2M", anc)
	qemuImg(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", anc, "-F", "qcow2", snap)
	qemuImg(t, "qemu-io", "-c", "write -P 2 3M 64k", snap)
	qemuImg(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", anc, "-F", "qcow2", cur)
	qemuImg(t, "qemu-io", "-c", "write -z 1M 64k", "-c", "write -P 4 7M 4k", cur)
	src, err := Open(cur, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	base, err := Open(snap, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer base.Close()
	p, err := NewPlan(src, base, 16, 8*mib, 8*mib)
	if err != nil {
		t.Fatal(err)
	}
	wantCmp := ext(mib, mib+64<<10, 3*mib, 3*mib+64<<10, 7*mib, 7*mib+64<<10)
	if p.Shared != 1 || fmt.Sprint(p.Compare) != fmt.Sprint(wantCmp) {
		t.Fatalf("shared %d, compare %v, want %v", p.Shared, p.Compare, wantCmp)
	}
	wantSrc := ext(0, mib, mib+64<<10, 2*mib, 7*mib, 7*mib+64<<10)
	if fmt.Sprint(p.Source) != fmt.Sprint(wantSrc) {
		t.Fatalf("source %v, want %v", p.Source, wantSrc)
	}
	// A base that ends before the source (a qcow2 may be smaller than its
	// backing file): past its end whatever the source holds differs.
	if p, err = NewPlan(src, base, 16, 8*mib, mib); err != nil {
		t.Fatal(err)
	}
	if want := ext(mib, 2*mib, 3*mib, 3*mib+64<<10, 7*mib, 7*mib+64<<10); fmt.Sprint(p.Compare) != fmt.Sprint(want) {
		t.Fatalf("base of 1 MiB: compare %v, want %v", p.Compare, want)
	}
	// A chain against itself: nothing can differ.
	p, err = NewPlan(src, src, 16, 8*mib, 8*mib)
	if err != nil || p.Compare == nil || len(p.Compare) != 0 {
		t.Fatalf("a chain against itself: %v %v", p.Compare, err)
	}
	// Chains that share nothing: no compare set, both allocations read.
	lone := filepath.Join(dir, "lone.qcow2")
	qemuImg(t, "qemu-img", "create", "-q", "-f", "qcow2", lone, "8M")
	other, err := Open(lone, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	if p, err = NewPlan(src, other, 16, 8*mib, 8*mib); err != nil || p.Compare != nil || p.Shared != 0 {
		t.Fatalf("unrelated chains: compare %v shared %d %v", p.Compare, p.Shared, err)
	}
}

// TestSameDisk: two device nodes of one block device are the same disk
// (an LVM volume under /dev/VG and under a directory of --path), two
// files are not.
func TestSameDisk(t *testing.T) {
	dir := t.TempDir()
	a, b := filepath.Join(dir, "a"), filepath.Join(dir, "b")
	for _, p := range []string{a, b} {
		if err := os.WriteFile(p, make([]byte, 4096), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	stat := func(p string) os.FileInfo {
		fi, err := os.Stat(p)
		if err != nil {
			t.Fatal(err)
		}
		return fi
	}
	if SameDisk(stat(a), stat(b)) || !SameDisk(stat(a), stat(a)) {
		t.Fatal("regular files: wrong answer")
	}
	if os.Geteuid() != 0 {
		t.Skip("SKIP: device nodes need root")
	}
	out, err := exec.Command("losetup", "--show", "-f", a).CombinedOutput()
	if err != nil {
		t.Skipf("SKIP: losetup refused here: %v: %s", err, out)
	}
	dev := strings.TrimSpace(string(out))
	defer exec.Command("losetup", "-d", dev).Run()
	st := stat(dev).Sys().(*syscall.Stat_t)
	node := filepath.Join(dir, "node")
	if err := syscall.Mknod(node, syscall.S_IFBLK|0o600, int(st.Rdev)); err != nil {
		t.Skipf("SKIP: mknod refused here: %v", err)
	}
	if !SameDisk(stat(dev), stat(node)) || SameDisk(stat(dev), stat(a)) {
		t.Fatal("device nodes: wrong answer")
	}
}

// Package tests runs the built binary end to end, with qemu-img and qemu-io
// as the judges of qcow2, loop devices as real block devices, and real
// pipes. Helpers here are shared by every test file of the package.
package tests

import (
	"bytes"
	"fmt"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/xapi-project/xapi-qcow-tool/tests/qemutest"
)

// bin is the path of the binary under test, built once by TestMain.
var bin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "xqt-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	bin = filepath.Join(dir, "xapi-qcow-tool")
	build := exec.Command("go", "build", "-o", bin, "../cmd/xapi-qcow-tool")
	// As make build and the RPM (GOFLAGS_STATIC in the Makefile): without
	// cgo, whose threads take 8 MiB stacks from glibc and fail under an
	// address-space cap, and without heap base randomisation.
	build.Env = append(os.Environ(), "CGO_ENABLED=0", "GOEXPERIMENT=norandomizedheapbase64")
	build.Stderr = os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "building the binary:", err)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// needUnshare skips, visibly, where a private mount namespace cannot be
// made (the journal and out-of-space tests mount their own /run or tmpfs).
func needUnshare(t testing.TB) {
	t.Helper()
	if _, err := exec.LookPath("unshare"); err != nil {
		t.Skip("SKIP: unshare not installed")
	}
	if out, err := exec.Command("unshare", "-m", "--propagation", "private", "true").CombinedOutput(); err != nil {
		t.Skipf("SKIP: unshare -m refused here: %v: %s", err, bytes.TrimSpace(out))
	}
}

// checkOneLineError asserts a failed run: non-zero exit, nothing on
// stdout, exactly one line on stderr starting with the program name and
// containing want.
func checkOneLineError(t testing.TB, r result, want string) {
	t.Helper()
	if r.Code == 0 {
		t.Fatalf("expected failure, got exit 0")
	}
	if len(r.Stdout) != 0 {
		t.Fatalf("expected nothing on stdout, got %d bytes", len(r.Stdout))
	}
	msg := string(r.Stderr)
	if strings.Count(msg, "\n") != 1 || !strings.HasPrefix(msg, "xapi-qcow-tool: ") {
		t.Fatalf("expected one line 'xapi-qcow-tool: ...' on stderr, got %q", msg)
	}
	if !strings.Contains(msg, want) {
		t.Fatalf("error %q does not mention %q", msg, want)
	}
}

// dataExtents returns the [start, length] pairs qemu-img map reports as
// data in the image itself (not in its backing file).
func dataExtents(t testing.TB, img string) [][2]int64 {
	var out [][2]int64
	for _, e := range qemutest.Map(t, img) {
		if e.Data && e.Depth == 0 {
			out = append(out, [2]int64{e.Start, e.Length})
		}
	}
	return out
}

// writeRandom writes n random bytes at off of path (creating it).
func writeRandom(t testing.TB, r *rand.Rand, path string, off, n int64) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, n)
	r.Read(buf)
	if _, err := f.WriteAt(buf, off); err != nil {
		t.Fatal(err)
	}
}

// sparseFile creates a sparse file of size bytes.
func sparseFile(t testing.TB, path string, size int64) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
}

// loopDevice attaches a loop device to file and detaches it at the end of
// the test. It skips, visibly, where losetup is refused.
func loopDevice(t testing.TB, file string, direct bool) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("SKIP: loop devices need root")
	}
	args := []string{"--show", "-f"}
	if direct {
		args = append(args, "--direct-io=on")
	}
	out, err := exec.Command("losetup", append(args, file)...).CombinedOutput()
	if err != nil {
		t.Skipf("SKIP: losetup refused here: %v: %s", err, strings.TrimSpace(string(out)))
	}
	dev := strings.TrimSpace(string(out))
	t.Cleanup(func() { exec.Command("losetup", "-d", dev).Run() })
	return dev
}

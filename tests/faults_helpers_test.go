package tests

// Helpers of the fault tests (faults_test.go): processes started in the
// background with a pipe on one side, time limits, one-line error checks
// without a captured stdout, a private mount namespace with a small tmpfs,
// and a pty.

import (
	"crypto/sha256"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// checkFailureLine asserts a non-zero status and one line on stderr, of
// our form, mentioning each of want, without a Go traceback.
func checkFailureLine(t testing.TB, code int, stderr string, want ...string) {
	t.Helper()
	if code == 0 {
		t.Fatalf("exit 0, expected a failure; stderr %q", stderr)
	}
	if strings.Contains(stderr, "goroutine") || strings.Contains(stderr, "panic") {
		t.Fatalf("traceback on stderr: %q", stderr)
	}
	if strings.Count(stderr, "\n") != 1 || !strings.HasSuffix(stderr, "\n") || !strings.HasPrefix(stderr, "xapi-qcow-tool: ") {
		t.Fatalf("expected one line 'xapi-qcow-tool: ...' on stderr, got %q", stderr)
	}
	for _, w := range want {
		if !strings.Contains(strings.ToLower(stderr), strings.ToLower(w)) {
			t.Fatalf("error %q does not mention %q", strings.TrimSpace(stderr), w)
		}
	}
}

// pipe returns both ends of a new pipe, closed at the end of the test.
func pipe(t testing.TB) (r, w *os.File) {
	t.Helper()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close(); w.Close() })
	return r, w
}

// pipeBytes is how many bytes wait in the pipe whose read end is r.
func pipeBytes(t testing.TB, r *os.File) int {
	t.Helper()
	n, err := unix.IoctlGetInt(int(r.Fd()), unix.TIOCINQ)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// waitPipe waits until at least n bytes wait in the pipe, or the process
// exits, or 20 s pass.
func waitPipe(t testing.TB, r *os.File, n int, p *proc) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for pipeBytes(t, r) < n {
		select {
		case <-p.done:
			t.Fatalf("exited before filling the pipe (%d bytes in it): %v: %q", pipeBytes(t, r), p.err, p.stderr.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("the pipe holds %d bytes after 20 s, expected %d", pipeBytes(t, r), n)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// filledExport fills dir/src.img with size bytes of fillFile's pattern
// and exports it (stream) to dir/src.qcow2.
func filledExport(t testing.TB, dir string, size int64) (src, img string) {
	t.Helper()
	src = filepath.Join(dir, "src.img")
	fillFile(t, src, size)
	img = filepath.Join(dir, "src.qcow2")
	exportToFile(t, img, "stream", "--source", src)
	return src, img
}

// fillFile writes size bytes of a non-zero pattern that differs in every
// cluster (so every cluster is stored and none compresses to nothing).
func fillFile(t testing.TB, path string, size int64) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, 1<<20)
	for off := int64(0); off < size; off += int64(len(buf)) {
		for i := 0; i < len(buf); i += 8 {
			v := uint64(off+int64(i))*0x9E3779B97F4A7C15 | 1
			for j := 0; j < 8; j++ {
				buf[i+j] = byte(v >> (8 * j))
			}
		}
		if _, err := f.Write(buf[:min(int64(len(buf)), size-off)]); err != nil {
			t.Fatal(err)
		}
	}
}

// fileSum is the SHA-256 of a file or block device.
func fileSum(t testing.TB, path string) string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		t.Fatal(err)
	}
	return fmt.Sprintf("%x", h.Sum(nil))
}

// privateTmpfs runs a bash script in a new mount namespace, with a tmpfs
// of the given size (e.g. "4M") mounted at $MNT (a new directory under the
// test's temporary directory, empty outside the namespace). Inside the
// script, $BIN is the binary under test. It returns the script's combined
// output and skips, visibly, where unshare or mount is refused.
func privateTmpfs(t testing.TB, size, script string, env ...string) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("SKIP: mounting a tmpfs needs root")
	}
	if _, err := exec.LookPath("unshare"); err != nil {
		t.Skip("SKIP: unshare not installed (util-linux)")
	}
	mnt := filepath.Join(t.TempDir(), "mnt")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	probe := exec.Command("unshare", "-m", "--propagation", "private", "mount", "-t", "tmpfs", "-o", "size="+size, "xqt-faults", mnt)
	if out, err := probe.CombinedOutput(); err != nil {
		t.Skipf("SKIP: cannot mount a tmpfs in a private mount namespace here: %v: %s", err, strings.TrimSpace(string(out)))
	}
	full := "set -u\nmount -t tmpfs -o size=" + size + " xqt-faults \"$MNT\" || exit 99\n" + script
	cmd := exec.Command("unshare", "-m", "--propagation", "private", "bash", "-c", full)
	cmd.Env = append(append(os.Environ(), "MNT="+mnt, "BIN="+bin), env...)
	out, err := cmd.CombinedOutput()
	if ee, ok := err.(*exec.ExitError); ok && ee.ExitCode() == 99 {
		t.Skipf("SKIP: mount refused inside the namespace: %s", out)
	}
	if err != nil {
		t.Fatalf("namespace script: %v\n%s", err, out)
	}
	return string(out)
}

// openPty returns the master and slave of a new pseudo-terminal, or skips
// where /dev/ptmx is unavailable.
func openPty(t testing.TB) (master, slave *os.File) {
	t.Helper()
	m, err := os.OpenFile("/dev/ptmx", os.O_RDWR|unix.O_NOCTTY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Skipf("SKIP: /dev/ptmx unavailable: %v", err)
	}
	t.Cleanup(func() { m.Close() })
	unlock := int32(0)
	if _, _, e := unix.Syscall(unix.SYS_IOCTL, m.Fd(), unix.TIOCSPTLCK, uintptr(unsafe.Pointer(&unlock))); e != 0 {
		t.Skipf("SKIP: unlockpt: %v", e)
	}
	n, err := unix.IoctlGetUint32(int(m.Fd()), unix.TIOCGPTN)
	if err != nil {
		t.Skipf("SKIP: ptsname: %v", err)
	}
	s, err := os.OpenFile(fmt.Sprintf("/dev/pts/%d", n), os.O_RDWR|unix.O_NOCTTY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Skipf("SKIP: opening the pty slave: %v", err)
	}
	t.Cleanup(func() { s.Close() })
	return m, s
}

// startWithJournal starts the binary like startTool, but in a private
// mount namespace where /run/systemd/journal/socket is a datagram socket
// of this test (as runWithJournal in journal_test.go does, in the
// background). unshare and sh exec, so the process is the binary itself:
// signals sent to it reach the tool. entries returns what the journal
// received so far. It skips, visibly, where unshare -m is refused.
func startWithJournal(t *testing.T, stdin, stdout *os.File, args ...string) (p *proc, entries func() []journalEntry) {
	t.Helper()
	j := newFakeJournal(t)
	return startCmd(t, stdin, stdout, j.unshareArgs(args...), "unshare", j.env()), j.entries
}

// journalFailure waits up to a second for the error entry of a failed run
// (PRIORITY=3) and returns it, or nil.
func journalFailure(entries func() []journalEntry) journalEntry {
	for deadline := time.Now().Add(time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		for _, e := range entries() {
			if e["PRIORITY"] == "3" {
				return e
			}
		}
	}
	return nil
}

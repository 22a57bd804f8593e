package tests

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestBenchSmoke runs the benchmark in its quick mode (tiny images): it
// must finish, exit 0 and print its table with a verdict on every row, so
// that `make bench` does not rot between the times someone runs it in full.
func TestBenchSmoke(t *testing.T) {
	for _, tool := range []string{"bash", "dd", "awk", "truncate", "sort", "cmp"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("SKIP: %s not installed", tool)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "bash", filepath.Join("bench", "bench.sh"))
	dir := t.TempDir()
	cmd.Env = append(os.Environ(), "BENCH_QUICK=1", "BIN="+bin, "BENCH_DOC=", "BENCH_DIR="+dir)
	// On timeout bench.sh gets SIGTERM, not SIGKILL, so that its EXIT trap
	// detaches the loop devices it attached; what it still leaves behind
	// is detached here.
	cmd.Cancel = func() error { return cmd.Process.Signal(syscall.SIGTERM) }
	cmd.WaitDelay = 10 * time.Second
	t.Cleanup(func() { detachLoopsUnder(dir) })
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	if ctx.Err() != nil {
		t.Fatalf("bench.sh timed out\n%s", errb.Bytes())
	}
	if err != nil {
		t.Fatalf("bench.sh: %v\nstdout:\n%s\nstderr:\n%s", err, out.Bytes(), errb.Bytes())
	}
	text := out.String()
	if !strings.Contains(text, "| case | ours (s) | limit (s) | ratio | target |") {
		t.Fatalf("no table in the output:\n%s", text)
	}
	rows := 0
	for _, line := range strings.Split(text, "\n") {
		if !strings.HasPrefix(line, "| ") || strings.HasPrefix(line, "| case ") {
			continue
		}
		rows++
		if !strings.Contains(line, "| PASS |") && !strings.Contains(line, "| MISS |") && !strings.Contains(line, "| SKIP: ") {
			t.Errorf("row without a verdict: %s", line)
		}
	}
	for _, want := range []string{"export 16 MiB random", "export 64 MiB, 25 % data in runs", "export diff of 64 MiB", "scale: export"} {
		if !strings.Contains(text, "| "+want) {
			t.Errorf("table has no row %q:\n%s", want, text)
		}
	}
	if rows < 8 {
		t.Errorf("table has %d rows, want every case (at least 8):\n%s", rows, text)
	}
	// Loop devices over deleted images keep their memory and use up the
	// machine's loop devices: none may survive the run.
	if out, err := exec.Command("losetup", "-a").Output(); err == nil && strings.Contains(string(out), dir) {
		t.Errorf("bench.sh left loop devices attached:\n%s", out)
	}
	if left, _ := os.ReadDir(dir); len(left) > 0 {
		t.Errorf("bench.sh left %d entries behind in its directory (images must be removed)", len(left))
	}
}

// detachLoopsUnder detaches every loop device whose backing file lies in
// dir (a run killed before its own clean-up would leave them attached).
func detachLoopsUnder(dir string) {
	out, err := exec.Command("losetup", "-a").Output()
	if err != nil {
		return
	}
	for _, line := range strings.Split(string(out), "\n") {
		if dev, _, ok := strings.Cut(line, ":"); ok && strings.Contains(line, dir) {
			exec.Command("losetup", "-d", dev).Run()
		}
	}
}

package discover

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"time"
)

const (
	// TapCtlTimeout bounds one run of tap-ctl: it answers from the
	// tapdisks' control sockets in milliseconds; a host where it hangs
	// gets today's export, not a hung one.
	TapCtlTimeout = 10 * time.Second
	// MaxTapCtlOutput bounds what tap-ctl may print: a line per tapdisk,
	// a few thousand tapdisks at the most.
	MaxTapCtlOutput = 1 << 20
	maxTapCtlStderr = 4 << 10
)

// stateStopped are the tapdisk VBD state bits (blktap's TD_VBD_*) under
// which its image may be about to change or be gone: dead, closed,
// quiesce requested, quiesced, pause requested, paused, shutdown
// requested. xapi's paused state is 0x2a.
const stateStopped = 0x7f

// findTapdisk runs `tap-ctl list -m MINOR` (with -p PID when pid >= 0)
// and returns the one running tapdisk serving that minor, with an image.
func findTapdisk(ctx context.Context, pid, minor int) (*Tapdisk, error) {
	args := []string{"list"}
	if pid >= 0 {
		args = append(args, "-p", strconv.Itoa(pid))
	}
	args = append(args, "-m", strconv.Itoa(minor))
	cmdline := TapCtl + " " + strings.Join(args, " ")
	out, err := runTapCtl(ctx, args)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", cmdline, err)
	}
	var found []*Tapdisk
	lines := 0
	for _, line := range strings.Split(string(out), "\n") {
		if strings.TrimSpace(line) == "" {
			continue
		}
		lines++
		t, ok := parseTapCtlLine(line)
		if ok && t.Minor == minor && (pid < 0 || t.PID == pid) {
			found = append(found, t)
		}
	}
	switch {
	case len(found) == 0:
		return nil, fmt.Errorf("%s: no tapdisk serves minor %d (%d lines printed, none of the form pid=N minor=%d state=S args=DRIVER:PATH)", cmdline, minor, lines, minor)
	case len(found) > 1:
		return nil, fmt.Errorf("%s: %d tapdisks claim minor %d", cmdline, len(found), minor)
	}
	t := found[0]
	if t.Driver == "" || t.Image == "" {
		return nil, fmt.Errorf("%s: tapdisk %d (minor %d) has no image open", cmdline, t.PID, minor)
	}
	if s, err := strconv.ParseUint(t.State, 0, 32); err != nil || s&stateStopped != 0 {
		return nil, fmt.Errorf("%s: tapdisk %d (minor %d) is not running (state %s): its image may be changing", cmdline, t.PID, minor, t.State)
	}
	return t, nil
}

// parseTapCtlLine parses one line of `tap-ctl list`, as xapi does:
// "pid=%u minor=%u state=%s args=DRIVER:PATH", single spaces between the
// key-values, the path possibly holding spaces (kept as they are), args
// possibly absent or without a colon (no image open).
func parseTapCtlLine(line string) (*Tapdisk, bool) {
	line = strings.TrimSuffix(line, "\r")
	f := strings.SplitN(line, " ", 4)
	if len(f) < 3 {
		return nil, false
	}
	pid, ok1 := keyUint(f[0], "pid=")
	minor, ok2 := keyUint(f[1], "minor=")
	state, ok3 := strings.CutPrefix(f[2], "state=")
	if !ok1 || !ok2 || !ok3 || state == "" {
		return nil, false
	}
	t := &Tapdisk{PID: pid, Minor: minor, State: state}
	if len(f) == 4 {
		args, ok := strings.CutPrefix(f[3], "args=")
		if !ok {
			return nil, false
		}
		if drv, image, ok := strings.Cut(args, ":"); ok {
			t.Driver, t.Image = Driver(drv), image
		}
	}
	return t, true
}

func keyUint(field, key string) (int, bool) {
	v, ok := strings.CutPrefix(field, key)
	if !ok {
		return 0, false
	}
	n, err := parseUint(v)
	return n, err == nil
}

// parseUint parses a decimal number below 2^31, digits only.
func parseUint(s string) (int, error) {
	if s == "" || strings.Trim(s, "0123456789") != "" {
		return 0, fmt.Errorf("%q is not a number", s)
	}
	n, err := strconv.ParseUint(s, 10, 31)
	return int(n), err
}

// runTapCtl runs tap-ctl with args: by its absolute path, stdin
// /dev/null, a fixed environment, killed after TapCtlTimeout, its output
// bounded by MaxTapCtlOutput (more is an error, and the program is
// stopped).
func runTapCtl(ctx context.Context, args []string) ([]byte, error) {
	if _, err := os.Stat(TapCtl); err != nil {
		return nil, fmt.Errorf("not runnable: %w", unwrapPath(err))
	}
	ctx, cancel := context.WithTimeout(ctx, TapCtlTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, TapCtl, args...)
	cmd.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL=C"}
	// Its own process group, killed whole: a child left holding the
	// output pipe must not keep us waiting.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = time.Second
	stdout := &headWriter{max: MaxTapCtlOutput, full: cancel}
	stderr := &headWriter{max: maxTapCtlStderr}
	cmd.Stdout, cmd.Stderr = stdout, stderr
	err := cmd.Run()
	switch {
	case stdout.over:
		return nil, fmt.Errorf("printed more than %d bytes", MaxTapCtlOutput)
	case errors.Is(ctx.Err(), context.DeadlineExceeded):
		return nil, fmt.Errorf("no answer within %v", TapCtlTimeout)
	case err != nil:
		if msg := strings.TrimSpace(stderr.String()); msg != "" {
			return nil, fmt.Errorf("%v: %s", unwrapPath(err), oneLine(msg))
		}
		return nil, unwrapPath(err)
	}
	return stdout.buf.Bytes(), nil
}

// headWriter keeps the first max bytes written to it. Past them it drops
// the rest without failing the writer (which would leave the program
// blocked on a full pipe) and calls full once.
type headWriter struct {
	max  int
	full func()
	over bool
	buf  bytes.Buffer
}

func (w *headWriter) Write(p []byte) (int, error) {
	room := w.max - w.buf.Len()
	w.buf.Write(p[:max(0, min(room, len(p)))])
	if len(p) > room && !w.over {
		w.over = true
		if w.full != nil {
			w.full()
		}
	}
	return len(p), nil
}

func (w *headWriter) String() string { return w.buf.String() }

func oneLine(s string) string { return strings.Join(strings.Fields(s), " ") }

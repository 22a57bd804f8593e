package tests

import (
	"bytes"
	"io"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"
)

// The one way the tests run a program: the binary, the binary under one of
// its drop-in names, or a program that runs it (unshare, prlimit, time).
// run waits for it; start leaves it running in the background. Every other
// runner of this package is a shorthand for one of the two.

// cmdSpec is a run of a program.
type cmdSpec struct {
	path   string // "": the binary under test
	args   []string
	stdin  io.Reader  // nil: /dev/null
	stdout io.Writer  // nil: captured in proc.stdout
	stderr *os.File   // nil: captured in proc.stderr (a pty, to be a terminal)
	extra  []*os.File // descriptors 3, 4, ... of the child
	env    []string   // added to the environment
	dir    string     // working directory ("": the test's)
	limit  time.Duration
}

// result is what a run of the binary did.
type result struct {
	Stdout, Stderr []byte
	Code           int
}

// proc is a program running in the background.
type proc struct {
	cmd    *exec.Cmd
	stdout bytes.Buffer
	stderr bytes.Buffer
	done   chan struct{}
	err    error
}

// start starts s with stderr captured (and stdout, when s.stdout is nil).
// The process is killed at the end of the test if it is still running.
func start(t testing.TB, s cmdSpec) *proc {
	t.Helper()
	if s.path == "" {
		s.path = bin
	}
	p := &proc{cmd: exec.Command(s.path, s.args...), done: make(chan struct{})}
	if len(s.env) > 0 {
		p.cmd.Env = append(os.Environ(), s.env...)
	}
	p.cmd.Stdin = s.stdin
	p.cmd.Dir = s.dir
	p.cmd.Stdout = s.stdout
	if s.stdout == nil {
		p.cmd.Stdout = &p.stdout
	}
	p.cmd.Stderr = &p.stderr
	if s.stderr != nil {
		p.cmd.Stderr = s.stderr
	}
	p.cmd.ExtraFiles = s.extra
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { p.err = p.cmd.Wait(); close(p.done) }()
	t.Cleanup(func() {
		select {
		case <-p.done:
		default:
			p.cmd.Process.Kill()
			<-p.done
		}
	})
	return p
}

// run runs s to its end, within s.limit (default 60 s) so that a hang
// fails the test instead of the CI run.
func run(t testing.TB, s cmdSpec) result {
	t.Helper()
	if s.limit == 0 {
		s.limit = 60 * time.Second
	}
	p := start(t, s)
	code := p.wait(t, s.limit)
	return result{p.stdout.Bytes(), p.stderr.Bytes(), code}
}

// wait waits at most limit for the process to exit and returns its
// status; it fails the test if the process is still running then, or was
// killed by a signal.
func (p *proc) wait(t testing.TB, limit time.Duration) int {
	t.Helper()
	select {
	case <-p.done:
	case <-time.After(limit):
		p.cmd.Process.Kill()
		<-p.done
		t.Fatalf("%s %s: still running %v later (killed); stderr so far: %q",
			p.cmd.Path, strings.Join(p.cmd.Args[1:], " "), limit, p.stderr.String())
	}
	if ee, ok := p.err.(*exec.ExitError); ok {
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			t.Fatalf("killed by %v instead of exiting with a status; stderr %q", ws.Signal(), p.stderr.String())
		}
		return ee.ExitCode()
	}
	if p.err != nil {
		t.Fatal(p.err)
	}
	return 0
}

// runTool runs the binary with args, stdin from in (nil: /dev/null).
func runTool(t testing.TB, in []byte, args ...string) result {
	t.Helper()
	return runAs(t, bin, in, args...)
}

// runAs is runTool for the binary under another name (see linkAs).
func runAs(t testing.TB, path string, in []byte, args ...string) result {
	t.Helper()
	return runWithFiles(t, path, in, "", nil, args...)
}

// runWithFiles runs path with args, stdin from in (nil: /dev/null), stdout
// into the file out (when not empty, else captured), and extra descriptors
// 3, 4, ...
func runWithFiles(t testing.TB, path string, in []byte, out string, extra []*os.File, args ...string) result {
	t.Helper()
	s := cmdSpec{path: path, args: args, extra: extra}
	if in != nil {
		s.stdin = bytes.NewReader(in)
	}
	if out != "" {
		s.stdout = createFile(t, out)
	}
	return run(t, s)
}

// createFile creates (or truncates) path for a child's output; it is
// closed at the end of the test.
func createFile(t testing.TB, path string) *os.File {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

// mustSucceed fails the test unless r is a success.
func mustSucceed(t testing.TB, r result, what string) {
	t.Helper()
	if r.Code != 0 {
		t.Fatalf("%s: exit %d: %s", what, r.Code, r.Stderr)
	}
}

// mustRun runs the binary and fails the test unless it exits 0.
func mustRun(t testing.TB, in []byte, args ...string) []byte {
	t.Helper()
	r := runTool(t, in, args...)
	mustSucceed(t, r, "xapi-qcow-tool "+strings.Join(args, " "))
	return r.Stdout
}

// exportToFile runs an export with stdout redirected to the new file out
// (no buffering of the image in the test's memory).
func exportToFile(t testing.TB, out string, args ...string) {
	t.Helper()
	mustSucceed(t, runWithFiles(t, bin, nil, out, nil, args...), "xapi-qcow-tool "+strings.Join(args, " "))
}

// runPiped runs the binary with the file img written into a real pipe on
// its stdin (the way xapi hands over its HTTP socket: no seeking), and
// extra descriptors from fd 3 on.
func runPiped(t testing.TB, img string, extra []*os.File, args ...string) result {
	t.Helper()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	go func() {
		defer w.Close()
		f, err := os.Open(img)
		if err != nil {
			return
		}
		defer f.Close()
		io.Copy(w, f) // EPIPE when the tool stops early: fine
	}()
	return run(t, cmdSpec{args: args, stdin: r, extra: extra, limit: 120 * time.Second})
}

// startTool starts the binary in the background with the given stdin and
// stdout (nil: /dev/null).
func startTool(t testing.TB, stdin, stdout *os.File, args ...string) *proc {
	t.Helper()
	return startCmd(t, stdin, stdout, args, bin)
}

// startCmd is startTool for another program (the binary under another
// name, or prlimit running it).
func startCmd(t testing.TB, stdin, stdout *os.File, args []string, path string, env ...string) *proc {
	t.Helper()
	s := cmdSpec{path: path, args: args, env: env}
	if stdin != nil {
		s.stdin = stdin
	}
	if stdout == nil {
		null, err := os.OpenFile(os.DevNull, os.O_WRONLY, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer null.Close()
		stdout = null
	}
	s.stdout = stdout
	return start(t, s)
}

package tests

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// linkAs makes a symlink named name to the binary under test, the way a
// package installs the drop-in names, and returns its path.
func linkAs(t testing.TB, name string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	if err := os.Symlink(bin, p); err != nil {
		t.Fatal(err)
	}
	return p
}

// hintPipe returns the read end of a pipe that carries data, for
// exec.Cmd.ExtraFiles (the child sees ExtraFiles[i] as descriptor 3+i). A
// goroutine writes the data, as xapi's launcher does, and closes the pipe.
func hintPipe(t testing.TB, data []byte) *os.File {
	t.Helper()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	go func() {
		w.Write(data)
		w.Close()
	}()
	t.Cleanup(func() { r.Close() })
	return r
}

// runWithFiles runs path with args, stdin from in (nil: /dev/null), stdout
// into the file out (when not empty, else captured), and extra descriptors
// 3, 4, ...
func runWithFiles(t testing.TB, path string, in []byte, out string, extra []*os.File, args ...string) result {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, path, args...)
	if in != nil {
		cmd.Stdin = bytes.NewReader(in)
	}
	var stdout, stderr bytes.Buffer
	cmd.Stderr = &stderr
	if out != "" {
		f, err := os.Create(out)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		cmd.Stdout = f
	} else {
		cmd.Stdout = &stdout
	}
	cmd.ExtraFiles = extra
	err := cmd.Run()
	if ctx.Err() != nil {
		t.Fatalf("%s %s: timed out", filepath.Base(path), strings.Join(args, " "))
	}
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatalf("running %s: %v", path, err)
	}
	return result{stdout.Bytes(), stderr.Bytes(), code}
}

// mustSucceed fails the test unless r is a success with a quiet stderr.
func mustSucceed(t testing.TB, r result, what string) {
	t.Helper()
	if r.Code != 0 {
		t.Fatalf("%s: exit %d: %s", what, r.Code, r.Stderr)
	}
}

// sameBytes fails unless files a and b are identical.
func sameBytes(t testing.TB, a, b string) {
	t.Helper()
	sameFiles(t, a, b)
}

package tests

import (
	"os"
	"path/filepath"
	"testing"
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

// sameBytes fails unless files a and b are identical.
func sameBytes(t testing.TB, a, b string) {
	t.Helper()
	sameFiles(t, a, b)
}

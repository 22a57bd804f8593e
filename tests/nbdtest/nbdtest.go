// Package nbdtest runs NBD servers we did not write (qemu-nbd, nbdkit) on
// unix sockets for the tests of vhdcompat/... and tests, and asks libnbd's
// nbdinfo what they report. Where a tool is missing the test skips with a
// visible "SKIP:" line. Test helpers only: no production code imports it.
package nbdtest

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// packages names the Debian package of each tool, for the skip line.
var packages = map[string]string{"qemu-nbd": "qemu-utils", "nbdkit": "nbdkit", "nbdinfo": "libnbd-bin"}

// Need skips t, visibly, unless every tool is installed.
func Need(t testing.TB, tools ...string) {
	t.Helper()
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("SKIP: %s not installed (Debian package %s)", tool, packages[tool])
		}
	}
}

// Server is a running NBD server.
type Server struct {
	Socket string // the unix socket it listens on
	Export string
	cmd    *exec.Cmd
}

// URI is the server's export as libnbd names it.
func (s *Server) URI() string {
	return fmt.Sprintf("nbd+unix:///%s?socket=%s", s.Export, s.Socket)
}

// Stop ends the server (it is also stopped when the test ends).
func (s *Server) Stop() {
	if s.cmd.Process != nil && s.cmd.ProcessState == nil {
		s.cmd.Process.Kill()
		s.cmd.Wait()
	}
}

// start runs a server that listens on socket and waits until it accepts.
func start(t testing.TB, socket, export, tool string, args ...string) *Server {
	t.Helper()
	Need(t, tool)
	cmd := exec.Command(tool, args...)
	// The server's messages (among them the readiness probe's hang-up)
	// are shown only when the test fails.
	var log bytes.Buffer
	cmd.Stdout, cmd.Stderr = &log, &log
	if err := cmd.Start(); err != nil {
		t.Fatalf("%s: %v", tool, err)
	}
	s := &Server{Socket: socket, Export: export, cmd: cmd}
	t.Cleanup(func() {
		s.Stop()
		if t.Failed() && log.Len() > 0 {
			t.Logf("%s said:\n%s", tool, log.String())
		}
	})
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if c, err := net.Dial("unix", socket); err == nil {
			c.Close()
			return s
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s %s: no socket after 10 s", tool, strings.Join(args, " "))
		}
	}
}

// QemuNBD serves img read-only with qemu-nbd under the export name export
// (`qemu-nbd -r -k SOCKET --persistent -f FORMAT -x EXPORT IMG`, plus
// extra options such as --allocation-depth).
func QemuNBD(t testing.TB, img, format, export string, extra ...string) *Server {
	t.Helper()
	socket := filepath.Join(t.TempDir(), "nbd.sock")
	args := append([]string{"-r", "-k", socket, "--persistent", "-f", format, "-x", export}, extra...)
	return start(t, socket, export, "qemu-nbd", append(args, img)...)
}

// Nbdkit serves a plugin with nbdkit in the foreground
// (`nbdkit -f [-r] -U SOCKET -e EXPORT PLUGIN ARGS...`), read-only unless
// writable.
func Nbdkit(t testing.TB, export string, writable bool, plugin string, args ...string) *Server {
	t.Helper()
	socket := filepath.Join(t.TempDir(), "nbd.sock")
	all := []string{"-f", "-U", socket, "-e", export}
	if !writable {
		all = append(all, "-r")
	}
	all = append(append(all, plugin), args...)
	return start(t, socket, export, "nbdkit", all...)
}

// MapEntry is one element of `nbdinfo --map --json`.
type MapEntry struct {
	Offset int64  `json:"offset"`
	Length int64  `json:"length"`
	Type   uint32 `json:"type"`
}

// Map is what nbdinfo --map reports for the server's base:allocation.
func Map(t testing.TB, s *Server) []MapEntry {
	t.Helper()
	Need(t, "nbdinfo")
	out, err := exec.Command("nbdinfo", "--map", "--json", s.URI()).Output()
	if err != nil {
		t.Fatalf("nbdinfo --map %s: %v", s.URI(), err)
	}
	var m []MapEntry
	if err := json.Unmarshal(out, &m); err != nil {
		t.Fatalf("nbdinfo --map --json: %v\n%s", err, out)
	}
	return m
}

// DataBytes is how many bytes of a map are data (neither hole nor zero).
func DataBytes(m []MapEntry) int64 {
	var n int64
	for _, e := range m {
		if e.Type&3 == 0 {
			n += e.Length
		}
	}
	return n
}

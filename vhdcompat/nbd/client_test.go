package nbd

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os/exec"
	"path/filepath"
	"reflect"
	"strconv"
	"testing"
	"time"

	"github.com/xapi-project/xapi-qcow-tool/tests/nbdtest"
	"github.com/xapi-project/xapi-qcow-tool/tests/qemutest"
)

// walk connects to s and returns every extent of the export.
func walk(t *testing.T, network, address, export string) (*Client, []Extent) {
	t.Helper()
	c, err := Connect(context.Background(), network, address, export, Options{Timeout: 10 * time.Second})
	if err != nil {
		t.Fatalf("Connect: %v", err)
	}
	var got []Extent
	if err := c.Extents(context.Background(), func(e Extent) error {
		got = append(got, e)
		return nil
	}); err != nil {
		t.Fatalf("Extents: %v", err)
	}
	if err := c.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	checkCover(t, got, c.Size())
	return c, got
}

// checkCover asserts the extents are consecutive, non-empty and cover
// [0, size) exactly.
func checkCover(t testing.TB, got []Extent, size int64) {
	t.Helper()
	var off int64
	for i, e := range got {
		if e.Offset != off || e.Length <= 0 {
			t.Fatalf("extent %d %+v: expected one starting at %d", i, e, off)
		}
		off += e.Length
	}
	if off != size {
		t.Fatalf("extents end at %d, the export has %d bytes", off, size)
	}
}

// merged joins neighbours of the same type (nbdinfo and this client may
// cut the export at different places, e.g. at window ends).
func merged(m []nbdtest.MapEntry) []nbdtest.MapEntry {
	var out []nbdtest.MapEntry
	for _, e := range m {
		if n := len(out); n > 0 && out[n-1].Type == e.Type && out[n-1].Offset+out[n-1].Length == e.Offset {
			out[n-1].Length += e.Length
			continue
		}
		out = append(out, e)
	}
	return out
}

func asMap(ext []Extent) []nbdtest.MapEntry {
	m := make([]nbdtest.MapEntry, len(ext))
	for i, e := range ext {
		m[i] = nbdtest.MapEntry{Offset: e.Offset, Length: e.Length, Type: e.Flags}
	}
	return merged(m)
}

// sameAsNbdinfo asserts the client saw what nbdinfo --map reports.
func sameAsNbdinfo(t *testing.T, s *nbdtest.Server, got []Extent) {
	t.Helper()
	want := merged(nbdtest.Map(t, s))
	if g := asMap(got); !reflect.DeepEqual(g, want) {
		t.Fatalf("extents differ from nbdinfo --map:\n got %v\nwant %v", g, want)
	}
}

// TestQemuNBD: qemu-nbd serving qcow2 (data, zero clusters, a backing
// file, data past 1 GiB so the walk takes several windows) and raw images,
// with and without --allocation-depth; the client reports what nbdinfo
// --map does.
func TestQemuNBD(t *testing.T) {
	qemutest.Need(t)
	nbdtest.Need(t, "qemu-nbd", "nbdinfo")
	dir := t.TempDir()
	base := qemutest.Create(t, filepath.Join(dir, "base.qcow2"), "", "3G", "write -P 7 2G 1M")
	top := filepath.Join(dir, "top.qcow2")
	qemutest.Img(t, "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top, "3G")
	qemutest.IO(t, top, "write -P 1 0 64k", "write -z 1M 128k", "write -P 2 1023M 2M", "write -P 3 3071M 1M")
	raw := filepath.Join(dir, "raw.img")
	qemutest.Img(t, "convert", "-O", "raw", top, raw)
	for _, tc := range []struct {
		name, img, format string
		extra             []string
	}{
		{"qcow2", top, "qcow2", nil},
		{"qcow2 allocation depth", top, "qcow2", []string{"--allocation-depth"}},
		{"raw", raw, "raw", nil},
		{"raw allocation depth", raw, "raw", []string{"--allocation-depth"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := nbdtest.QemuNBD(t, tc.img, tc.format, "disk", tc.extra...)
			c, got := walk(t, "unix", s.Socket, "disk")
			if c.Size() != 3<<30 {
				t.Fatalf("size %d", c.Size())
			}
			sameAsNbdinfo(t, s, got)
			var data int64
			for _, e := range got {
				if e.Data() {
					data += e.Length
				}
			}
			if data < 64<<10+2<<20+1<<20+1<<20 {
				t.Fatalf("only %d bytes of data reported", data)
			}
		})
	}
}

// TestNbdkit: nbdkit's memory, sparse-random and file plugins, over a
// unix socket and TCP.
func TestNbdkit(t *testing.T) {
	nbdtest.Need(t, "nbdkit", "nbdinfo")
	dir := t.TempDir()
	file := filepath.Join(dir, "file.img")
	if out, err := exec.Command("sh", "-c", "truncate -s 256M "+file+" && dd if=/dev/urandom of="+file+" bs=64k count=3 seek=100 conv=notrunc status=none").CombinedOutput(); err != nil {
		t.Fatalf("%v %s", err, out)
	}
	for _, tc := range []struct {
		name string
		args []string
	}{
		{"memory", []string{"memory", "size=1536M"}},
		{"sparse-random", []string{"sparse-random", "size=2G", "seed=42", "percent=5"}},
		{"file", []string{"file", file}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := nbdtest.Nbdkit(t, "x", false, tc.args[0], tc.args[1:]...)
			_, got := walk(t, "unix", s.Socket, "x")
			sameAsNbdinfo(t, s, got)
		})
	}
	t.Run("tcp", func(t *testing.T) {
		port := freePort(t)
		cmd := exec.Command("nbdkit", "-f", "-r", "-i", "127.0.0.1", "-p", strconv.Itoa(port), "sparse-random", "size=1G", "seed=3")
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
		addr := fmt.Sprintf("127.0.0.1:%d", port)
		for i := 0; ; i++ {
			if c, err := net.Dial("tcp", addr); err == nil {
				c.Close()
				break
			}
			if i == 500 {
				t.Fatal("nbdkit did not listen")
			}
			time.Sleep(20 * time.Millisecond)
		}
		c, got := walk(t, "tcp", addr, "")
		if c.Size() != 1<<30 || len(got) < 2 {
			t.Fatalf("size %d, %d extents", c.Size(), len(got))
		}
	})
}

func freePort(t *testing.T) int {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// TestUnknownExport: qemu-nbd refuses an export it does not have; the
// client says so.
func TestUnknownExport(t *testing.T) {
	qemutest.Need(t)
	nbdtest.Need(t, "qemu-nbd")
	img := qemutest.Create(t, filepath.Join(t.TempDir(), "a.qcow2"), "", "1M")
	s := nbdtest.QemuNBD(t, img, "qcow2", "disk")
	_, err := Connect(context.Background(), "unix", s.Socket, "other", Options{})
	var oe *OptionError
	if err == nil || !errors.As(err, &oe) {
		t.Fatalf("Connect to a missing export: %v", err)
	}
	t.Log(err)
}

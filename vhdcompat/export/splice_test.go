package export

import (
	"bytes"
	"context"
	"io"
	"math/rand"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/xapi-project/xapi-qcow-tool/vhdcompat/hints"
	"github.com/xapi-project/xapi-qcow-tool/vhdcompat/rawdisk"
)

// spliceSource writes a 12 MiB source with data scattered over it, some
// of it at offsets no sector boundary meets, and returns its path.
func spliceSource(t *testing.T) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "src.img")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(12 << 20); err != nil {
		t.Fatal(err)
	}
	r := rand.New(rand.NewSource(7))
	for _, x := range [][2]int64{{0, 3 << 20}, {4<<20 + 1000, 70000}, {6 << 20, 5 << 20}, {12<<20 - 4096, 4096}} {
		b := make([]byte, x[1])
		r.Read(b)
		if _, err := f.WriteAt(b, x[0]); err != nil {
			t.Fatal(err)
		}
	}
	return path
}

// exportTo runs an export of path (O_DIRECT when direct) into out.
func exportTo(t *testing.T, path string, direct bool, ext hints.Extents, out io.Writer) error {
	t.Helper()
	d, err := rawdisk.Open(path, direct)
	if err != nil {
		t.Skipf("O_DIRECT is not available here: %v", err)
	}
	defer d.Close()
	_, err = Run(context.Background(), out, Options{Source: d, SourceExtents: ext})
	return err
}

// TestSplicedDataPass: the O_DIRECT data pass through the lanes writes the
// same image as the pass through memory, into a pipe and into a file, with
// and without a hint mask whose edges fall inside sectors (those pieces go
// through memory).
func TestSplicedDataPass(t *testing.T) {
	src := spliceSource(t)
	masks := map[string]hints.Extents{
		"scan": nil,
		"mask": {{Start: 0, End: 3 << 20}, {Start: 4<<20 + 1000, End: 4<<20 + 71000}, {Start: 6<<20 + 512, End: 11 << 20}, {Start: 12<<20 - 4096, End: 12 << 20}},
	}
	for name, ext := range masks {
		t.Run(name, func(t *testing.T) {
			var want bytes.Buffer
			if err := exportTo(t, src, false, ext, &want); err != nil {
				t.Fatal(err)
			}
			var buffered bytes.Buffer // not a file: the pass through memory
			if err := exportTo(t, src, true, ext, &buffered); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(buffered.Bytes(), want.Bytes()) {
				t.Fatal("the O_DIRECT pass through memory differs from the page-cache export")
			}

			r, w, err := os.Pipe()
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(exportThrough(t, src, ext, w, r), want.Bytes()) {
				t.Fatal("the spliced export into a pipe differs from the page-cache export")
			}
			// A socket, as xapi's HTTP connection: non-blocking, so that
			// the writer also meets EAGAIN when the reader lags.
			fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM, 0)
			if err != nil {
				t.Fatal(err)
			}
			syscall.SetNonblock(fds[0], true)
			sock, peer := os.NewFile(uintptr(fds[0]), "sock"), os.NewFile(uintptr(fds[1]), "peer")
			if !bytes.Equal(exportThrough(t, src, ext, sock, peer), want.Bytes()) {
				t.Fatal("the spliced export into a socket differs from the page-cache export")
			}

			out := filepath.Join(t.TempDir(), "out.qcow2")
			f, err := os.Create(out)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			if err := exportTo(t, src, true, ext, f); err != nil {
				t.Fatal(err)
			}
			if b, _ := os.ReadFile(out); !bytes.Equal(b, want.Bytes()) {
				t.Fatal("the spliced export into a file differs from the page-cache export")
			}
		})
	}
}

// exportThrough exports src (O_DIRECT) into w while reading r to its end,
// and returns what r read; it closes both.
func exportThrough(t *testing.T, src string, ext hints.Extents, w, r *os.File) []byte {
	t.Helper()
	defer r.Close()
	got := make(chan []byte)
	go func() { b, _ := io.ReadAll(r); got <- b }()
	err := exportTo(t, src, true, ext, w)
	w.Close()
	if err != nil {
		t.Fatal(err)
	}
	return <-got
}

// TestSplicedShrink: a source that ends early under the lanes' reads is
// reported as having shrunk, and the export stops.
func TestSplicedShrink(t *testing.T) {
	src := spliceSource(t)
	d, err := rawdisk.Open(src, true)
	if err != nil {
		t.Skipf("O_DIRECT is not available here: %v", err)
	}
	defer d.Close()
	if err := os.Truncate(src, 5<<20); err != nil {
		t.Fatal(err)
	}
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	go io.Copy(io.Discard, r)
	// The map makes the export skip its allocation pass: the data pass is
	// the first to meet the shorter disk.
	_, err = Run(context.Background(), w, Options{Source: d, SourceExtents: hints.Extents{{Start: 0, End: 12 << 20}}})
	w.Close()
	if err == nil || !strings.Contains(err.Error(), "shrank") {
		t.Fatalf("got %v, want a disk that shrank", err)
	}
}

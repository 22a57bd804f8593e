package rawdisk

import (
	"bytes"
	"errors"
	"io"
	"os"
	"path/filepath"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"
)

func TestOpenRefusesNonDisks(t *testing.T) {
	dir := t.TempDir()
	fifo := filepath.Join(dir, "fifo")
	if err := unix.Mkfifo(fifo, 0o644); err != nil {
		t.Fatal(err)
	}
	for path, want := range map[string]string{dir: "directory", fifo: "FIFO", "/dev/null": "character device"} {
		_, err := Open(path, false)
		if !errors.Is(err, ErrNotDisk) {
			t.Fatalf("%s: got %v, want ErrNotDisk", path, err)
		}
		if !bytes.Contains([]byte(err.Error()), []byte(want)) {
			t.Fatalf("%s: %v does not say %q", path, err, want)
		}
	}
	if _, err := Open(filepath.Join(dir, "missing"), false); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("missing file: %v", err)
	}
}

func TestDataExtentsSkipHoles(t *testing.T) {
	p := filepath.Join(t.TempDir(), "sparse")
	f, _ := os.Create(p)
	f.Truncate(64 << 20)
	f.WriteAt([]byte("x"), 10<<20)
	f.WriteAt([]byte("y"), 40<<20)
	f.Close()
	d, err := Open(p, false)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	var covered int64
	var sawX, sawY bool
	d.DataExtents(func(s, e int64) error {
		covered += e - s
		sawX = sawX || s <= 10<<20 && 10<<20 < e
		sawY = sawY || s <= 40<<20 && 40<<20 < e
		return nil
	})
	if !sawX || !sawY {
		t.Fatal("a data block is outside the extents")
	}
	if covered > 8<<20 {
		t.Skipf("SKIP: the file system reports %d bytes of data for two bytes (no SEEK_DATA granularity here)", covered)
	}
}

func TestDirectReadOddSize(t *testing.T) {
	p := filepath.Join(t.TempDir(), "odd")
	want := make([]byte, 3*Alignment+777)
	for i := range want {
		want[i] = byte(i*31 + 1)
	}
	os.WriteFile(p, want, 0o644)
	d, err := Open(p, true)
	if err != nil {
		t.Skipf("SKIP: O_DIRECT refused on this file system: %v", err)
	}
	defer d.Close()
	buf := AlignedBuffer(4 * Alignment)
	if uintptr(unsafe.Pointer(&buf[0]))%Alignment != 0 {
		t.Fatal("AlignedBuffer is not aligned")
	}
	n, err := d.ReadAt(buf, 0)
	if err != nil && err != io.EOF {
		t.Skipf("SKIP: O_DIRECT read refused here: %v", err)
	}
	if n != len(want) || !bytes.Equal(buf[:n], want) {
		t.Fatalf("read %d bytes, want %d equal bytes", n, len(want))
	}
	// An unaligned length that ends inside the file: bounced last sector.
	part := AlignedBuffer(Alignment + 100)[:Alignment+100]
	if n, err := d.ReadAt(part, Alignment); err != nil || n != len(part) || !bytes.Equal(part, want[Alignment:2*Alignment+100]) {
		t.Fatalf("partial direct read: n=%d err=%v", n, err)
	}
}

func TestReadReportsShrink(t *testing.T) {
	p := filepath.Join(t.TempDir(), "shrinks")
	os.WriteFile(p, make([]byte, 1<<20), 0o644)
	d, err := Open(p, false)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	os.Truncate(p, 4096)
	_, err = d.ReadAt(make([]byte, 65536), 0)
	if err == nil || !bytes.Contains([]byte(err.Error()), []byte("shrank")) {
		t.Fatalf("got %v, want a 'disk shrank' error", err)
	}
}

func TestZeroAndWriteback(t *testing.T) {
	p := filepath.Join(t.TempDir(), "z")
	data := bytes.Repeat([]byte{0xab}, 1<<20)
	os.WriteFile(p, data, 0o644)
	d, err := OpenFile(p, false, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if err := d.Zero(4096, 200000); err != nil {
		t.Fatal(err)
	}
	if err := d.StartWriteback(0, 1<<20); err != nil {
		t.Fatal(err)
	}
	if err := d.WaitWriteback(0, 1<<20); err != nil {
		t.Fatal(err)
	}
	got, _ := os.ReadFile(p)
	copy(data[4096:4096+200000], make([]byte, 200000))
	if !bytes.Equal(got, data) {
		t.Fatal("Zero changed the wrong bytes")
	}
}

func TestFromFileDirectSetsODirect(t *testing.T) {
	p := filepath.Join(t.TempDir(), "fd")
	os.WriteFile(p, make([]byte, 8192), 0o644)
	f, err := os.OpenFile(p, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	d, err := FromFileDirect(f, "fd 3", true)
	if err != nil {
		t.Skipf("SKIP: O_DIRECT refused on this file system: %v", err)
	}
	fl, err := unix.FcntlInt(f.Fd(), unix.F_GETFL, 0)
	if err != nil || fl&unix.O_DIRECT == 0 || !d.Direct() {
		t.Fatalf("O_DIRECT not set on the descriptor (flags %#x, err %v)", fl, err)
	}
}

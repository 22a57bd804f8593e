package rawdisk

import (
	"bytes"
	"io"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"golang.org/x/sys/unix"
)

// refusalDisk returns a disk to refuse O_DIRECT on, its content and the
// IO mode that asks for O_DIRECT on it: a loop device (IOAuto) where this
// runs as root, else a regular file (IODirect). Block devices accept
// O_DIRECT on this kind of machine, so the refusals below are injected
// where the disk is opened and read or written (openFile, pread, pwrite);
// tests/direct_test.go meets a real one on a ramfs.
func refusalDisk(t *testing.T) (string, []byte, IO) {
	t.Helper()
	p := filepath.Join(t.TempDir(), "disk")
	want := make([]byte, 1<<20)
	rand.New(rand.NewSource(1)).Read(want)
	if err := os.WriteFile(p, want, 0o644); err != nil {
		t.Fatal(err)
	}
	if os.Geteuid() == 0 {
		if out, err := exec.Command("losetup", "--show", "-f", p).Output(); err == nil {
			dev := strings.TrimSpace(string(out))
			t.Cleanup(func() { exec.Command("losetup", "-d", dev).Run() })
			return dev, want, IOAuto
		}
	}
	t.Logf("no loop device here: a regular file with --direct stands for the device")
	if f, err := os.OpenFile(p, os.O_RDONLY|unix.O_DIRECT, 0); err != nil {
		t.Skipf("SKIP: O_DIRECT refused on %s already: %v", p, err)
	} else {
		f.Close()
	}
	return p, want, IODirect
}

// inject replaces one of the package's system calls for the test.
func inject[F any](t *testing.T, v *F, f F) {
	old := *v
	*v = f
	t.Cleanup(func() { *v = old })
}

func isDirect(f *os.File) bool {
	fl, err := unix.FcntlInt(f.Fd(), unix.F_GETFL, 0)
	return err == nil && fl&unix.O_DIRECT != 0
}

// refusals counts the calls of Options.Refused.
type refusals struct {
	n    atomic.Int32
	last atomic.Value
}

func (r *refusals) options(mode IO) Options {
	return Options{IO: mode, Refused: func(path string, err error) {
		r.n.Add(1)
		r.last.Store(err)
	}}
}

func (r *refusals) check(t *testing.T, d *Disk) {
	t.Helper()
	if n := r.n.Load(); n != 1 {
		t.Fatalf("Refused called %d times, want once", n)
	}
	if err, _ := r.last.Load().(error); err == nil || !strings.Contains(err.Error(), "invalid argument") {
		t.Fatalf("Refused was told %v, want EINVAL", err)
	}
	if d.Direct() || isDirect(d.File()) || d.DirectRefused() == nil {
		t.Fatalf("after the refusal: Direct %v, descriptor O_DIRECT %v, DirectRefused %v", d.Direct(), isDirect(d.File()), d.DirectRefused())
	}
}

func readAll(t *testing.T, d *Disk, n int) []byte {
	t.Helper()
	buf := AlignedBuffer(n)
	got, err := d.ReadAt(buf, 0)
	if err != nil && err != io.EOF {
		t.Fatal(err)
	}
	return buf[:got]
}

// TestRefusalAtStart: the refusal comes at the open or at the first read
// (the probe at open meets it): either way the engines see a buffered disk
// that reads the same bytes, and the refusal is told once.
func TestRefusalAtStart(t *testing.T) {
	for _, tc := range []struct {
		name   string
		refuse func(t *testing.T)
	}{
		{"open", func(t *testing.T) {
			inject(t, &openFile, func(name string, flag int, perm os.FileMode) (*os.File, error) {
				if flag&unix.O_DIRECT != 0 {
					return nil, &os.PathError{Op: "open", Path: name, Err: unix.EINVAL}
				}
				return os.OpenFile(name, flag, perm)
			})
		}},
		{"first read", func(t *testing.T) {
			inject(t, &pread, func(f *os.File, p []byte, off int64) (int, error) {
				if isDirect(f) {
					return 0, &os.PathError{Op: "read", Path: f.Name(), Err: unix.EINVAL}
				}
				return f.ReadAt(p, off)
			})
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path, want, mode := refusalDisk(t)
			tc.refuse(t)
			var r refusals
			d, err := OpenWith(path, r.options(mode))
			if err != nil {
				t.Fatal(err)
			}
			defer d.Close()
			r.check(t, d)
			if !bytes.Equal(readAll(t, d, len(want)), want) {
				t.Fatal("read through the page cache returned other bytes")
			}
		})
	}
}

// refuseFromNow checks that the disk just opened is direct, then turns
// the injected refusal on until the subtest ends (and closes the disk).
func refuseFromNow(t *testing.T, d *Disk, err error, refuse *atomic.Bool) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	if !d.Direct() {
		t.Fatal("not direct before the refusal")
	}
	refuse.Store(true)
	t.Cleanup(func() { refuse.Store(false) })
}

// TestRefusalMidRun: the refusal comes at a read after the open (two
// readers at once, as the export's), or at the first write: the I/O is
// redone through the page cache and the refusal told once.
func TestRefusalMidRun(t *testing.T) {
	path, want, mode := refusalDisk(t)
	var refuse atomic.Bool
	inject(t, &pread, func(f *os.File, p []byte, off int64) (int, error) {
		if refuse.Load() && isDirect(f) {
			return 0, &os.PathError{Op: "read", Path: f.Name(), Err: unix.EINVAL}
		}
		return f.ReadAt(p, off)
	})
	inject(t, &pwrite, func(f *os.File, p []byte, off int64) (int, error) {
		if refuse.Load() && isDirect(f) {
			return 0, &os.PathError{Op: "write", Path: f.Name(), Err: unix.EINVAL}
		}
		return f.WriteAt(p, off)
	})

	t.Run("reads", func(t *testing.T) {
		var r refusals
		d, err := OpenWith(path, r.options(mode))
		refuseFromNow(t, d, err, &refuse)
		var wg sync.WaitGroup
		errs := make([]error, 4)
		for i := range errs {
			wg.Add(1)
			go func() {
				defer wg.Done()
				buf := AlignedBuffer(len(want) / 4)
				off := int64(i * len(buf))
				if _, err := d.ReadAt(buf, off); err != nil && err != io.EOF {
					errs[i] = err
				} else if !bytes.Equal(buf, want[off:off+int64(len(buf))]) {
					errs[i] = io.ErrUnexpectedEOF
				}
			}()
		}
		wg.Wait()
		for _, err := range errs {
			if err != nil {
				t.Fatal(err)
			}
		}
		r.check(t, d)
	})

	t.Run("writes", func(t *testing.T) {
		var r refusals
		d, err := OpenFileWith(path, 0o644, r.options(mode))
		refuseFromNow(t, d, err, &refuse)
		buf := AlignedBuffer(64 << 10)
		for i := range buf {
			buf[i] = 0x5a
		}
		if err := d.WriteAtAnyAlignment(buf, 128<<10); err != nil {
			t.Fatal(err)
		}
		if err := d.Sync(); err != nil {
			t.Fatal(err)
		}
		r.check(t, d)
		copy(want[128<<10:], buf)
		if !bytes.Equal(readAll(t, d, len(want)), want) {
			t.Fatal("the write redone through the page cache is not on the disk")
		}
	})
}

func TestIOModes(t *testing.T) {
	p := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(p, make([]byte, 8192), 0o644); err != nil {
		t.Fatal(err)
	}
	d, err := OpenWith(p, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if d.Direct() || isDirect(d.File()) {
		t.Error("IOAuto: a regular file is opened with O_DIRECT")
	}
	d.Close()
	f, err := os.OpenFile(p, os.O_RDWR|unix.O_DIRECT, 0)
	if err != nil {
		t.Skipf("SKIP: O_DIRECT refused here: %v", err)
	}
	defer f.Close()
	if d, err := FromFile(f, "fd 3"); err != nil || !d.Direct() {
		t.Fatalf("FromFile does not see the descriptor's O_DIRECT (%v)", err)
	}
	d, err = FromFileWith(f, "fd 3", Options{IO: IOBuffered})
	if err != nil {
		t.Fatal(err)
	}
	if d.Direct() || isDirect(f) {
		t.Error("IOBuffered: O_DIRECT left on the descriptor")
	}
}

// TestUnaligned reads a direct disk at odd offsets and lengths, as the
// support commands' qcow2 walks do, and past its end.
func TestUnaligned(t *testing.T) {
	path, want, mode := refusalDisk(t)
	d, err := OpenWith(path, Options{IO: mode})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if !d.Direct() {
		t.Fatal("not direct")
	}
	r := d.Unaligned()
	rng := rand.New(rand.NewSource(2))
	for i := 0; i < 200; i++ {
		off := rng.Int63n(int64(len(want)))
		n := rng.Intn(3 << 20)
		p := make([]byte, n)
		got, err := r.ReadAt(p, off)
		end := min(off+int64(n), int64(len(want)))
		if got != int(end-off) || !bytes.Equal(p[:got], want[off:end]) {
			t.Fatalf("ReadAt(%d bytes at %d) = %d, %v: wrong bytes", n, off, got, err)
		}
		if (off+int64(n) > int64(len(want))) != (err == io.EOF) {
			t.Fatalf("ReadAt(%d bytes at %d): error %v", n, off, err)
		}
	}
}

package tests

// Block devices under xapi's own command lines (issue 11): O_DIRECT by
// default on devices, the page cache for regular files and with
// --buffered, 4096-byte logical sectors both ways, and the fallback to the
// page cache when O_DIRECT is refused.

import (
	"fmt"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/xapi-project/xapi-qcow-tool/tests/qemutest"
)

// loopSector attaches a loop device with direct I/O and the given logical
// sector size to file, detached at the end of the test; it skips, visibly,
// where that is refused.
func loopSector(t testing.TB, file string, sector int) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("SKIP: loop devices need root")
	}
	out, err := exec.Command("losetup", "--show", "-f", "--direct-io=on", "--sector-size", strconv.Itoa(sector), file).CombinedOutput()
	if err != nil {
		t.Skipf("SKIP: losetup --sector-size %d refused here: %v: %s", sector, err, strings.TrimSpace(string(out)))
	}
	dev := strings.TrimSpace(string(out))
	t.Cleanup(func() { exec.Command("losetup", "-d", dev).Run() })
	if got, err := exec.Command("blockdev", "--getss", dev).Output(); err == nil && strings.TrimSpace(string(got)) != strconv.Itoa(sector) {
		t.Fatalf("%s has %s-byte sectors, asked %d", dev, strings.TrimSpace(string(got)), sector)
	}
	return dev
}

// openFlags waits until the process has path open and returns the flags
// of that descriptor (/proc/PID/fdinfo), or fails after 20 s.
func openFlags(t testing.TB, p *proc, path string) int {
	t.Helper()
	want, err := filepath.EvalSymlinks(path)
	if err != nil {
		t.Fatal(err)
	}
	pid := p.cmd.Process.Pid
	deadline := time.Now().Add(20 * time.Second)
	for {
		fds, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
		for _, fd := range fds {
			target, err := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", pid, fd.Name()))
			if err != nil || target != want {
				continue
			}
			info, err := os.ReadFile(fmt.Sprintf("/proc/%d/fdinfo/%s", pid, fd.Name()))
			if err != nil {
				continue
			}
			for _, line := range strings.Split(string(info), "\n") {
				if v, ok := strings.CutPrefix(line, "flags:"); ok {
					fl, err := strconv.ParseInt(strings.TrimSpace(v), 8, 64)
					if err != nil {
						t.Fatalf("fdinfo flags %q: %v", v, err)
					}
					return int(fl)
				}
			}
		}
		select {
		case <-p.done:
			t.Fatalf("exited without opening %s: %v: %s", path, p.err, p.stderr.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s not opened after 20 s", path)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// TestDirectByDefault runs xapi's two command lines, through the drop-in
// names, and stream and serve, on a block device and on a regular file,
// and reads the descriptor's flags while each runs: a block device is
// opened with O_DIRECT unless --buffered, a regular file only with
// --direct. Each run must still produce the right bytes.
func TestDirectByDefault(t *testing.T) {
	qemutest.Need(t)
	dir := t.TempDir()
	const size = 8 << 20 // larger than the output pipe (1 MiB)
	backing := filepath.Join(dir, "disk.img")
	sparseFile(t, backing, size)
	writeRandom(t, rand.New(rand.NewSource(11)), backing, 0, size)
	dev := loopDevice(t, backing, true)
	file := filepath.Join(dir, "file.img")
	sparseFile(t, file, size)
	writeRandom(t, rand.New(rand.NewSource(12)), file, 0, size)
	// A regular file on a tmpfs too, where $TMPDIR is a disk file system
	// (and the other way round).
	shm := file
	if d, err := os.MkdirTemp("/dev/shm", "xqt-direct-"); err == nil {
		t.Cleanup(func() { os.RemoveAll(d) })
		shm = filepath.Join(d, "file.img")
		sparseFile(t, shm, size)
		writeRandom(t, rand.New(rand.NewSource(13)), shm, 0, size)
	} else {
		t.Logf("no /dev/shm here (%v): the tmpfs cases use %s", err, file)
	}
	x2s, qst := linkAs(t, "qcow2-to-stdout"), linkAs(t, "qcow-stream-tool")

	for _, c := range []struct {
		name   string
		disk   string
		extra  []string
		direct bool
	}{
		{"device", dev, nil, true},
		{"device --buffered", dev, []string{"--buffered"}, false},
		{"device --direct", dev, []string{"--direct"}, true},
		{"file", file, nil, false},
		{"file --direct", file, []string{"--direct"}, true},
		{"file on tmpfs", shm, nil, false},
	} {
		check := func(t *testing.T, p *proc, path string) {
			t.Helper()
			if got := openFlags(t, p, path)&unix.O_DIRECT != 0; got != c.direct {
				t.Errorf("%s open with O_DIRECT: %v, want %v", path, got, c.direct)
			}
		}
		for _, face := range []struct {
			name string
			argv func(disk string) (string, []string)
		}{
			{"qcow2-to-stdout", func(d string) (string, []string) { return x2s, append([]string{d}, c.extra...) }},
			{"stream", func(d string) (string, []string) {
				return bin, append([]string{"stream", "--source", d}, c.extra...)
			}},
		} {
			t.Run("export/"+face.name+"/"+c.name, func(t *testing.T) {
				// The output pipe is not read until the flags are seen:
				// the export blocks on it with the disk open.
				r, w := pipe(t)
				path, args := face.argv(c.disk)
				p := startCmd(t, nil, w, args, path)
				w.Close()
				check(t, p, c.disk)
				img := filepath.Join(t.TempDir(), "out.qcow2")
				drainTo(t, r, img)
				if code := p.wait(t, 30*time.Second); code != 0 {
					t.Fatalf("exit %d: %s", code, p.stderr.String())
				}
				qemutest.Compare(t, img, c.disk)
			})
		}
		img := filepath.Join(dir, "src.qcow2")
		exportToFile(t, img, "stream", "--source", file)
		for _, face := range []struct {
			name string
			argv func(disk string) (string, []string)
		}{
			{"stream_decode", func(d string) (string, []string) {
				return qst, append([]string{"stream_decode", d}, c.extra...)
			}},
			{"serve", func(d string) (string, []string) {
				return bin, append([]string{"serve", "--source", "stdin:", "--destination", "file://" + d}, c.extra...)
			}},
		} {
			t.Run("import/"+face.name+"/"+c.name, func(t *testing.T) {
				zeroRange(t, c.disk, 0, size)
				// The image is held back after its header: the import
				// opens the destination and waits for the rest.
				data, err := os.ReadFile(img)
				if err != nil {
					t.Fatal(err)
				}
				r, w := pipe(t)
				path, args := face.argv(c.disk)
				p := startCmd(t, r, nil, args, path)
				r.Close()
				if _, err := w.Write(data[:65536]); err != nil {
					t.Fatal(err)
				}
				check(t, p, c.disk)
				go func() { w.Write(data[65536:]); w.Close() }()
				if code := p.wait(t, 30*time.Second); code != 0 {
					t.Fatalf("exit %d: %s", code, p.stderr.String())
				}
				qemutest.Compare(t, img, c.disk)
			})
		}
	}
	// --direct and --buffered together are a usage error, before anything
	// is opened.
	for _, args := range [][]string{{"stream", "--source", file, "--direct", "--buffered"}, {"stream_decode", "--direct", "--buffered", file}} {
		r := runTool(t, nil, args...)
		if r.Code != 2 || !strings.Contains(string(r.Stderr), "--buffered") {
			t.Errorf("%v: exit %d, %q; want exit 2 naming --buffered", args, r.Code, r.Stderr)
		}
	}
	r := runAs(t, x2s, nil, file, "--direct", "--buffered")
	if r.Code != 2 {
		t.Errorf("qcow2-to-stdout --direct --buffered: exit %d, want 2: %s", r.Code, r.Stderr)
	}
}

// drainTo copies the read end of a pipe into a new file until EOF.
func drainTo(t testing.TB, r *os.File, path string) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.ReadFrom(r); err != nil {
		t.Fatal(err)
	}
}

// Test4KSectors moves disks to and from loop devices with 4096-byte
// logical sectors through xapi's command lines (the drop-in names), judged
// byte for byte by qemu-img compare: a device whose size ends in a partial
// cluster; 512-byte clusters, whose runs start and end inside the
// device's sectors (read-modify-write), from a pipe; and a full import
// into a device full of other data, whose zero ranges are zeroed with the
// device's alignment.
func Test4KSectors(t *testing.T) {
	qemutest.Need(t)
	dir := t.TempDir()
	// 8 MiB and three sectors: the last 64 KiB cluster is partial.
	const size = 8<<20 + 3*4096
	src := filepath.Join(dir, "src.img")
	sparseFile(t, src, size)
	r := rand.New(rand.NewSource(4096))
	writeRandom(t, r, src, 0, 1<<20)
	for off := int64(2 << 20); off < 3<<20; off += 1536 {
		writeRandom(t, r, src, off, 512) // every third 512-byte sector
	}
	writeRandom(t, r, src, 5<<20+512, 100000)
	writeRandom(t, r, src, size-5000, 5000) // the partial last cluster
	srcDev := loopSector(t, src, 4096)
	x2s, qst := linkAs(t, "qcow2-to-stdout"), linkAs(t, "qcow-stream-tool")

	for _, cs := range []string{"65536", "512"} {
		t.Run("export/cluster "+cs, func(t *testing.T) {
			img := filepath.Join(t.TempDir(), "out.qcow2")
			res := runWithFiles(t, x2s, nil, img, nil, srcDev, "-c", cs, "-v")
			mustSucceed(t, res, "qcow2-to-stdout "+srcDev)
			stayedDirect(t, string(res.Stderr))
			qemutest.Check(t, img)
			qemutest.Compare(t, img, src)
			qemutest.Compare(t, img, srcDev)
		})
	}

	t.Run("import/stream_decode of 512-byte clusters from a pipe", func(t *testing.T) {
		// xapi's export piped into xapi's import, device to device: the
		// zero clusters are not in the image, and stream_decode leaves
		// them alone, so the destination starts as zeros.
		dst := filepath.Join(t.TempDir(), "dst.img")
		sparseFile(t, dst, size)
		dstDev := loopSector(t, dst, 4096)
		script := fmt.Sprintf("set -o pipefail; %q %q -c 512 -v | %q stream_decode -v %q", x2s, srcDev, qst, dstDev)
		out, err := exec.Command("bash", "-c", script).CombinedOutput()
		if err != nil {
			t.Fatalf("%s: %v: %s", script, err, out)
		}
		stayedDirect(t, string(out))
		sameBytes(t, src, dstDev)
		img := filepath.Join(t.TempDir(), "c512.qcow2")
		mustSucceed(t, runWithFiles(t, x2s, nil, img, nil, srcDev, "-c", "512"), "qcow2-to-stdout -c 512")
		qemutest.Compare(t, img, dstDev)
	})

	t.Run("import/serve over other data", func(t *testing.T) {
		// qemu-img's own image of the source, 512-byte clusters, its
		// zeros unallocated: a full import must zero them on a device
		// that held other data, in whole 4096-byte sectors around the
		// unaligned edges.
		img := filepath.Join(t.TempDir(), "qemu.qcow2")
		qemutest.Img(t, "convert", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=512", src, img)
		dst := filepath.Join(t.TempDir(), "dst.img")
		sparseFile(t, dst, size)
		writeRandom(t, rand.New(rand.NewSource(9)), dst, 0, size)
		dstDev := loopSector(t, dst, 4096)
		data, err := os.ReadFile(img)
		if err != nil {
			t.Fatal(err)
		}
		res := runWithFiles(t, bin, data, "", nil, "serve", "-v", "--source", "stdin:", "--destination", dstDev)
		mustSucceed(t, res, "serve into "+dstDev)
		stayedDirect(t, string(res.Stderr))
		qemutest.Compare(t, img, dstDev)
		// And stream_decode of qemu-img's file (random access: stdin is
		// the file), onto other data again: only what it allocates is
		// written, so the device must read as the image over that data.
		writeRandom(t, rand.New(rand.NewSource(10)), dst, 0, size)
		expected := filepath.Join(t.TempDir(), "expected.img")
		copyFile(t, dst, expected)
		// What the image stores (data and zero flags) replaces what was
		// there; what it leaves unallocated stays.
		for _, e := range qemutest.Map(t, img) {
			switch {
			case e.Data:
				overlay(t, src, expected, e.Start, e.Length)
			case e.Present:
				zeroRange(t, expected, e.Start, e.Length)
			}
		}
		f, err := os.Open(img)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		cmd := exec.Command(qst, "stream_decode", "-v", dstDev)
		cmd.Stdin = f
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("stream_decode < %s: %v: %s", img, err, out)
		}
		stayedDirect(t, string(out))
		sameBytes(t, expected, dstDev)
	})
}

// stayedDirect fails unless the -v log of a run on 4096-byte-sector
// devices says it used O_DIRECT throughout: an I/O misaligned for the
// device would be refused and silently redone through the page cache.
func stayedDirect(t testing.TB, log string) {
	t.Helper()
	if strings.Contains(log, "O_DIRECT refused") || !strings.Contains(log, "direct=true") || strings.Contains(log, "direct=false") {
		t.Fatalf("the run did not stay with O_DIRECT:\n%s", log)
	}
}

// overlay copies n bytes at off of from into to, at the same offset.
func overlay(t testing.TB, from, to string, off, n int64) {
	t.Helper()
	poke(t, to, off, readAt(t, from, off, n)...)
}

// TestDirectRefused runs --direct on files of a ramfs, which refuses
// O_DIRECT at open (EINVAL) — a real refusal on this kind of machine;
// block devices accept O_DIRECT here, so their refusal is injected in
// vhdcompat/rawdisk's tests (TestRefusal*). The export and the import
// must carry on through the page cache, say so once on stderr with -v,
// and produce the right bytes.
func TestDirectRefused(t *testing.T) {
	qemutest.Need(t)
	needUnshare(t)
	if os.Geteuid() != 0 {
		t.Skip("SKIP: mounting a ramfs needs root")
	}
	dir := t.TempDir()
	mnt := filepath.Join(dir, "ramfs")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	src := filepath.Join(dir, "src.img")
	sparseFile(t, src, 4<<20+4096)
	writeRandom(t, rand.New(rand.NewSource(5)), src, 1<<20, 2<<20)
	writeRandom(t, rand.New(rand.NewSource(6)), src, 4<<20, 4096)
	script := `set -eu
mount -t ramfs xqt-ramfs "$MNT" || exit 99
cp "$SRC" "$MNT/src.img"
# A refusal at open, or this kernel gives ramfs direct I/O.
if dd if="$MNT/src.img" of=/dev/null bs=4096 count=1 iflag=direct 2>/dev/null; then exit 98; fi
"$BIN" stream -v --direct --source "$MNT/src.img" > "$DIR/out.qcow2" 2> "$DIR/export.err"
"$BIN" serve -v --direct --source "$DIR/out.qcow2" --destination "$MNT/dst.img" 2> "$DIR/import.err"
cmp "$SRC" "$MNT/dst.img"
`
	cmd := exec.Command("unshare", "-m", "--propagation", "private", "bash", "-c", script)
	cmd.Env = append(os.Environ(), "MNT="+mnt, "BIN="+bin, "SRC="+src, "DIR="+dir)
	out, err := cmd.CombinedOutput()
	if ee, ok := err.(*exec.ExitError); ok {
		switch ee.ExitCode() {
		case 99:
			t.Skipf("SKIP: cannot mount a ramfs here: %s", out)
		case 98:
			t.Skipf("SKIP: this kernel's ramfs accepts O_DIRECT: no real refusal to test")
		}
	}
	if err != nil {
		logs, _ := os.ReadFile(filepath.Join(dir, "export.err"))
		logi, _ := os.ReadFile(filepath.Join(dir, "import.err"))
		t.Fatalf("%v: %s\nexport stderr:\n%s\nimport stderr:\n%s", err, out, logs, logi)
	}
	qemutest.Compare(t, filepath.Join(dir, "out.qcow2"), src)
	for _, f := range []string{"export.err", "import.err"} {
		b, err := os.ReadFile(filepath.Join(dir, f))
		if err != nil {
			t.Fatal(err)
		}
		if n := strings.Count(string(b), "O_DIRECT refused"); n != 1 {
			t.Errorf("%s: %d lines about the refusal, want 1:\n%s", f, n, b)
		}
		if !strings.Contains(string(b), "invalid argument") {
			t.Errorf("%s: the refusal does not give its reason (EINVAL):\n%s", f, b)
		}
		if !strings.Contains(string(b), "direct=false") {
			t.Errorf("%s: the run does not log that it went through the page cache:\n%s", f, b)
		}
	}
}

// TestSupportOnDevices runs the support commands on 4096-byte-sector
// devices, which they read with O_DIRECT: a qcow2 image written onto one
// (info, map and check must say what they say of the file; their reads of
// headers and tables are not sector-aligned), and compare of an image
// against a raw device.
func TestSupportOnDevices(t *testing.T) {
	qemutest.Need(t)
	dir := t.TempDir()
	raw := filepath.Join(dir, "raw.img")
	sparseFile(t, raw, 4<<20)
	writeRandom(t, rand.New(rand.NewSource(21)), raw, 70000, 300000)
	img := filepath.Join(dir, "img.qcow2")
	exportToFile(t, img, "stream", "--source", raw, "--cluster-size", "4096")
	// The device holding the image is a little larger than it, as an LV.
	onDev := filepath.Join(dir, "qcow2-on-device")
	copyFile(t, img, onDev)
	if err := os.Truncate(onDev, 1<<20); err != nil {
		t.Fatal(err)
	}
	qdev := loopSector(t, onDev, 4096)
	rdev := loopSector(t, raw, 4096)
	for _, cmd := range []string{"info", "map", "check"} {
		want := mustRun(t, nil, cmd, "--output=json", img)
		got := mustRun(t, nil, cmd, "--output=json", qdev)
		norm := func(b []byte, name string) string { return strings.ReplaceAll(string(b), name, "IMG") }
		if cmd == "info" || cmd == "check" {
			// The file's size differs (the device is padded): compare what
			// describes the image.
			for _, key := range []string{`"virtual-size"`, `"cluster-size"`, `"check-errors"`, `"corruptions"`, `"leaks"`} {
				if w, g := field(string(want), key), field(string(got), key); w != g {
					t.Errorf("%s %s: %s is %q on the device, %q on the file", cmd, qdev, key, g, w)
				}
			}
			continue
		}
		if norm(want, img) != norm(got, qdev) {
			t.Errorf("%s on the device differs from the file:\n%s\n%s", cmd, got, want)
		}
	}
	if r := runTool(t, nil, "compare", img, rdev); r.Code != 0 {
		t.Fatalf("compare %s %s: exit %d: %s%s", img, rdev, r.Code, r.Stdout, r.Stderr)
	}
	if r := runTool(t, nil, "compare", qdev, raw); r.Code != 0 {
		t.Fatalf("compare %s %s: exit %d: %s%s", qdev, raw, r.Code, r.Stdout, r.Stderr)
	}
	writeRandom(t, rand.New(rand.NewSource(22)), raw, 4<<20-512, 1)
	if r := runTool(t, nil, "compare", img, rdev); r.Code != 1 {
		t.Fatalf("compare after a change: exit %d, want 1: %s", r.Code, r.Stdout)
	}
}

// field returns the text after `key:` on its line of JSON output.
func field(text, key string) string {
	for _, line := range strings.Split(text, "\n") {
		if i := strings.Index(line, key+":"); i >= 0 {
			return strings.TrimSpace(line[i+len(key)+1:])
		}
	}
	return ""
}

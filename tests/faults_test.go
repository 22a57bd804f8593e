package tests

// Fault tests: what the built binary does when the world misbehaves —
// the reader of an export goes away, the import target fills up or fails,
// a signal arrives, the source shrinks between the two export passes, the
// destination is too small, the paths are not disks, stdout is a terminal.
// docs/RELIABILITY.md states the guarantees these tests hold the tool to.

import (
	"fmt"
	"io"
	"math/rand"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestFaultExportReaderGoesAway: the reader (xapi's HTTP client) reads a
// few KiB and closes the pipe; the tool ends with one line, at once.
func TestFaultExportReaderGoesAway(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "src.img")
	fillFile(t, src, 48<<20)
	for _, tc := range []struct {
		name  string
		extra []string
		after int // bytes read before closing
	}{
		{"in-metadata", nil, 4 << 10},
		{"in-data", nil, 3 << 20},
		{"in-data-direct", []string{"--direct"}, 3 << 20},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r, w := pipe(t)
			p := startTool(t, nil, w, append([]string{"stream", "--source", src}, tc.extra...)...)
			w.Close()
			if _, err := io.ReadFull(r, make([]byte, tc.after)); err != nil {
				t.Fatalf("reading the first %d bytes: %v (stderr %q)", tc.after, err, p.stderr.String())
			}
			r.Close()
			start := time.Now()
			code := p.wait(t, 5*time.Second)
			if el := time.Since(start); el > time.Second {
				t.Errorf("took %v to notice the reader went away, want < 1s", el)
			}
			checkFailureLine(t, code, p.stderr.String(), "broken pipe")
		})
	}
}

// TestFaultSignals: SIGTERM and SIGINT while the export is blocked on a
// pipe nobody reads, and while the import waits for a stream that stalls
// after its first clusters: the tool exits non-zero within 2 s with one
// line naming the signal. (That the journal records it is checked by the
// journal tests, which own the journal's test infrastructure.)
func TestFaultSignals(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "src.img")
	fillFile(t, src, 24<<20)
	img := filepath.Join(dir, "src.qcow2")
	exportToFile(t, img, "stream", "--source", src)
	head, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	head = head[:3<<16] // header, refcount table, refcount block

	for _, sig := range []syscall.Signal{syscall.SIGTERM, syscall.SIGINT} {
		name := map[syscall.Signal]string{syscall.SIGTERM: "SIGTERM", syscall.SIGINT: "SIGINT"}[sig]
		t.Run("export/"+name, func(t *testing.T) {
			r, w := pipe(t)
			p := startTool(t, nil, w, "stream", "--source", src)
			w.Close()
			waitPipe(t, r, 60<<10, p)
			time.Sleep(200 * time.Millisecond) // let it block in write/sendfile
			signalAndCheck(t, p, sig, name)
		})
		t.Run("import/"+name, func(t *testing.T) {
			r, w := pipe(t)
			dst := filepath.Join(t.TempDir(), "dst.img")
			p := startTool(t, r, nil, "serve", "--destination", dst)
			r.Close()
			if _, err := w.Write(head); err != nil {
				t.Fatal(err)
			}
			// The destination is opened once the header is validated:
			// from then on the tool waits for more of the stream.
			deadline := time.Now().Add(10 * time.Second)
			for {
				if _, err := os.Stat(dst); err == nil {
					break
				}
				select {
				case <-p.done:
					t.Fatalf("exited before the stream ended: %v %q", p.err, p.stderr.String())
				default:
				}
				if time.Now().After(deadline) {
					t.Fatal("the destination was not opened 10 s after the header")
				}
				time.Sleep(5 * time.Millisecond)
			}
			time.Sleep(200 * time.Millisecond) // let it block in read
			signalAndCheck(t, p, sig, name)
		})
	}
}

func signalAndCheck(t *testing.T, p *proc, sig syscall.Signal, name string) {
	t.Helper()
	select {
	case <-p.done:
		t.Fatalf("exited before the signal: %v %q", p.err, p.stderr.String())
	default:
	}
	if err := p.cmd.Process.Signal(sig); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	code := p.wait(t, 10*time.Second)
	if el := time.Since(start); el > 2*time.Second {
		t.Errorf("exited %v after %s, want < 2s", el, name)
	}
	checkFailureLine(t, code, p.stderr.String(), name)
}

// TestFaultSourceShrinks: the source is truncated while the export waits
// in its data pass (after the metadata, which promised every cluster, was
// written); the tool must fail, naming the shrink, not exit 0 with an
// image whose clusters no longer match the source.
func TestFaultSourceShrinks(t *testing.T) {
	const size = 32 << 20
	dir := t.TempDir()
	src := filepath.Join(dir, "src.img")
	fillFile(t, src, size)
	// Every cluster is stored: the metadata is what precedes the data.
	ref := filepath.Join(dir, "ref.qcow2")
	exportToFile(t, ref, "stream", "--source", src)
	st, err := os.Stat(ref)
	if err != nil {
		t.Fatal(err)
	}
	metadata := st.Size() - size
	os.Remove(ref)
	for _, tc := range []struct {
		name  string
		extra []string
	}{
		{"sendfile", nil},
		{"direct", []string{"--direct"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fillFile(t, src, size)
			r, w := pipe(t)
			p := startTool(t, nil, w, append([]string{"stream", "--source", src}, tc.extra...)...)
			w.Close()
			// Take the metadata and the first data cluster, then let the
			// pipe fill: the tool is then blocked in its data pass.
			if _, err := io.ReadFull(r, make([]byte, metadata+65536)); err != nil {
				t.Fatalf("reading the metadata: %v (stderr %q)", err, p.stderr.String())
			}
			waitPipe(t, r, 60<<10, p)
			time.Sleep(200 * time.Millisecond)
			if err := os.Truncate(src, 4<<20); err != nil {
				t.Fatal(err)
			}
			got := make(chan int64, 1)
			go func() { n, _ := io.Copy(io.Discard, r); got <- n }()
			code := p.wait(t, 20*time.Second)
			checkFailureLine(t, code, p.stderr.String(), "shrank")
			if n := metadata + 65536 + <-got; n >= st.Size() {
				t.Errorf("%d bytes written, the whole image: the shrink went unnoticed", n)
			}
		})
	}
}

// TestFaultImportNoSpace: the destination is a file on a full tmpfs, or a
// loop device whose backing file lives on it; the import fails with one
// line naming the offset of the failed write.
func TestFaultImportNoSpace(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "src.img")
	fillFile(t, src, 12<<20)
	img := filepath.Join(dir, "src.qcow2")
	exportToFile(t, img, "stream", "--source", src)
	out := filepath.Join(dir, "out")
	if err := os.Mkdir(out, 0o755); err != nil {
		t.Fatal(err)
	}
	// Each run leaves $OUT/<name>.code and $OUT/<name>.err.
	script := `
run() { name=$1; shift; "$@" 2>"$OUT/$name.err"; echo $? >"$OUT/$name.code"; }
run file-stream sh -c 'exec "$BIN" serve --destination "$MNT/a.img" <"$IMG"' 
rm -f "$MNT/a.img"
cat "$IMG" | run file-pipe "$BIN" serve --destination "$MNT/a.img"
rm -f "$MNT/a.img"
run file-random "$BIN" serve --source "$IMG" --destination "$MNT/a.img"
rm -f "$MNT/a.img"
truncate -s 16M "$MNT/backing" || exit 1
DEV=$(losetup --show -f "$MNT/backing" 2>"$OUT/losetup.err") || { echo refused >"$OUT/losetup"; exit 0; }
export DEV
trap 'losetup -d "$DEV"' EXIT
run loop-direct "$BIN" serve --source "$IMG" --destination "$DEV" --direct
run loop-buffered "$BIN" serve --source "$IMG" --destination "$DEV"
run loop-stream-decode sh -c 'exec "$BIN" stream_decode "$DEV" <"$IMG"'
`
	privateTmpfs(t, "4M", script, "IMG="+img, "OUT="+out)
	read := func(name string) (int, string) {
		c, err := os.ReadFile(filepath.Join(out, name+".code"))
		if err != nil {
			t.Fatalf("%s: no result: %v", name, err)
		}
		e, _ := os.ReadFile(filepath.Join(out, name+".err"))
		var code int
		fmt.Sscan(string(c), &code)
		return code, string(e)
	}
	for _, name := range []string{"file-stream", "file-pipe", "file-random"} {
		t.Run(name, func(t *testing.T) {
			code, msg := read(name)
			checkFailureLine(t, code, msg, "offset", "no space left")
		})
	}
	if b, err := os.ReadFile(filepath.Join(out, "losetup")); err == nil {
		e, _ := os.ReadFile(filepath.Join(out, "losetup.err"))
		t.Skipf("SKIP: losetup refused here (%s): %s", strings.TrimSpace(string(b)), e)
	}
	// With O_DIRECT the failing write reports the error: its offset is
	// named. Through the page cache the error only surfaces at fsync,
	// where the offset is no longer known (see docs/RELIABILITY.md).
	for name, want := range map[string][]string{
		"loop-direct":        {"offset"},
		"loop-buffered":      {"fsync", "input/output error"},
		"loop-stream-decode": {"fsync", "input/output error"},
	} {
		t.Run(name, func(t *testing.T) {
			code, msg := read(name)
			checkFailureLine(t, code, msg, want...)
		})
	}
}

// TestFaultDestinationTooSmall: an image larger than its destination is
// refused before the first write, from a pipe or a file, into a regular
// file that declares its size or a block device.
func TestFaultDestinationTooSmall(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "src.img")
	sparseFile(t, src, 8<<20)
	writeRandom(t, rand.New(rand.NewSource(61)), src, 0, 2<<20)
	img := filepath.Join(dir, "src.qcow2")
	exportToFile(t, img, "stream", "--source", src)

	dst := filepath.Join(dir, "dst.img")
	writeRandom(t, rand.New(rand.NewSource(62)), dst, 0, 1<<20)
	before := fileSum(t, dst)
	for _, args := range [][]string{
		{"serve", "--source", img, "--destination", dst, "--destination-size", fmt.Sprint(1 << 20)},
		{"serve", "--source", "file://" + img, "--destination", "file://" + dst, "--destination-size", fmt.Sprint(1 << 20), "--direct"},
	} {
		r := runTool(t, nil, args...)
		checkFailureLine(t, r.Code, string(r.Stderr), "larger")
		if fileSum(t, dst) != before {
			t.Fatalf("%v: a refused import changed the destination", args)
		}
	}
	// From a pipe: the header alone decides.
	f, err := os.Open(img)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	pr, pw := pipe(t)
	go func() { io.Copy(pw, f); pw.Close() }()
	p := startTool(t, pr, nil, "serve", "--destination", dst, "--destination-size", fmt.Sprint(1<<20))
	pr.Close()
	checkFailureLine(t, p.wait(t, 10*time.Second), p.stderr.String(), "larger")
	if fileSum(t, dst) != before {
		t.Fatal("a refused import from a pipe changed the destination")
	}

	back := filepath.Join(dir, "back.img")
	copyFile(t, dst, back)
	dev := loopDevice(t, back, false)
	for _, args := range [][]string{
		{"serve", "--source", img, "--destination", dev},
		{"serve", "--source", img, "--destination", dev, "--direct"},
		{"stream_decode", dev},
	} {
		var r result
		if args[0] == "stream_decode" {
			b, _ := os.ReadFile(img)
			r = runTool(t, b, args...)
		} else {
			r = runTool(t, nil, args...)
		}
		checkFailureLine(t, r.Code, string(r.Stderr), "larger")
		if fileSum(t, dev) != before || fileSum(t, back) != before {
			t.Fatalf("%v: a refused import changed the device", args)
		}
	}
}

// TestFaultNotDisks: paths that are not disks — a directory, a FIFO, a
// character device, a missing file — as an export's base and an import's
// source or destination: one line, promptly (opening a FIFO would block),
// nothing created.
func TestFaultNotDisks(t *testing.T) {
	dir := t.TempDir()
	ok := filepath.Join(dir, "ok.img")
	sparseFile(t, ok, 1<<20)
	writeRandom(t, rand.New(rand.NewSource(63)), ok, 0, 4096)
	img := filepath.Join(dir, "ok.qcow2")
	exportToFile(t, img, "stream", "--source", ok)
	fifo := filepath.Join(dir, "fifo")
	if err := mkfifo(fifo); err != nil {
		t.Fatal(err)
	}
	missing := filepath.Join(dir, "missing")
	cases := []struct {
		args []string
		want string
	}{
		{[]string{"stream", "--source", ok, "--relative-to", dir, "--destination", "null:"}, "directory"},
		{[]string{"stream", "--source", ok, "--relative-to", fifo, "--destination", "null:"}, "FIFO"},
		{[]string{"stream", "--source", ok, "--relative-to", "/dev/zero", "--destination", "null:"}, "character device"},
		{[]string{"stream", "--source", ok, "--relative-to", missing, "--destination", "null:"}, "no such file"},
		{[]string{"stream", "--source", fifo, "--destination", "null:"}, "FIFO"},
		{[]string{"serve", "--source", img, "--destination", dir}, "directory"},
		{[]string{"serve", "--source", img, "--destination", fifo}, "FIFO"},
		{[]string{"serve", "--source", img, "--destination", "/dev/null"}, "character device"},
		{[]string{"serve", "--source", img, "--destination", filepath.Join(missing, "x.img")}, "no such file"},
		{[]string{"serve", "--source", missing, "--destination", filepath.Join(dir, "new.img")}, "no such file"},
		{[]string{"serve", "--source", dir, "--destination", filepath.Join(dir, "new.img")}, "directory"},
		{[]string{"stream_decode", fifo}, "FIFO"},
		{[]string{"stream_decode", dir}, "directory"},
	}
	for _, c := range cases {
		t.Run(strings.ReplaceAll(strings.Join(c.args, " "), dir, "DIR"), func(t *testing.T) {
			in, err := os.Open(img)
			if err != nil {
				t.Fatal(err)
			}
			defer in.Close()
			p := startTool(t, in, nil, c.args...)
			checkFailureLine(t, p.wait(t, 5*time.Second), p.stderr.String(), c.want)
			if _, err := os.Stat(filepath.Join(dir, "new.img")); err == nil {
				t.Fatal("a refused import created its destination")
			}
		})
	}
}

// TestFaultBaseOfAnotherSize: a base shorter or longer than the source is
// allowed (the missing tail of a shorter base reads as zeros); the diff,
// applied with our import on a copy of the base cut to the source's size,
// or read by qemu-img through its backing file, gives the source.
func TestFaultBaseOfAnotherSize(t *testing.T) {
	needQemu(t)
	dir := t.TempDir()
	r := rand.New(rand.NewSource(64))
	const size = 4<<20 + 4096
	src := filepath.Join(dir, "src.img")
	sparseFile(t, src, size)
	for off := int64(0); off < size; off += 256 << 10 {
		writeRandom(t, r, src, off, 8192)
	}
	for _, baseSize := range []int64{1<<20 + 512, 8 << 20} {
		t.Run(fmt.Sprint(baseSize), func(t *testing.T) {
			base := filepath.Join(dir, "base.img")
			os.Remove(base)
			sparseFile(t, base, baseSize)
			copyRange(t, src, base, min(baseSize, size))
			writeRandom(t, r, base, 1<<20-4096, 4096)    // src differs from base here
			writeRandom(t, r, base, baseSize-4096, 4096) // and in the base's tail
			diff := filepath.Join(dir, "diff.qcow2")
			exportToFile(t, diff, "stream", "--source", src, "--relative-to", base, "--backing-file", base)
			qemuCheck(t, diff)
			qemuCompare(t, diff, src)

			rebuilt := filepath.Join(dir, "rebuilt.img")
			copyFile(t, base, rebuilt)
			if err := os.Truncate(rebuilt, size); err != nil {
				t.Fatal(err)
			}
			mustRun(t, nil, "serve", "--delta", "--source", diff, "--destination", rebuilt)
			qemu(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", rebuilt, src)
		})
	}
}

// copyRange copies the first n bytes of from over to.
func copyRange(t testing.TB, from, to string, n int64) {
	t.Helper()
	b := readAt(t, from, 0, n)
	f, err := os.OpenFile(to, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(b, 0); err != nil {
		t.Fatal(err)
	}
}

// TestFaultTerminalRefused: a qcow2 image is never written to a terminal.
func TestFaultTerminalRefused(t *testing.T) {
	master, slave := openPty(t)
	src := filepath.Join(t.TempDir(), "src.img")
	fillFile(t, src, 1<<20)
	for _, args := range [][]string{
		{"stream", "--source", src},
		{"stream", "--source", src, "--destination", "stdout:"},
		{"stream", "--source", src, "--destination-fd", "1"},
		{"qcow2-to-stdout", src},
	} {
		t.Run(strings.Join(append(args[:1:1], args[min(3, len(args)):]...), " "), func(t *testing.T) {
			p := startTool(t, nil, slave, args...)
			checkFailureLine(t, p.wait(t, 5*time.Second), p.stderr.String(), "terminal")
			// One Fd call: os.File.Fd puts the descriptor back in
			// blocking mode.
			fd := int(master.Fd())
			if err := unix.SetNonblock(fd, true); err != nil {
				t.Fatal(err)
			}
			buf := make([]byte, 4096)
			n, err := unix.Read(fd, buf)
			if n > 0 {
				t.Fatalf("%d bytes written to the terminal: %q", n, buf[:n])
			}
			if err != unix.EAGAIN {
				t.Fatalf("reading the pty master: %v", err)
			}
		})
	}
}

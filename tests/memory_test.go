package tests

// No input kills the process: hostile images and streams run through the
// binary under a 1 GiB address-space cap (prlimit --as, the cap OpenStack
// puts on qemu-img for untrusted images) must end with exit 1 and one line,
// never with the Go runtime's "fatal error: out of memory", and with a
// peak RSS below 256 MiB (docs/RELIABILITY.md, "Resource bounds").

import (
	"encoding/binary"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

const (
	capAS   = 1 << 30   // the address-space cap of these tests
	rssMax  = 256 << 20 // the peak RSS every input stays below
	hostile = "../qcow/testdata/hostile"
)

// capped returns the prefix that runs the binary under GNU time (peak RSS
// into rssFile) and prlimit --as=1GiB; it skips, visibly, without prlimit.
func capped(t *testing.T, rssFile string) []string {
	t.Helper()
	var prefix []string
	if p, err := exec.LookPath("time"); err == nil && filepath.IsAbs(p) {
		prefix = append(prefix, p, "-f", "%M", "-o", rssFile, "--")
	} else {
		t.Log("GNU time not installed: peak RSS not measured")
	}
	p, err := exec.LookPath("prlimit")
	if err != nil {
		t.Skip("SKIP: prlimit not installed (util-linux)")
	}
	return append(prefix, p, fmt.Sprintf("--as=%d", capAS), "--")
}

// feed writes head, then filler zero bytes, then tail into w, as fast as a
// pipe takes them, and closes w; it stops quietly when the reader goes.
func feed(w *os.File, head []byte, filler int64, tail []byte) {
	defer w.Close()
	if _, err := w.Write(head); err != nil {
		return
	}
	zeros := make([]byte, 1<<20)
	for filler > 0 {
		n, err := w.Write(zeros[:min(filler, int64(len(zeros)))])
		if err != nil {
			return
		}
		filler -= int64(n)
	}
	w.Write(tail)
}

// runCapped runs the binary under the cap with stdin from a generator
// (nil: /dev/null) and returns its status, stderr and peak RSS.
func runCapped(t *testing.T, prefix []string, rssFile string, gen func(w *os.File), args ...string) (int, string, int64) {
	t.Helper()
	var stdin *os.File
	if gen != nil {
		r, w := pipe(t)
		stdin = r
		go gen(w)
	}
	p := startLimited(t, prefix, stdin, args...)
	if stdin != nil {
		stdin.Close()
	}
	code := p.wait(t, 60*time.Second)
	return code, p.stderr.String(), readRSS(t, rssFile)
}

// checkCapped asserts exit 1, one line, no runtime error, RSS in bounds.
func checkCapped(t *testing.T, code int, stderr string, rss int64, want ...string) {
	t.Helper()
	if strings.Contains(stderr, "fatal error") || strings.Contains(stderr, "runtime:") {
		t.Fatalf("the Go runtime died: %q", stderr)
	}
	if code != 1 {
		t.Fatalf("exit %d, want 1; stderr %q", code, stderr)
	}
	checkFailureLine(t, code, stderr, want...)
	if rss > rssMax {
		t.Fatalf("peak RSS %d MiB, bound %d MiB", rss>>20, rssMax>>20)
	}
}

// TestCapHostileCorpus: every image of qcow/testdata/hostile, imported
// from a pipe and from a file (serve, stream_decode) and inspected (info,
// check), under the cap.
func TestCapHostileCorpus(t *testing.T) {
	files, err := filepath.Glob(filepath.Join(hostile, "*.qcow2"))
	if err != nil || len(files) < 50 {
		t.Fatalf("hostile corpus missing (%d files, %v)", len(files), err)
	}
	dir := t.TempDir()
	rssFile := filepath.Join(dir, "rss")
	prefix := capped(t, rssFile)
	dst := filepath.Join(dir, "dst.img")
	var peak int64
	for _, f := range files {
		img, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		name := strings.TrimSuffix(filepath.Base(f), ".qcow2")
		stream := func(w *os.File) { feed(w, img, 0, nil) }
		for _, c := range []struct {
			mode string
			gen  func(*os.File)
			args []string
			// import: exit 1; support commands report a damaged image
			// with their own status (check: 2 or 3), never a crash
			support bool
		}{
			{"serve-pipe", stream, []string{"serve", "--destination", dst, "--destination-size", "1073741824"}, false},
			{"serve-file", nil, []string{"serve", "--source", f, "--destination", dst, "--destination-size", "1073741824"}, false},
			{"stream_decode", stream, []string{"stream_decode", dst}, false},
			{"info-file", nil, []string{"info", f}, true},
			{"check-stream", stream, []string{"check", "-"}, true},
			{"map-stream", stream, []string{"map", "--output=json", "-"}, true},
		} {
			os.Remove(dst)
			code, stderr, rss := runCapped(t, prefix, rssFile, c.gen, c.args...)
			peak = max(peak, rss)
			t.Run(name+"/"+c.mode, func(t *testing.T) {
				if c.mode == "stream_decode" && name == "backing_refused" {
					// stream_decode applies a diff: a backing file is
					// what a diff has.
					if code != 0 {
						t.Fatalf("exit %d: %q", code, stderr)
					}
					return
				}
				if !c.support {
					checkCapped(t, code, stderr, rss)
					return
				}
				if strings.Contains(stderr, "fatal error") || strings.Contains(stderr, "goroutine ") || code == 2 && strings.Contains(stderr, "see --help") {
					t.Fatalf("exit %d: %q", code, stderr)
				}
				if rss > rssMax {
					t.Fatalf("peak RSS %d MiB", rss>>20)
				}
			})
		}
	}
	t.Logf("peak RSS over the hostile corpus: %d MiB", peak>>20)
}

// iotest272 builds the image of qemu's iotest 272 with qemu-img and
// qemu-io: 2 MiB clusters, refcount_bits=2, 64 MiB, the file extended to
// 4 GiB and its first refcount block saying every cluster is used, so that
// the compressed cluster written last (and its L2 table) land behind
// 4 GiB of bytes nothing references. It returns the stream's head (up to
// the end of the L1 table), the length of the filler and the tail.
func iotest272(t *testing.T, dir string) (head []byte, filler int64, tail []byte) {
	t.Helper()
	for _, tool := range []string{"qemu-img", "qemu-io"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("SKIP: %s not installed", tool)
		}
	}
	img := filepath.Join(dir, "272.qcow2")
	if out, err := exec.Command("qemu-img", "create", "-f", "qcow2", "-o", "cluster_size=2M,refcount_bits=2", img, "64M").CombinedOutput(); err != nil {
		t.Fatalf("qemu-img create: %v: %s", err, out)
	}
	f, err := os.OpenFile(img, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	word := func(off int64) int64 {
		b := make([]byte, 8)
		if _, err := f.ReadAt(b, off); err != nil {
			t.Fatal(err)
		}
		return int64(binary.BigEndian.Uint64(b))
	}
	refBlock := word(word(48))
	if err := f.Truncate(4 << 30); err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte(strings.Repeat("\x55", 512)), refBlock); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("qemu-io", "-c", "write -c -P 42 0 2M", img).CombinedOutput(); err != nil {
		t.Fatalf("qemu-io: %v: %s", err, out)
	}
	l1 := word(40)
	if l2 := uint64(word(l1)) &^ (1 << 63); l2 < 4<<30 {
		t.Fatalf("the L2 table is at %#x, not behind 4 GiB: qemu-io changed", l2)
	}
	st, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	head = make([]byte, l1+2<<20)
	tail = make([]byte, st.Size()-4<<30)
	if _, err := f.ReadAt(head, 0); err != nil {
		t.Fatal(err)
	}
	if _, err := f.ReadAt(tail, 4<<30); err != nil && err != io.EOF {
		t.Fatal(err)
	}
	return head, 4<<30 - int64(len(head)), tail
}

// TestCapIotest272: the iotest-272 stream into serve, 20 times: each run
// buffers up to the decoder's bound and is refused with one line; none
// may die in the runtime (6 of 20 did with a 256 MiB bound under 1 GiB).
// Then with --max-buffer: what fits the cap is refused by the bound, what
// does not is refused before reading.
func TestCapIotest272(t *testing.T) {
	dir := t.TempDir()
	head, filler, tail := iotest272(t, dir)
	rssFile := filepath.Join(dir, "rss")
	prefix := capped(t, rssFile)
	dst := filepath.Join(dir, "dst.img")
	gen := func(w *os.File) { feed(w, head, filler, tail) }
	var peak int64
	for i := range 20 {
		os.Remove(dst)
		code, stderr, rss := runCapped(t, prefix, rssFile, gen, "serve", "--destination", dst)
		peak = max(peak, rss)
		t.Run(fmt.Sprint("run", i), func(t *testing.T) {
			checkCapped(t, code, stderr, rss, "more than 67108864 bytes arrive before the tables")
		})
	}
	t.Logf("peak RSS %d MiB", peak>>20)
	code, stderr, rss := runCapped(t, prefix, rssFile, gen, "serve", "--destination", dst, "--max-buffer", fmt.Sprint(128<<20))
	checkCapped(t, code, stderr, rss, "more than 134217728 bytes arrive before the tables")
	code, stderr, _ = runCapped(t, prefix, rssFile, gen, "serve", "--destination", dst, "--max-buffer", fmt.Sprint(512<<20))
	if code != 2 || !strings.Contains(stderr, "does not fit the address-space limit") {
		t.Fatalf("--max-buffer 512 MiB under a 1 GiB cap: exit %d, %q", code, stderr)
	}
}

// spreadStream is a stream whose L1 table names 512 Ki L2 tables (the
// decoder's cap of pending references at the default bound), eight in
// each of 2^16 groups of 4096 host clusters (the host bitmaps' cap), none
// of which arrives: what follows the L1 is filler nothing references, so
// the decoder holds both bitmaps, every pending reference and then the
// buffer at their bounds at once.
func spreadStream() (head []byte, filler int64) {
	const (
		cb       = 9
		cs       = 1 << cb
		tables   = 512 << 10
		l1Offset = 2 * cs
		l1Bytes  = tables * 8
	)
	head = make([]byte, l1Offset+l1Bytes)
	be := binary.BigEndian
	be.PutUint32(head[0:], 0x514649fb)
	be.PutUint32(head[4:], 3)
	be.PutUint32(head[20:], cb)
	be.PutUint64(head[24:], tables*(cs/8)*cs) // virtual size: what the L1 maps
	be.PutUint32(head[36:], tables)
	be.PutUint64(head[40:], l1Offset)
	be.PutUint64(head[48:], cs) // refcount table at cluster 1, one cluster of zeros
	be.PutUint32(head[56:], 1)
	be.PutUint32(head[96:], 4)    // refcount order
	be.PutUint32(head[100:], 104) // header length
	for i := range tables {
		group, j := uint64(i/8+3), uint64(i%8) // groups from 3: past the L1
		be.PutUint64(head[l1Offset+8*i:], (group*4096+j)*cs)
	}
	return head, 256 << 20
}

// TestCapSpreadStream: the decoder at all its bounds at once, from a pipe,
// under the cap.
func TestCapSpreadStream(t *testing.T) {
	dir := t.TempDir()
	rssFile := filepath.Join(dir, "rss")
	prefix := capped(t, rssFile)
	head, filler := spreadStream()
	gen := func(w *os.File) { feed(w, head, filler, nil) }
	for _, args := range [][]string{
		{"serve", "--destination", filepath.Join(dir, "dst.img")},
		{"check", "-"},
		{"map", "-"},
	} {
		code, stderr, rss := runCapped(t, prefix, rssFile, gen, args...)
		t.Logf("%s: exit %d, peak RSS %d MiB: %s", args[0], code, rss>>20, strings.TrimSpace(stderr))
		if args[0] == "serve" {
			checkCapped(t, code, stderr, rss, "more than")
		} else if strings.Contains(stderr, "fatal error") || rss > rssMax {
			t.Fatalf("%s: exit %d, RSS %d MiB: %q", args[0], code, rss>>20, stderr)
		}
	}
}

// smallestCap is the address-space cap every command must run under: the
// Go runtime's floor (725 MiB, docs/RELIABILITY.md) and a little room. It
// fails when the build loses GOEXPERIMENT=norandomizedheapbase64 (imports
// then need 793 MiB), or when a dependency brings a large reservation.
const smallestCap = 760 << 20

// TestCapSmallest: every command, on a small disk and its image, under
// prlimit --as=760MiB, three times each.
func TestCapSmallest(t *testing.T) {
	p, err := exec.LookPath("prlimit")
	if err != nil {
		t.Skip("SKIP: prlimit not installed (util-linux)")
	}
	dir := t.TempDir()
	raw, img := filepath.Join(dir, "disk.raw"), filepath.Join(dir, "disk.qcow2")
	fillFile(t, raw, 24<<20)
	mustRun(t, nil, "stream", "--source", raw, "--destination", "file://"+img)
	out := filepath.Join(dir, "out")
	stdin := func() *os.File {
		f, err := os.Open(img)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { f.Close() })
		return f
	}
	for _, c := range []struct {
		name  string
		stdin bool
		args  []string
	}{
		{"version", false, []string{"--version"}},
		{"stream", false, []string{"stream", "--source", raw, "--destination", "file://" + out}},
		{"stream-direct", false, []string{"stream", "--source", raw, "--direct", "--destination", "file://" + out}},
		{"qcow2-to-stdout", false, []string{"qcow2-to-stdout", raw}},
		{"serve-stdin", true, []string{"serve", "--destination", out}},
		{"serve-file", false, []string{"serve", "--source", img, "--destination", out, "--direct"}},
		{"stream_decode", true, []string{"stream_decode", out}},
		{"info", false, []string{"info", img}},
		{"map", false, []string{"map", img}},
		{"check", false, []string{"check", img}},
		{"check-stream", true, []string{"check", "-"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			for range 3 {
				var in *os.File
				if c.stdin {
					in = stdin()
				}
				sink, err := os.Create(filepath.Join(dir, "stdout"))
				if err != nil {
					t.Fatal(err)
				}
				args := append([]string{fmt.Sprintf("--as=%d", smallestCap), "--", bin}, c.args...)
				q := startCmd(t, in, sink, args, p)
				code := q.wait(t, 60*time.Second)
				sink.Close()
				if code != 0 {
					t.Fatalf("exit %d under a %d MiB cap: %q", code, smallestCap>>20, q.stderr.String())
				}
			}
		})
	}
}

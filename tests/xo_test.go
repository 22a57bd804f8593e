package tests

// Xen Orchestra as a client, both ways: its npm package @xen-orchestra/qcow2
// (tests/xo: package.json, lockfile, xo.mjs) reads our exports the way XO
// reads xapi's GET /export_raw_vdi?format=qcow2, closes after the tables the
// way its NBD backups do, and writes the streams XO sends to
// PUT /import_raw_vdi?format=qcow2, which we import.

import (
	"bufio"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/xapi-project/xapi-qcow-tool/tests/qemutest"
)

// xoHarness returns the node binary and the harness script, or skips,
// visibly, when node (>= 20.18, the packages' engines) or the installed
// packages are missing (`npm ci` in tests/xo; .ci/deps runs it).
func xoHarness(t *testing.T) (node, script string) {
	t.Helper()
	node, err := exec.LookPath("node")
	if err != nil {
		t.Skip("SKIP: node not installed (Debian: apt-get install nodejs npm; then npm ci in tests/xo)")
	}
	out, err := exec.Command(node, "-p", "process.versions.node").Output()
	if err != nil {
		t.Skipf("SKIP: node -p process.versions.node: %v", err)
	}
	var major, minor int
	fmt.Sscanf(strings.TrimSpace(string(out)), "%d.%d", &major, &minor)
	if major < 20 || major == 20 && minor < 18 {
		t.Skipf("SKIP: node %s is older than Xen Orchestra's packages need (20.18)", strings.TrimSpace(string(out)))
	}
	dir, err := filepath.Abs("xo")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, "node_modules", "@xen-orchestra", "qcow2", "package.json")); err != nil {
		t.Skipf("SKIP: Xen Orchestra's packages are not installed: run npm ci in %s (bash .ci/deps does)", dir)
	}
	return node, filepath.Join(dir, "xo.mjs")
}

// xoSummary is what the harness prints after reading a stream.
type xoSummary struct {
	VirtualSize int64 `json:"virtualSize"`
	ClusterSize int64 `json:"clusterSize"`
	Blocks      int64 `json:"blocks"`
}

// xoRead runs an export (path args..., extra descriptors from 3 on) into a
// real pipe that XO's QcowStream reads, forward only, into the raw file
// out (a copy of the base for a diff, else empty).
func xoRead(t *testing.T, path string, extra []*os.File, out string, args ...string) xoSummary {
	t.Helper()
	node, script := xoHarness(t)
	r, w := pipe(t)
	exp := start(t, cmdSpec{path: path, args: args, stdout: w, extra: extra})
	xo := start(t, cmdSpec{path: node, args: []string{script, "read", "3", out}, extra: []*os.File{r}})
	r.Close()
	w.Close()
	if code := xo.wait(t, 60*time.Second); code != 0 {
		t.Fatalf("XO's QcowStream: exit %d: %s", code, xo.stderr.Bytes())
	}
	if code := exp.wait(t, 10*time.Second); code != 0 {
		t.Fatalf("%s %s: exit %d: %s", filepath.Base(path), strings.Join(args, " "), code, exp.stderr.Bytes())
	}
	var s xoSummary
	if err := json.Unmarshal(xo.stdout.Bytes(), &s); err != nil {
		t.Fatalf("XO's summary %q: %v", xo.stdout.Bytes(), err)
	}
	return s
}

// emptyFile creates an empty file and returns its path.
func emptyFile(t *testing.T, path string) string {
	t.Helper()
	sparseFile(t, path, 0)
	return path
}

// TestXOReadsOurExports: XO's QcowStream reads our full, diff, hinted and
// 2 MiB-cluster exports from a pipe, forward only (it throws on any
// backward read), and rebuilds the disk byte for byte; a diff is applied
// onto a copy of its base.
func TestXOReadsOurExports(t *testing.T) {
	xoHarness(t)
	dir := t.TempDir()
	const size = 20<<20 + 3584 // not a multiple of the cluster size
	base := filepath.Join(dir, "base.raw")
	sparseFile(t, base, size)
	rnd := newRand(91)
	for _, off := range []int64{0, 1 << 20, 3<<20 + 4096, 9 << 20, 16 << 20, size - 3584} {
		writeRandom(t, rnd, base, off, min(300<<10, size-off))
	}
	// The new disk: changed clusters, a new one, one that became zero,
	// and a changed tail.
	next := filepath.Join(dir, "next.raw")
	copyFile(t, base, next)
	writeRandom(t, rnd, next, 1<<20+8192, 100)
	writeRandom(t, rnd, next, 12<<20, 70<<10)
	zeroRange(t, next, 9<<20, 64<<10)
	writeRandom(t, rnd, next, size-512, 512)

	q2s := linkAs(t, "qcow2-to-stdout.py")
	for _, tc := range []struct {
		name string
		path string
		args []string
		cs   int64
	}{
		{"stream", bin, []string{"stream", "--source", next}, 64 << 10},
		{"stream-direct", bin, []string{"stream", "--source", next, "--direct"}, 64 << 10},
		{"stream-2MiB-clusters", bin, []string{"stream", "--source", next, "--cluster-size", fmt.Sprint(2 << 20)}, 2 << 20},
		{"qcow2-to-stdout", q2s, []string{next}, 64 << 10},
		{"qcow2-to-stdout-2MiB-clusters", q2s, []string{next, "-c", fmt.Sprint(2 << 20)}, 2 << 20},
	} {
		t.Run("full/"+tc.name, func(t *testing.T) {
			out := emptyFile(t, filepath.Join(t.TempDir(), "out.raw"))
			s := xoRead(t, tc.path, nil, out, tc.args...)
			if s.VirtualSize != size || s.ClusterSize != tc.cs {
				t.Fatalf("XO read a virtual size of %d in %d-byte clusters, want %d in %d", s.VirtualSize, s.ClusterSize, size, tc.cs)
			}
			sameFiles(t, out, next)
		})
	}
	for _, tc := range []struct {
		name string
		path string
		args []string
	}{
		{"stream-relative-to", bin, []string{"stream", "--source", next, "--relative-to", base}},
		{"qcow2-to-stdout-diff", q2s, []string{next, "--diff", base}},
	} {
		t.Run("diff/"+tc.name, func(t *testing.T) {
			out := filepath.Join(t.TempDir(), "copy-of-base.raw")
			copyFile(t, base, out)
			s := xoRead(t, tc.path, nil, out, tc.args...)
			if s.Blocks == 0 || s.Blocks > 8 {
				t.Fatalf("the diff has %d clusters, want the few that changed", s.Blocks)
			}
			sameFiles(t, out, next)
		})
	}
	t.Run("hinted/qcow2-to-stdout", func(t *testing.T) {
		qemutest.Need(t)
		d := t.TempDir()
		h := makeHintedImage(t, d, "vdi", 65536, 24<<20,
			[]string{"write -P 0x5a 0 200k", "write -P 0xa5 5M 64k", "write -P 0x33 23M 1M"}, []int64{10 << 20})
		want := filepath.Join(d, "want.raw")
		toRaw(t, h.qcow2, want)
		out := emptyFile(t, filepath.Join(d, "out.raw"))
		xoRead(t, q2s, []*os.File{hintPipe(t, h.mapJSON), hintPipe(t, h.infoJSON)}, out,
			h.raw, "--json-header-map", "3", "--json-header-info", "4")
		sameFiles(t, out, want)
	})
}

// TestXOClosesAfterTables: XO reads the header and the tables, then closes
// the stream (its NBD backups do). The export, blocked writing data into
// the pipe, ends within a second, non-zero, with one line saying the client
// went away, no panic, and a journal entry at notice priority (a client
// hanging up is not a storage error).
func TestXOClosesAfterTables(t *testing.T) {
	node, script := xoHarness(t)
	src := filepath.Join(t.TempDir(), "src.img")
	fillFile(t, src, 48<<20)
	for _, args := range [][]string{
		{"stream", "--source", src},
		{"stream", "--source", src, "--direct"},
		{"qcow2-to-stdout", src},
	} {
		t.Run(strings.Join(append(args[:1:1], args[min(3, len(args)):]...), " "), func(t *testing.T) {
			r, w := pipe(t)
			p, entries := startWithJournal(t, nil, w, args...)
			// XO's stdin stays open until the test is done with it; its
			// stdout says what it did, line by line.
			stdin, holdStdin := pipe(t)
			stdout, xoOut := pipe(t)
			xo := start(t, cmdSpec{path: node, args: []string{script, "tables", "3"}, stdin: stdin, stdout: xoOut, extra: []*os.File{r}})
			r.Close()
			w.Close()
			stdin.Close()
			xoOut.Close()
			xoErr := &xo.stderr
			lines := bufio.NewScanner(stdout)
			var s xoSummary
			if !lines.Scan() || json.Unmarshal(lines.Bytes(), &s) != nil {
				t.Fatalf("XO's summary: %q; stderr %s", lines.Text(), xoErr.Bytes())
			}
			if s.VirtualSize != 48<<20 || s.Blocks != 48<<20/65536 {
				t.Fatalf("XO read %+v from the tables", s)
			}
			if !lines.Scan() || lines.Text() != "closed" {
				t.Fatalf("XO did not close: %q; stderr %s", lines.Text(), xoErr.Bytes())
			}
			closed := time.Now()
			code := p.wait(t, 5*time.Second)
			if el := time.Since(closed); el > time.Second {
				t.Errorf("the export took %v to end after XO closed the stream, want < 1s", el)
			}
			checkFailureLine(t, code, p.stderr.String(), "client went away", "broken pipe")
			// XO was still running: the pipe was closed by close().
			holdStdin.Close()
			if code := xo.wait(t, 10*time.Second); code != 0 {
				t.Fatalf("XO: exit %d: %s", code, xoErr.Bytes())
			}
			var got journalEntry
			for deadline := time.Now().Add(time.Second); got == nil && time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
				for _, e := range entries() {
					if e["EXIT_STATUS"] == strconv.Itoa(code) {
						got = e
					}
				}
			}
			if got == nil {
				t.Fatal("no journal entry for the failure")
			}
			if got["PRIORITY"] != "5" || !strings.Contains(got["MESSAGE"], "client went away") {
				t.Fatalf("journal entry %v, want PRIORITY 5 (notice) saying the client went away", got)
			}
		})
	}
}

// xoWrite runs XO's toQcow2Stream of the raw file raw and returns its
// stdout, a pipe, for the import to read; wait waits for XO to end.
func xoWrite(t *testing.T, raw string) (stream *os.File, wait func() error) {
	t.Helper()
	node, script := xoHarness(t)
	r, w := pipe(t)
	xo := start(t, cmdSpec{path: node, args: []string{script, "write", raw}, stdout: w})
	w.Close()
	return r, func() error {
		if code := xo.wait(t, 60*time.Second); code != 0 {
			return fmt.Errorf("XO's toQcow2Stream: exit %d: %s", code, xo.stderr.Bytes())
		}
		return nil
	}
}

// TestXOStreamsImport: the streams XO's QcowStreamGenerator writes (version
// 2, 64 KiB clusters, the virtual size rounded up to 64 KiB) from sparse
// disks, aligned and not, import through serve (a pipe) and stream_decode
// (onto a file and a loop device of the disk's size) byte for byte: onto
// a device, or a file of a declared size, exactly the disk; a file that
// stream_decode writes grows to XO's rounded virtual size.
func TestXOStreamsImport(t *testing.T) {
	xoHarness(t)
	dir := t.TempDir()
	for _, size := range []int64{16 << 20, 16<<20 + 4096} { // aligned; unaligned as in XO #9411
		raw := filepath.Join(dir, fmt.Sprintf("disk-%d.raw", size))
		sparseFile(t, raw, size)
		rnd := newRand(size)
		for _, off := range []int64{0, 70 << 10, 5 << 20, 8<<20 + 512, size - 512} {
			writeRandom(t, rnd, raw, off, min(100<<10, size-off))
		}
		for _, tc := range []struct {
			name string
			dest func(t *testing.T) (dest, back string)
			args func(dest string) []string
			// grows: a file stream_decode writes has no size to keep: it
			// grows to XO's virtual size, zeros past the disk's end.
			grows bool
		}{
			{"serve-new-file", func(t *testing.T) (string, string) {
				p := filepath.Join(t.TempDir(), "vdi.img")
				return p, p
			}, func(d string) []string {
				return []string{"serve", "--source", "stdin:", "--destination", "file://" + d, "--destination-size", fmt.Sprint(size)}
			}, false},
			{"serve-loop-direct", func(t *testing.T) (string, string) {
				p := filepath.Join(t.TempDir(), "vdi.img")
				fill(t, p, size, 0xAA)
				return loopDevice(t, p, false), p
			}, func(d string) []string {
				return []string{"serve", "--source-fd", "0", "--destination", "file://" + d, "--direct"}
			}, false},
			{"stream_decode-file", func(t *testing.T) (string, string) {
				p := filepath.Join(t.TempDir(), "vdi.img")
				sparseFile(t, p, size)
				return p, p
			}, func(d string) []string { return []string{"stream_decode", d} }, true},
			{"stream_decode-loop", func(t *testing.T) (string, string) {
				p := filepath.Join(t.TempDir(), "vdi.img")
				sparseFile(t, p, size)
				return loopDevice(t, p, false), p
			}, func(d string) []string { return []string{"stream_decode", d} }, false},
		} {
			t.Run(fmt.Sprintf("%d/%s", size, tc.name), func(t *testing.T) {
				dest, back := tc.dest(t)
				stream, wait := xoWrite(t, raw)
				p := startTool(t, stream, nil, tc.args(dest)...)
				stream.Close()
				code := p.wait(t, 60*time.Second)
				if err := wait(); err != nil {
					t.Fatal(err)
				}
				if code != 0 {
					t.Fatalf("%s: exit %d: %s", strings.Join(tc.args(dest), " "), code, p.stderr.String())
				}
				want := raw
				if tc.grows && size%(64<<10) != 0 {
					want = filepath.Join(t.TempDir(), "want.raw")
					copyFile(t, raw, want)
					if err := os.Truncate(want, (size+64<<10-1)&^(64<<10-1)); err != nil {
						t.Fatal(err)
					}
				}
				sameFiles(t, back, want)
			})
		}
	}
}

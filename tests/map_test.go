package tests

// map judged by qemu-img map, byte for byte: the JSON layout and the human
// layout, on qemu's iotests corpus (runIotestCase calls judgeMap), on an
// image of over a million runs (as a file and from a pipe, with peak RSS
// bounded), and on VHDs; a closed stdout ends the walk with one line.

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/xapi-project/xapi-qcow-tool/tests/qemutest"
)

// qemuMapAlone runs qemu-img map on img with its backing file not opened
// (what our map describes), in layout out ("json" or "human"); ok is false
// where qemu-img fails.
func qemuMapAlone(img, out string) (stdout []byte, ok bool) {
	abs, _ := filepath.Abs(img)
	spec := fmt.Sprintf(`json:{"driver":"qcow2","backing":null,"file":{"driver":"file","filename":%q}}`, abs)
	cmd := exec.Command("qemu-img", "map", "--output="+out, spec)
	cmd.Stderr = nil
	b, err := cmd.Output()
	return b, err == nil
}

// judgeMap compares our map of img with qemu-img's, byte for byte in both
// layouts, wherever both map it (a damaged image we refuse with one line);
// it returns what it found, for the iotests row's log line. Ranges left to
// a backing file are at depth 1 in ours, unopened (zero) in qemu's: both
// are compared after that rewrite, merged again.
func judgeMap(t *testing.T, img string, valid bool) string {
	t.Helper()
	abs, _ := filepath.Abs(img)
	want, ok := qemuMapAlone(abs, "json")
	ours := runTool(t, nil, "map", "--output=json", abs)
	if !ok {
		return fmt.Sprintf("qemu-img map fails, ours exits %d", ours.Code)
	}
	if ours.Code != 0 && valid {
		t.Fatalf("map: exit %d on a valid image: %s", ours.Code, ours.Stderr)
	}
	if ours.Code != 0 {
		// A damaged image (or a feature we refuse: an external data file)
		// qemu maps anyway: refused with one line, nothing on stdout.
		checkOneLineError(t, ours, "map: ")
		return "map: refused where qemu-img maps"
	}
	got := ours.Stdout
	if bytes.Contains(got, []byte(`"depth": 1`)) {
		// Ranges left to the backing file: qemu-img without it reads them
		// as zeros (with the host offset of an allocated cluster's
		// unallocated subclusters, which at depth 1 ours leaves out).
		norm := func(m []qemutest.MapEntry) []byte {
			for i := range m {
				if m[i].Depth == 1 {
					m[i].Depth, m[i].Zero = 0, true
				}
				if !m[i].Data {
					m[i].Offset = nil
				}
			}
			return mapJSON(remerge(m))
		}
		got, want = norm(qemutest.ParseMap(t, "map", got)), norm(qemutest.ParseMap(t, "qemu-img map", want))
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("map --output=json differs from qemu-img map:\nours:\n%s\nqemu-img:\n%s", got, want)
	}
	// The human layout: qemu-img's, where qemu-img prints it; it refuses
	// data without an offset (compressed), which ours lists as such.
	compressed := bytes.Contains(got, []byte(`"data": true}`))
	wantHuman, ok := qemuMapAlone(abs, "human")
	gotHuman := mustRun(t, nil, "map", abs)
	human := "human equal"
	switch {
	case ok && !bytes.Equal(gotHuman, wantHuman):
		t.Fatalf("map differs from qemu-img map:\nours:\n%s\nqemu-img:\n%s", gotHuman, wantHuman)
	case !ok && !compressed:
		t.Fatalf("qemu-img map refuses the human layout of an image without compressed clusters")
	case !ok && !bytes.Contains(gotHuman, []byte("compressed      "+abs+"\n")):
		t.Fatalf("map lists no compressed extent:\n%s", gotHuman)
	case !ok:
		human = "human: qemu-img refuses compressed clusters, ours lists them"
	}
	return fmt.Sprintf("map: json equal, %s", human)
}

// mapJSON prints a map in qemu-img's layout.
func mapJSON(m []qemutest.MapEntry) []byte {
	var out bytes.Buffer
	out.WriteString("[")
	for i, e := range m {
		if i > 0 {
			out.WriteString(",\n")
		}
		fmt.Fprintf(&out, `{ "start": %d, "length": %d, "depth": %d, "present": %t, "zero": %t, "data": %t`, e.Start, e.Length, e.Depth, e.Present, e.Zero, e.Data)
		if e.Offset != nil {
			fmt.Fprintf(&out, `, "offset": %d`, *e.Offset)
		}
		out.WriteString("}")
	}
	out.WriteString("]\n")
	return out.Bytes()
}

// fragmented makes a qcow2 image of size bytes in 512-byte clusters with
// every other cluster allocated: one map entry per cluster. qemu-img
// create lays out the header and the L1 table; the L2 tables are appended
// the way qemu lays out files, each just before its data clusters, or with
// tablesFirst all before the data, as this tool's export lays out streams.
// The data clusters are left as holes (map reads no data, and with the
// refcounts left as created, qemu and we see no metadata preallocation and
// report them as data). Writing it with qemu-io takes minutes; this takes
// a blink.
func fragmented(t testing.TB, dir string, size int64, tablesFirst bool) string {
	t.Helper()
	const cs, per = 512, 512 / 8
	img := filepath.Join(dir, fmt.Sprintf("frag-%d-%t.qcow2", size, tablesFirst))
	qemutest.Img(t, "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", img, fmt.Sprint(size))
	f, err := os.OpenFile(img, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	end, err := f.Seek(0, io.SeekEnd)
	if err != nil {
		t.Fatal(err)
	}
	end = (end + cs - 1) / cs * cs
	l1Off := int64(peekBE(t, img, 40, 8))
	tables := size / (cs * per)
	l1 := make([]byte, tables*8)
	l2 := make([]byte, cs)
	data := end + tables*cs // tablesFirst: the data after every table
	for i := range tables {
		at := end + i*cs
		if !tablesFirst {
			at = end + i*(1+per/2)*cs
			data = at + cs
		}
		binary.BigEndian.PutUint64(l1[i*8:], uint64(at)|1<<63)
		clear(l2)
		for j := 0; j < per; j += 2 {
			binary.BigEndian.PutUint64(l2[j*8:], uint64(data)|1<<63)
			data += cs
		}
		if _, err := f.WriteAt(l2, at); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := f.WriteAt(l1, l1Off); err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(data); err != nil {
		t.Fatal(err)
	}
	return img
}

// TestMapFragmented: an image of over a million runs (512 MiB of 512-byte
// clusters, every other one allocated) maps as qemu-img maps it, from the
// file and from a pipe, in both layouts, with a peak RSS that does not grow
// with the runs; a stream with its tables first is put back in guest order.
func TestMapFragmented(t *testing.T) {
	qemutest.Need(t)
	dir := t.TempDir()
	const size = 512 << 20 // 1 Mi clusters: 2^20 runs
	img := fragmented(t, dir, size, false)
	// As this tool exports it: the stream decoder holds every data run
	// until the data comes, and map every range between them (up to the
	// decoder's bound of 2^19 references; here 2^16).
	exported := fragmented(t, dir, 64<<20, true)
	qemus := map[string][]byte{}
	rss := filepath.Join(dir, "rss")
	prefix := capped(t, rss)
	for _, c := range []struct {
		name   string
		img    string
		layout string
		pipe   bool
		maxRSS int64
	}{
		{"file json", img, "json", false, mapRSSMax},
		{"file human", img, "human", false, mapRSSMax},
		{"pipe json", img, "json", true, mapRSSMax},
		{"pipe json, tables first", exported, "json", true, mapRSSMax},
	} {
		img := c.img
		want, ok := qemus[img+c.layout]
		if !ok {
			if want, ok = qemuMapAlone(img, c.layout); !ok {
				t.Fatal("qemu-img map fails")
			}
			qemus[img+c.layout] = want
		}
		if n := bytes.Count(want, []byte("\n")); c.name == "file json" && n < 1<<20 {
			t.Fatalf("the image has %d runs, want over a million", n)
		}
		out := filepath.Join(dir, "out")
		f := createFile(t, out)
		path := img
		var stdin *os.File
		if c.pipe {
			path = "-"
			r, w := pipe(t)
			stdin = r
			go func() {
				defer w.Close()
				src, err := os.Open(img)
				if err == nil {
					src.WriteTo(w)
					src.Close()
				}
			}()
		}
		p := startCmd(t, stdin, f, append(prefix, bin, "map", "--output="+c.layout, path), prefix[0])
		if stdin != nil {
			stdin.Close()
		}
		code := p.wait(t, 120*time.Second)
		f.Close()
		if code != 0 {
			t.Fatalf("%s: exit %d: %s", c.name, code, p.stderr.String())
		}
		got := readFile(t, out)
		if !bytes.Equal(got, want) {
			i := 0
			for i < min(len(got), len(want)) && got[i] == want[i] {
				i++
			}
			t.Fatalf("%s: differs from qemu-img map at byte %d:\nours %q\nqemu %q", c.name, i, got[i:min(len(got), i+200)], want[i:min(len(want), i+200)])
		}
		r := readRSS(t, rss)
		t.Logf("%s: %d entries, peak RSS %d MiB", c.name, bytes.Count(got, []byte("\n")), r>>20)
		if r > c.maxRSS {
			t.Fatalf("%s: peak RSS %d MiB, bound %d MiB", c.name, r>>20, c.maxRSS>>20)
		}
	}
}

// mapRSSMax bounds map's peak RSS whatever the number of runs: the Go
// runtime, one L2 table and a 64 KiB output buffer. A stream laid out as
// qemu lays out files adds nothing; one with every table first holds its
// pending runs (the decoder's bound: 2^19 of them, under 100 MiB with
// map's share; the test's 2^16 stay well under this).
const mapRSSMax = 48 << 20

// TestMapClosedStdout: a reader that goes away (map | head) ends the walk
// at once with one line naming the write, exit 1.
func TestMapClosedStdout(t *testing.T) {
	qemutest.Need(t)
	dir := t.TempDir()
	img := qemutest.Create(t, filepath.Join(dir, "a.qcow2"), "cluster_size=512", "64M")
	var script strings.Builder
	for off := 0; off < 64<<20; off += 1 << 14 {
		fmt.Fprintf(&script, "-c\x00write -q %d 512\x00", off)
	}
	args := append([]string{"-f", "qcow2"}, strings.Split(strings.TrimSuffix(script.String(), "\x00"), "\x00")...)
	qemutest.Run(t, "qemu-io", append(args, img)...)
	r, w := pipe(t)
	r.Close() // nobody reads
	p := startTool(t, nil, w, "map", "--output=json", img)
	w.Close()
	code := p.wait(t, 30*time.Second)
	checkOneLineError(t, result{Stderr: p.stderr.Bytes(), Code: code}, "writing the map to stdout")
	if code != 1 || !strings.Contains(p.stderr.String(), "broken pipe") {
		t.Fatalf("exit %d, stderr %q", code, p.stderr.String())
	}
}

// TestMapVHDHuman: the human layout of a VHD's map is qemu-img map -f vpc's.
func TestMapVHDHuman(t *testing.T) {
	qemutest.Need(t)
	dir := t.TempDir()
	for _, opts := range []string{"subformat=dynamic", "subformat=fixed"} {
		img := filepath.Join(dir, strings.TrimPrefix(opts, "subformat=")+".vhd")
		qemutest.Img(t, "create", "-q", "-f", "vpc", "-o", opts+",force_size=on", img, "12M")
		qemutest.Run(t, "qemu-io", "-f", "vpc", "-c", "write -P 1 0 4k", "-c", "write -P 2 2M 3M", "-c", "write 9M 512", img)
		for _, layout := range []string{"human", "json"} {
			want := qemutest.Img(t, "map", "-f", "vpc", "--output="+layout, img)
			if got := mustRun(t, nil, "map", "--output="+layout, img); !bytes.Equal(got, want) {
				t.Fatalf("%s %s:\nours:\n%s\nqemu-img:\n%s", opts, layout, got, want)
			}
		}
	}
}

// TestMapEmptyImage: a disk of 0 bytes maps as qemu-img maps it: one empty
// entry in JSON, the heading alone in the human layout.
func TestMapEmptyImage(t *testing.T) {
	qemutest.Need(t)
	img := qemutest.Create(t, filepath.Join(t.TempDir(), "empty.qcow2"), "", "0")
	for _, layout := range []string{"json", "human"} {
		want := qemutest.Img(t, "map", "--output="+layout, img)
		if got := mustRun(t, nil, "map", "--output="+layout, img); !bytes.Equal(got, want) {
			t.Errorf("%s:\nours:\n%s\nqemu-img:\n%s", layout, got, want)
		}
	}
}

package tests

import (
	"bufio"
	"encoding/json"
	"fmt"
	"math/rand"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/xapi-project/xapi-qcow-tool/tests/qemutest"
	"github.com/xapi-project/xapi-qcow-tool/tests/vhdtest"
)

// vhdCorpus is the VHD package's hostile corpus (built by its
// corpus_test.go): each image with check's exit status and a piece of the
// line its finding prints.
const vhdCorpus = "../vhdcompat/vhd/testdata/check"

// TestCheckVHDCorpus: `check` on every image of the corpus, as a user runs
// it: the exit status, the finding on a line of its own naming its offset,
// nothing but findings for a clean image, and the same counts in JSON.
func TestCheckVHDCorpus(t *testing.T) {
	f, err := os.Open(filepath.Join(vhdCorpus, "MANIFEST"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	n := 0
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || line[0] == '#' {
			continue
		}
		p := strings.SplitN(line, "|", 4)
		var exit int
		fmt.Sscan(p[1], &exit)
		args := []string{"check"}
		if p[2] != "" {
			var dirs []string
			for _, d := range strings.Split(p[2], ":") {
				dirs = append(dirs, filepath.Join(vhdCorpus, d))
			}
			args = append(args, "--path", strings.Join(dirs, ":"))
		}
		img := filepath.Join(vhdCorpus, p[0])
		n++
		t.Run(p[0], func(t *testing.T) {
			r := runTool(t, nil, append(args, img)...)
			out := string(r.Stdout) + string(r.Stderr)
			if r.Code != exit || !strings.Contains(out, p[3]) {
				t.Fatalf("exit %d:\n%s\nwant exit %d and %q", r.Code, out, exit, p[3])
			}
			if exit == 1 && p[3] == "not a VHD image" {
				return // no VHD: checked as qcow2, refused in one line
			}
			lines := 0
			for _, l := range strings.Split(string(r.Stdout), "\n") {
				if strings.HasPrefix(l, "ERROR: ") || strings.HasPrefix(l, "Warning: ") || strings.HasPrefix(l, "Check error: ") {
					lines++
					if !strings.Contains(l, "offset 0x") && !strings.Contains(l, "parent") && !strings.Contains(l, "loop") {
						t.Errorf("finding names no offset: %q", l)
					}
				}
			}
			if p[3] == "" && lines > 0 {
				t.Fatalf("a clean image has findings:\n%s", r.Stdout)
			}
			if p[3] != "" && lines == 0 {
				t.Fatalf("no finding line:\n%s", r.Stdout)
			}
			j := runTool(t, nil, append(append(args, "--output=json"), img)...)
			var res struct {
				Format      string `json:"format"`
				Corruptions int    `json:"corruptions"`
				CheckErrors int    `json:"check-errors"`
				Findings    []struct {
					Severity, Message string
					Offset            *int64
				} `json:"findings"`
			}
			if err := json.Unmarshal(j.Stdout, &res); err != nil || j.Code != exit || res.Format != "vpc" || len(res.Findings) != lines {
				t.Fatalf("json (exit %d, %v): %s", j.Code, err, j.Stdout)
			}
		})
	}
	if n < 40 {
		t.Fatalf("%d cases", n)
	}
}

// TestHybridTap01BitmapsAt512: an image of tap 0.1 keeps its sector
// bitmaps least significant bit first; exported sector by sector
// (--cluster-size 512) it gives the device's data exactly, where reading
// the bitmaps the other way round would export other sectors.
func TestHybridTap01BitmapsAt512(t *testing.T) {
	qemutest.Need(t)
	dir := t.TempDir()
	const size = 4 << 20
	im := vhdtest.New(size)
	im.CreatorVersion = 1 // tap 0.1
	raw := filepath.Join(dir, "disk.raw")
	sparseFile(t, raw, size)
	rf, err := os.OpenFile(raw, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	r := rand.New(rand.NewSource(21))
	// Single sectors where the two bit orders differ (1 and 6 swap), a
	// run across a byte, and one in the second block.
	want := [][2]int64{{512, 512}, {7 * 512, 3 * 512}, {40 * 512, 512}, {2<<20 + 9*512, 512}}
	for _, w := range want {
		b := make([]byte, w[1])
		r.Read(b)
		im.Write(w[0], b)
		if _, err := rf.WriteAt(b, w[0]); err != nil {
			t.Fatal(err)
		}
	}
	rf.Close()
	img := filepath.Join(dir, "tap01.vhd")
	if err := im.Save(img); err != nil {
		t.Fatal(err)
	}
	dev := loopDevice(t, raw, false)
	out := filepath.Join(dir, "out.qcow2")
	exportToFile(t, out, "stream", "--source-format", "hybrid", "--source", dev+":"+img, "--cluster-size", "512")
	qemutest.Compare(t, out, raw)
	if got := dataExtents(t, out); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("the export stores %v, want %v", got, want)
	}
	// check notes the bit order, and passes the image.
	c := runTool(t, nil, "check", img)
	if c.Code != 0 || !strings.Contains(string(c.Stdout), "least significant bit first") {
		t.Fatalf("check: exit %d: %s", c.Code, c.Stdout)
	}
}

// TestHybridSmallBlocks: blocks of 512 bytes and 2 KiB (the specification
// allows any power of two of sectors; their bitmap is padded to a sector,
// as blktap's libvhd pads it) are read, and exported at --cluster-size 512
// equal to the device.
func TestHybridSmallBlocks(t *testing.T) {
	qemutest.Need(t)
	for _, bs := range []uint32{512, 2048} {
		t.Run(fmt.Sprint(bs), func(t *testing.T) {
			dir := t.TempDir()
			const size = 1 << 20
			im := vhdtest.New(size)
			im.BlockSize = bs
			raw := filepath.Join(dir, "disk.raw")
			sparseFile(t, raw, size)
			rf, err := os.OpenFile(raw, os.O_WRONLY, 0)
			if err != nil {
				t.Fatal(err)
			}
			r := rand.New(rand.NewSource(int64(bs)))
			want := [][2]int64{{0, 512}, {3 * 512, 2 * 512}, {100 * 512, 9 * 512}, {size - 512, 512}}
			for _, w := range want {
				b := make([]byte, w[1])
				r.Read(b)
				im.Write(w[0], b)
				if _, err := rf.WriteAt(b, w[0]); err != nil {
					t.Fatal(err)
				}
			}
			rf.Close()
			img := filepath.Join(dir, "small.vhd")
			if err := im.Save(img); err != nil {
				t.Fatal(err)
			}
			dev := loopDevice(t, raw, false)
			out := filepath.Join(dir, "out.qcow2")
			exportToFile(t, out, "stream", "--source-format", "hybrid", "--source", dev+":"+img, "--cluster-size", "512")
			qemutest.Compare(t, out, raw)
			if got := dataExtents(t, out); fmt.Sprint(got) != fmt.Sprint(want) {
				t.Fatalf("the export stores %v, want %v", got, want)
			}
		})
	}
}

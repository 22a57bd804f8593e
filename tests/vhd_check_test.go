package tests

import (
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
	for _, c := range vhdtest.ReadManifest(t, vhdCorpus, 40) {
		args := []string{"check"}
		if len(c.Search) > 0 {
			var dirs []string
			for _, d := range c.Search {
				dirs = append(dirs, filepath.Join(vhdCorpus, d))
			}
			args = append(args, "--path", strings.Join(dirs, ":"))
		}
		img := filepath.Join(vhdCorpus, c.Path)
		t.Run(c.Path, func(t *testing.T) {
			r := runTool(t, nil, append(args, img)...)
			out := string(r.Stdout) + string(r.Stderr)
			if r.Code != c.Exit || !strings.Contains(out, c.Want) {
				t.Fatalf("exit %d:\n%s\nwant exit %d and %q", r.Code, out, c.Exit, c.Want)
			}
			if c.Exit == 1 && c.Want == "not a VHD image" {
				return // no VHD: checked as qcow2, refused in one line
			}
			lines := 0
			for _, l := range strings.Split(string(r.Stdout), "\n") {
				if strings.HasPrefix(l, "ERROR: ") || strings.HasPrefix(l, "Warning: ") || strings.HasPrefix(l, "Check error: ") {
					lines++
					if !strings.Contains(l, "offset 0x") {
						t.Errorf("finding names no offset: %q", l)
					}
				}
			}
			if (c.Want == "") != (lines == 0) {
				t.Fatalf("%d finding lines, want %q:\n%s", lines, c.Want, r.Stdout)
			}
			j := runTool(t, nil, append(append(args, "--output=json"), img)...)
			var res struct {
				Format   string `json:"format"`
				Findings []struct {
					Severity, Message string
					Offset            *int64
				} `json:"findings"`
			}
			if err := json.Unmarshal(j.Stdout, &res); err != nil || j.Code != c.Exit || res.Format != "vpc" || len(res.Findings) != lines {
				t.Fatalf("json (exit %d, %v): %s", j.Code, err, j.Stdout)
			}
		})
	}
}

// exportAt512 writes the sectors want (random data) into im and into a raw
// file, exports the raw file on a loop device with the hybrid source over
// im at --cluster-size 512, and checks that the export reads as the device
// and stores exactly want. place, when not nil, puts the saved image where
// the host would have it (a volume) and returns that path. It returns the
// image's path.
func exportAt512(t *testing.T, im *vhdtest.Image, want [][2]int64, seed int64, place func(string) string) string {
	dir := t.TempDir()
	raw := filepath.Join(dir, "disk.raw")
	sparseFile(t, raw, im.Size)
	rf, err := os.OpenFile(raw, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	r := rand.New(rand.NewSource(seed))
	for _, w := range want {
		b := make([]byte, w[1])
		r.Read(b)
		im.Write(w[0], b)
		if _, err := rf.WriteAt(b, w[0]); err != nil {
			t.Fatal(err)
		}
	}
	rf.Close()
	img := filepath.Join(dir, "disk.vhd")
	if err := im.Save(img); err != nil {
		t.Fatal(err)
	}
	if place != nil {
		img = place(img)
	}
	dev := loopDevice(t, raw, false)
	out := filepath.Join(dir, "out.qcow2")
	exportToFile(t, out, "stream", "--source-format", "hybrid", "--source", dev+":"+img, "--cluster-size", "512")
	qemutest.Compare(t, out, raw)
	if got := dataExtents(t, out); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("the export stores %v, want %v", got, want)
	}
	return img
}

// TestHybridTap01BitmapsAt512: an image of tap 0.1 keeps its sector
// bitmaps least significant bit first; exported sector by sector
// (--cluster-size 512) it gives the device's data exactly, where reading
// the bitmaps the other way round would export other sectors.
func TestHybridTap01BitmapsAt512(t *testing.T) {
	qemutest.Need(t)
	im := vhdtest.New(4 << 20)
	im.CreatorVersion = 1 // tap 0.1
	// Single sectors where the two bit orders differ (1 and 6 swap), a
	// run across a byte, and one in the second block.
	img := exportAt512(t, im, [][2]int64{{512, 512}, {7 * 512, 3 * 512}, {40 * 512, 512}, {2<<20 + 9*512, 512}}, 21, nil)
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
			const size = 1 << 20
			im := vhdtest.New(size)
			im.BlockSize = bs
			exportAt512(t, im, [][2]int64{{0, 512}, {3 * 512, 2 * 512}, {100 * 512, 9 * 512}, {size - 512, 512}}, int64(bs), nil)
		})
	}
}

// TestHybridVHDInLargerVolume: on an LVHD SR the VHD is a logical volume
// larger than itself, its footer followed by whatever the volume held:
// the footer copy at offset 0 is read, check warns that none is at the
// end, and the hybrid source exports the VDI.
func TestHybridVHDInLargerVolume(t *testing.T) {
	qemutest.Need(t)
	var vol string
	exportAt512(t, vhdtest.New(4<<20), [][2]int64{{0, 4096}, {3<<20 + 512, 512}}, 22, func(img string) string {
		f, err := os.OpenFile(img, os.O_WRONLY|os.O_APPEND, 0)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := f.Write(make([]byte, 1<<20)); err != nil {
			t.Fatal(err)
		}
		f.Close()
		vol = loopDevice(t, img, false)
		return vol
	})
	c := runTool(t, nil, "check", vol)
	if c.Code != 0 || !strings.Contains(string(c.Stdout), "Warning: VHD footer at offset") || !strings.Contains(string(c.Stdout), "no footer at the end of the image") {
		t.Fatalf("check %s: exit %d: %s%s", vol, c.Code, c.Stdout, c.Stderr)
	}
}

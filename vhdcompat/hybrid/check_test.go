package hybrid

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/xapi-project/xapi-qcow-tool/tests/vhdtest"
)

// corpus is vhd's hostile corpus: each image with check's exit status and
// a piece of its finding (see vhd's corpus_test.go, which builds it).
const corpus = "../vhd/testdata/check"

// TestCorpusCheckAndRefusal: check gives every image of the corpus (and
// its chain) its finding and exit status, and the hybrid source's chain
// opener (with the walk of each layer's bitmaps) refuses exactly the
// images check calls corrupt, with the words of check's first corruption;
// a parent not found is refused naming the paths tried.
func TestCorpusCheckAndRefusal(t *testing.T) {
	for _, m := range vhdtest.ReadManifest(t, corpus, 40) {
		c := struct {
			path, want string
			exit       int
			search     []string
		}{filepath.Join(corpus, m.Path), m.Want, m.Exit, nil}
		for _, d := range m.Search {
			c.search = append(c.search, filepath.Join(corpus, d))
		}
		t.Run(m.Path, func(t *testing.T) {
			f, err := os.Open(c.path)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			fi, _ := f.Stat()
			res, err := CheckVHD(c.path, f, fi.Size(), c.search)
			var lines []string
			exit := 1
			switch {
			case err != nil:
				lines = []string{err.Error()}
			case res == nil:
				lines = []string{"not a VHD image"}
			default:
				exit = res.ExitCode()
				for _, f := range res.Findings {
					prefix := ""
					if f.Severity == "warning" {
						prefix = "Warning: "
					}
					lines = append(lines, prefix+f.Message)
				}
			}
			text := strings.Join(lines, "\n")
			if exit != c.exit || !strings.Contains(text, c.want) || (c.want == "" && len(lines) > 0) {
				t.Fatalf("exit %d, findings:\n%s\nwant exit %d and %q", exit, text, c.exit, c.want)
			}
			if res == nil {
				return
			}
			ch, oerr := Open(c.path, c.search)
			if oerr == nil {
				for _, l := range ch.Layers {
					if oerr = l.Walk(l.VirtualSize, func(int64, int64, Kind) error { return nil }); oerr != nil {
						break
					}
				}
				ch.Close()
			}
			switch exit {
			case 0:
				if oerr != nil {
					t.Fatalf("the hybrid source refuses an image check passes: %v", oerr)
				}
			case 1:
				var mp *MissingParentError
				if !errors.As(oerr, &mp) {
					t.Fatalf("the hybrid source says %v, want a missing parent", oerr)
				}
			case 2:
				first := ""
				for _, f := range res.Findings {
					if f.Severity == "corruption" {
						first = f.Message
						break
					}
				}
				if oerr == nil || !strings.Contains(oerr.Error(), first) {
					t.Fatalf("the hybrid source says %v, want check's first corruption %q", oerr, first)
				}
			}
		})
	}
}

// TestSearchGoesPastAnotherChainsFile: a file of the parent's name whose
// unique id is not the one the child names does not end the search; the
// true parent in a later --path directory is found, and when none fits,
// every candidate is named with its id.
func TestSearchGoesPastAnotherChainsFile(t *testing.T) {
	dir := t.TempDir()
	parent := vhdtest.New(4 * mib)
	parent.Write(0, fill(1, 4096))
	child := vhdtest.Child(parent, "p.vhd")
	child.Write(mib, fill(2, 4096))
	save(t, child, filepath.Join(dir, "vdi", "c.vhd"))
	save(t, vhdtest.New(4*mib), filepath.Join(dir, "vdi", "p.vhd"))
	save(t, vhdtest.New(4*mib), filepath.Join(dir, "a", "p.vhd"))
	save(t, parent, filepath.Join(dir, "b", "p.vhd"))
	top := filepath.Join(dir, "vdi", "c.vhd")
	c, err := Open(top, []string{filepath.Join(dir, "a"), filepath.Join(dir, "b")})
	if err != nil {
		t.Fatal(err)
	}
	if len(c.Layers) != 2 || c.Layers[1].Path != filepath.Join(dir, "b", "p.vhd") {
		t.Fatalf("layers %v", c.Layers)
	}
	c.Close()
	// libvhdi reads the chain found as the disk written.
	want := make([]byte, 4*mib)
	copy(want, fill(1, 4096))
	copy(want[mib:], fill(2, 4096))
	got, err := vhdtest.ReadWithLibvhdi(t, top, filepath.Join(dir, "b", "p.vhd"))
	if err != nil || got != fmt.Sprintf("%x", sha256.Sum256(want)) {
		t.Fatalf("libvhdi reads the chain found as %s (%v), not as written", got, err)
	}
	_, err = Open(top, []string{filepath.Join(dir, "a")})
	var wp *WrongParentError
	if !errors.As(err, &wp) || len(wp.Candidates) != 2 || !strings.Contains(err.Error(), filepath.Join(dir, "vdi", "p.vhd")) || !strings.Contains(err.Error(), filepath.Join(dir, "a", "p.vhd")) {
		t.Fatalf("no candidate fits: %v", err)
	}
}

// TestCheckDeepChain: check follows a chain to MaxDepth images and calls a
// deeper one corrupt, in the hybrid source's words.
func TestCheckDeepChain(t *testing.T) {
	deep := t.TempDir()
	prev := vhdtest.New(64 << 10)
	prev.BlockSize = 4096
	save(t, prev, filepath.Join(deep, "0.vhd"))
	for i := 1; i <= MaxDepth; i++ {
		im := vhdtest.Child(prev, fmt.Sprintf("%d.vhd", i-1))
		save(t, im, filepath.Join(deep, fmt.Sprintf("%d.vhd", i)))
		prev = im
	}
	for _, c := range []struct {
		top  int
		exit int
	}{{MaxDepth - 1, 0}, {MaxDepth, 2}} {
		p := filepath.Join(deep, fmt.Sprint(c.top, ".vhd"))
		f, _ := os.Open(p)
		fi, _ := f.Stat()
		res, err := CheckVHD(p, f, fi.Size(), nil)
		f.Close()
		if err != nil || res.ExitCode() != c.exit {
			t.Fatalf("chain of %d: %v %+v", c.top+1, err, res)
		}
		if c.exit == 2 && !strings.Contains(res.Findings[len(res.Findings)-1].Message, ErrTooDeep.Error()) {
			t.Fatalf("chain of %d: %+v", c.top+1, res.Findings)
		}
	}
}

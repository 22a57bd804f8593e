package vhdtest

import (
	"bufio"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// CorpusCase is one line of the MANIFEST of vhdcompat/vhd's hostile
// corpus (testdata/check): an image (the top of a chain for the chain
// cases, in a directory of their own), check's exit status, the --path of
// the chain cases, and a piece of the line its finding prints ("" for an
// image without any finding).
type CorpusCase struct {
	Path   string // relative to the corpus
	Exit   int
	Search []string // relative to the corpus
	Want   string
}

// ReadManifest parses dir/MANIFEST (lines path|exit|search|finding, # for
// comments) and fails the test when it holds fewer than min cases.
func ReadManifest(t testing.TB, dir string, min int) []CorpusCase {
	t.Helper()
	f, err := os.Open(filepath.Join(dir, "MANIFEST"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var out []CorpusCase
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || line[0] == '#' {
			continue
		}
		p := strings.SplitN(line, "|", 4)
		if len(p) != 4 {
			t.Fatalf("MANIFEST line %q", line)
		}
		c := CorpusCase{Path: p[0], Want: p[3]}
		if _, err := fmt.Sscan(p[1], &c.Exit); err != nil {
			t.Fatalf("MANIFEST line %q: %v", line, err)
		}
		for _, d := range strings.Split(p[2], ":") {
			if d != "" {
				c.Search = append(c.Search, d)
			}
		}
		out = append(out, c)
	}
	if len(out) < min {
		t.Fatalf("only %d cases in %s/MANIFEST", len(out), dir)
	}
	return out
}

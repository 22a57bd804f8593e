package qcow

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// The hostile-stream corpus is kept in testdata/hostile so that it is run
// as files, the way an operator would meet them, and so that other tools
// (the end-to-end tests, a fuzzer) can use it. Regenerate it with
//
//	XQT_UPDATE_HOSTILE=1 go test ./qcow -run TestHostileCorpusFiles
//
// after changing hostileCorpus or TestReaderTruncated's cut points.
const hostileDir = "testdata/hostile"

func writeHostileCorpus(t *testing.T) {
	base, _, l := hostileBase(t)
	os.RemoveAll(hostileDir)
	if err := os.MkdirAll(hostileDir, 0o755); err != nil {
		t.Fatal(err)
	}
	write := func(name string, b []byte) {
		if err := os.WriteFile(filepath.Join(hostileDir, name+".qcow2"), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	for _, m := range hostileCorpus() {
		write(m.name, m.mut(bytes.Clone(base), l))
	}
	cs := l.ClusterSize()
	for _, p := range []uint64{0, 71, cs - 1, l.RefcountBlockOffset, l.L1Offset + 8, l.L2Offset + 100, l.DataOffset + cs/2, uint64(len(base)) - 1} {
		write(fmt.Sprintf("truncated-at-%#x", p), base[:p])
	}
}

// TestHostileCorpusFiles: every image in testdata/hostile is refused by
// both decoders with one line, without panicking.
func TestHostileCorpusFiles(t *testing.T) {
	if os.Getenv("XQT_UPDATE_HOSTILE") != "" {
		writeHostileCorpus(t)
	}
	files, err := filepath.Glob(filepath.Join(hostileDir, "*.qcow2"))
	if err != nil || len(files) < 50 {
		t.Fatalf("hostile corpus missing or small (%d files, %v): regenerate it (see the comment above)", len(files), err)
	}
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		name := strings.TrimSuffix(filepath.Base(f), ".qcow2")
		expectFailure(t, name, b, ReaderOptions{})
	}
}

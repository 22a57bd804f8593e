package export

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"math/rand"
	"os"
	"path/filepath"
	"testing"

	"github.com/xapi-project/xapi-qcow-tool/qcow"
	"github.com/xapi-project/xapi-qcow-tool/vhdcompat/hints"
	"github.com/xapi-project/xapi-qcow-tool/vhdcompat/rawdisk"
)

const cl = 64 << 10

// clusterDisk writes a disk of len(fill) clusters, cluster i random when
// fill[i] is true and zeros otherwise, and returns its path and bytes.
func clusterDisk(t *testing.T, name string, seed int64, fill ...bool) (string, []byte) {
	t.Helper()
	b := make([]byte, len(fill)*cl)
	r := rand.New(rand.NewSource(seed))
	for i, f := range fill {
		if f {
			r.Read(b[i*cl : (i+1)*cl])
		}
	}
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return p, b
}

// storedClusters decodes an exported image and returns the clusters it
// stores, checking their bytes against want.
func storedClusters(t *testing.T, img []byte, want []byte) []int {
	t.Helper()
	r, err := qcow.NewReader(bytes.NewReader(img), qcow.ReaderOptions{})
	if err != nil {
		t.Fatal(err)
	}
	var out []int
	for {
		e, err := r.Next()
		if err == io.EOF {
			return out
		}
		if err != nil {
			t.Fatal(err)
		}
		if e.Kind != qcow.ExtentData {
			continue
		}
		if !bytes.Equal(e.Data, want[e.Offset:e.Offset+e.Length]) {
			t.Fatalf("cluster at %d: wrong bytes", e.Offset)
		}
		for o := e.Offset; o < e.Offset+e.Length; o += cl {
			out = append(out, int(o/cl))
		}
	}
}

// exportStored runs the export into memory and returns the clusters the
// image stores (their bytes checked against want), as fmt prints them,
// with the run's result.
func exportStored(t *testing.T, opt Options, want []byte) (string, *Result) {
	t.Helper()
	var out bytes.Buffer
	res, err := Run(context.Background(), &out, opt)
	if err != nil {
		t.Fatal(err)
	}
	return fmt.Sprint(storedClusters(t, out.Bytes(), want)), res
}

// TestExactExtents: the hybrid source's extents are scanned, not trusted:
// an allocated cluster of zeros is left out, and nothing outside them is
// read, whatever the disk holds there.
func TestExactExtents(t *testing.T) {
	path, raw := clusterDisk(t, "src", 1, true, false, true, true)
	want := bytes.Clone(raw)
	clear(want[2*cl : 3*cl]) // outside the extents: reads as zeros
	ext := hints.Extents{{Start: 0, End: 2 * cl}, {Start: 3 * cl, End: 4 * cl}}
	for _, direct := range []bool{false, true} {
		t.Run(fmt.Sprintf("direct=%v", direct), func(t *testing.T) {
			d, err := rawdisk.Open(path, direct)
			if err != nil {
				t.Skipf("SKIP: O_DIRECT refused here: %v", err)
			}
			defer d.Close()
			got, res := exportStored(t, Options{Source: d, SourceExtents: ext, ExactExtents: true}, want)
			if got != "[0 3]" {
				t.Fatalf("stored clusters %v, want [0 3]", got)
			}
			if res.ScannedBytes != 3*cl {
				t.Fatalf("the allocation pass scanned %d bytes, want the %d allocated", res.ScannedBytes, 3*cl)
			}
		})
	}
}

// TestCompareSet: against a base, only the clusters of the compare set
// are read and compared; the rest are the same images on both sides.
func TestCompareSet(t *testing.T) {
	src, raw := clusterDisk(t, "src", 1, true, true, true, true)
	base, _ := clusterDisk(t, "base", 2, true, true, true, true)
	s, err := rawdisk.Open(src, false)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	b, err := rawdisk.Open(base, false)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	all := hints.Extents{{Start: 0, End: 4 * cl}}
	got, res := exportStored(t, Options{Source: s, Base: b, SourceExtents: all, BaseExtents: all,
		ExactExtents: true, Compare: hints.Extents{{Start: cl, End: 2 * cl}, {Start: 3 * cl, End: 4 * cl}}}, raw)
	if got != "[1 3]" {
		t.Fatalf("stored clusters %v, want [1 3]", got)
	}
	if res.ScannedBytes != 2*cl {
		t.Fatalf("scanned %d bytes, want %d", res.ScannedBytes, 2*cl)
	}
}

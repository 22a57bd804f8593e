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

// TestExactExtents: the extents of the image behind the source are
// trusted: every cluster they name is stored as read, with no allocation
// pass, and nothing outside them is read, whatever the disk holds there.
// With DetectZeros they are read first, and an allocated cluster of zeros
// is left out.
func TestExactExtents(t *testing.T) {
	path, raw := clusterDisk(t, "src", 1, true, false, true, true)
	want := bytes.Clone(raw)
	clear(want[2*cl : 3*cl]) // outside the extents: reads as zeros
	ext := hints.Extents{{Start: 0, End: 2 * cl}, {Start: 3 * cl, End: 4 * cl}}
	for _, c := range []struct {
		direct, detect bool
		stored         string
		scanned        uint64
	}{
		{false, false, "[0 1 3]", 0},
		{true, false, "[0 1 3]", 0},
		{false, true, "[0 3]", 3 * cl},
		{true, true, "[0 3]", 3 * cl},
	} {
		t.Run(fmt.Sprintf("direct=%v,detect=%v", c.direct, c.detect), func(t *testing.T) {
			d, err := rawdisk.Open(path, c.direct)
			if err != nil {
				t.Skipf("SKIP: O_DIRECT refused here: %v", err)
			}
			defer d.Close()
			got, res := exportStored(t, Options{Source: d, SourceExtents: ext, ExactExtents: true, DetectZeros: c.detect}, want)
			if got != c.stored {
				t.Fatalf("stored clusters %v, want %v", got, c.stored)
			}
			if res.ScannedBytes != c.scanned {
				t.Fatalf("the allocation pass scanned %d bytes, want %d", res.ScannedBytes, c.scanned)
			}
		})
	}
}

// kinds decodes an exported image and returns its clusters by kind, as fmt
// prints them: data then zero.
func kinds(t *testing.T, img []byte) (data, zero string) {
	t.Helper()
	r, err := qcow.NewReader(bytes.NewReader(img), qcow.ReaderOptions{})
	if err != nil {
		t.Fatal(err)
	}
	var d, z []int
	for {
		e, err := r.Next()
		if err == io.EOF {
			return fmt.Sprint(d), fmt.Sprint(z)
		}
		if err != nil {
			t.Fatal(err)
		}
		for o := e.Offset; o < e.Offset+e.Length; o += cl {
			switch e.Kind {
			case qcow.ExtentData:
				d = append(d, int(o/cl))
			case qcow.ExtentZero:
				z = append(z, int(o/cl))
			}
		}
	}
}

// TestDiffAgainstImage: a diff against a base image is decided from the
// allocation alone, with no base disk: the clusters that may differ
// (Compare, or everything either side allocates) are stored, read from
// the source where it holds data, and as zero clusters, unread, where it
// holds none. DetectZeros turns the source's all-zero clusters among them
// into zero clusters too.
func TestDiffAgainstImage(t *testing.T) {
	// Clusters 0-2 and 5 hold data, 4 is allocated but zeros.
	src, raw := clusterDisk(t, "src", 1, true, true, true, false, false, true)
	srcExt := hints.Extents{{Start: 0, End: 3 * cl}, {Start: 4 * cl, End: 6 * cl}}
	for _, c := range []struct {
		name          string
		base, compare hints.Extents
		detect        bool
		data, zero    string
		scanned       uint64
	}{
		// Nothing shared: the base's cluster 3 reads as zeros in the
		// source, everything the source allocates is sent.
		{"share nothing", hints.Extents{{Start: 3 * cl, End: 4 * cl}}, nil, false, "[0 1 2 4 5]", "[3]", 0},
		{"share nothing, detect zeros", hints.Extents{{Start: 3 * cl, End: 4 * cl}}, nil, true, "[0 1 2 5]", "[3 4]", 5 * cl},
		// Shared below: only what either side wrote above it.
		{"compare", hints.Extents{}, hints.Extents{{Start: cl, End: 2 * cl}, {Start: 3 * cl, End: 5 * cl}}, false, "[1 4]", "[3]", 0},
	} {
		t.Run(c.name, func(t *testing.T) {
			d, err := rawdisk.Open(src, false)
			if err != nil {
				t.Fatal(err)
			}
			defer d.Close()
			var out bytes.Buffer
			res, err := Run(context.Background(), &out, Options{Source: d, SourceExtents: srcExt, ExactExtents: true,
				BaseExtents: c.base, Compare: c.compare, DetectZeros: c.detect})
			if err != nil {
				t.Fatal(err)
			}
			storedClusters(t, out.Bytes(), raw) // the bytes of each data cluster
			if data, zero := kinds(t, out.Bytes()); data != c.data || zero != c.zero {
				t.Fatalf("data clusters %v, zero clusters %v; want %v and %v", data, zero, c.data, c.zero)
			}
			if res.ScannedBytes != c.scanned {
				t.Fatalf("scanned %d bytes, want %d", res.ScannedBytes, c.scanned)
			}
		})
	}
}

package export

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/xapi-project/xapi-qcow-tool/vhdcompat/hints"
	"github.com/xapi-project/xapi-qcow-tool/vhdcompat/rawdisk"
)

// TestProbeLateData: the probing allocation pass (page cache and O_DIRECT)
// finds data that starts after a cluster's probe, in a partial last
// cluster too, and leaves a cluster of zeros out; windows probed by
// several readers give the same bitmap as one.
func TestProbeLateData(t *testing.T) {
	const clusters = 200 // more than one 4 MiB window
	raw := make([]byte, clusters*cl+8192)
	for i := 0; i < clusters; i++ {
		switch i % 4 {
		case 0:
			raw[i*cl] = 1 // in the probe
		case 1:
			raw[i*cl+cl-1] = 2 // past the probe, either size
		case 2:
			raw[i*cl+4096] = 3 // just past an O_DIRECT probe
		}
	}
	raw[len(raw)-1] = 4 // the partial last cluster, past its probe
	path := filepath.Join(t.TempDir(), "late")
	if err := os.WriteFile(path, raw, 0o644); err != nil {
		t.Fatal(err)
	}
	var want []int
	for i := 0; i <= clusters; i++ {
		if i == clusters || i%4 != 3 {
			want = append(want, i)
		}
	}
	ext := hints.Extents{{Start: 0, End: int64(len(raw))}}
	for _, direct := range []bool{false, true} {
		for _, exact := range []bool{false, true} {
			t.Run(fmt.Sprintf("direct=%v,exact=%v", direct, exact), func(t *testing.T) {
				d, err := rawdisk.Open(path, direct)
				if err != nil {
					t.Skipf("SKIP: O_DIRECT refused here: %v", err)
				}
				defer d.Close()
				opt := Options{Source: d}
				if exact {
					opt.SourceExtents, opt.ExactExtents, opt.DetectZeros = ext, true, true
				}
				e := &exporter{opt: opt, cs: cl, size: d.Size()}
				if probe := direct && d.Direct(); e.canProbeScan() != (exact || !probe) {
					t.Fatalf("canProbeScan = %v: O_DIRECT probes only exact extents", e.canProbeScan())
				}
				var out bytes.Buffer
				if _, err := Run(context.Background(), &out, opt); err != nil {
					t.Fatal(err)
				}
				if got := storedClusters(t, out.Bytes(), append(raw, make([]byte, cl)...)); fmt.Sprint(got) != fmt.Sprint(want) {
					t.Fatalf("stored clusters %v, want %v", got, want)
				}
			})
		}
	}
}

package qcow

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/xapi-project/xapi-qcow-tool/qcow/bitmap"
	"github.com/xapi-project/xapi-qcow-tool/tests/qemutest"
)

func TestPlanLayoutFixedPoint(t *testing.T) {
	// With 512-byte clusters and 64-bit refcounts a block holds 64
	// refcounts and a table cluster 64 pointers: step the data count across
	// every boundary and check the refcount structures exactly cover the
	// image, themselves included.
	for _, order := range []uint32{0, 3, 4, 6} {
		for data := uint64(0); data < 5000; data += 7 {
			l, err := PlanLayout(1<<30, 9, order, 1, data)
			if err != nil {
				t.Fatal(err)
			}
			perBlock := uint64(512*8) >> order
			if l.RefcountBlocks*perBlock < l.TotalClusters {
				t.Fatalf("order %d data %d: %d blocks cover %d < %d clusters", order, data, l.RefcountBlocks, l.RefcountBlocks*perBlock, l.TotalClusters)
			}
			if (l.RefcountBlocks-1)*perBlock >= l.TotalClusters {
				t.Fatalf("order %d data %d: one refcount block too many", order, data)
			}
			if l.RefcountTableCluster*64 < l.RefcountBlocks || (l.RefcountTableCluster-1)*64 >= l.RefcountBlocks {
				t.Fatalf("order %d data %d: refcount table %d clusters for %d blocks", order, data, l.RefcountTableCluster, l.RefcountBlocks)
			}
			if l.DataOffset+data*512 != l.Size() {
				t.Fatal("data does not end the image")
			}
		}
	}
}

func TestPlanLayoutTooLarge(t *testing.T) {
	_, err := PlanLayout(1<<40, 9, 4, 0, 0)
	if err == nil || !strings.Contains(err.Error(), "use a cluster size of") {
		t.Fatalf("want a too-large error naming a cluster size, got %v", err)
	}
}

// TestEncodeQemuCheck writes images across cluster sizes, refcount widths
// and fill patterns, and lets qemu-img judge them.
func TestEncodeQemuCheck(t *testing.T) {
	qemutest.Need(t, "qemu-img")
	dir := t.TempDir()
	for _, cb := range []uint32{9, 12, 16, 21} {
		for _, order := range []uint32{0, 4, 6} {
			size := uint64(3<<20) + 1536
			// A third of the clusters data, a third zero-flagged.
			enc, raw, _ := encodeRandom(t, int64(2+cb*10+order), size, cb, order)
			img := filepath.Join(dir, "x.qcow2")
			rawPath := filepath.Join(dir, "x.raw")
			os.WriteFile(img, enc, 0o644)
			os.WriteFile(rawPath, raw, 0o644)
			qemutest.Img(t, "check", img)
			qemutest.Img(t, "compare", "-f", "qcow2", "-F", "raw", img, rawPath)
			var info struct {
				VirtualSize uint64 `json:"virtual-size"`
				ClusterSize uint64 `json:"cluster-size"`
			}
			json.Unmarshal(qemutest.Img(t, "info", "--output=json", img), &info)
			if info.VirtualSize != size || info.ClusterSize != 1<<cb {
				t.Fatalf("qemu-img info: %+v", info)
			}
		}
	}
}

func newEmpty(l *Layout) *bitmap.Bitmap {
	return bitmap.New((l.VirtualSize + l.ClusterSize() - 1) / l.ClusterSize())
}

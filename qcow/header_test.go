package qcow

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"testing"

	"github.com/xapi-project/xapi-qcow-tool/tests/qemutest"
)

func TestHeaderRoundTrip(t *testing.T) {
	for _, cb := range []uint32{9, 16, 21} {
		l, err := PlanLayout(5<<40>>(21-cb), cb, 4, 3, 10)
		if err != nil {
			t.Fatal(err)
		}
		h := l.Header()
		h.BackingFile, h.BackingFormat = "/var/base.img", "raw"
		buf, err := h.MarshalCluster0()
		if err != nil {
			t.Fatal(err)
		}
		if uint64(len(buf)) != uint64(1)<<cb {
			t.Fatalf("cluster 0 is %d bytes", len(buf))
		}
		got, err := ParseHeader(buf)
		if err != nil {
			t.Fatalf("cluster bits %d: %v", cb, err)
		}
		if got.Size != h.Size || got.L1TableOffset != h.L1TableOffset || got.L1Size != h.L1Size ||
			got.RefcountTableOffset != h.RefcountTableOffset || got.BackingFile != h.BackingFile ||
			got.BackingFormat != "raw" || got.HeaderLength != HeaderLength || got.RefcountOrder != 4 {
			t.Fatalf("round trip: got %+v want %+v", got, h)
		}
		if cb > 9 && len(got.FeatureNames) != len(StandardFeatureNames) {
			t.Fatalf("feature names: %v", got.FeatureNames)
		}
	}
}

// TestHeaderAgainstQemuInfo writes a metadata-only image (no data) and
// checks what qemu-img info reads from the header we encoded.
func TestHeaderAgainstQemuInfo(t *testing.T) {
	qemutest.Need(t, "qemu-img")
	for _, c := range []struct {
		size    uint64
		cb, ord uint32
		backing string
	}{{1 << 30, 16, 4, ""}, {5 << 40, 16, 6, ""}, {3<<20 + 512, 9, 0, "base.raw"}, {1 << 20, 21, 3, "b"}} {
		l, err := PlanLayout(c.size, c.cb, c.ord, 0, 0)
		if err != nil {
			t.Fatal(err)
		}
		var out bytes.Buffer
		a := Allocation{VirtualSize: c.size, ClusterBits: c.cb, RefcountOrder: c.ord, Data: newEmpty(l), BackingFile: c.backing, BackingFormat: "raw"}
		if _, err := Encode(&out, a, bytes.NewReader(nil)); err != nil {
			t.Fatal(err)
		}
		p := filepath.Join(t.TempDir(), "h.qcow2")
		os.WriteFile(p, out.Bytes(), 0o644)
		var info struct {
			VirtualSize    uint64 `json:"virtual-size"`
			ClusterSize    uint64 `json:"cluster-size"`
			BackingFile    string `json:"backing-filename"`
			BackingFormat  string `json:"backing-filename-format"`
			FormatSpecific struct {
				Data struct {
					Compat       string `json:"compat"`
					RefcountBits int    `json:"refcount-bits"`
				} `json:"data"`
			} `json:"format-specific"`
		}
		args := []string{"info", "--output=json", p}
		if c.backing != "" {
			args = []string{"info", "--output=json", "-U", p}
		}
		if err := json.Unmarshal(qemutest.Img(t, args...), &info); err != nil {
			t.Fatal(err)
		}
		if info.VirtualSize != c.size || info.ClusterSize != 1<<c.cb || info.FormatSpecific.Data.Compat != "1.1" ||
			info.FormatSpecific.Data.RefcountBits != 1<<c.ord || info.BackingFile != c.backing {
			t.Fatalf("qemu-img info %+v for %+v", info, c)
		}
		if c.backing != "" && info.BackingFormat != "raw" {
			t.Fatalf("backing format %q", info.BackingFormat)
		}
	}
}

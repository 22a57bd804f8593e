package tests

import (
	"encoding/json"
	"path/filepath"
	"testing"

	"github.com/xapi-project/xapi-qcow-tool/tests/qemutest"
	"github.com/xapi-project/xapi-qcow-tool/tests/vhdtest"
)

// TestDiscoveryRefusesWhatCheckCallsCorrupt: for every image of the VHD
// corpus that check calls corrupt, discovery (tapdisk serving the image
// behind the VDI's device) does not use its chain: the export is read by
// scanning the device, and the one warning line carries check's first
// corruption, word for word.
func TestDiscoveryRefusesWhatCheckCallsCorrupt(t *testing.T) {
	qemutest.Need(t)
	h := newXapiHost(t)
	const size = 32 << 10 // the corpus images' virtual size
	raw := filepath.Join(h.dir, "disk.raw")
	sparseFile(t, raw, size)
	writeRandom(t, newRand(211), raw, 8<<10, 4096)
	dev := quietLoop(t, raw)
	vdi, minor := h.vdi(dev, "corpus-vdi")
	n := 0
	for _, c := range vhdtest.ReadManifest(t, vhdCorpus, 40) {
		if c.Exit != 2 || len(c.Search) > 0 {
			continue
		}
		n++
		img, err := filepath.Abs(filepath.Join(vhdCorpus, c.Path))
		if err != nil {
			t.Fatal(err)
		}
		t.Run(c.Path, func(t *testing.T) {
			// Parents searched where discovery searches them, as xapi
			// passes vhd-tool's --path.
			j := runTool(t, nil, "check", "--output=json", "--path", "/dev/mapper:.", img)
			var res struct {
				Findings []struct{ Severity, Message string }
			}
			if err := json.Unmarshal(j.Stdout, &res); err != nil || j.Code != 2 {
				t.Fatalf("check: exit %d, %v: %s", j.Code, err, j.Stdout)
			}
			first := ""
			for _, f := range res.Findings {
				if f.Severity == "corruption" {
					first = f.Message
					break
				}
			}
			h.t = t
			h.reset()
			h.tapdisk(4, minor, "0", "vhd:"+img)
			out := filepath.Join(h.dir, "out.qcow2")
			started, warnings := h.export(out, "qcow2-to-stdout.py", vdi)
			qemutest.Compare(t, out, raw)
			checkFallback(t, started, warnings, "scan", first)
		})
	}
	if n < 20 {
		t.Fatalf("only %d corrupt images", n)
	}
}

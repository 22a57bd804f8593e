package hints

import (
	"strings"
	"testing"
)

// TestLoadChecksEveryHintAgainstItsDisk: every hint that states a disk size
// is checked against the disk it is given for, whichever command line gave
// it.
func TestLoadChecksEveryHintAgainstItsDisk(t *testing.T) {
	const gib10 = `10737418240`
	info := `{"virtual-size": ` + gib10 + `, "cluster-size": 65536, "format": "qcow2"}`
	mapJSON := `[{"start": 0, "length": ` + gib10 + `, "depth": 0, "present": true, "zero": false, "data": true}]`
	legacy := `{"virtual_size": ` + gib10 + `, "cluster_bits": 16, "data_clusters": [0]}`
	src := func(flag, text string) Source { return Source{Flag: flag, Reader: strings.NewReader(text)} }
	small := Disk{Name: "small.raw", Size: 1 << 20}
	for name, req := range map[string]Request{
		"info":        {Source: DiskHints{Info: src("--allocation-info", info)}},
		"map":         {Source: DiskHints{Map: src("--allocation-map", mapJSON)}},
		"header":      {Source: DiskHints{Header: src("--json-header", legacy)}},
		"base info":   {Base: DiskHints{Info: src("--base-allocation-info", info)}},
		"base map":    {Base: DiskHints{Map: src("--base-allocation-map", mapJSON)}},
		"base header": {Base: DiskHints{Header: src("--json-header-diff", legacy)}},
	} {
		t.Run(name, func(t *testing.T) {
			_, err := Load(req, small, &small, 16)
			if err == nil || !strings.Contains(err.Error(), "the hints are for another disk") {
				t.Fatalf("hints for 10 GiB on a 1 MiB disk: %v", err)
			}
		})
	}
	// The same hints on a disk of their size (rounded up to 512 bytes is
	// fine: a logical volume is larger than the image behind it).
	big := Disk{Name: "big.raw", Size: 10 << 30}
	l, err := Load(Request{Source: DiskHints{Info: src("-i", info), Map: src("-m", mapJSON)}}, big, nil, 20)
	if err != nil {
		t.Fatal(err)
	}
	if l.ClusterBits != 16 || l.SourceExtents.Bytes() != 10<<30 {
		t.Fatalf("got cluster bits %d, %d bytes of extents", l.ClusterBits, l.SourceExtents.Bytes())
	}
	if _, err := Load(Request{Base: DiskHints{Map: src("--json-header-diff-map", mapJSON)}}, big, nil, 16); err == nil {
		t.Fatal("base hints without a base accepted")
	}
}

package vhdcompat

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/xapi-project/xapi-qcow-tool/tests/qemutest"
)

// TestHybridBaseDeviceBesideImage: a caller that fills both
// ExportRequest.Base (a base device) and Hybrid.BaseImage (the qcow2-to-stdout
// drop-in's --diff with the base's image discovered) gets the diff from the
// chains' metadata: the snapshot's zeroed cluster goes as a zero cluster,
// where a byte comparison with the base device would have stored it as a
// data cluster of zeros. The device is only checked for its size.
func TestHybridBaseDeviceBesideImage(t *testing.T) {
	qemutest.Need(t)
	dir := t.TempDir()
	base := qemutest.Create(t, filepath.Join(dir, "base.qcow2"), "", "8M", "write -P 1 0 1M")
	snap := qemutest.Overlay(t, base, filepath.Join(dir, "snap.qcow2"), "", "write -z 0 64k", "write -P 5 4M 64k")
	snapRaw, baseRaw := qemutest.Raw(t, snap), qemutest.Raw(t, base)
	small := filepath.Join(dir, "small.raw")
	if err := os.WriteFile(small, make([]byte, 4096), 0o644); err != nil {
		t.Fatal(err)
	}
	export := func(baseDev string) (string, error) {
		out := filepath.Join(dir, "diff.qcow2")
		f, err := os.Create(out)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		err = Export(&Env{Ctx: context.Background()}, &ExportRequest{
			Source: snapRaw, Base: baseDev, ClusterSize: 65536, RefcountBits: 16, Out: f, OutName: out,
			Hybrid: &HybridRequest{Image: snap, BaseImage: base, Search: []string{dir}},
		})
		return out, err
	}
	out, err := export(baseRaw)
	if err != nil {
		t.Fatal(err)
	}
	var data, zero []int64
	for _, e := range qemutest.Map(t, out) {
		switch {
		case e.Depth != 0:
		case e.Data:
			data = append(data, e.Start)
		case e.Zero:
			zero = append(zero, e.Start)
		}
	}
	if len(data) != 1 || data[0] != 4<<20 || len(zero) == 0 || zero[0] != 0 {
		t.Fatalf("data clusters at %v, zero clusters at %v; want data at 4 MiB only and a zero cluster at 0", data, zero)
	}
	if _, err := export(small); err == nil {
		t.Fatal("a base device of another size than the base image was accepted")
	}
}

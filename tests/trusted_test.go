package tests

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/xapi-project/xapi-qcow-tool/tests/qemutest"
)

// TestMapHintTrusted: a qemu-img map hint (xapi's path for a qcow2-backed
// VDI: the drop-in's --json-header-map and --json-header-info, stream's
// --allocation-map) is trusted like the hybrid source's chain: each
// allocated cluster is read once, in the data pass, and stored as read, a
// cluster the guest filled with zeros included. With --detect-zeros that
// cluster is left out, for a second read of the allocation (the map's
// extents are no whole clusters of the image, so pass 1 reads them whole).
// Counted by the loop device under O_DIRECT.
func TestMapHintTrusted(t *testing.T) {
	qemutest.Need(t)
	dir := t.TempDir()
	img, raw := filepath.Join(dir, "d.qcow2"), filepath.Join(dir, "d.raw")
	qemutest.Img(t, "create", "-q", "-f", "qcow2", img, "16M")
	qemutest.IO(t, img, "write -P 1 0 192k", "write -P 0 4M 64k", "write -P 2 9M 64k", "write -z 12M 1M")
	qemutest.Img(t, "convert", "-O", "raw", img, raw)
	mapJSON := qemutest.Img(t, "map", "--output=json", img)
	infoJSON := qemutest.Img(t, "info", "--output=json", img)
	alloc := allocatedBytes(t, img) // 192k + the zeros' 64k + 64k
	const zeros = kib64
	for _, c := range []struct {
		name   string
		tool   string
		args   []string
		detect bool
	}{
		{"qcow2-to-stdout", linkAs(t, "qcow2-to-stdout"), []string{"--json-header-map", "3", "--json-header-info", "4"}, false},
		{"stream", bin, []string{"stream", "--allocation-map", "fd://3", "--allocation-info", "fd://4"}, false},
		{"stream --detect-zeros", bin, []string{"stream", "--allocation-map", "fd://3", "--allocation-info", "fd://4", "--detect-zeros"}, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			dev := quietLoop(t, raw)
			out := filepath.Join(dir, "out.qcow2")
			args := c.args
			if c.tool == bin {
				args = append([]string{args[0], "--source", dev}, args[1:]...)
			} else {
				args = append([]string{dev}, args...)
			}
			before := sectorsRead(t, dev)
			r := runWithFiles(t, c.tool, nil, out, []*os.File{hintPipe(t, mapJSON), hintPipe(t, infoJSON)}, args...)
			mustSucceed(t, r, c.name)
			read := (sectorsRead(t, dev) - before) * 512
			qemutest.Compare(t, out, raw)
			stored := clustersOf(dataExtents(t, out))
			wantStored, wantRead := alloc, alloc+directProbes
			if c.detect {
				wantStored = alloc - zeros
				wantRead = alloc + wantStored + directProbes
			}
			if stored != wantStored || read != wantRead {
				t.Fatalf("stored %d bytes and read %d, want %d stored and %d read (the map allocates %d)", stored, read, wantStored, wantRead, alloc)
			}
			t.Logf("read %d bytes, stored %d, the map allocates %d", read, stored, alloc)
		})
	}
}

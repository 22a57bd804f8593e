package tests

import (
	"encoding/json"
	"fmt"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/xapi-project/xapi-qcow-tool/tests/qemutest"
	"github.com/xapi-project/xapi-qcow-tool/tests/vhdtest"
)

// TestSupportVHD: info and map of VHD files say what qemu-img says of them
// (format vpc), and show a differencing disk's parent.
func TestSupportVHD(t *testing.T) {
	qemutest.Need(t)
	dir := t.TempDir()
	for _, c := range []struct{ name, opts, size string }{
		{"dynamic", "subformat=dynamic,force_size=on", "30M"},
		{"fixed", "subformat=fixed,force_size=on", "6M"},
	} {
		t.Run(c.name, func(t *testing.T) {
			img := filepath.Join(dir, c.name+".vhd")
			qemutest.Img(t, "create", "-q", "-f", "vpc", "-o", c.opts, img, c.size)
			qemutest.Run(t, "qemu-io", "-f", "vpc", "-c", "write -P 1 0 4k", "-c", "write -P 2 2M 3M", img)
			var ours, theirs []map[string]any
			if err := json.Unmarshal(mustRun(t, nil, "map", "--output=json", img), &ours); err != nil {
				t.Fatal(err)
			}
			if err := json.Unmarshal(qemutest.Img(t, "map", "-f", "vpc", "--output=json", img), &theirs); err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(ours, theirs) {
				t.Fatalf("map:\nours   %v\nqemu's %v", ours, theirs)
			}
			var oi, qi map[string]any
			json.Unmarshal(mustRun(t, nil, "info", "--output=json", img), &oi)
			json.Unmarshal(qemutest.Img(t, "info", "-f", "vpc", "--output=json", img), &qi)
			for _, k := range []string{"virtual-size", "format", "cluster-size", "dirty-flag"} {
				if fmt.Sprint(oi[k]) != fmt.Sprint(qi[k]) {
					t.Errorf("info %s: ours %v, qemu's %v", k, oi[k], qi[k])
				}
			}
		})
	}
	t.Run("differencing", func(t *testing.T) {
		parent := vhdtest.New(8 << 20)
		child := vhdtest.Child(parent, "parent.vhd")
		child.Write(2<<20, make([]byte, 4096))
		p, cpath := filepath.Join(dir, "parent.vhd"), filepath.Join(dir, "child.vhd")
		if err := parent.Save(p); err != nil {
			t.Fatal(err)
		}
		if err := child.Save(cpath); err != nil {
			t.Fatal(err)
		}
		out := string(mustRun(t, nil, "info", cpath))
		for _, want := range []string{"differencing", "parent name:           parent.vhd", "parent locator:        ./parent.vhd"} {
			if !strings.Contains(out, want) {
				t.Fatalf("info does not say %q:\n%s", want, out)
			}
		}
		var m []qemutest.MapEntry
		if err := json.Unmarshal(mustRun(t, nil, "map", "--output=json", cpath), &m); err != nil {
			t.Fatal(err)
		}
		if len(m) != 3 || m[0].Depth != 1 || !m[1].Data || m[1].Start != 2<<20 || m[1].Length != 4096 || m[2].Depth != 1 {
			t.Fatalf("map of a differencing VHD: %+v", m)
		}
	})
	r := runTool(t, nil, "info", filepath.Join(dir, "nothing.vhd"))
	checkOneLineError(t, r, "nothing.vhd")
}

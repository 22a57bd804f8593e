package vhdtest

import (
	"encoding/json"
	"os/exec"
	"testing"
)

// describeScript prints, for each VHD named in argv, what libvhdi reads of
// its footer and header, as a JSON array.
const describeScript = `
import sys, json, pyvhdi
out = []
for p in sys.argv[1:]:
    f = pyvhdi.file()
    f.open(p)
    out.append({'media-size': f.media_size, 'disk-type': f.disk_type, 'identifier': f.identifier,
                'parent-identifier': f.parent_identifier or '', 'parent-filename': f.parent_filename or ''})
    f.close()
print(json.dumps(out))
`

// Description is what libvhdi reads of one VHD.
type Description struct {
	MediaSize        int64  `json:"media-size"`
	DiskType         int    `json:"disk-type"` // 2 fixed, 3 dynamic, 4 differencing
	Identifier       string `json:"identifier"`
	ParentIdentifier string `json:"parent-identifier"`
	ParentFilename   string `json:"parent-filename"` // the header's parent name
}

// Describe returns libvhdi's reading of each VHD file. It skips, visibly,
// where libvhdi is not installed, and fails the test where libvhdi cannot
// open a file.
func Describe(t testing.TB, paths ...string) []Description {
	t.Helper()
	py := needLibvhdi(t)
	out, err := exec.Command(py, append([]string{"-c", describeScript}, paths...)...).CombinedOutput()
	if err != nil {
		t.Fatalf("libvhdi cannot describe %v: %v: %s", paths, err, out)
	}
	var d []Description
	if err := json.Unmarshal(out, &d); err != nil {
		t.Fatalf("libvhdi's description: %v: %s", err, out)
	}
	return d
}

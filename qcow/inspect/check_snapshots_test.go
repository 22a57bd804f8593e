package inspect

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// TestCheckQemuSnapshots: images qemu-img snapshot -c made are clean,
// although qemu writes the snapshot table last and unpadded (it used to be
// reported as past the end of the file, with a leaked cluster).
func TestCheckQemuSnapshots(t *testing.T) {
	imgs := map[string][]byte{}
	b, err := os.ReadFile("../testdata/seeds/qemu-snapshots-4k.qcow2")
	if err != nil {
		t.Fatal(err)
	}
	imgs["seed"] = b
	if _, err := exec.LookPath("qemu-img"); err != nil {
		t.Log("SKIP: qemu-img not installed: checking the stored seed only")
	} else {
		img := filepath.Join(t.TempDir(), "s.qcow2")
		for _, args := range [][]string{
			{"create", "-q", "-f", "qcow2", img, "64M"},
			{"snapshot", "-c", "one", img},
			{"snapshot", "-c", "two", img},
		} {
			if out, err := exec.Command("qemu-img", args...).CombinedOutput(); err != nil {
				t.Fatalf("qemu-img %v: %v: %s", args, err, out)
			}
		}
		if imgs["64k"], err = os.ReadFile(img); err != nil {
			t.Fatal(err)
		}
	}
	for name, img := range imgs {
		res, err := CheckFile(bytes.NewReader(img), int64(len(img)))
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if res.ExitCode() != 0 || len(res.Errors) != 0 {
			t.Errorf("%s: exit %d, %q", name, res.ExitCode(), res.Errors)
		}
	}
}

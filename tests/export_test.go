package tests

import (
	"math/rand"
	"path/filepath"
	"testing"
)

func TestExportSmoke(t *testing.T) {
	needQemu(t)
	dir := t.TempDir()
	raw := filepath.Join(dir, "a.img")
	sparseFile(t, raw, 10<<20)
	writeRandom(t, rand.New(rand.NewSource(1)), raw, 1<<20, 4096)
	img := filepath.Join(dir, "a.qcow2")
	exportToFile(t, img, "stream", "--source", raw)
	qemuCheck(t, img)
	qemuCompare(t, img, raw)
}

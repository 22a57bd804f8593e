package tests

import (
	"go/parser"
	"go/token"
	"io/fs"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// layers ranks the packages from the top (cmd) down (qcow/bitmap): a
// package's non-test files may import only packages of a lower rank, so
// that no package imports one above it (docs/ARCHITECTURE.md, "Layers").
// tests/qemutest is for tests alone: no non-test file may import it.
var layers = map[string]int{
	"cmd/xapi-qcow-tool": 7,
	"wrapper":            6,
	"vhdcompat":          5,
	"vhdcompat/export":   4,
	"vhdcompat/importer": 4,
	"vhdcompat/hybrid":   4,
	"vhdcompat/hints":    3,
	"vhdcompat/rawdisk":  2,
	"vhdcompat/discover": 2,
	"qcow/inspect":       2,
	"qcow":               1,
	"vhdcompat/vhd":      1,
	"vhdcompat/nbd":      1,
	"qcow/bitmap":        0,
}

// TestLayers: every import between the project's packages goes down.
func TestLayers(t *testing.T) {
	const module = "github.com/xapi-project/xapi-qcow-tool/"
	seen := map[string]bool{}
	err := filepath.WalkDir("..", func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && (d.Name() == "testdata" || strings.HasPrefix(d.Name(), ".")) && path != ".." {
			return filepath.SkipDir
		}
		if d.IsDir() || !strings.HasSuffix(path, ".go") || strings.HasSuffix(path, "_test.go") {
			return nil
		}
		pkg := filepath.ToSlash(filepath.Dir(strings.TrimPrefix(path, "../")))
		if strings.HasPrefix(pkg, "tests") {
			return nil // test helpers: ranked by who may import them, below
		}
		rank, ok := layers[pkg]
		if !ok {
			t.Errorf("%s: package %s has no place in the layers (add it to tests/layers_test.go and docs/ARCHITECTURE.md)", path, pkg)
			return nil
		}
		seen[pkg] = true
		f, err := parser.ParseFile(token.NewFileSet(), path, nil, parser.ImportsOnly)
		if err != nil {
			return err
		}
		for _, imp := range f.Imports {
			ip, _ := strconv.Unquote(imp.Path.Value)
			dep, ok := strings.CutPrefix(ip, module)
			if !ok {
				continue
			}
			if depRank, known := layers[dep]; !known || depRank >= rank {
				t.Errorf("%s: %s imports %s, which is not below it", path, pkg, dep)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	for pkg := range layers {
		if !seen[pkg] {
			t.Errorf("package %s is ranked but has no files", pkg)
		}
	}
}

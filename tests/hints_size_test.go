package tests

import (
	"os"
	"path/filepath"
	"testing"
)

// TestHintsForAnotherDisk: hints written for a 10 GiB image are refused on
// a 1 MiB disk by both exporters, through the one hint loader: `stream`
// once accepted them and exported.
func TestHintsForAnotherDisk(t *testing.T) {
	dir := t.TempDir()
	small := filepath.Join(dir, "small.raw")
	sparseFile(t, small, 1<<20)
	info := []byte(`{"virtual-size": 10737418240, "cluster-size": 65536, "format": "qcow2"}`)
	mapJSON := []byte(`[{ "start": 0, "length": 10737418240, "depth": 0, "present": true, "zero": false, "data": true, "offset": 327680}]`)
	infoPath, mapPath := filepath.Join(dir, "i.json"), filepath.Join(dir, "m.json")
	writeFile(t, infoPath, info)
	writeFile(t, mapPath, mapJSON)
	cases := map[string]result{
		"stream --allocation-info --allocation-map": runTool(t, nil, "stream", "--source", small,
			"--allocation-info", infoPath, "--allocation-map", mapPath, "--destination", "null:"),
		"stream --allocation-map": runTool(t, nil, "stream", "--source", small,
			"--allocation-map", mapPath, "--destination", "null:"),
		"stream --base-allocation-info": runTool(t, nil, "stream", "--source", small, "--relative-to", small,
			"--base-allocation-info", infoPath, "--destination", "null:"),
		"qcow2-to-stdout --json-header-info --json-header-map": runWithFiles(t, linkAs(t, "qcow2-to-stdout.py"), nil, "",
			[]*os.File{hintPipe(t, mapJSON), hintPipe(t, info)}, small, "--json-header-map", "3", "--json-header-info", "4"),
	}
	for name, r := range cases {
		t.Run(name, func(t *testing.T) {
			checkOneLineError(t, r, "the hints are for another disk")
			if r.Code != 1 || len(r.Stdout) != 0 {
				t.Fatalf("exit %d with %d bytes on stdout, want 1 and nothing", r.Code, len(r.Stdout))
			}
		})
	}
}

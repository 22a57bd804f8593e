package hints

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"reflect"
	"testing"
)

// seedFiles adds every file matching glob (under testdata) to the corpus
// through add.
func seedFiles(f *testing.F, glob string, add func(b []byte)) {
	files, _ := filepath.Glob(filepath.Join("testdata", glob))
	if len(files) == 0 {
		f.Fatalf("no seed files testdata/%s", glob)
	}
	for _, name := range files {
		b, err := os.ReadFile(name)
		if err != nil {
			f.Fatal(err)
		}
		add(b)
	}
}

// checkExtents checks the Extents invariant: sorted, disjoint, not
// adjacent, non-empty, inside [0, size).
func checkExtents(t *testing.T, what string, x Extents, size int64) {
	if x == nil {
		t.Fatalf("%s: nil extents (means \"no hint\")", what)
	}
	var end int64 = -1
	for _, e := range x {
		if e.Start < 0 || e.End > size || e.End <= e.Start || e.Start <= end {
			t.Fatalf("%s: extent %+v after end %d in a %d-byte disk", what, e, end, size)
		}
		end = e.End
	}
}

// FuzzParseMap: qemu-img map JSON (a descriptor xapi hands the drop-in).
// What ParseMap accepts must be the data extents encoding/json sees in the
// same text, normalised.
func FuzzParseMap(f *testing.F) {
	seedFiles(f, "qemu-img/map-*.json", func(b []byte) {
		f.Add(b, int64(1<<20))
		f.Add(b, int64(8192))
	})
	f.Fuzz(func(t *testing.T, b []byte, size int64) {
		size = max(size, 0)
		x, err := ParseMap(bytes.NewReader(b), size)
		if err != nil {
			return
		}
		checkExtents(t, "map", x, size)
		var all []MapEntry
		if json.Unmarshal(b, &all) != nil {
			return // trailing text: ParseMap stops at the closing bracket
		}
		var want []Extent
		for _, e := range all {
			if e.Data && !e.Zero && e.Length > 0 {
				want = append(want, Extent{e.Start, e.Start + e.Length})
			}
		}
		if w := Normalize(want, size); !reflect.DeepEqual(x, w) {
			t.Fatalf("ParseMap gave %v, encoding/json %v", x, w)
		}
	})
}

// FuzzParseInfo: qemu-img info JSON.
func FuzzParseInfo(f *testing.F) {
	seedFiles(f, "qemu-img/info-*.json", func(b []byte) { f.Add(b) })
	f.Fuzz(func(t *testing.T, b []byte) {
		in, err := ParseInfo(bytes.NewReader(b))
		if err != nil {
			return
		}
		if in.VirtualSize < 0 || in.ClusterBits != 0 && (in.ClusterBits < 9 || in.ClusterBits > 21) {
			t.Fatalf("accepted %+v", in)
		}
	})
}

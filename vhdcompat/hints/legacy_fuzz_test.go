package hints

import (
	"bytes"
	"testing"
)

// FuzzParseLegacy: older xapi's JSON header (stdin of the drop-in).
func FuzzParseLegacy(f *testing.F) {
	seedFiles(f, "legacy/*.json", func(b []byte) { f.Add(b) })
	f.Fuzz(func(t *testing.T, b []byte) {
		l, err := ParseLegacy(bytes.NewReader(b))
		if err != nil {
			return
		}
		if l.VirtualSize < 0 || l.VirtualSize > 1<<62 || l.ClusterBits < 9 || l.ClusterBits > 21 {
			t.Fatalf("accepted size %d, cluster bits %d", l.VirtualSize, l.ClusterBits)
		}
		checkExtents(t, "legacy", l.Extents, l.VirtualSize)
		cs := int64(1) << l.ClusterBits
		for _, e := range l.Extents {
			if e.Start%cs != 0 || e.End%cs != 0 && e.End != l.VirtualSize {
				t.Fatalf("extent %+v is not whole clusters of %d bytes", e, cs)
			}
		}
	})
}

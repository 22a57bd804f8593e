package hints

import (
	"bytes"
	"encoding/base64"
	"fmt"
	"io"
	"reflect"
	"strings"
	"testing"
)

func TestParseMap(t *testing.T) {
	// What qemu-img map --output=json prints for a qcow2 file with data at
	// 0..64K, a zero cluster at 64K, a hole, and data ending mid-cluster
	// (a partial last cluster of a disk whose size is not cluster aligned).
	in := `[{ "start": 0, "length": 65536, "depth": 0, "present": true, "zero": false, "data": true, "compressed": false, "offset": 327680},
{ "start": 65536, "length": 65536, "depth": 0, "present": true, "zero": true, "data": false, "compressed": false},
{ "start": 131072, "length": 196608, "depth": 0, "present": false, "zero": true, "data": false, "compressed": false},
{ "start": 327680, "length": 65536, "depth": 0, "present": true, "zero": false, "data": true, "offset": 393216},
{ "start": 393216, "length": 1000, "depth": 0, "present": true, "zero": false, "data": true, "offset": 458752}]`
	got, err := ParseMap(strings.NewReader(in), 394216)
	if err != nil {
		t.Fatal(err)
	}
	want := Extents{{0, 65536}, {327680, 394216}}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("got %v, want %v", got, want)
	}
	// Clipped to the disk size.
	got, err = ParseMap(strings.NewReader(in), 330000)
	if err != nil {
		t.Fatal(err)
	}
	if want := (Extents{{0, 65536}, {327680, 330000}}); !reflect.DeepEqual(got, want) {
		t.Fatalf("clipped: got %v, want %v", got, want)
	}
	// Empty image.
	got, err = ParseMap(strings.NewReader("[]"), 1<<20)
	if err != nil || got == nil || len(got) != 0 {
		t.Fatalf("empty map: %v %v", got, err)
	}
	// Nothing with data: an empty, non-nil hint (nil would mean "no hint").
	got, err = ParseMap(strings.NewReader(`[{"start": 0, "length": 65536, "depth": 0, "present": false, "zero": true, "data": false}]`), 1<<20)
	if err != nil || got == nil || len(got) != 0 {
		t.Fatalf("map without data: %#v %v", got, err)
	}
}

// An extent that ends inside a cluster still covers the whole cluster once
// aligned: the reference's floor() lost that cluster.
func TestAlignOutKeepsPartialCluster(t *testing.T) {
	x := Extents{{0, 4096}, {65536 + 100, 65536 + 200}, {3 * 65536, 3*65536 + 1}}
	got := x.AlignOut(65536, 10*65536)
	want := Extents{{0, 2 * 65536}, {3 * 65536, 4 * 65536}}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("got %v, want %v", got, want)
	}
}

func TestParseMapHostile(t *testing.T) {
	cases := map[string]string{
		"not json":        "hello",
		"object":          `{"start": 0}`,
		"truncated":       `[{"start": 0, "length": 10, "data": true}`,
		"negative start":  `[{"start": -1, "length": 10, "data": true}]`,
		"negative length": `[{"start": 0, "length": -10, "data": true}]`,
		"overflow":        `[{"start": 4611686018427387000, "length": 4611686018427387000, "data": true}]`,
		"string length":   `[{"start": 0, "length": "10", "data": true}]`,
		"huge number":     `[{"start": 0, "length": 1e30, "data": true}]`,
		"empty":           ``,
		"trailing junk":   `[{"start": 0, "length": 10, "data": true} x]`,
	}
	for name, in := range cases {
		if _, err := ParseMap(strings.NewReader(in), 1<<20); err == nil {
			t.Errorf("%s: accepted %q", name, in)
		}
	}
}

func TestParseInfo(t *testing.T) {
	in := `{
    "children": [],
    "virtual-size": 10485760,
    "filename": "a.qcow2",
    "cluster-size": 4096,
    "format": "qcow2",
    "actual-size": 200704,
    "format-specific": {"type": "qcow2", "data": {"compat": "1.1", "refcount-bits": 16}},
    "dirty-flag": false
}`
	info, err := ParseInfo(strings.NewReader(in))
	if err != nil {
		t.Fatal(err)
	}
	if info.VirtualSize != 10485760 || info.ClusterBits != 12 || info.Format != "qcow2" {
		t.Fatalf("got %+v", info)
	}
	info, err = ParseInfo(strings.NewReader(`{"virtual-size": 512, "format": "raw"}`))
	if err != nil || info.ClusterBits != 0 {
		t.Fatalf("raw: %+v %v", info, err)
	}
	for _, bad := range []string{
		`{"virtual-size": -1}`, `{"cluster-size": 1000}`, `{"cluster-size": 256}`, `{"cluster-size": 4194304}`,
		`{"cluster-size": -65536}`, `[1]`, ``, `{"virtual-size": "big"}`,
	} {
		if _, err := ParseInfo(strings.NewReader(bad)); err == nil {
			t.Errorf("accepted %q", bad)
		}
	}
}

// cbt builds a base64 bitmap with the given 64 KiB blocks set, MSB first.
func cbt(nblocks int, set ...int) string {
	b := make([]byte, (nblocks+7)/8)
	for _, i := range set {
		b[i/8] |= 0x80 >> (i % 8)
	}
	return base64.StdEncoding.EncodeToString(b)
}

func TestParseChangedBlocks(t *testing.T) {
	// Block 0 is the most significant bit of byte 0: 0x80 flags block 0,
	// not block 7.
	bm, err := ParseChangedBlocks(strings.NewReader(base64.StdEncoding.EncodeToString([]byte{0x80, 0x01})), 16, 16)
	if err != nil {
		t.Fatal(err)
	}
	if !bm.Test(0) || bm.Test(7) || !bm.Test(15) || bm.Test(8) || bm.Count() != 2 {
		t.Fatalf("MSB-first order broken: count %d", bm.Count())
	}
	cases := []struct {
		bits     uint32
		clusters uint64
		blocks   int
		set      []int
		want     []uint64
	}{
		// 4 KiB clusters: one block is 16 clusters.
		{12, 64, 4, []int{1, 3}, rangeOf(16, 32, 48, 64)},
		// 2 MiB clusters: 32 blocks per cluster; any set block flags it.
		{21, 3, 96, []int{33, 95}, []uint64{1, 2}},
		// 512-byte clusters, a disk that ends inside block 1.
		{9, 130, 2, []int{1}, rangeOf(128, 130)},
		// 128 KiB clusters: blocks 2 and 3 share cluster 1.
		{17, 4, 8, []int{2, 3, 7}, []uint64{1, 3}},
	}
	for _, c := range cases {
		t.Run(fmt.Sprintf("cluster_bits=%d", c.bits), func(t *testing.T) {
			bm, err := ParseChangedBlocks(strings.NewReader(cbt(c.blocks, c.set...)), c.bits, c.clusters)
			if err != nil {
				t.Fatal(err)
			}
			var got []uint64
			for g, ok := bm.NextSet(0); ok && g < c.clusters; g, ok = bm.NextSet(g + 1) {
				got = append(got, g)
			}
			if !reflect.DeepEqual(got, c.want) {
				t.Fatalf("got %v, want %v", got, c.want)
			}
		})
	}
}

// rangeOf returns the integers of [a, b) and [c, d) ...
func rangeOf(bounds ...uint64) []uint64 {
	var out []uint64
	for i := 0; i+1 < len(bounds); i += 2 {
		for v := bounds[i]; v < bounds[i+1]; v++ {
			out = append(out, v)
		}
	}
	return out
}

func TestParseChangedBlocksHostile(t *testing.T) {
	// Too short: 16 clusters of 64 KiB need 2 bytes.
	if _, err := ParseChangedBlocks(strings.NewReader(cbt(8, 0)), 16, 16); err == nil {
		t.Error("accepted a bitmap shorter than the disk")
	}
	if _, err := ParseChangedBlocks(strings.NewReader("!!!notbase64"), 16, 16); err == nil {
		t.Error("accepted invalid base64")
	}
	// Far longer than the disk: refused without reading it all.
	long := &countingReader{r: strings.NewReader(strings.Repeat("A", 1<<24))}
	if _, err := ParseChangedBlocks(long, 16, 16); err == nil {
		t.Error("accepted a bitmap far longer than the disk")
	}
	if long.n > 1<<20 {
		t.Errorf("read %d bytes of an oversized bitmap", long.n)
	}
	// Line breaks and spaces are fine (base64 tools wrap lines).
	text := cbt(16, 3)
	wrapped := text[:2] + "\n" + text[2:] + "\n"
	bm, err := ParseChangedBlocks(strings.NewReader(wrapped), 16, 16)
	if err != nil || !bm.Test(3) || bm.Count() != 1 {
		t.Fatalf("wrapped base64: %v", err)
	}
}

type countingReader struct {
	r io.Reader
	n int
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += n
	return n, err
}

func TestParseLegacyForms(t *testing.T) {
	const cs = 65536
	cases := []struct {
		name, in string
		want     *Legacy
	}{
		{"intervals", `{"virtual_size": 1048576, "cluster_bits": 16, "data_clusters": [[0, 1], [5, 5], [14, 15]]}`,
			&Legacy{1 << 20, 16, Extents{{0, 2 * cs}, {5 * cs, 6 * cs}, {14 * cs, 16 * cs}}}},
		{"flat", `{"virtual_size": 1048576, "cluster_bits": 16, "data_clusters": [0, 1, 5, 14, 15]}`,
			&Legacy{1 << 20, 16, Extents{{0, 2 * cs}, {5 * cs, 6 * cs}, {14 * cs, 16 * cs}}}},
		{"unsorted flat, keys in any order", `{"data_clusters": [15, 0, 5, 1, 14, 5], "cluster_bits": 16, "virtual_size": 1048576, "extra": {"x": [1, 2]}}`,
			&Legacy{1 << 20, 16, Extents{{0, 2 * cs}, {5 * cs, 6 * cs}, {14 * cs, 16 * cs}}}},
		{"mixed", `{"virtual_size": 1048576, "cluster_bits": 16, "data_clusters": [[0, 1], 2, [3, 4]]}`,
			&Legacy{1 << 20, 16, Extents{{0, 5 * cs}}}},
		// The last cluster is partial: the extent stops at the disk's end.
		{"partial last cluster", `{"virtual_size": 70000, "cluster_bits": 16, "data_clusters": [1]}`,
			&Legacy{70000, 16, Extents{{cs, 70000}}}},
		{"4 KiB clusters", `{"virtual_size": 1048576, "cluster_bits": 12, "data_clusters": [[3, 4]]}`,
			&Legacy{1 << 20, 12, Extents{{3 * 4096, 5 * 4096}}}},
		{"empty", `{"virtual_size": 0, "cluster_bits": 16, "data_clusters": []}`,
			&Legacy{0, 16, Extents{}}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			got, err := ParseLegacy(strings.NewReader(c.in))
			if err != nil {
				t.Fatal(err)
			}
			if got.VirtualSize != c.want.VirtualSize || got.ClusterBits != c.want.ClusterBits || len(got.Extents) != len(c.want.Extents) ||
				len(got.Extents) > 0 && !reflect.DeepEqual(got.Extents, c.want.Extents) {
				t.Fatalf("got %+v, want %+v", got, c.want)
			}
		})
	}
}

func TestParseLegacyHostile(t *testing.T) {
	cases := map[string]string{
		"not an object":     `[1, 2]`,
		"missing size":      `{"cluster_bits": 16, "data_clusters": []}`,
		"missing bits":      `{"virtual_size": 1, "data_clusters": []}`,
		"missing clusters":  `{"virtual_size": 1, "cluster_bits": 16}`,
		"bits too small":    `{"virtual_size": 1, "cluster_bits": 8, "data_clusters": []}`,
		"bits too large":    `{"virtual_size": 1, "cluster_bits": 22, "data_clusters": []}`,
		"negative size":     `{"virtual_size": -1, "cluster_bits": 16, "data_clusters": []}`,
		"float size":        `{"virtual_size": 1.5, "cluster_bits": 16, "data_clusters": []}`,
		"string size":       `{"virtual_size": "1", "cluster_bits": 16, "data_clusters": []}`,
		"index past end":    `{"virtual_size": 65536, "cluster_bits": 16, "data_clusters": [1]}`,
		"interval past end": `{"virtual_size": 131072, "cluster_bits": 16, "data_clusters": [[0, 2]]}`,
		"reversed interval": `{"virtual_size": 1048576, "cluster_bits": 16, "data_clusters": [[5, 4]]}`,
		"negative index":    `{"virtual_size": 1048576, "cluster_bits": 16, "data_clusters": [-1]}`,
		"huge index":        `{"virtual_size": 1048576, "cluster_bits": 16, "data_clusters": [9223372036854775807]}`,
		"overflowing index": `{"virtual_size": 1048576, "cluster_bits": 16, "data_clusters": [99999999999999999999999]}`,
		"triple":            `{"virtual_size": 1048576, "cluster_bits": 16, "data_clusters": [[1, 2, 3]]}`,
		"single":            `{"virtual_size": 1048576, "cluster_bits": 16, "data_clusters": [[1]]}`,
		"nested":            `{"virtual_size": 1048576, "cluster_bits": 16, "data_clusters": [[[1]]]}`,
		"string index":      `{"virtual_size": 1048576, "cluster_bits": 16, "data_clusters": ["1"]}`,
		"clusters object":   `{"virtual_size": 1048576, "cluster_bits": 16, "data_clusters": {"a": 1}}`,
		"truncated":         `{"virtual_size": 1048576, "cluster_bits": 16, "data_clusters": [1, 2`,
		"empty":             ``,
		"size overflow":     `{"virtual_size": 9223372036854775807, "cluster_bits": 16, "data_clusters": []}`,
	}
	for name, in := range cases {
		if l, err := ParseLegacy(strings.NewReader(in)); err == nil {
			t.Errorf("%s: accepted %q as %+v", name, in, l)
		} else if strings.Contains(err.Error(), "\n") {
			t.Errorf("%s: multi-line error %q", name, err)
		}
	}
}

// An endless header is cut off at MaxLegacyBytes, without holding it all.
func TestParseLegacyEndless(t *testing.T) {
	defer func(v int64) { maxLegacyBytes = v }(maxLegacyBytes)
	maxLegacyBytes = 64 << 10
	r := io.MultiReader(strings.NewReader(`{"virtual_size": 1048576, "cluster_bits": 16, "data_clusters": [`),
		&repeatReader{pattern: []byte("0, ")})
	_, err := ParseLegacy(r)
	if err == nil || !strings.Contains(err.Error(), "longer than") {
		t.Fatalf("endless header: %v", err)
	}
}

type repeatReader struct {
	pattern []byte
	pos     int
}

func (r *repeatReader) Read(p []byte) (int, error) {
	for i := range p {
		p[i] = r.pattern[r.pos%len(r.pattern)]
		r.pos++
	}
	return len(p), nil
}

// A flat list of many contiguous clusters collapses into one extent.
func TestParseLegacyLargeFlatList(t *testing.T) {
	var b bytes.Buffer
	const n = 20000
	fmt.Fprintf(&b, `{"virtual_size": %d, "cluster_bits": 9, "data_clusters": [`, n*512)
	for i := 0; i < n; i++ {
		if i > 0 {
			b.WriteString(",")
		}
		fmt.Fprint(&b, i)
	}
	b.WriteString("]}")
	l, err := ParseLegacy(&b)
	if err != nil {
		t.Fatal(err)
	}
	if want := (Extents{{0, n * 512}}); !reflect.DeepEqual(l.Extents, want) {
		t.Fatalf("got %v", l.Extents)
	}
}

func TestSplit(t *testing.T) {
	x := Extents{{0, 10}, {20, 30}, {40, 50}}
	by := Extents{{5, 22}, {25, 26}, {28, 45}, {60, 70}}
	in, out := x.Split(by)
	if fmt.Sprint(in) != "[{5 10} {20 22} {25 26} {28 30} {40 45}]" || fmt.Sprint(out) != "[{0 5} {22 25} {26 28} {45 50}]" {
		t.Fatalf("in %v, out %v", in, out)
	}
	if in, out := x.Split(nil); len(in) != 0 || fmt.Sprint(out) != fmt.Sprint(x) {
		t.Fatalf("split by nothing: in %v, out %v", in, out)
	}
}

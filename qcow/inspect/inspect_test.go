package inspect

import (
	"bytes"
	"errors"
	"io"
	"math/rand"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/xapi-project/xapi-qcow-tool/qcow"
	"github.com/xapi-project/xapi-qcow-tool/qcow/bitmap"
)

// encode builds a qcow2 image of raw with the package's encoder: every
// non-zero cluster is stored.
func encode(t *testing.T, raw []byte, clusterBits uint32) []byte {
	t.Helper()
	cs := uint64(1) << clusterBits
	n := (uint64(len(raw)) + cs - 1) / cs
	data := bitmap.New(n)
	for i := uint64(0); i < n; i++ {
		end := min((i+1)*cs, uint64(len(raw)))
		if firstNonZero(raw[i*cs:end]) >= 0 {
			data.Set(i)
		}
	}
	var out bytes.Buffer
	a := qcow.Allocation{VirtualSize: uint64(len(raw)), ClusterBits: clusterBits, RefcountOrder: 4, Data: data}
	if _, err := qcow.Encode(&out, a, bytes.NewReader(raw)); err != nil {
		t.Fatal(err)
	}
	return out.Bytes()
}

func sampleRaw(seed int64) []byte {
	r := rand.New(rand.NewSource(seed))
	raw := make([]byte, 3<<20+512)
	for _, off := range []int{0, 70000, 1 << 20, 3<<20 - 40000} {
		r.Read(raw[off : off+40000])
	}
	return raw
}

func TestRefcountEntryWidths(t *testing.T) {
	// Sub-byte refcounts fill each byte from its least significant bits.
	b := []byte{0b1001_0110, 0xff, 0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc}
	cases := []struct {
		bits uint64
		i    uint64
		want uint64
	}{
		{1, 0, 0}, {1, 1, 1}, {1, 2, 1}, {1, 7, 1}, {1, 6, 0},
		{2, 0, 0b10}, {2, 1, 0b01}, {2, 3, 0b10},
		{4, 0, 0b0110}, {4, 1, 0b1001},
		{8, 2, 0x12}, {16, 1, 0x1234}, {32, 1, 0x56789abc}, {64, 0, 0x96ff123456789abc},
	}
	for _, c := range cases {
		rc := &refcounts{bits: c.bits}
		if got := rc.entry(b, c.i); got != c.want {
			t.Errorf("%d-bit entry %d: %#x, want %#x", c.bits, c.i, got, c.want)
		}
	}
}

func TestCounterIsSparse(t *testing.T) {
	k := newCounter()
	// Clusters far apart cost one chunk each, not the span between them.
	for _, c := range []uint64{0, 1 << 40, 1<<40 + 1, 1 << 50} {
		if n, _, _ := k.add(c, roleData); n != 0 {
			t.Fatalf("cluster %d: previous count %d", c, n)
		}
	}
	if len(k.chunks) != 3 {
		t.Fatalf("%d chunks for three regions", len(k.chunks))
	}
	if n, r, _ := k.add(1<<40, roleL2); n != 1 || r != roleData {
		t.Fatalf("second reference: previous %d %v", n, r)
	}
	if n, r, _ := k.add(1<<40, roleData); n != 2 || r != roleL2 {
		t.Fatalf("metadata must be remembered over data: previous %d %v", n, r)
	}
	if k.get(1<<40) != 3 || k.get(5) != 0 {
		t.Fatal("counts wrong")
	}
}

func TestMapMergesLikeQemu(t *testing.T) {
	var out []MapEntry
	m := &mapper{m: MapMerger{Emit: func(e MapEntry) error { out = append(out, e); return nil }}}
	cs := uint64(65536)
	m.add(piece{start: 0, length: cs, kind: qcow.ExtentData, host: 5 * cs, hasHost: true})
	m.add(piece{start: cs, length: cs, kind: qcow.ExtentData, host: 6 * cs, hasHost: true})     // contiguous: merged
	m.add(piece{start: 2 * cs, length: cs, kind: qcow.ExtentData, host: 9 * cs, hasHost: true}) // a jump: new entry
	m.add(piece{start: 3 * cs, length: cs, kind: qcow.ExtentData, host: 100, compressed: true})
	m.add(piece{start: 4 * cs, length: cs, kind: qcow.ExtentData, host: 7000, compressed: true}) // no offsets: merged
	m.add(piece{start: 5 * cs, length: cs, kind: qcow.ExtentZero})
	m.add(piece{start: 6 * cs, length: 3 * cs, kind: qcow.ExtentUnallocated})
	m.m.Flush()
	want := []string{"0+131072 data@327680", "131072+65536 data@589824", "196608+131072 data", "327680+65536 zero", "393216+196608 hole"}
	if len(out) != len(want) {
		t.Fatalf("%d entries: %+v", len(out), out)
	}
	for i, e := range out {
		s := ""
		switch {
		case e.Data:
			s = "data"
		case e.Present:
			s = "zero"
		default:
			s = "hole"
		}
		got := itoa(e.Start) + "+" + itoa(e.Length) + " " + s
		if e.Offset != nil {
			got += "@" + itoa(*e.Offset)
		}
		if got != want[i] {
			t.Errorf("entry %d: %s, want %s", i, got, want[i])
		}
	}
}

func itoa(n uint64) string {
	if n == 0 {
		return "0"
	}
	var b []byte
	for ; n > 0; n /= 10 {
		b = append([]byte{byte('0' + n%10)}, b...)
	}
	return string(b)
}

func TestAllocationSummary(t *testing.T) {
	cs := uint64(65536)
	sc := cs / 32
	c := &allocCounter{cs: cs}
	// cluster 0: one data subcluster, the rest zero → a data cluster
	c.add(piece{start: 0, length: sc, kind: qcow.ExtentData})
	c.add(piece{start: sc, length: cs - sc, kind: qcow.ExtentZero})
	// cluster 1: zero then unallocated → a zero cluster
	c.add(piece{start: cs, length: sc, kind: qcow.ExtentZero})
	c.add(piece{start: cs + sc, length: cs - sc, kind: qcow.ExtentUnallocated})
	// clusters 2-9 unallocated, 10-11 compressed data
	c.add(piece{start: 2 * cs, length: 8 * cs, kind: qcow.ExtentUnallocated})
	c.add(piece{start: 10 * cs, length: 2 * cs, kind: qcow.ExtentData, compressed: true})
	a := c.done()
	if a.DataClusters != 3 || a.ZeroClusters != 1 || a.UnallocatedClusters != 8 || a.CompressedClusters != 2 {
		t.Fatalf("%+v", a)
	}
	if a.DataBytes+a.ZeroBytes+a.UnallocatedBytes != 12*cs || a.DataBytes != sc+2*cs {
		t.Fatalf("bytes: %+v", a)
	}
}

func TestEncodedImageIsCleanAndMapped(t *testing.T) {
	raw := sampleRaw(1)
	img := encode(t, raw, 16)
	r := bytes.NewReader(img)
	res, err := CheckFile(r, int64(len(img)))
	if err != nil {
		t.Fatal(err)
	}
	if res.ExitCode() != 0 || res.AllocatedClusters == 0 {
		t.Fatalf("%+v", res)
	}
	m, err := mapFile(r, int64(len(img)), nil)
	if err != nil {
		t.Fatal(err)
	}
	var data uint64
	for _, e := range m {
		if e.Data {
			data += e.Length
			if e.Offset == nil || *e.Offset+e.Length > uint64(len(img)) {
				t.Fatalf("data extent without a valid offset: %+v", e)
			}
			if !bytes.Equal(img[*e.Offset:*e.Offset+e.Length], raw[e.Start:e.Start+e.Length]) {
				t.Fatalf("extent %+v does not hold the raw bytes", e)
			}
		} else if !e.Zero || e.Present {
			t.Fatalf("hole reported as %+v", e)
		}
	}
	in, err := InfoFile(r, int64(len(img)))
	if err != nil {
		t.Fatal(err)
	}
	if in.Allocation.DataBytes != data || in.VirtualSize != uint64(len(raw)) {
		t.Fatalf("info %+v, map data %d", in.Allocation, data)
	}
	// The stream of the same image gives the same map.
	sm, err := mapStream(bytes.NewReader(img))
	if err != nil {
		t.Fatal(err)
	}
	if len(sm) != len(m) {
		t.Fatalf("stream map %d entries, file map %d", len(sm), len(m))
	}
	for i := range m {
		if sm[i].Start != m[i].Start || sm[i].Length != m[i].Length || sm[i].Data != m[i].Data || (sm[i].Offset == nil) != (m[i].Offset == nil) {
			t.Fatalf("entry %d: stream %+v, file %+v", i, sm[i], m[i])
		}
	}
	sres, err := CheckStream(bytes.NewReader(img))
	if err != nil || sres.ExitCode() != 0 {
		t.Fatalf("stream check: %v %+v", err, sres)
	}
}

func TestCompare(t *testing.T) {
	raw := sampleRaw(2)
	img := encode(t, raw, 12)
	other := append([]byte(nil), raw...)
	other[1<<20+777] ^= 1
	longer := append(append([]byte(nil), raw...), make([]byte, 5000)...)
	dirtyTail := append(append([]byte(nil), raw...), make([]byte, 5000)...)
	dirtyTail[len(raw)+4000] = 9
	cases := []struct {
		name      string
		a, b      []byte
		identical bool
		at        uint64
	}{
		{"raw raw", raw, raw, true, 0},
		{"raw qcow2", raw, img, true, 0},
		{"qcow2 qcow2", img, img, true, 0},
		{"qcow2 raw differs", img, other, false, 1<<20 + 777},
		{"zero tail", longer, img, true, 0},
		{"non-zero tail", img, dirtyTail, false, uint64(len(raw)) + 4000},
	}
	for _, c := range cases {
		res, err := Compare(bytes.NewReader(c.a), int64(len(c.a)), bytes.NewReader(c.b), int64(len(c.b)))
		if err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		if res.Identical != c.identical || !c.identical && res.Offset != c.at {
			t.Errorf("%s: %+v, want identical %v at %d", c.name, res, c.identical, c.at)
		}
	}
}

// TestHostileImages changes bytes of a valid image at random: every
// function must return (an error or a result), never panic or hang.
func TestHostileImages(t *testing.T) {
	base := encode(t, sampleRaw(3), 9)
	r := rand.New(rand.NewSource(4))
	for i := 0; i < 150; i++ {
		img := append([]byte(nil), base...)
		for j := 0; j < 1+r.Intn(8); j++ {
			// Mostly the metadata at the front, where damage matters.
			off := r.Intn(min(len(img), 1<<14))
			if r.Intn(4) == 0 {
				off = r.Intn(len(img))
			}
			img[off] = byte(r.Intn(256))
		}
		if r.Intn(5) == 0 {
			img = img[:r.Intn(len(img))]
		}
		ra := bytes.NewReader(img)
		n := int64(len(img))
		InfoFile(ra, n)
		mapFile(ra, n, nil)
		CheckFile(ra, n)
		Compare(ra, n, bytes.NewReader(base), int64(len(base)))
		mapStream(bytes.NewReader(img))
		CheckStream(io.LimitReader(bytes.NewReader(img), n))
	}
}

// TestHostileCorpus feeds the decoder's corpus of hostile images
// (qcow/testdata/hostile) to every function, as files and as streams:
// each returns, without a panic, and check reports every image that the
// decoder refuses for its structure.
func TestHostileCorpus(t *testing.T) {
	files, err := filepath.Glob("../testdata/hostile/*.qcow2")
	if err != nil || len(files) < 50 {
		t.Fatalf("hostile corpus missing (%d files, %v)", len(files), err)
	}
	var clean []string
	for _, f := range files {
		img, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		ra, n := bytes.NewReader(img), int64(len(img))
		InfoFile(ra, n)
		mapFile(ra, n, nil)
		Compare(ra, n, ra, n)
		InfoStream(bytes.NewReader(img))
		mapStream(bytes.NewReader(img))
		CheckStream(bytes.NewReader(img))
		if res, err := CheckFile(ra, n); err == nil && res.ExitCode() == 0 {
			clean = append(clean, filepath.Base(f))
		}
	}
	// The images with a sound structure, which qemu-img check also finds
	// clean: the decoder refuses a backing file unless the import applies
	// a diff, an image marked corrupt, and a last data cluster one byte
	// short (qemu reads the missing byte as zero).
	if want := []string{"backing_refused.qcow2", "incompat_corrupt.qcow2", "truncated-at-0xefff.qcow2"}; !slices.Equal(clean, want) {
		t.Fatalf("check finds nothing wrong in %v, want only %v", clean, want)
	}
}

// mapFile and mapStream collect the map that MapFile and MapStream emit.
func mapFile(r io.ReaderAt, size int64, holes Holes) (m []MapEntry, err error) {
	err = MapFile(r, size, holes, func(e MapEntry) error { m = append(m, e); return nil })
	return m, err
}

func mapStream(r io.Reader) (m []MapEntry, err error) {
	err = MapStream(r, func(e MapEntry) error { m = append(m, e); return nil })
	return m, err
}

// TestGuestOrder: pieces arriving out of guest order come out in guest
// order, each as soon as what is before it has come; a range described
// twice is refused, and so is holding more than maxHeld pieces.
func TestGuestOrder(t *testing.T) {
	const n = 1000
	perm := rand.New(rand.NewSource(1)).Perm(n)
	var got []uint64
	g := &guestOrder{size: n * 512, emit: func(p piece) error { got = append(got, p.start, p.length); return nil }}
	for _, i := range perm {
		kind := qcow.ExtentData
		if i%3 == 0 {
			kind = qcow.ExtentZero
		}
		if err := g.add(piece{start: uint64(i) * 512, length: 512, kind: kind, host: uint64(i+1) * 512, hasHost: true}); err != nil {
			t.Fatal(err)
		}
	}
	if err := g.done(); err != nil {
		t.Fatal(err)
	}
	var pos uint64
	for i := 0; i < len(got); i += 2 {
		if got[i] != pos {
			t.Fatalf("piece at %d, want %d", got[i], pos)
		}
		pos += got[i+1]
	}
	if pos != n*512 || len(g.held) != 0 {
		t.Fatalf("covered %d of %d, %d held", pos, n*512, len(g.held))
	}

	g = &guestOrder{size: 4096, emit: func(piece) error { return nil }}
	g.add(piece{start: 1024, length: 512})
	g.add(piece{start: 0, length: 1024})
	if err := g.add(piece{start: 1024, length: 512, kind: qcow.ExtentZero}); err == nil {
		t.Fatal("a range described twice was accepted")
	}

	g = &guestOrder{size: 1 << 40, emit: func(piece) error { return nil }}
	var err error
	for i := uint64(1); err == nil && i < 2*maxHeld; i++ {
		err = g.add(piece{start: i * 1024, length: 512}) // never continues what came before
	}
	if !errors.Is(err, qcow.ErrNeedRandomAccess) || len(g.held) > maxHeld {
		t.Fatalf("held %d pieces: %v", len(g.held), err)
	}
}

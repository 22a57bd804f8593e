package qcow

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"math/rand"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"sync/atomic"
	"testing"
	"testing/iotest"
	"time"

	"github.com/xapi-project/xapi-qcow-tool/qcow/bitmap"
	"github.com/xapi-project/xapi-qcow-tool/tests/qemutest"
)

// streamOnly hides ReadAt and Seek: the decoder must see a pipe.
type streamOnly struct{ r io.Reader }

func (s streamOnly) Read(p []byte) (int, error) { return s.r.Read(p) }

// span is an extent without its data.
type span struct {
	Kind       ExtentKind
	Off, Len   uint64
	Host       uint64
	Compressed bool
}

// collect drains r, checking the extent invariants, and returns the
// extents. When disk is not nil, data extents are copied into it.
func collect(r *Reader, disk []byte, maxExtents int) ([]span, error) {
	size := r.Header().Size
	var spans []span
	for {
		e, err := r.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return spans, err
		}
		if e.Length == 0 || e.Offset >= size || e.Length > size-e.Offset {
			return spans, fmt.Errorf("extent %+v outside the virtual size %d", span{e.Kind, e.Offset, e.Length, e.HostOffset, e.Compressed}, size)
		}
		if e.Kind == ExtentData && uint64(len(e.Data)) != e.Length {
			return spans, fmt.Errorf("data extent at %#x: %d bytes of data for length %d", e.Offset, len(e.Data), e.Length)
		}
		if e.Kind != ExtentData && e.Data != nil {
			return spans, fmt.Errorf("%v extent with data", e.Kind)
		}
		if disk != nil && e.Kind == ExtentData {
			copy(disk[e.Offset:], e.Data)
		}
		spans = append(spans, span{e.Kind, e.Offset, e.Length, e.HostOffset, e.Compressed})
		if len(spans) > maxExtents {
			return spans, fmt.Errorf("more than %d extents", maxExtents)
		}
	}
	return spans, nil
}

// checkCover checks that spans cover [0, size) exactly once.
func checkCover(spans []span, size uint64) error {
	s := append([]span(nil), spans...)
	sort.Slice(s, func(i, j int) bool { return s[i].Off < s[j].Off })
	var at uint64
	for _, x := range s {
		if x.Off != at {
			return fmt.Errorf("extents leave a gap or overlap at %#x (next extent at %#x)", at, x.Off)
		}
		at += x.Len
	}
	if at != size {
		return fmt.Errorf("extents end at %#x, virtual size %#x", at, size)
	}
	return nil
}

func isGuestOrder(spans []span) bool {
	for i := 1; i < len(spans); i++ {
		if spans[i].Off < spans[i-1].Off {
			return false
		}
	}
	return true
}

// decodeAll decodes the whole disk of r and checks that its extents cover
// it exactly once.
func decodeAll(t *testing.T, what string, r *Reader, size uint64) ([]byte, []span) {
	t.Helper()
	disk := make([]byte, size)
	spans, err := collect(r, disk, 1<<24)
	if err != nil {
		t.Fatalf("%s: %v", what, err)
	}
	if err := checkCover(spans, size); err != nil {
		t.Fatalf("%s: %v", what, err)
	}
	return disk, spans
}

// decodeBoth decodes img as a stream (optionally one byte per read) and by
// offset; it checks both give disk contents equal to want and return the
// stream's spans.
func decodeBoth(t *testing.T, img, want []byte, oneByte bool, opts ReaderOptions) []span {
	t.Helper()
	var src io.Reader = streamOnly{bytes.NewReader(img)}
	if oneByte {
		src = iotest.OneByteReader(bytes.NewReader(img))
	}
	r, err := NewReader(src, opts)
	if err != nil {
		t.Fatalf("NewReader: %v", err)
	}
	size := r.Header().Size
	if want != nil && uint64(len(want)) != size {
		t.Fatalf("virtual size %d, want %d", size, len(want))
	}
	disk, spans := decodeAll(t, "stream", r, size)
	if want != nil && !bytes.Equal(disk, want) {
		t.Fatalf("stream: content differs at %#x", firstDiff(disk, want))
	}
	if lent := decodeLending(t, src, img, opts, oneByte); !bytes.Equal(lent, disk) {
		t.Fatalf("stream into lent memory: content differs at %#x", firstDiff(lent, disk))
	}
	ra, err := NewReaderAt(bytes.NewReader(img), int64(len(img)), opts)
	if err != nil {
		t.Fatalf("NewReaderAt: %v", err)
	}
	disk2, spans2 := decodeAll(t, "reader at", ra, size)
	if !isGuestOrder(spans2) {
		t.Fatalf("reader at: extents not in guest order")
	}
	if !bytes.Equal(disk, disk2) {
		t.Fatalf("stream and reader at differ at %#x", firstDiff(disk, disk2))
	}
	return spans
}

// decodeLending decodes img as a stream whose data runs land in memory the
// caller lends (ReaderOptions.Lend), of varying sizes: whole, short,
// less than a cluster, none. Each lent buffer must come back as the next extent,
// a data extent at the buffer's offset whose Data is the buffer's memory.
func decodeLending(t *testing.T, _ io.Reader, img []byte, opts ReaderOptions, oneByte bool) []byte {
	t.Helper()
	var src io.Reader = streamOnly{bytes.NewReader(img)}
	if oneByte {
		src = iotest.OneByteReader(bytes.NewReader(img))
	}
	var (
		lent     []byte
		lentOff  uint64
		lentRuns int
	)
	rng := rand.New(rand.NewSource(int64(len(img))))
	opts.Lend = func(off uint64, n int) []byte {
		if lent != nil {
			t.Fatalf("Lend(%#x) while the buffer lent at %#x is out", off, lentOff)
		}
		switch rng.Intn(4) {
		case 0:
			return nil
		case 1:
			n = 1 + rng.Intn(n) // short, maybe less than a cluster
		}
		lent, lentOff = make([]byte, n), off
		return lent
	}
	r, err := NewReader(src, opts)
	if err != nil {
		t.Fatalf("NewReader (lending): %v", err)
	}
	disk := make([]byte, r.Header().Size)
	for {
		e, err := r.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("stream (lending): %v", err)
		}
		if lent != nil {
			inLent := e.Kind == ExtentData && e.Offset == lentOff && len(e.Data) > 0 && len(e.Data) <= len(lent) && &e.Data[0] == &lent[0]
			// Only a lent buffer of less than a cluster may be declined.
			if !inLent && len(lent) >= 1<<r.Header().ClusterBits {
				t.Fatalf("the extent after the buffer lent at %#x of %d bytes is %v at %#x (%d bytes), not in that buffer", lentOff, len(lent), e.Kind, e.Offset, e.Length)
			}
			if inLent {
				lentRuns++
			}
			lent = nil
		}
		if e.Kind == ExtentData {
			copy(disk[e.Offset:], e.Data)
		}
	}
	lendingUsed.Add(int64(lentRuns))
	return disk
}

// lendingUsed counts the lentRuns decodeLending saw used, over all tests:
// TestLendingUsed checks the path was taken.
var lendingUsed atomic.Int64

func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}

// encodeRandom makes an image with our encoder: each cluster is data, zero
// or unallocated at random.
func encodeRandom(t testing.TB, seed int64, size uint64, cb, order uint32) (img, raw []byte, a Allocation) {
	r := rand.New(rand.NewSource(seed))
	clusters := (size + 1<<cb - 1) >> cb
	data, zero := bitmap.New(clusters), bitmap.New(clusters)
	raw = make([]byte, size)
	for g := uint64(0); g < clusters; g++ {
		switch r.Intn(3) {
		case 0:
			data.Set(g)
			lo, hi := g<<cb, min((g+1)<<cb, size)
			r.Read(raw[lo:hi])
		case 1:
			zero.Set(g)
		}
	}
	a = Allocation{VirtualSize: size, ClusterBits: cb, RefcountOrder: order, Data: data, Zero: zero}
	var out bytes.Buffer
	if _, err := Encode(&out, a, bytes.NewReader(raw)); err != nil {
		t.Fatal(err)
	}
	return out.Bytes(), raw, a
}

func TestReaderEncodeRoundTrip(t *testing.T) {
	for _, cb := range []uint32{9, 12, 16, 21} {
		for _, order := range []uint32{0, 4, 6} {
			size := uint64(3<<20) + 1536
			img, raw, a := encodeRandom(t, int64(cb*10+order), size, cb, order)
			spans := decodeBoth(t, img, raw, false, ReaderOptions{})
			for _, s := range spans {
				for g := s.Off >> cb; g<<cb < s.Off+s.Len; g++ {
					want := ExtentUnallocated
					if a.Data.Test(g) {
						want = ExtentData
					} else if a.Zero.Test(g) {
						want = ExtentZero
					}
					if s.Kind != want {
						t.Fatalf("cb %d order %d: guest cluster %d is %v, want %v", cb, order, g, s.Kind, want)
					}
				}
			}
		}
	}
	// One small case one byte at a time.
	img, raw, _ := encodeRandom(t, 1, 64<<10+512, 12, 4)
	decodeBoth(t, img, raw, true, ReaderOptions{})
}

func TestReaderEmptyAndTiny(t *testing.T) {
	for _, size := range []uint64{0, 512, 4096, 5000} {
		img, raw, _ := encodeRandom(t, 7, size, 12, 4)
		decodeBoth(t, img, raw, false, ReaderOptions{})
	}
}

// TestReaderPast4TiB: a 5 TiB disk with 64 KiB clusters has an L1 table of
// several clusters; data above 4 TiB must land at the right guest offsets.
func TestReaderPast4TiB(t *testing.T) {
	const cb = 16
	size := uint64(5) << 40
	clusters := size >> cb
	data := bitmap.New(clusters)
	marks := []uint64{0, 1, (4 << 40) >> cb, (4<<40)>>cb + 1, (4<<40 + 123<<20) >> cb, clusters - 1}
	for _, g := range marks {
		data.Set(g)
	}
	src := &markSource{}
	var out bytes.Buffer
	a := Allocation{VirtualSize: size, ClusterBits: cb, RefcountOrder: 4, Data: data}
	l, err := Encode(&out, a, src)
	if err != nil {
		t.Fatal(err)
	}
	if l.L1Clusters < 2 {
		t.Fatalf("L1 spans %d clusters", l.L1Clusters)
	}
	img := out.Bytes()
	check := func(name string, r *Reader) {
		var total uint64
		seen := map[uint64]bool{}
		for {
			e, err := r.Next()
			if err == io.EOF {
				break
			}
			if err != nil {
				t.Fatalf("%s: %v", name, err)
			}
			total += e.Length
			if e.Kind != ExtentData {
				continue
			}
			for off := uint64(0); off < e.Length; off += 1 << cb {
				g := (e.Offset + off) >> cb
				if !data.Test(g) {
					t.Fatalf("%s: data extent at %#x for a cluster without data", name, e.Offset+off)
				}
				if got := string(e.Data[off : off+16]); got != fmt.Sprintf("%016x", g) {
					t.Fatalf("%s: guest cluster %#x holds %q", name, g, got)
				}
				seen[g] = true
			}
		}
		if total != size || len(seen) != len(marks) {
			t.Fatalf("%s: extents cover %d bytes (want %d), %d data clusters (want %d)", name, total, size, len(seen), len(marks))
		}
	}
	r, err := NewReader(streamOnly{bytes.NewReader(img)}, ReaderOptions{})
	if err != nil {
		t.Fatal(err)
	}
	check("stream", r)
	ra, err := NewReaderAt(bytes.NewReader(img), int64(len(img)), ReaderOptions{})
	if err != nil {
		t.Fatal(err)
	}
	check("reader at", ra)
}

// markSource reads as each 64 KiB cluster's index in hex at its start.
type markSource struct{}

func (markSource) ReadAt(p []byte, off int64) (int, error) {
	clear(p)
	if off%(1<<16) == 0 && len(p) >= 16 {
		copy(p, fmt.Sprintf("%016x", off>>16))
	}
	return len(p), nil
}

// ---- images made by qemu ----

// scatter is a set of qemu-io writes touching data, zero and discard
// paths at several places of a 6 MiB disk.
var scatter = []string{
	"write -P 0x5a 0 64k",
	"write -z 1M 128k",
	"write -P 0x11 1100k 20k",
	"discard 2M 64k",
	"write -P 0x22 3M 1M",
	"write -P 0x33 5000k 4k",
	"write -P 0x44 6143k 1k",
}

type qemuCase struct {
	name   string
	create []string // qemu-img create options (after -f qcow2)
	io     [][]string
	// convert, when set, turns the image into the tested one with these
	// qemu-img convert options (after the source).
	convert  []string
	snapshot bool
}

func qemuCases() []qemuCase {
	var cs []qemuCase
	for _, compat := range []string{"0.10", "1.1"} {
		for _, cl := range []string{"512", "4k", "64k", "2M"} {
			cs = append(cs, qemuCase{name: "compat" + compat + "-" + cl,
				create: []string{"-o", "compat=" + compat + ",cluster_size=" + cl}, io: [][]string{scatter}})
		}
	}
	for _, rb := range []string{"1", "16", "64"} {
		cs = append(cs, qemuCase{name: "refcount" + rb, create: []string{"-o", "refcount_bits=" + rb}, io: [][]string{scatter}})
	}
	cs = append(cs,
		qemuCase{name: "zlib", io: [][]string{scatter}, convert: []string{"-c", "-o", "compression_type=zlib"}},
		qemuCase{name: "zstd", io: [][]string{scatter}, convert: []string{"-c", "-o", "compression_type=zstd"}},
		qemuCase{name: "zlib-4k", io: [][]string{scatter}, convert: []string{"-c", "-o", "cluster_size=4k"}},
		qemuCase{name: "convert", io: [][]string{scatter}, convert: []string{}},
		qemuCase{name: "convert-512", io: [][]string{scatter}, convert: []string{"-o", "cluster_size=512"}},
		qemuCase{name: "extl2-convert", io: [][]string{scatter}, convert: []string{"-o", "extended_l2=on,cluster_size=64k"}},
		qemuCase{name: "extl2-writes", create: []string{"-o", "extended_l2=on,cluster_size=64k"},
			io: [][]string{scatter, {"write -P 0x66 4k 4k", "write -P 0x67 72k 8k", "write -z 12k 4k", "write -P 0x68 2052k 4k", "discard 3M 8k"}}},
		qemuCase{name: "empty"},
		qemuCase{name: "empty-compat0.10", create: []string{"-o", "compat=0.10"}},
		qemuCase{name: "lazy", create: []string{"-o", "lazy_refcounts=on"}, io: [][]string{scatter}},
		qemuCase{name: "prealloc", create: []string{"-o", "preallocation=metadata"}, io: [][]string{scatter}},
		qemuCase{name: "snapshots", io: [][]string{scatter, {"write -P 0x77 0 32k", "write -P 0x78 3M 64k", "write -z 3200k 64k", "write -P 0x79 5M 128k"}}, snapshot: true},
	)
	return cs
}

func makeQemuImage(t *testing.T, dir string, c qemuCase) (img string, raw []byte) {
	t.Helper()
	img = filepath.Join(dir, c.name+".qcow2")
	args := append([]string{"create", "-q", "-f", "qcow2"}, c.create...)
	qemutest.Img(t, append(args, img, "6M")...)
	for i, cmds := range c.io {
		if i > 0 && c.snapshot {
			qemutest.Img(t, "snapshot", "-c", fmt.Sprintf("s%d", i), img)
		}
		qemutest.IO(t, img, cmds...)
	}
	if c.convert != nil {
		conv := filepath.Join(dir, c.name+"-conv.qcow2")
		qemutest.Img(t, append(append([]string{"convert", "-f", "qcow2", "-O", "qcow2"}, c.convert...), img, conv)...)
		img = conv
	}
	rawPath := filepath.Join(dir, c.name+".raw")
	qemutest.Img(t, "convert", "-f", "qcow2", "-O", "raw", img, rawPath)
	raw, err := os.ReadFile(rawPath)
	if err != nil {
		t.Fatal(err)
	}
	return img, raw
}

func TestReaderQemuImages(t *testing.T) {
	qemutest.Need(t)
	dir := t.TempDir()
	for _, c := range qemuCases() {
		t.Run(c.name, func(t *testing.T) {
			img, raw := makeQemuImage(t, dir, c)
			b, err := os.ReadFile(img)
			if err != nil {
				t.Fatal(err)
			}
			spans := decodeBoth(t, b, raw, c.name == "compat1.1-4k", ReaderOptions{})
			var comp int
			for _, s := range spans {
				if s.Compressed {
					comp++
				}
			}
			if strings.HasPrefix(c.name, "z") && comp == 0 {
				t.Fatalf("no compressed extents")
			}
		})
	}
}

// TestReaderStreamLayoutErrors: an image whose L1 follows the data cannot
// be streamed within a small buffer, but is read by offset.
func TestReaderBufferBound(t *testing.T) {
	qemutest.Need(t)
	dir := t.TempDir()
	c := qemuCase{name: "snap", io: [][]string{scatter, {"write -P 0x77 0 32k", "write -P 0x78 3M 64k"}}, snapshot: true}
	img, raw := makeQemuImage(t, dir, c)
	b, _ := os.ReadFile(img)
	decodeBoth(t, b, raw, false, ReaderOptions{})
	r, err := NewReader(streamOnly{bytes.NewReader(b)}, ReaderOptions{MaxBuffered: 4096})
	if err != nil {
		t.Fatal(err)
	}
	_, err = collect(r, nil, 1<<20)
	if !errors.Is(err, ErrNeedRandomAccess) {
		t.Fatalf("want ErrNeedRandomAccess, got %v", err)
	}
	t.Log(err)
}

// TestReaderBacking: a backing file is refused unless allowed.
func TestReaderBacking(t *testing.T) {
	clusters := uint64(16)
	data := bitmap.New(clusters)
	data.Set(3)
	a := Allocation{VirtualSize: clusters << 16, ClusterBits: 16, RefcountOrder: 4, Data: data, BackingFile: "base.img", BackingFormat: "raw"}
	var out bytes.Buffer
	if _, err := Encode(&out, a, markSource{}); err != nil {
		t.Fatal(err)
	}
	if _, err := NewReader(bytes.NewReader(out.Bytes()), ReaderOptions{}); err == nil || !strings.Contains(err.Error(), "backing file") {
		t.Fatalf("want a backing file error, got %v", err)
	}
	r, err := NewReader(bytes.NewReader(out.Bytes()), ReaderOptions{AllowBacking: true})
	if err != nil {
		t.Fatal(err)
	}
	if r.Header().BackingFile != "base.img" {
		t.Fatalf("backing file %q", r.Header().BackingFile)
	}
	spans, err := collect(r, nil, 100)
	if err != nil || checkCover(spans, a.VirtualSize) != nil {
		t.Fatalf("%v %v", err, spans)
	}
}

// ---- hostile streams ----

// hostileBase is a small image of our encoder: 4 KiB clusters, 4 MiB, two
// L2 tables, data and zero clusters in both.
func hostileBase(t testing.TB) ([]byte, []byte, *Layout) {
	const cb = 12
	size := uint64(4 << 20)
	clusters := size >> cb
	data, zero := bitmap.New(clusters), bitmap.New(clusters)
	raw := make([]byte, size)
	r := rand.New(rand.NewSource(9))
	for _, g := range []uint64{0, 1, 2, 10, 511, 512, 513, 700, 1023} {
		data.Set(g)
		r.Read(raw[g<<cb : (g+1)<<cb])
	}
	for _, g := range []uint64{5, 6, 600} {
		zero.Set(g)
	}
	var out bytes.Buffer
	l, err := Encode(&out, Allocation{VirtualSize: size, ClusterBits: cb, RefcountOrder: 4, Data: data, Zero: zero}, bytes.NewReader(raw))
	if err != nil {
		t.Fatal(err)
	}
	return out.Bytes(), raw, l
}

type mutation struct {
	name string
	mut  func(b []byte, l *Layout) []byte
}

func put64(off uint64, v uint64) func(b []byte, l *Layout) []byte {
	return func(b []byte, l *Layout) []byte { be64(b, off, v); return b }
}

func be64(b []byte, off, v uint64) {
	for i := uint64(0); i < 8; i++ {
		b[off+i] = byte(v >> (56 - 8*i))
	}
}

func be32(b []byte, off uint64, v uint32) {
	for i := uint64(0); i < 4; i++ {
		b[off+i] = byte(v >> (24 - 8*i))
	}
}

func hdr32(off uint64, v uint32) func(b []byte, l *Layout) []byte {
	return func(b []byte, l *Layout) []byte { be32(b, off, v); return b }
}

// l2e sets the L2 entry of guest cluster g (of the first two tables).
func l2e(g uint64, v func(l *Layout) uint64) func(b []byte, l *Layout) []byte {
	return func(b []byte, l *Layout) []byte {
		be64(b, l.L2Offset+g*8, v(l))
		return b
	}
}

func l1e(i uint64, v func(l *Layout) uint64) func(b []byte, l *Layout) []byte {
	return func(b []byte, l *Layout) []byte {
		be64(b, l.L1Offset+i*8, v(l))
		return b
	}
}

func hostileCorpus() []mutation {
	const cs = 4096
	copied := uint64(1) << 63
	ms := []mutation{
		{"magic", hdr32(0, 0x514649fa)},
		{"version1", hdr32(4, 1)},
		{"version4", hdr32(4, 4)},
		{"cluster_bits8", hdr32(20, 8)},
		{"cluster_bits22", hdr32(20, 22)},
		{"cluster_bits_huge", hdr32(20, 0xffffffff)},
		{"size_huge", put64(24, 1<<60)},
		{"size_past_l1", put64(24, 1<<40)},
		{"crypt", hdr32(32, 1)},
		{"l1_size0", hdr32(36, 0)},
		{"l1_size_max", hdr32(36, 0xffffffff)},
		{"l1_size_4Mi", hdr32(36, 4<<20)},
		{"l1_offset_unaligned", func(b []byte, l *Layout) []byte { be64(b, 40, l.L1Offset+512); return b }},
		{"l1_offset0", put64(40, 0)},
		{"l1_offset_2^57", put64(40, 1<<57)},
		{"l1_offset_far", put64(40, 1<<50)},
		{"l1_offset_rt", func(b []byte, l *Layout) []byte { be64(b, 40, l.RefcountTableOffset); return b }},
		{"rt_offset_unaligned", put64(48, cs+8)},
		{"rt_offset0", put64(48, 0)},
		{"rt_offset_l1", func(b []byte, l *Layout) []byte { be64(b, 48, l.L1Offset); return b }},
		{"rt_clusters0", hdr32(56, 0)},
		{"rt_clusters_huge", hdr32(56, 0xffffffff)},
		{"snapshots_no_table", hdr32(60, 1)},
		{"snapshots_huge", func(b []byte, l *Layout) []byte { be32(b, 60, 0xffffffff); be64(b, 64, cs); return b }},
		{"incompat_unknown", put64(72, 1<<5)},
		{"incompat_corrupt", put64(72, IncompatCorrupt)},
		{"incompat_external", put64(72, IncompatExternalData)},
		{"header_length_short", hdr32(100, 7)},
		{"header_length_huge", hdr32(100, 0xfff8)},
		{"refcount_order7", hdr32(96, 7)},
		{"compression_type2", func(b []byte, l *Layout) []byte { be64(b, 72, IncompatCompressionType); b[104] = 2; return b }},
		{"compression_type_nobit", func(b []byte, l *Layout) []byte { b[104] = 1; return b }},
		{"backing_outside", func(b []byte, l *Layout) []byte { be64(b, 8, 0xffffff); be32(b, 16, 10); return b }},
		{"backing_long", func(b []byte, l *Layout) []byte { be64(b, 8, 200); be32(b, 16, 2000); return b }},
		{"backing_refused", func(b []byte, l *Layout) []byte { be64(b, 8, 2048); be32(b, 16, 4); copy(b[2048:], "base"); return b }},
		{"extension_overrun", func(b []byte, l *Layout) []byte { be32(b, 112, 0x12345678); be32(b, 116, 0xffffff); return b }},
		{"extension_encryption", func(b []byte, l *Layout) []byte { be32(b, 112, ExtEncryptionHeader); be32(b, 116, 0); return b }},
		{"refblock_unaligned", func(b []byte, l *Layout) []byte { be64(b, l.RefcountTableOffset, l.RefcountBlockOffset+8); return b }},
		{"refblock_into_l1", func(b []byte, l *Layout) []byte { be64(b, l.RefcountTableOffset+8, l.L1Offset); return b }},
		{"refblock_is_data", func(b []byte, l *Layout) []byte { be64(b, l.RefcountTableOffset+8, l.DataOffset); return b }},

		{"l1_to_rt", l1e(0, func(l *Layout) uint64 { return l.RefcountTableOffset | copied })},
		{"l1_to_refblock", l1e(0, func(l *Layout) uint64 { return l.RefcountBlockOffset | copied })},
		{"l1_to_l1", l1e(0, func(l *Layout) uint64 { return l.L1Offset | copied })},
		{"l1_far", l1e(0, func(l *Layout) uint64 { return 1<<55 | copied })},
		{"l1_unaligned", l1e(0, func(l *Layout) uint64 { return (l.L2Offset + 512) | copied })},
		{"l1_reserved", l1e(0, func(l *Layout) uint64 { return l.L2Offset | copied | 2 })},
		{"l1_reserved_high", l1e(0, func(l *Layout) uint64 { return l.L2Offset | 1<<60 })},
		{"l1_duplicate", l1e(1, func(l *Layout) uint64 { return l.L2Offset | copied })},
		{"l1_to_data", l1e(0, func(l *Layout) uint64 { return l.DataOffset | copied })},

		{"l2_to_header", l2e(0, func(l *Layout) uint64 { return 512 | copied })},
		{"l2_to_rt", l2e(0, func(l *Layout) uint64 { return l.RefcountTableOffset | copied })},
		{"l2_to_refblock", l2e(0, func(l *Layout) uint64 { return l.RefcountBlockOffset | copied })},
		{"l2_to_l1", l2e(0, func(l *Layout) uint64 { return l.L1Offset | copied })},
		{"l2_to_own_l2", l2e(0, func(l *Layout) uint64 { return l.L2Offset | copied })},
		{"l2_to_other_l2", l2e(0, func(l *Layout) uint64 { return (l.L2Offset + cs) | copied })},
		{"l2_duplicate", l2e(1, func(l *Layout) uint64 { return l.DataOffset | copied })},
		{"l2_zero_duplicate", l2e(5, func(l *Layout) uint64 { return l.DataOffset | copied | 1 })},
		{"l2_far", l2e(3, func(l *Layout) uint64 { return 1<<55 | copied })},
		{"l2_past_end", l2e(3, func(l *Layout) uint64 { return (l.Size() + 16*cs) | copied })},
		{"l2_unaligned", l2e(0, func(l *Layout) uint64 { return (l.DataOffset + 512) | copied })},
		{"l2_reserved", l2e(0, func(l *Layout) uint64 { return l.DataOffset | copied | 4 })},
		{"l2_reserved_high", l2e(0, func(l *Layout) uint64 { return l.DataOffset | copied | 1<<57 })},
		{"l2_behind", func(b []byte, l *Layout) []byte {
			// the second table maps a cluster that sits before it: the
			// first L2 table's own cluster is taken, so use the L1's.
			be64(b, l.L2Offset+512*8+3*8, (l.L1Offset)|copied)
			return b
		}},
		{"compressed_garbage", l2e(3, func(l *Layout) uint64 { return 1<<62 | 1<<58 | l.DataOffset })},
		{"compressed_2^56", l2e(3, func(l *Layout) uint64 { return 1<<62 | (1<<56 - 100) })},
		{"compressed_into_l1", l2e(3, func(l *Layout) uint64 { return 1<<62 | (l.L1Offset + 10) })},
		{"compressed_past_end", l2e(3, func(l *Layout) uint64 { return 1<<62 | (l.Size() + 10*cs + 7) })},
	}
	return append(ms, snapshotMutations()...)
}

// expectFailure decodes img both ways and wants an error from each, one
// line long, without extents outside the disk.
func expectFailure(t *testing.T, name string, img []byte, opts ReaderOptions) {
	t.Helper()
	for _, mode := range []string{"stream", "at"} {
		var r *Reader
		var err error
		if mode == "stream" {
			r, err = NewReader(streamOnly{bytes.NewReader(img)}, opts)
		} else {
			r, err = NewReaderAt(bytes.NewReader(img), int64(len(img)), opts)
		}
		if err == nil {
			_, err = collect(r, nil, 1<<20)
		}
		if err == nil {
			t.Errorf("%s (%s): no error", name, mode)
			continue
		}
		msg := err.Error()
		if strings.Contains(msg, "\n") || !strings.HasPrefix(msg, "qcow2 ") {
			t.Errorf("%s (%s): badly formed error %q", name, mode, msg)
		}
		var fe *FormatError
		if !errors.As(err, &fe) {
			t.Errorf("%s (%s): error %T is not a *FormatError", name, mode, err)
		}
		if testing.Verbose() {
			t.Logf("%-22s %-6s %v", name, mode, err)
		}
	}
}

func TestReaderHostile(t *testing.T) {
	base, raw, l := hostileBase(t)
	decodeBoth(t, base, raw, false, ReaderOptions{})
	for _, m := range hostileCorpus() {
		img := m.mut(bytes.Clone(base), l)
		expectFailure(t, m.name, img, ReaderOptions{})
	}
}

func TestReaderTruncated(t *testing.T) {
	base, _, l := hostileBase(t)
	cs := l.ClusterSize()
	points := []uint64{0, 1, 50, 71, 72, 104, cs - 1, cs, l.RefcountBlockOffset, l.L1Offset, l.L1Offset + 8,
		l.L2Offset, l.L2Offset + 100, l.L2Offset + cs, l.DataOffset, l.DataOffset + cs/2, uint64(len(base)) - 1}
	for p := l.DataOffset; p < uint64(len(base)); p += 3 * cs {
		points = append(points, p, p+777)
	}
	for _, p := range points {
		if p >= uint64(len(base)) {
			continue
		}
		name := fmt.Sprintf("truncated@%#x", p)
		expectFailure(t, name, base[:p], ReaderOptions{})
		r, err := NewReader(streamOnly{bytes.NewReader(base[:p])}, ReaderOptions{})
		if err == nil {
			_, err = collect(r, nil, 1<<20)
		}
		if !errors.Is(err, io.ErrUnexpectedEOF) {
			t.Errorf("%s: error does not wrap io.ErrUnexpectedEOF: %v", name, err)
		}
	}
}

// relocate moves n clusters at from to the end of the image and repoints
// the reference at refOff to them.
func relocate(b []byte, from, n, refOff, flags uint64, cs uint64) []byte {
	to := uint64(len(b))
	b = append(b, b[from:from+n*cs]...)
	clear(b[from : from+n*cs])
	be64(b, refOff, to|flags)
	return b
}

// TestReaderOutOfOrder: tables that arrive before what maps them are held
// (within MaxBuffered) and used; past the bound the error says to use a
// file.
func TestReaderOutOfOrder(t *testing.T) {
	base, raw, l := hostileBase(t)
	cs := l.ClusterSize()
	// L1 after the data: both L2 tables and all data arrive first.
	img := relocate(bytes.Clone(base), l.L1Offset, l.L1Clusters, 40, 0, cs)
	decodeBoth(t, img, raw, false, ReaderOptions{})
	r, err := NewReader(streamOnly{bytes.NewReader(img)}, ReaderOptions{MaxBuffered: int64(8 * cs)})
	if err == nil {
		_, err = collect(r, nil, 1<<20)
	}
	if !errors.Is(err, ErrNeedRandomAccess) || !strings.Contains(err.Error(), "given as a file") {
		t.Fatalf("want ErrNeedRandomAccess, got %v", err)
	}
	// The second L2 table after the data it maps.
	img = relocate(bytes.Clone(base), l.L2Offset+cs, 1, l.L1Offset+8, 1<<63, cs)
	decodeBoth(t, img, raw, true, ReaderOptions{})
	// Garbage after the image is drained and ignored.
	img = append(bytes.Clone(base), make([]byte, 3*cs+5)...)
	decodeBoth(t, img, raw, false, ReaderOptions{})
}

// TestReaderPendingLimit: references to clusters far ahead are bounded.
func TestReaderPendingLimit(t *testing.T) {
	base, _, l := hostileBase(t)
	img := bytes.Clone(base)
	// Point the first L2 table's 512 entries at scattered clusters far
	// ahead: every one is its own pending run.
	for g := uint64(0); g < 512; g++ {
		be64(img, l.L2Offset+g*8, (1<<40+g*2*l.ClusterSize())|1<<63)
	}
	r, err := NewReader(streamOnly{bytes.NewReader(img)}, ReaderOptions{MaxBuffered: 1 << 16})
	if err != nil {
		t.Fatal(err)
	}
	r.s.maxPending = 100 // the real bound is MaxBuffered/128, at least 4096
	_, err = collect(r, nil, 1<<20)
	if !errors.Is(err, ErrNeedRandomAccess) || !strings.Contains(err.Error(), "references to clusters not yet seen") {
		t.Fatalf("want a pending-limit error, got %v", err)
	}
	t.Log(err)
}

// ---- cost of hostile input ----

// decodeCost decodes img with both decoders as far as they go, as
// FuzzReader does, and returns the bytes allocated per decode (averaged)
// and the slowest decode.
func decodeCost(t *testing.T, img []byte) (perRun uint64, slowest time.Duration) {
	t.Helper()
	opts := ReaderOptions{MaxBuffered: 1 << 20, AllowBacking: true}
	decode := func() {
		if r, err := NewReader(streamOnly{bytes.NewReader(img)}, opts); err == nil {
			collect(r, nil, 1<<20)
		}
		if r, err := NewReaderAt(bytes.NewReader(img), int64(len(img)), opts); err == nil {
			collect(r, nil, 1<<20)
		}
	}
	decode() // warm up: nothing global is lazily built inside the count
	const runs = 10
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	for range runs {
		start := time.Now()
		decode()
		slowest = max(slowest, time.Since(start))
	}
	runtime.ReadMemStats(&after)
	return (after.TotalAlloc - before.TotalAlloc) / runs, slowest
}

// TestReaderCostFollowsInput: what a decode allocates follows the bytes of
// the image, not the sizes it declares (cluster size, runs of clusters,
// compressed lengths). The decoders used to allocate 1 MiB read buffers
// (and a whole declared cluster for the header) whatever the input: 2 MiB
// per decode of a 6 KiB image, which made FuzzReader crawl and let a
// 4 KiB image claiming 2 MiB clusters cost 4 MiB.
func TestReaderCostFollowsInput(t *testing.T) {
	base, _, l := hostileBase(t)
	cases := map[string][]byte{}
	for i, s := range fuzzSeeds(t) {
		cases[fmt.Sprintf("seed%d", i)] = s
	}
	cases["base"] = base

	// A 4 KiB image declaring 2 MiB clusters.
	huge := bytes.Clone(base[:4096])
	be32(huge, 20, MaxClusterBits)
	cases["cluster_bits21_4KiB"] = huge

	// The stream ends inside the first data cluster of a run of them.
	cases["truncated_in_data"] = bytes.Clone(base[:l.DataOffset+100])

	// Every entry of the first L2 table is a compressed cluster of the
	// largest length at the start of the data, where the image ends.
	comp := bytes.Clone(base[:l.DataOffset+64])
	x := 62 - (l.ClusterBits - 8)
	for g := uint64(0); g < 512; g++ {
		be64(comp, l.L2Offset+g*8, 1<<62|(1<<(62-x)-1)<<x|(l.DataOffset+8))
	}
	cases["compressed_at_end"] = comp

	for name, img := range cases {
		t.Run(name, func(t *testing.T) {
			perRun, slowest := decodeCost(t, img)
			// A deflate or zstd decoder's state, plus a few hundred bytes
			// per table entry referencing a cluster.
			limit := 192<<10 + 4*uint64(len(img))
			t.Logf("%d-byte image: %d bytes allocated per decode (limit %d), slowest %v", len(img), perRun, limit, slowest)
			if perRun > limit {
				t.Errorf("a decode of a %d-byte image allocates %d bytes, more than %d", len(img), perRun, limit)
			}
			// Wall time measures the machine as much as the code: under
			// -race on two loaded cores a sound decode took 260 ms. The
			// allocation bound above is the measure; this only catches a
			// decode that loops over what the image declares, which takes
			// seconds, not milliseconds.
			if slowest > 2*time.Second {
				t.Errorf("a decode of a %d-byte image took %v", len(img), slowest)
			}
		})
	}
}

// TestLendingUsed: decoding a stream with random data into lent memory
// (decodeBoth) fills the lentRuns rather than declining them all.
func TestLendingUsed(t *testing.T) {
	before := lendingUsed.Load()
	img, raw, _ := encodeRandom(t, 11, 8<<20, 16, 4)
	decodeBoth(t, img, raw, false, ReaderOptions{})
	if lendingUsed.Load() == before {
		t.Fatal("no data run was read into lent memory")
	}
}

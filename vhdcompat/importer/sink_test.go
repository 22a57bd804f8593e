package importer

import (
	"bytes"
	"errors"
	"math/rand"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/xapi-project/xapi-qcow-tool/vhdcompat/rawdisk"
)

// countingTarget records the calls a sink makes to a real disk.
type countingTarget struct {
	d      *rawdisk.Disk
	writes [][2]int64 // off, len
	zeros  [][2]int64
}

func (c *countingTarget) WriteAtAnyAlignment(p []byte, off int64) error {
	c.writes = append(c.writes, [2]int64{off, int64(len(p))})
	return c.d.WriteAtAnyAlignment(p, off)
}

func (c *countingTarget) Zero(off, n int64) error {
	c.zeros = append(c.zeros, [2]int64{off, n})
	return c.d.Zero(off, n)
}

func (c *countingTarget) Direct() bool { return c.d.Direct() }

// disk creates a file of size bytes filled with 0xAA (so that zeroing
// shows) and opens it.
func disk(t *testing.T, size int64, direct bool) (*countingTarget, string) {
	t.Helper()
	p := filepath.Join(t.TempDir(), "disk.img")
	if err := os.WriteFile(p, bytes.Repeat([]byte{0xAA}, int(size)), 0o644); err != nil {
		t.Fatal(err)
	}
	d, err := rawdisk.OpenFile(p, direct, 0o644)
	if err != nil {
		if direct {
			t.Skipf("SKIP: O_DIRECT refused on %s: %v", p, err)
		}
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	return &countingTarget{d: d}, p
}

func content(t *testing.T, p string) []byte {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func randomBytes(seed int64, n int) []byte {
	b := make([]byte, n)
	rand.New(rand.NewSource(seed)).Read(b)
	return b
}

func TestSinkCoalescesAdjacentData(t *testing.T) {
	const size = 8 << 20
	ct, p := disk(t, size, false)
	s := NewSink(ct, SinkOptions{Size: size, KnownZeroFrom: size})
	want := randomBytes(1, 6<<20)
	for off := 0; off < len(want); off += 64 << 10 {
		if err := s.Data(int64(off), want[off:off+64<<10]); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.Flush(); err != nil {
		t.Fatal(err)
	}
	// 96 extents of 64 KiB: one 4 MiB write and one 2 MiB write.
	if len(ct.writes) != 2 || ct.writes[0] != [2]int64{0, 4 << 20} || ct.writes[1] != [2]int64{4 << 20, 2 << 20} {
		t.Fatalf("writes %v, want [0 4MiB] [4MiB 2MiB]", ct.writes)
	}
	got := content(t, p)
	if !bytes.Equal(got[:len(want)], want) || !bytes.Equal(got[len(want):], bytes.Repeat([]byte{0xAA}, size-len(want))) {
		t.Fatal("content differs")
	}
	// A gap ends a write.
	ct.writes = nil
	s.Data(0, want[:4096])
	s.Data(8192, want[:4096])
	s.Flush()
	if len(ct.writes) != 2 {
		t.Fatalf("writes across a gap %v, want 2", ct.writes)
	}
}

func TestSinkZeroSemantics(t *testing.T) {
	const size = 1 << 20
	for _, tc := range []struct {
		name          string
		delta         bool
		knownZeroFrom int64
		wantZeroCalls int
		zeroFlag      byte // what a zero-flag range reads as afterwards
		unalloc       byte // what an unallocated range reads as afterwards
	}{
		{"default", false, size, 2, 0, 0},
		{"delta", true, size, 1, 0, 0xAA},
		{"prezeroed", false, 0, 0, 0xAA, 0xAA}, // trusted: nothing is touched
		{"prezeroed delta", true, 0, 0, 0xAA, 0xAA},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ct, p := disk(t, size, false)
			s := NewSink(ct, SinkOptions{Size: size, Delta: tc.delta, KnownZeroFrom: tc.knownZeroFrom})
			if err := s.Zero(0, 256<<10); err != nil {
				t.Fatal(err)
			}
			if err := s.Unallocated(512<<10, 256<<10); err != nil {
				t.Fatal(err)
			}
			if err := s.Flush(); err != nil {
				t.Fatal(err)
			}
			if len(ct.zeros) != tc.wantZeroCalls || len(ct.writes) != 0 {
				t.Fatalf("zero calls %v writes %v, want %d zero calls and no writes", ct.zeros, ct.writes, tc.wantZeroCalls)
			}
			got := content(t, p)
			check := func(name string, a, b int, want byte) {
				if !bytes.Equal(got[a:b], bytes.Repeat([]byte{want}, b-a)) {
					t.Fatalf("%s range does not read as %#x", name, want)
				}
			}
			check("zero-flag", 0, 256<<10, tc.zeroFlag)
			check("untouched", 256<<10, 512<<10, 0xAA)
			check("unallocated", 512<<10, 768<<10, tc.unalloc)
			check("untouched tail", 768<<10, size, 0xAA)
		})
	}
}

func TestSinkAllZeroData(t *testing.T) {
	const size = 16 << 20
	// Fresh file: zeros within data are skipped; only the data is written.
	p := filepath.Join(t.TempDir(), "sparse.img")
	d, err := rawdisk.OpenFile(p, false, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if err := d.Truncate(size); err != nil {
		t.Fatal(err)
	}
	ct := &countingTarget{d: d}
	s := NewSink(ct, SinkOptions{Size: size, KnownZeroFrom: 0})
	data := randomBytes(2, 64<<10)
	chunk := make([]byte, 1<<20)
	copy(chunk[512<<10:], data) // one data cluster in the middle of each MiB
	for off := int64(0); off < size; off += 1 << 20 {
		if err := s.Data(off, chunk); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.Flush(); err != nil {
		t.Fatal(err)
	}
	if s.Stats.Written != 16*64<<10 || len(ct.zeros) != 0 {
		t.Fatalf("written %d bytes, zero calls %d; want only the 16 data clusters written", s.Stats.Written, len(ct.zeros))
	}
	var st syscall.Stat_t
	if err := syscall.Stat(p, &st); err != nil {
		t.Fatal(err)
	}
	if alloc := st.Blocks * 512; alloc > 2*16*64<<10 {
		t.Fatalf("file allocates %d bytes for 1 MiB of data", alloc)
	}
	got := content(t, p)
	for off := 0; off < size; off += 1 << 20 {
		if !bytes.Equal(got[off:off+1<<20], chunk) {
			t.Fatalf("content differs in MiB at %d", off)
		}
	}

	// Old content: long zero runs are zeroed cheaply, short ones written.
	ct2, p2 := disk(t, 1<<20, false)
	s2 := NewSink(ct2, SinkOptions{Size: 1 << 20, KnownZeroFrom: 1 << 20})
	buf := make([]byte, 1<<20)
	copy(buf, data[:4096])                // data, then 252 KiB of zeros (zeroed)
	copy(buf[256<<10:], data[:4096])      // data, then 4 KiB of zeros (written)
	copy(buf[256<<10+8192:], data[:4096]) // data, then zeros to the end (zeroed)
	if err := s2.Data(0, buf); err != nil {
		t.Fatal(err)
	}
	if err := s2.Flush(); err != nil {
		t.Fatal(err)
	}
	if len(ct2.zeros) != 2 || len(ct2.writes) != 2 {
		t.Fatalf("zeros %v writes %v: want two long runs zeroed, two writes", ct2.zeros, ct2.writes)
	}
	if !bytes.Equal(content(t, p2), buf) {
		t.Fatal("content differs")
	}
}

func TestSinkSmallZeroRidesAlong(t *testing.T) {
	// Extended L2: 2 KiB zero subclusters between data make one write.
	ct, p := disk(t, 1<<20, false)
	s := NewSink(ct, SinkOptions{Size: 1 << 20, KnownZeroFrom: 1 << 20})
	want := randomBytes(3, 64<<10)
	for off := 0; off < len(want); off += 4096 {
		s.Data(int64(off), want[off:off+2048])
		s.Zero(int64(off+2048), 2048)
		clear(want[off+2048 : off+4096])
	}
	if err := s.Flush(); err != nil {
		t.Fatal(err)
	}
	if len(ct.writes) != 1 || len(ct.zeros) != 0 {
		t.Fatalf("writes %v zeros %v, want one write", ct.writes, ct.zeros)
	}
	if !bytes.Equal(content(t, p)[:len(want)], want) {
		t.Fatal("content differs")
	}
}

func TestSinkBounds(t *testing.T) {
	const size = 64 << 10
	ct, p := disk(t, 1<<20, false) // the file is larger than the bound
	s := NewSink(ct, SinkOptions{Size: size, KnownZeroFrom: size})
	var be *BoundsError
	for _, f := range []func() error{
		func() error { return s.Data(size-512, make([]byte, 1024)) },
		func() error { return s.Data(-1, make([]byte, 1)) },
		func() error { return s.Zero(size, 1) },
		func() error { return s.Unallocated(0, size+1) },
		func() error { return s.Zero(1<<62, 1<<62) },
	} {
		if err := f(); !errors.As(err, &be) {
			t.Fatalf("got %v, want a BoundsError", err)
		}
	}
	if err := s.Flush(); err != nil {
		t.Fatal(err)
	}
	if len(ct.writes)+len(ct.zeros) != 0 || !bytes.Equal(content(t, p), bytes.Repeat([]byte{0xAA}, 1<<20)) {
		t.Fatal("an out-of-bounds extent changed the disk")
	}
	// The last byte is in bounds.
	if err := s.Data(size-1, []byte{1}); err != nil {
		t.Fatal(err)
	}
}

func TestSinkDirectOddSizes(t *testing.T) {
	// O_DIRECT with 512-byte extents, out of order, on a file whose size
	// is not a multiple of 4096: unaligned pieces go through the page
	// cache, the file never grows.
	const size = 3<<20 + 1536
	ct, p := disk(t, size, true)
	s := NewSink(ct, SinkOptions{Size: size, KnownZeroFrom: size})
	want := bytes.Repeat([]byte{0xAA}, size)
	r := rand.New(rand.NewSource(4))
	for _, off := range r.Perm(1 << 20 / 512) { // the first MiB, in random order
		o := off * 512
		switch off % 7 {
		case 0:
			s.Zero(int64(o), 512)
			clear(want[o : o+512])
		case 1:
			// left as is
		default:
			r.Read(want[o : o+512])
			if err := s.Data(int64(o), want[o:o+512]); err != nil {
				t.Fatal(err)
			}
		}
	}
	// A long sequential run exercises aligned direct writes.
	r.Read(want[1<<20 : 2<<20])
	if err := s.Data(1<<20, want[1<<20:2<<20]); err != nil {
		t.Fatal(err)
	}
	r.Read(want[size-5000:])
	if err := s.Data(size-5000, want[size-5000:]); err != nil {
		t.Fatal(err)
	}
	if err := s.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := ct.d.Sync(); err != nil {
		t.Fatal(err)
	}
	got := content(t, p)
	if len(got) != size {
		t.Fatalf("file size %d, want %d", len(got), size)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("content differs")
	}
}

// TestSinkLend: bytes filled into the memory Lend lends and
// passed to Data are written where they belong, in one write with their
// neighbours; a lent buffer that the next call does not use (or uses only in
// part) leaves nothing of itself in the pending write.
func TestSinkLend(t *testing.T) {
	const size = 8 << 20
	ct, p := disk(t, size, false)
	s := NewSink(ct, SinkOptions{Size: size, KnownZeroFrom: size})
	want := bytes.Repeat([]byte{0xAA}, size)
	src := randomBytes(3, 3<<20)

	// 64 KiB copied, then 1 MiB lent and filled in place.
	if err := s.Data(0, src[:64<<10]); err != nil {
		t.Fatal(err)
	}
	copy(want, src[:64<<10])
	b := s.Lend(64<<10, 1<<20)
	if len(b) != 1<<20 {
		t.Fatalf("lent %d bytes, want 1 MiB", len(b))
	}
	copy(b, src[64<<10:])
	copy(want[64<<10:], src[64<<10:64<<10+1<<20])
	if err := s.Data(64<<10, b); err != nil {
		t.Fatal(err)
	}

	// Lent, filled only in part: the rest of the lent buffer is not written.
	b = s.Lend(64<<10+1<<20, 1<<20)
	copy(b, bytes.Repeat([]byte{0x55}, len(b)))
	if err := s.Data(64<<10+1<<20, b[:4096]); err != nil {
		t.Fatal(err)
	}
	copy(want[64<<10+1<<20:], bytes.Repeat([]byte{0x55}, 4096))

	// Lent, then something else: the lent buffer is taken back untouched.
	b = s.Lend(2<<20, 1<<20)
	copy(b, bytes.Repeat([]byte{0x66}, len(b)))
	if err := s.Zero(6<<20, 64<<10); err != nil {
		t.Fatal(err)
	}
	clear(want[6<<20 : 6<<20+64<<10])
	if err := s.Flush(); err != nil {
		t.Fatal(err)
	}
	if ct.writes[0] != [2]int64{0, 64<<10 + 1<<20 + 4096} {
		t.Fatalf("first write %v, want the copied and lent bytes in one", ct.writes[0])
	}
	// Outside the disk: nothing lent.
	if b := s.Lend(size, 4096); b != nil {
		t.Fatalf("lent %d bytes past the end of the disk", len(b))
	}
	if b := s.Lend(size-4096, 1<<20); len(b) != 4096 {
		t.Fatalf("lent %d bytes for the last 4 KiB", len(b))
	}
	if err := s.Flush(); err != nil {
		t.Fatal(err)
	}
	if got := content(t, p); !bytes.Equal(got, want) {
		t.Fatal("content differs")
	}
}

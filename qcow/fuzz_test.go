package qcow

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"
)

// fuzzSeeds are small real images: qemu's (testdata/seeds) and our own.
func fuzzSeeds(tb testing.TB) [][]byte {
	var seeds [][]byte
	files, _ := filepath.Glob(filepath.Join("testdata", "seeds", "*.qcow2"))
	for _, name := range files {
		b, err := os.ReadFile(name)
		if err != nil {
			tb.Fatal(err)
		}
		seeds = append(seeds, b)
	}
	if len(seeds) == 0 {
		tb.Fatal("no seed images in testdata/seeds")
	}
	for _, cb := range []uint32{9, 10} {
		img, _, _ := encodeRandom(tb, int64(cb), 8<<10+512, cb, 4)
		seeds = append(seeds, img)
	}
	return seeds
}

func FuzzParseHeader(f *testing.F) {
	for _, s := range fuzzSeeds(f) {
		f.Add(s[:min(len(s), 4096)])
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		h, err := ParseHeader(b)
		if err != nil {
			return
		}
		cs := h.ClusterSize()
		if h.ClusterBits < MinClusterBits || h.ClusterBits > MaxClusterBits {
			t.Fatalf("cluster bits %d accepted", h.ClusterBits)
		}
		if h.RefcountTableOffset%cs != 0 || h.RefcountTableOffset == 0 || h.L1Size > 0 && h.L1TableOffset%cs != 0 {
			t.Fatalf("unaligned tables accepted: %+v", h)
		}
		if uint64(h.L1Size)*h.L2Entries()*cs < h.Size {
			t.Fatalf("L1 of %d entries cannot map %d bytes", h.L1Size, h.Size)
		}
	})
}

// fuzzDecode runs one decoder over img and checks the invariants: no
// extent outside the virtual size, no overlap, bounded total length.
func fuzzDecode(t *testing.T, r *Reader, err error) {
	if err != nil {
		return
	}
	size := r.Header().Size
	var total uint64
	for n := 0; ; n++ {
		e, err := r.Next()
		if err != nil {
			return
		}
		if e.Length == 0 || e.Offset >= size || e.Length > size-e.Offset {
			t.Fatalf("extent %#x+%#x outside the virtual size %#x", e.Offset, e.Length, size)
		}
		if e.Kind == ExtentData && uint64(len(e.Data)) != e.Length {
			t.Fatalf("data extent with %d bytes for length %d", len(e.Data), e.Length)
		}
		total += e.Length
		if total > size {
			t.Fatalf("extents cover %#x bytes, more than the virtual size %#x", total, size)
		}
		if n > 1<<22 {
			t.Fatal("too many extents")
		}
	}
}

// FuzzReader: run it with -fuzzminimizetime=500x (make fuzz does).
// Minimising a qcow2 image is wasted work: removing any byte shifts every
// offset after it, so no candidate keeps the new coverage, and the
// minimiser's O(n²) subset pass runs for the whole default 60 s on a
// seed-sized input (a few KiB to 94 KiB); its executions are only reported
// when it returns, so a short run showed ~20 execs in 10 s with both
// workers busy. A time limit does not help (the coordinator kills and
// restarts a worker whose minimisation overruns it); a count does, and
// still lets a crasher have its tail cut.
func FuzzReader(f *testing.F) {
	for _, s := range fuzzSeeds(f) {
		f.Add(s)
	}
	opts := ReaderOptions{MaxBuffered: 1 << 20, AllowBacking: true}
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := NewReader(streamOnly{bytes.NewReader(b)}, opts)
		fuzzDecode(t, r, err)
		r, err = NewReaderAt(bytes.NewReader(b), int64(len(b)), opts)
		fuzzDecode(t, r, err)
		fuzzLending(t, b, opts)
	})
}

// fuzzLending decodes img as a stream into lent memory (Lend): every
// lent buffer of a cluster or more must serve the very next extent.
func fuzzLending(t *testing.T, img []byte, opts ReaderOptions) {
	var lent []byte
	var lentOff uint64
	opts.Lend = func(off uint64, n int) []byte {
		lent, lentOff = make([]byte, n), off
		return lent
	}
	r, err := NewReader(streamOnly{bytes.NewReader(img)}, opts)
	if err != nil {
		return
	}
	cs := 1 << r.Header().ClusterBits
	for n := 0; n <= 1<<22; n++ {
		e, err := r.Next()
		if err != nil {
			return
		}
		if lent != nil {
			inLent := e.Kind == ExtentData && e.Offset == lentOff && len(e.Data) > 0 && len(e.Data) <= len(lent) && &e.Data[0] == &lent[0]
			if !inLent && len(lent) >= cs {
				t.Fatalf("a buffer of %d bytes lent at %#x was followed by a %v extent at %#x", len(lent), lentOff, e.Kind, e.Offset)
			}
		}
		lent = nil
	}
}

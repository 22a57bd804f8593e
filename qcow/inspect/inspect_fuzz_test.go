package inspect

import (
	"bytes"
	"io"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/xapi-project/xapi-qcow-tool/tests/zerotail"
)

// The support commands read images nobody vouches for: a customer's file
// or a stream from anywhere. Whatever the bytes, info, map and check must
// return (no panic, no hang) with memory within fuzzHeapBound.

// fuzzHeapBound is the most heap one call may add. The decoder of a
// stream may buffer streamBuffer (64 MiB); a file's L1 (32 MiB) and
// refcount table (8 MiB) are read whole, as bytes and as entries.
const fuzzHeapBound = 192 << 20

// fuzzHang is how long one input may take before it counts as a hang
// (generous: the long runs share two cores with everything else).
const fuzzHang = 60 * time.Second

// inspectSeeds are qemu's images and the hostile corpus of the qcow
// package.
func inspectSeeds(f *testing.F) [][]byte {
	var seeds [][]byte
	for _, glob := range []string{"../testdata/seeds/*.qcow2", "../testdata/hostile/*.qcow2"} {
		files, _ := filepath.Glob(glob)
		for _, name := range files {
			b, err := os.ReadFile(name)
			if err != nil {
				f.Fatal(err)
			}
			seeds = append(seeds, b)
		}
	}
	if len(seeds) < 50 {
		f.Fatalf("only %d seed images in ../testdata", len(seeds))
	}
	return seeds
}

// bounded runs fn within fuzzHeapBound and fuzzHang (zerotail.Bounded).
func bounded(t *testing.T, what string, fn func()) {
	zerotail.Bounded(t, what, fuzzHeapBound, fuzzHang, fn)
}

// checkMap checks that a map covers [0, size) once, in order.
func checkMap(t *testing.T, what string, m []MapEntry, size uint64) {
	var pos uint64
	for _, e := range m {
		if e.Start != pos || e.Length == 0 || e.Length > size-pos {
			t.Fatalf("%s: entry %+v after %#x in a %#x-byte disk", what, e, pos, size)
		}
		pos += e.Length
	}
	if pos != size && len(m) > 0 {
		t.Fatalf("%s: the map covers %#x of %#x bytes", what, pos, size)
	}
}

// checkInfo checks that the allocation adds up to the virtual size.
func checkInfo(t *testing.T, what string, in *Info) {
	a := in.Allocation
	if sum := a.DataBytes + a.ZeroBytes + a.UnallocatedBytes; sum != in.VirtualSize {
		t.Fatalf("%s: allocation %+v adds up to %d, not the virtual size %d", what, a, sum, in.VirtualSize)
	}
}

// FuzzInspectFile runs info, map and check on the bytes as a file,
// followed by up to 256 MiB of zeros (a sparse file) so that tables may
// point past the bytes given.
func FuzzInspectFile(f *testing.F) {
	for _, s := range inspectSeeds(f) {
		f.Add(s, uint16(0))
	}
	f.Fuzz(func(t *testing.T, b []byte, tail uint16) {
		file := zerotail.File{B: b, Size: int64(len(b)) + int64(tail)<<12}
		bounded(t, "info", func() {
			if in, err := InfoFile(file, file.Size); err == nil {
				checkInfo(t, "info", in)
			}
		})
		bounded(t, "map", func() {
			m, err := mapFile(file, file.Size, nil)
			if err == nil {
				im, _ := openImage(file, file.Size)
				checkMap(t, "map", m, im.h.Size)
			}
		})
		bounded(t, "check", func() {
			res, err := CheckFile(file, file.Size)
			if err == nil && res.ExitCode() < 0 {
				t.Fatalf("check: exit code %d", res.ExitCode())
			}
		})
	})
}

// FuzzInspectStream runs info, map and check on the bytes as a stream.
func FuzzInspectStream(f *testing.F) {
	for _, s := range inspectSeeds(f) {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		pipe := func() io.Reader { return struct{ io.Reader }{bytes.NewReader(b)} }
		bounded(t, "info", func() {
			if in, err := InfoStream(pipe()); err == nil {
				checkInfo(t, "info", in)
			}
		})
		bounded(t, "map", func() {
			m, err := mapStream(pipe())
			if err == nil {
				in, _ := InfoStream(pipe())
				checkMap(t, "map", m, in.VirtualSize)
			}
		})
		bounded(t, "check", func() {
			res, err := CheckStream(pipe())
			if err == nil && res.ExitCode() < 0 {
				t.Fatalf("check: exit code %d", res.ExitCode())
			}
		})
	})
}

package vhd_test

import (
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/xapi-project/xapi-qcow-tool/tests/zerotail"
	"github.com/xapi-project/xapi-qcow-tool/vhdcompat/vhd"
)

// check and the hybrid source read VHDs nobody vouches for. Whatever the
// bytes, Check must return (no panic, no hang) within the heap bound, and
// agree with NewReader: an image Check finds no corruption in opens, and
// one NewReader opens and walks has no corruption.

// checkHeapBound is the most heap one Check may add: the BAT entries that
// map the virtual size (MaxTableEntries, 64 MiB) and their order (as
// much again), the batmap's bits and a MiB of reads.
const checkHeapBound = 192 << 20

// checkHang is how long one input may take before it counts as a hang
// (generous: fuzzing shares two cores with everything else).
const checkHang = 60 * time.Second

// FuzzCheck runs Check on the bytes as a file followed by up to 32 MiB of
// zeros (a sparse file), so that tables may point past the bytes given.
func FuzzCheck(f *testing.F) {
	n := 0
	filepath.WalkDir(corpusDir, func(p string, d fs.DirEntry, err error) error {
		if err == nil && !d.IsDir() && !strings.HasSuffix(p, "MANIFEST") {
			b, err := os.ReadFile(p)
			if err != nil {
				f.Fatal(err)
			}
			f.Add(b, uint16(0))
			n++
		}
		return nil
	})
	if n < 40 {
		f.Fatalf("only %d seed images in %s", n, corpusDir)
	}
	f.Fuzz(func(t *testing.T, b []byte, tail uint16) {
		file := zerotail.File{B: b, Size: int64(len(b)) + int64(tail)<<9}
		var rep *vhd.Report
		var err error
		zerotail.Bounded(t, "check", checkHeapBound, checkHang, func() {
			rep, err = vhd.Check(file, file.Size)
		})
		if err != nil {
			return
		}
		if len(rep.Findings) > vhd.MaxFindings || rep.Corruptions+rep.Warnings != len(rep.Findings)+rep.NotShown {
			t.Fatalf("%d findings, %d not shown, %d corruptions, %d warnings", len(rep.Findings), rep.NotShown, rep.Corruptions, rep.Warnings)
		}
		var walkErr, nerr error
		zerotail.Bounded(t, "reader", checkHeapBound, checkHang, func() {
			var v *vhd.Reader
			if v, nerr = vhd.NewReader(file, file.Size); nerr != nil {
				return
			}
			var pos int64
			walkErr = v.Extents(func(e vhd.Extent) error {
				if e.Start != pos || e.Length <= 0 {
					t.Fatalf("extent %+v does not follow %d", e, pos)
				}
				pos += e.Length
				return nil
			})
			if walkErr == nil && pos != v.VirtualSize() && v.VirtualSize() > 0 {
				t.Fatalf("extents cover %d of %d bytes", pos, v.VirtualSize())
			}
		})
		switch {
		case rep.Corruptions == 0 && (nerr != nil || walkErr != nil):
			t.Fatalf("Check finds no corruption, the reader refuses: %v %v", nerr, walkErr)
		case rep.Corruptions > 0 && nerr == nil && walkErr == nil:
			t.Fatalf("the reader opens and walks what Check calls corrupt: %v", rep.Findings)
		case nerr != nil && firstCorruption(rep) != "" && firstCorruption(rep) != nerr.Error():
			t.Fatalf("the reader refuses with %q, Check's first corruption is %q", nerr, firstCorruption(rep))
		}
	})
}

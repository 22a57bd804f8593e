package tests

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/xapi-project/xapi-qcow-tool/tests/qemutest"
)

// qemu's own test corpus (tests/qemu-iotests of qemu 7.2, the release of
// the machine's qemu-img), rebuilt: each row makes the image one iotest
// makes, with qemu-img/qemu-io and byte pokes, and every image goes through
// our three import paths and our check, judged by qemu-img.

// iotestKind is what a row's image must do to us.
type iotestKind int

const (
	// valid: qemu reads it; every import is byte-identical to
	// qemu-img convert -O raw.
	valid iotestKind = iota
	// damaged: refused with one line before the damage reaches the
	// destination, or imported identically where qemu reads it.
	damaged
	// refused: must be refused with one line, nothing written (external
	// data files: the data is not in the stream).
	refused
)

type iotestCase struct {
	iotest string // qemu-iotests number
	name   string // what the image is
	kind   iotestKind
	// make builds the image t.qcow2 in dir; for an image with a backing
	// file it returns the backing file (imports are then deltas applied
	// onto qemu's reading of it).
	make func(t *testing.T, dir, img string) (base string)
	// streamLate: in a stream, what qemu refuses at open comes after the
	// data (a snapshot table at the end of the file), so a pipe refuses it
	// only once the data is written.
	streamLate bool
	// onePipe: the file is large (sparse), so only stream_decode reads
	// it through a pipe, to keep the corpus fast.
	onePipe bool
}

// create makes a qcow2 image with qemu-img create options and qemu-io
// commands.
func create(opts, size string, io ...string) func(t *testing.T, dir, img string) string {
	return func(t *testing.T, dir, img string) string {
		qemutest.Create(t, img, opts, size, io...)
		return ""
	}
}

// after runs f on the image once make has built it: the row constructor
// for images that qemu-img and qemu-io shape further.
func after(make func(t *testing.T, dir, img string) string, f func(t *testing.T, img string)) func(t *testing.T, dir, img string) string {
	return func(t *testing.T, dir, img string) string {
		base := make(t, dir, img)
		f(t, img)
		return base
	}
}

// then runs f after make, with the layout of the image make built.
func then(make func(t *testing.T, dir, img string) string, f func(t *testing.T, img string, l qcowLayout)) func(t *testing.T, dir, img string) string {
	return after(make, func(t *testing.T, img string) { f(t, img, layoutOf(t, img)) })
}

// withBacking makes a backing image base.qcow2 (qemu-img create options
// and qemu-io commands) and a top image over it.
func withBacking(size string, baseIO []string, topOpts string, topIO ...string) func(t *testing.T, dir, img string) string {
	return func(t *testing.T, dir, img string) string {
		base := filepath.Join(dir, "base.qcow2")
		create("", size, baseIO...)(t, dir, base)
		args := []string{"create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", base}
		if topOpts != "" {
			args = append(args, "-o", topOpts)
		}
		qemutest.Img(t, append(args, img)...)
		if len(topIO) > 0 {
			qemutest.IO(t, img, topIO...)
		}
		return base
	}
}

func iotestCases() []iotestCase {
	const top = 1 << 63 // COPIED
	pokeAt := func(field int64, width int, v uint64) func(t *testing.T, img string, l qcowLayout) {
		return func(t *testing.T, img string, l qcowLayout) { pokeBE(t, img, field, width, v) }
	}
	dataFile := func(opts string, io ...string) func(t *testing.T, dir, img string) string {
		return func(t *testing.T, dir, img string) string {
			// Commas in -o values are doubled.
			data := strings.ReplaceAll(filepath.Join(dir, "t.data"), ",", ",,")
			return create(strings.TrimPrefix(opts+",data_file="+data, ","), "4M", io...)(t, dir, img)
		}
	}
	snapshotted := func(compat string, n int) func(t *testing.T, dir, img string) string {
		return after(create(compat, "4M", "write -P 0x11 0 192k"), func(t *testing.T, img string) {
			for i := range n {
				qemutest.Img(t, "snapshot", "-c", fmt.Sprintf("sn%d", i), img)
				qemutest.IO(t, img, fmt.Sprintf("write -P 0x%x %dk 64k", 0x20+i, 64*i))
			}
		})
	}
	return []iotestCase{
		// 029: snapshots whose L1 table differs from the active one, VM state.
		{"029", "snapshot with a smaller L1, VM state written, snapshot applied", valid, after(create("", "4M"), func(t *testing.T, img string) {
			qemutest.Img(t, "snapshot", "-c", "foo", img)
			qemutest.IO(t, img, "write -b 0 4k", "write -P 0x29 1M 64k")
			qemutest.Img(t, "snapshot", "-a", "foo", img)
		}), false, false},
		{"029", "1 KiB clusters, 4 MiB of VM state, snapshot applied", valid, after(create("cluster_size=1024", "1M", "write -P 0x29 0 8k"), func(t *testing.T, img string) {
			qemutest.Img(t, "snapshot", "-c", "foo", img)
			qemutest.IO(t, img, "write -b 0 4M")
			qemutest.Img(t, "snapshot", "-a", "foo", img)
		}), false, false},
		{"029", "VM state at 1 TiB", valid, after(create("", "4M", "write -P 0x11 0 64k", "write -b -P 0x11 1T 4k"), func(t *testing.T, img string) {
			qemutest.Img(t, "snapshot", "-c", "foo", img)
		}), false, false},
		{"029", "512-byte clusters, size and L1 shrunk under a snapshot", valid, then(create("cluster_size=512", "4M", "write -P 0x29 0 512"), func(t *testing.T, img string, l qcowLayout) {
			qemutest.Img(t, "snapshot", "-c", "foo", img)
			pokeBE(t, img, hdrSize, 8, 512)
			pokeBE(t, img, hdrL1Size, 4, 1)
		}), false, false},

		// 031: unknown header extensions, a backing file name added later.
		{"031", "compat=0.10 with an unknown header extension", valid, then(create("compat=0.10", "4M", "write -P 0x31 64k 64k"), func(t *testing.T, img string, l qcowLayout) {
			addHeaderExt(t, img, 0x12345678, []byte("This is a test header extension"))
		}), false, false},
		{"031", "compat=1.1 with an unknown header extension", valid, then(create("compat=1.1", "4M", "write -P 0x31 64k 64k"), func(t *testing.T, img string, l qcowLayout) {
			addHeaderExt(t, img, 0x12345678, []byte("This is a test header extension"))
		}), false, false},
		{"031", "unknown extension, then rebase -u onto no backing file", valid, then(create("compat=1.1", "4M", "write -P 0x31 64k 64k"), func(t *testing.T, img string, l qcowLayout) {
			addHeaderExt(t, img, 0x12345678, []byte("This is a test header extension"))
			qemutest.Img(t, "rebase", "-u", "-b", "", img)
		}), false, false},

		// 036: feature bits.
		{"036", "unknown incompatible feature bit 63", damaged, then(create("", "4M"), func(t *testing.T, img string, l qcowLayout) {
			setFeatureBit(t, img, hdrIncompat, 63)
		}), false, false},
		{"036", "unknown incompatible bits 61-63 with names in the feature table", damaged, then(create("", "4M"), func(t *testing.T, img string, l qcowLayout) {
			for _, b := range []uint{61, 62, 63} {
				setFeatureBit(t, img, hdrIncompat, b)
			}
			delHeaderExt(t, img, 0x6803f857)
			name := make([]byte, 48)
			name[1] = 63
			copy(name[2:], "Test feature")
			addHeaderExt(t, img, 0x6803f857, name)
		}), false, false},
		{"036", "unknown autoclear feature bit 63", valid, then(create("", "4M", "write -P 0x36 0 64k"), func(t *testing.T, img string, l qcowLayout) {
			setFeatureBit(t, img, hdrAutoclear, 63)
		}), false, false},

		// 060: metadata overlaps and bad references.
		{"060", "L2 reference into the L1 table", damaged, then(create("", "4M"), func(t *testing.T, img string, l qcowLayout) {
			pokeBE(t, img, l.l1, 8, top|uint64(l.l1))
		}), false, false},
		{"060", "data cluster reference into a refcount block", damaged, then(create("", "4M"), func(t *testing.T, img string, l qcowLayout) {
			l2 := l.l1 + l.cs // the next cluster: past the end of a fresh image
			pokeBE(t, img, l.l1, 8, top|uint64(l2))
			pokeBE(t, img, l.rb+2*(l2/l.cs), 2, 1)
			pokeBE(t, img, l2, 8, top|uint64(l.rb))
			if err := os.Truncate(img, l2+l.cs); err != nil { // a whole L2 table
				t.Fatal(err)
			}
		}), false, false},
		{"060", "data cluster reference into an inactive L2 table", damaged, after(create("", "4M", "write -P 1 0 512"), func(t *testing.T, img string) {
			qemutest.Img(t, "snapshot", "-c", "foo", img)
			qemutest.IO(t, img, "write -P 2 0 512")
			sn := snapshotEntries(t, img)[0][0]
			oldL2 := peekBE(t, img, int64(peekBE(t, img, sn, 8)), 8) & offsetMask
			pokeBE(t, img, layoutOf(t, img).l2, 8, top|oldL2)
		}), false, false},
		{"060", "unaligned L1 entry", damaged, then(create("", "4M", "write 0 64k"), func(t *testing.T, img string, l qcowLayout) {
			pokeBE(t, img, l.l1, 8, top|uint64(l.l2)|0x2a00)
		}), false, false},
		{"060", "unaligned L2 entry", damaged, then(create("", "4M", "write 0 64k"), func(t *testing.T, img string, l qcowLayout) {
			pokeBE(t, img, l.l2, 8, top|uint64(l.l2+l.cs)|0x2a00)
		}), false, false},
		{"060", "unaligned preallocated zero cluster", damaged, then(create("", "4M", "write 0 64k"), func(t *testing.T, img string, l qcowLayout) {
			pokeBE(t, img, l.l2, 8, top|uint64(l.l2+l.cs)|0x2a01)
		}), false, false},
		{"060", "unaligned refcount table entry", damaged, then(create("", "4M", "write 0 64k"), func(t *testing.T, img string, l qcowLayout) {
			pokeBE(t, img, l.rt, 8, uint64(l.rb)|0x2a00)
		}), false, false},
		{"060", "dirty image with a refcount block past 2^32", damaged, then(create("", "4M", "write 0 64k"), func(t *testing.T, img string, l qcowLayout) {
			pokeBE(t, img, l.rt, 8, 0xffff2a00)
			setFeatureBit(t, img, hdrIncompat, 0)
		}), false, false},
		{"060", "two L2 entries unaligned (non-fatal then fatal)", damaged, then(create("", "4M", "write 0 128k"), func(t *testing.T, img string, l qcowLayout) {
			pokeBE(t, img, l.l2, 8, top|uint64(l.l2+l.cs)|0x2a00)
			pokeBE(t, img, l.l2+8, 8, top|uint64(l.l2+2*l.cs)|0x2a00)
		}), false, false},
		{"060", "empty refcount table", damaged, then(create("", "4M", "write 0 64k"), func(t *testing.T, img string, l qcowLayout) {
			pokeBE(t, img, l.rt, 8, 0)
		}), false, false},
		{"060", "empty refcount block", damaged, then(create("", "4M", "write 0 64k"), func(t *testing.T, img string, l qcowLayout) {
			pokeBE(t, img, l.rb, 8, 0)
		}), false, false},
		{"060", "empty refcount block, compressed cluster", damaged, then(create("", "4M", "write -P 0x60 64k 64k"), func(t *testing.T, img string, l qcowLayout) {
			pokeBE(t, img, l.rb, 8, 0)
			qemuMay("qemu-io", "-f", "qcow2", "-c", "write -c 0 64k", img)
		}), false, false},
		{"060", "zero refcount table size", damaged, pokeThen(create("", "4M"), pokeAt(hdrRTClusters, 4, 0)), false, false},
		{"060", "refcount table offset 0", damaged, pokeThen(create("", "4M", "write 0 64k"), pokeAt(hdrRTOffset, 8, 0)), false, false},
		{"060", "refcount block far past the end of the file", damaged, then(create("", "4M", "write -P 0x60 0 64k"), func(t *testing.T, img string, l qcowLayout) {
			pokeBE(t, img, l.rt+8, 8, 0x00ffffff00000000)
		}), false, false},
		{"060", "1-bit refcounts, uncovered refcount block in bounds", damaged, then(create("refcount_bits=1", "4M", "write -P 0x60 0 64k"), func(t *testing.T, img string, l qcowLayout) {
			pokeBE(t, img, l.rt+8, 8, 0x0000001000000000)
		}), false, false},
		{"060", "L1 entry with garbage in the reserved bits", damaged, then(create("", "4M"), func(t *testing.T, img string, l qcowLayout) {
			pokeBE(t, img, l.l1, 8, 0x2a2a2a2a)
		}), false, false},

		// 061: images qemu-img amend rewrote.
		{"061", "zero clusters expanded by a downgrade to compat=0.10", valid, after(create("compat=1.1,lazy_refcounts=on", "4M", "write -P 0x61 0 256k", "write -z 0 128k", "write -z 2M 128k"), func(t *testing.T, img string) {
			qemutest.Img(t, "amend", "-o", "compat=0.10", img)
		}), false, false},
		{"061", "dirty image (lazy refcounts, qemu-io killed)", valid, after(create("compat=1.1,lazy_refcounts=on", "4M"), func(t *testing.T, img string) {
			qemuMay("qemu-io", "-f", "qcow2", "-c", "write -P 0x2a 0 128k", "-c", "flush", "-c", "sigraise 9", img)
			if peekBE(t, img, hdrIncompat, 8)&1 == 0 {
				t.Fatal("the image is not dirty")
			}
		}), false, false},
		{"061", "dirty image downgraded to compat=0.10", valid, after(create("compat=1.1,lazy_refcounts=on", "4M"), func(t *testing.T, img string) {
			qemuMay("qemu-io", "-f", "qcow2", "-c", "write -P 0x2a 0 128k", "-c", "flush", "-c", "sigraise 9", img)
			qemutest.Img(t, "amend", "-o", "compat=0.10", img)
		}), false, false},
		{"061", "unknown compatible and autoclear bits", valid, then(create("compat=1.1", "4M", "write -P 0x61 64k 64k"), func(t *testing.T, img string, l qcowLayout) {
			setFeatureBit(t, img, hdrCompat, 42)
			setFeatureBit(t, img, hdrAutoclear, 42)
		}), false, false},
		{"061", "upgraded to compat=1.1 and grown by amend", valid, after(create("compat=0.10", "4M", "write -P 0x2a 3M 64k"), func(t *testing.T, img string) {
			qemutest.Img(t, "amend", "-o", "compat=1.1,lazy_refcounts=on,size=8M", img)
		}), false, false},
		{"061", "resized with snapshots, snapshot applied", valid, after(create("compat=0.10", "2M", "write -P 0x2a 1M 64k"), func(t *testing.T, img string) {
			qemutest.Img(t, "snapshot", "-c", "foo", img)
			qemutest.Img(t, "amend", "-o", "compat=1.1,size=8M", img)
			qemutest.Img(t, "snapshot", "-c", "bar", img)
			qemutest.IO(t, img, "write -P 0x61 6M 64k")
			qemutest.Img(t, "resize", "--shrink", img, "4M")
			qemutest.Img(t, "snapshot", "-a", "bar", img)
		}), false, false},
		{"061", "zero clusters under a snapshot expanded by a downgrade", valid, after(create("compat=1.1", "4M", "write -z 0 128k"), func(t *testing.T, img string) {
			qemutest.Img(t, "snapshot", "-c", "foo", img)
			qemutest.IO(t, img, "write -P 0x2a 0 128k")
			qemutest.Img(t, "amend", "-o", "compat=0.10", img)
		}), false, false},

		// 080: header fields out of range; qemu refuses to open.
		{"080", "huge header_length", damaged, pokeThen(create("", "4M"), pokeAt(hdrHeaderLength, 4, 0xffffffff)), false, false},
		{"080", "header_length 0x7fffffff", damaged, pokeThen(create("", "4M"), pokeAt(hdrHeaderLength, 4, 0x7fffffff)), false, false},
		{"080", "backing file offset past the cluster", damaged, pokeThen(create("", "4M"), pokeAt(hdrBackingOffset, 8, 0xffffffffffffffff)), false, false},
		{"080", "huge unknown header extension", damaged, then(create("", "4M"), func(t *testing.T, img string, l qcowLayout) {
			start, _, _ := headerExts(t, img)
			pokeBE(t, img, start, 4, 0x12345678)
			pokeBE(t, img, start+4, 4, 0x7fffffff)
		}), false, false},
		{"080", "refcount_table_clusters 0xffffffff", damaged, pokeThen(create("", "4M"), pokeAt(hdrRTClusters, 4, 0xffffffff)), false, false},
		{"080", "refcount_table_clusters 0x20001", damaged, pokeThen(create("", "4M"), pokeAt(hdrRTClusters, 4, 0x20001)), false, false},
		{"080", "misaligned refcount table", damaged, pokeThen(create("", "4M"), pokeAt(hdrRTOffset, 8, 0x1234567890abcdef)), false, false},
		{"080", "huge refcount table offset", damaged, pokeThen(create("", "4M"), pokeAt(hdrRTOffset, 8, 0xffffffffffff0000), pokeAt(hdrRTClusters, 4, 0x7f)), false, false},
		{"080", "nb_snapshots 0xffffffff", damaged, pokeThen(create("", "4M"), pokeAt(hdrNbSnapshots, 4, 0xffffffff)), false, false},
		{"080", "nb_snapshots 0x7fffffff", damaged, pokeThen(create("", "4M"), pokeAt(hdrNbSnapshots, 4, 0x7fffffff)), false, false},
		{"080", "snapshot table offset overflows", damaged, pokeThen(create("", "4M"), pokeAt(hdrSnapOffset, 8, 0xffffffffffff0000), pokeAt(hdrNbSnapshots, 4, 0xffff)), false, false},
		{"080", "misaligned snapshot table offset, no snapshots", damaged, pokeThen(create("", "4M"), pokeAt(hdrSnapOffset, 8, 0x1234567890abcdef)), false, false},
		// (080 puts 65536 entries there: qemu takes half a minute to read
		// them; 256 show the same.)
		{"080", "snapshot table past the end of the file", damaged, pokeThen(create("", "4M", "write -P 0x80 0 64k"), pokeAt(hdrSnapOffset, 8, 0x1000000), pokeAt(hdrNbSnapshots, 4, 0x100)), true, false},
		{"080", "l1_size 0xffffffff", damaged, pokeThen(create("", "4M"), pokeAt(hdrL1Size, 4, 0xffffffff)), false, false},
		{"080", "l1_size 0x7fffffff", damaged, pokeThen(create("", "4M"), pokeAt(hdrL1Size, 4, 0x7fffffff)), false, false},
		{"080", "L1 table offset overflows", damaged, pokeThen(create("", "4M"), pokeAt(hdrL1Offset, 8, 0x7fffffffffff0000), pokeAt(hdrL1Size, 4, 0xffff)), false, false},
		{"080", "misaligned L1 table", damaged, then(create("", "4M"), func(t *testing.T, img string, l qcowLayout) {
			pokeBE(t, img, hdrL1Offset, 8, 0x1234567890abcdef)
			pokeBE(t, img, hdrL1Size, 4, 1)
		}), false, false},
		{"080", "L1 table too small, with a snapshot", damaged, then(create("", "4M"), func(t *testing.T, img string, l qcowLayout) {
			qemutest.Img(t, "snapshot", "-c", "foo", img)
			pokeBE(t, img, hdrL1Size, 4, 0)
		}), false, false},
		{"080", "backing file name size 0xffffffff", damaged, pokeThen(create("", "4M"), pokeAt(hdrBackingOffset, 8, 0x1000), pokeAt(hdrBackingSize, 4, 0xffffffff)), false, false},
		{"080", "L2 entry: compressed, huge offset", damaged, then(create("", "4M", "write 0 512"), func(t *testing.T, img string, l qcowLayout) {
			pokeBE(t, img, l.l2, 8, 0xbfffffffffff0000)
		}), false, false},
		{"080", "L2 entry: huge physical offset", damaged, then(create("", "4M", "write 0 512"), func(t *testing.T, img string, l qcowLayout) {
			pokeBE(t, img, l.l2, 8, 0x800000ffffff0000)
		}), false, false},
		{"080", "snapshot L1 table offset unaligned", damaged, after(create("", "4M", "write 0 512"), func(t *testing.T, img string) {
			qemutest.Img(t, "snapshot", "-c", "test", img)
			pokeBE(t, img, snapshotEntries(t, img)[0][0], 8, 0x400200)
		}), false, false},
		{"080", "snapshot L1 table too large", damaged, after(create("", "4M", "write 0 512"), func(t *testing.T, img string) {
			qemutest.Img(t, "snapshot", "-c", "test", img)
			pokeBE(t, img, snapshotEntries(t, img)[0][0]+8, 4, 0x10000000)
		}), false, false},

		// 102: an image file cut short.
		{"102", "file truncated before its only data cluster", damaged, after(create("", "64k", "write -P 0x66 0 64k"), func(t *testing.T, img string) {
			qemutest.Img(t, "resize", "-f", "raw", "--shrink", img, fmt.Sprint(5*64<<10))
		}), false, false},

		// 112: refcount widths.
		{"112", "1-bit refcounts, snapshot refused", valid, after(create("refcount_bits=1", "4M", "write -P 0x12 0 512"), func(t *testing.T, img string) {
			qemuMay("qemu-img", "snapshot", "-c", "foo", img)
		}), false, false},
		{"112", "2-bit refcounts, three snapshots (the third refused)", valid, after(create("refcount_bits=2", "4M", "write -P 0x12 0 512"), func(t *testing.T, img string) {
			for _, s := range []string{"foo", "bar", "baz"} {
				qemuMay("qemu-img", "snapshot", "-c", s, img)
			}
		}), false, false},
		{"112", "1-bit refcounts, compressed clusters", valid, create("refcount_bits=1", "4M", "write -P 0 -c 0 64k", "write -P 1 -c 64k 64k"), false, false},
		{"112", "64-bit refcount with its top bit set", damaged, then(create("refcount_bits=64", "4M", "write 0 512"), func(t *testing.T, img string, l qcowLayout) {
			data := int64(peekBE(t, img, l.l2, 8) & offsetMask)
			pokeBE(t, img, l.rb+8*(data/l.cs), 8, 1<<63)
			pokeBE(t, img, l.l2, 8, uint64(data))
		}), false, false},
		{"112", "64-bit refcount at its maximum, snapshot refused", damaged, then(create("refcount_bits=64", "4M", "write 0 512"), func(t *testing.T, img string, l qcowLayout) {
			data := int64(peekBE(t, img, l.l2, 8) & offsetMask)
			pokeBE(t, img, l.rb+8*(data/l.cs), 8, 1<<64-1)
			pokeBE(t, img, l.l2, 8, uint64(data))
			qemuMay("qemu-img", "snapshot", "-c", "foo", img)
		}), false, false},
		// (qemu-img amend to 1 or 64 bits costs seconds of CPU at any
		// image size: one amend, to 2 bits, shows the rewritten layout.)
		{"112", "amended 16 -> 2 refcount bits, with a snapshot", valid, after(create("", "4M", "write -P 0x12 1M 2M"), func(t *testing.T, img string) {
			qemutest.Img(t, "snapshot", "-c", "foo", img)
			qemutest.IO(t, img, "write -P 0x13 0 1M")
			qemutest.Img(t, "amend", "-o", "refcount_bits=2", img)
		}), false, false},
		{"112", "two L2 entries for one data cluster, 1-bit refcounts", damaged, then(create("refcount_bits=1", "4M", "write -P 0x12 0 64k"), func(t *testing.T, img string, l qcowLayout) {
			pokeBE(t, img, l.l2+8, 8, peekBE(t, img, l.l2, 8))
		}), false, false},

		// 114: backing files without or with an unknown format.
		{"114", "backing file without a backing format extension", valid, func(t *testing.T, dir, img string) string {
			base := filepath.Join(dir, "base.raw")
			fill(t, base, 4<<20, 0x14)
			qemutest.Img(t, "create", "-q", "-f", "qcow2", "-F", "raw", "-b", base, img, "4M")
			qemutest.IO(t, img, "write -P 0x41 1M 64k")
			delHeaderExt(t, img, 0xe2792aca)
			return base
		}, false, false},
		{"114", "convert -B: only what differs from the backing file", valid, func(t *testing.T, dir, img string) string {
			base := filepath.Join(dir, "base.raw")
			fill(t, base, 4<<20, 0x14)
			src := filepath.Join(dir, "src.raw")
			fill(t, src, 4<<20, 0x14)
			poke(t, src, 1<<20, bytes.Repeat([]byte{0x41}, 64<<10)...)
			qemutest.Img(t, "convert", "-O", "qcow2", "-F", "raw", "-B", base, src, img)
			return base
		}, false, false},

		// 138: 2^32 clusters and a cleared COPIED flag.
		{"138", "512-byte clusters, L2 entry past the virtual size at 2^55", damaged, then(create("cluster_size=512", "512", "write -P 0x38 0 512"), func(t *testing.T, img string, l qcowLayout) {
			pokeBE(t, img, l.l2+8, 8, 0x0080000000000000)
		}), false, false},
		{"138", "refcount 2 on a refcount block, COPIED cleared on L1", damaged, then(create("", "64k", "write -P 0x38 0 64k"), func(t *testing.T, img string, l qcowLayout) {
			pokeBE(t, img, l.rb, 2, 2)
			pokeBE(t, img, l.l1, 8, uint64(l.l2))
		}), false, false},

		// 170: qemu-img dd's output.
		{"170", "written by qemu-img dd", valid, func(t *testing.T, dir, img string) string {
			src := filepath.Join(dir, "src.qcow2")
			create("", "1M", "write -P 0xa 0 1M")(t, dir, src)
			qemutest.Img(t, "dd", "if="+src, "of="+img, "-O", "qcow2")
			return ""
		}, false, false},

		// 214: compressed clusters, sizes poked.
		{"214", "2 MiB clusters, compressed, size field shrunk", damaged, then(create("cluster_size=2M,compression_type=zlib", "8M", "write -c -P 0x11 0 2M", "write -c -P 0x11 2M 2M"), func(t *testing.T, img string, l qcowLayout) {
			poke(t, img, l.l2, 0x40, 0x06)
		}), false, false},
		{"214", "2 MiB clusters, compressed, size fields at their maximum", damaged, then(create("cluster_size=2M,compression_type=zlib", "8M", "write -c -P 0x11 0 2M", "write -c -P 0x11 2M 2M"), func(t *testing.T, img string, l qcowLayout) {
			poke(t, img, l.l2, 0x7f, 0xfe)
			poke(t, img, l.l2+8, 0x7f, 0xfe)
		}), false, false},
		{"214", "compressed data spanning several clusters", valid, after(create("cluster_size=65536", "2M"), func(t *testing.T, img string) {
			for _, w := range []string{"write -P 0xbb 0 224k", "write -P 0xcc 272k 224k"} {
				qemutest.Run(t, "qemu-io", "-c", w, "--image-opts", "driver=compress,file.driver=qcow2,file.file.driver=file,file.file.filename="+img)
			}
		}), false, false},

		// 217: a snapshot deletion that failed half way: leaks.
		{"217", "snapshot deleted with an I/O error on freeing (leaks)", valid, func(t *testing.T, dir, img string) string {
			create("", "4M", "write -P 0x17 0 64k")(t, dir, img)
			qemutest.Img(t, "snapshot", "-c", "foo", img)
			conf := filepath.Join(dir, "blkdebug.conf")
			if err := os.WriteFile(conf, []byte("[inject-error]\nevent = \"cluster_free\"\nerrno = \"5\"\n"), 0o644); err != nil {
				t.Fatal(err)
			}
			qemuMay("qemu-img", "snapshot", "-d", "foo", "blkdebug:"+conf+":"+img) // fails: the injected error
			return ""
		}, false, false},

		// 244 and 289: external data files.
		{"244", "external data file named in the image", refused, dataFile("", "write -P 0x11 1M 1M"), false, false},
		{"244", "external data file, data_file_raw", refused, dataFile("data_file_raw=on", "write -P 0x11 1M 1M", "write -z 2M 1M"), false, false},
		{"244", "external data file required, name removed", refused, after(dataFile("", "write -P 0x11 0 64k"), func(t *testing.T, img string) {
			qemutest.Img(t, "amend", "-o", "data_file=", img)
		}), false, false},
		{"289", "64 KiB image, one cluster in its external data file", refused, dataFile("", "write -P 0x89 0 64k"), false, false},

		// 261: snapshot table entries.
		{"261", "v2 snapshot table, extra data 0, 50 (unknown) and 8 bytes", valid, then(snapshotted("compat=0.10", 3), func(t *testing.T, img string, l qcowLayout) {
			x := make([]byte, 50)
			copy(x[24:], "very important data")
			setSnapshotExtra(t, img, []byte{}, x, make([]byte, 8))
		}), false, false},
		{"261", "the same table upgraded to v3 by amend", valid, then(snapshotted("compat=0.10", 3), func(t *testing.T, img string, l qcowLayout) {
			x := make([]byte, 50)
			copy(x[24:], "very important data")
			setSnapshotExtra(t, img, []byte{}, x, make([]byte, 8))
			qemutest.Img(t, "amend", "-o", "compat=1.1", img)
		}), false, false},
		{"261", "v2 table under a header botched to v3", damaged, then(snapshotted("compat=0.10", 3), func(t *testing.T, img string, l qcowLayout) {
			setSnapshotExtra(t, img, []byte{}, make([]byte, 8), make([]byte, 8))
			pokeBE(t, img, hdrVersion, 4, 3)
			pokeBE(t, img, hdrHeaderLength, 4, 104)
			pokeBE(t, img, hdrRefcountOrder, 4, 4)
		}), false, false},
		{"261", "a snapshot deleted from the middle", valid, after(snapshotted("compat=1.1", 3), func(t *testing.T, img string) {
			qemutest.Img(t, "snapshot", "-d", "sn1", img)
		}), false, false},
		{"261", "64 KiB of unknown extra data in a snapshot entry", damaged, then(snapshotted("compat=1.1", 4), func(t *testing.T, img string, l qcowLayout) {
			pokeBE(t, img, snapshotEntries(t, img)[3][0]+36, 4, 0x10000)
		}), true, false},
		{"261", "snapshot table larger than 64 MiB", damaged, then(create("", "4M", "write -P 0x61 0 64k"), func(t *testing.T, img string, l qcowLayout) {
			// Entries of maximal size (1 KiB extra data, 64 KiB id and
			// name), written sparse: only their fixed part.
			const size = 40 + 1024 + 65535 + 65535 + 2
			var e [40]byte
			e[12], e[13], e[14], e[15] = 0xff, 0xff, 0xff, 0xff
			e[38] = 0x04 // extra data 1024
			off, n := int64(1<<20), 0
			for written := 0; written <= 64<<20; written += size {
				poke(t, img, off, e[:]...)
				off += size
				n++
			}
			if err := os.Truncate(img, off); err != nil {
				t.Fatal(err)
			}
			pokeBE(t, img, hdrSnapOffset, 8, 1<<20)
			pokeBE(t, img, hdrNbSnapshots, 4, uint64(n))
		}), true, false},

		// 271: subclusters (extended L2 entries).
		{"271", "extended L2: writes, zero writes, unmaps, discards, compression", valid, create("extended_l2=on", "1M",
			"write -P 1 0 1k", "write -P 2 3k 512", "write -P 3 5k 1k", "write -P 4 6k 2k", "write -P 5 8k 6k",
			"write -P 6 15k 4k", "write -P 7 32k 1k", "write -P 8 63k 4k", "write -z 2k 2k", "write -z -u 128k 32k",
			"write -P 9 192k 64k", "write -z -u 192k 32k", "discard 256k 64k", "write -c -P 10 320k 64k",
			"write -P 11 386k 512", "write -z 448k 192k", "write -P 12 780k 40k"), false, false},
		{"271", "extended L2 over a backing file", valid, func(t *testing.T, dir, img string) string {
			base := filepath.Join(dir, "base.raw")
			fill(t, base, 1<<20, 0xff)
			qemutest.Img(t, "create", "-q", "-f", "qcow2", "-o", "extended_l2=on", "-F", "raw", "-b", base, img, "1M")
			qemutest.IO(t, img, "write -P 1 0 1k", "write -P 2 3k 512", "write -z 8k 6k", "write -z -u 128k 32k",
				"write -P 3 192k 64k", "discard 192k 32k", "write -c -P 4 320k 64k", "write -z 448k 192k")
			return base
		}, false, false},
		{"271", "extended L2: standard zero bit set on an allocated cluster", damaged, then(create("extended_l2=on", "1M", "write -q -P 0x11 0 2k"), func(t *testing.T, img string, l qcowLayout) {
			poke(t, img, l.l2+7, 0x01)
		}), false, false},
		{"271", "extended L2: subcluster both zero and allocated", damaged, then(create("extended_l2=on", "1M", "write -q 32k 128k"), func(t *testing.T, img string, l qcowLayout) {
			pokeBE(t, img, l.l2+24, 4, 1)
		}), false, false},
		{"271", "extended L2: standard zero bit on an unallocated cluster", damaged, then(create("extended_l2=on", "1M", "write -q 256k 1k"), func(t *testing.T, img string, l qcowLayout) {
			poke(t, img, l.l2+7, 0x01)
		}), false, false},
		{"271", "extended L2: subcluster allocated in an unallocated cluster", damaged, then(create("extended_l2=on", "1M", "write -q 256k 1k"), func(t *testing.T, img string, l qcowLayout) {
			poke(t, img, l.l2+15, 0x01)
		}), false, false},
		{"271", "extended L2: compressed cluster with a subcluster bitmap", damaged, then(create("extended_l2=on", "1M", "write -q -P 11 -c 0 64k"), func(t *testing.T, img string, l qcowLayout) {
			poke(t, img, l.l2+11, 0x01, 0x80)
		}), false, false},
		{"271", "extended L2: unaligned cluster offset", damaged, func(t *testing.T, dir, img string) string {
			base := filepath.Join(dir, "base.raw")
			fill(t, base, 128<<10, 0xff)
			qemutest.Img(t, "create", "-q", "-f", "qcow2", "-o", "extended_l2=on", "-F", "raw", "-b", base, img)
			qemutest.IO(t, img, "write -q -P 1 4k 2k")
			poke(t, img, layoutOf(t, img).l2+6, 0x02)
			return base
		}, false, false},

		// 272: a compressed cluster above 4 GiB in the file.
		{"272", "compressed cluster above 4 GiB (2 MiB clusters, 2-bit refcounts)", damaged, then(create("cluster_size=2M,refcount_bits=2", "64M"), func(t *testing.T, img string, l qcowLayout) {
			if err := os.Truncate(img, 4<<30); err != nil {
				t.Fatal(err)
			}
			poke(t, img, l.rb, bytes.Repeat([]byte{0x55}, 512)...)
			qemutest.IO(t, img, "write -c -P 42 0 2M")
		}), false, true},

		// 290: discards, with and without a backing file.
		{"290", "compat=0.10, every cluster discarded", valid, create("compat=0.10", "128k", "write -P 1 0 128k", "discard 0 128k"), false, false},
		{"290", "compat=1.1, every cluster discarded", valid, create("compat=1.1", "128k", "write -P 1 0 128k", "discard 0 128k"), false, false},
		{"290", "compat=0.10 over a backing file, discarded", valid, withBacking("128k", []string{"write -P 0xff 0 128k"}, "compat=0.10", "write -P 1 0 128k", "discard 0 128k"), false, false},
		{"290", "compat=1.1 over a backing file, discarded", valid, withBacking("128k", []string{"write -P 0xff 0 128k"}, "compat=1.1", "write -P 1 0 128k", "discard 0 128k"), false, false},

		// 292: shrunk then grown over a backing file: the tail reads as zeros.
		{"292", "shrunk to 520k and grown to 567k over a backing file", valid, func(t *testing.T, dir, img string) string {
			base := withBacking("1M", []string{"write -P 0x11 0 1M"}, "", "write -P 0x22 0 1M")(t, dir, img)
			qemutest.Img(t, "resize", "--shrink", img, "520k")
			qemutest.Img(t, "resize", img, "567k")
			return base
		}, false, false},

		// 305: a refcount block moved by a poke.
		{"305", "1 KiB clusters, 64-bit refcounts, second refcount block moved", damaged, then(create("refcount_bits=64,cluster_size=1k", "1M", "write 0 124k", "discard 121k 1k", "discard 123k 1k"), func(t *testing.T, img string, l qcowLayout) {
			poke(t, img, l.rt+14, 0x06)
		}), false, false},
	}
}

// pokeThen is then for header pokes, made in order.
func pokeThen(make func(t *testing.T, dir, img string) string, pokes ...func(t *testing.T, img string, l qcowLayout)) func(t *testing.T, dir, img string) string {
	return then(make, func(t *testing.T, img string, l qcowLayout) {
		for _, poke := range pokes {
			poke(t, img, l)
		}
	})
}

// importMode is one way an image reaches the import.
type importMode struct {
	name  string
	pipe  bool
	args  func(img, dst string, delta bool) []string
	empty bool // the destination starts as zeros (stream_decode applies a diff)
}

var importModes = []importMode{
	{"serve from a pipe", true, func(img, dst string, delta bool) []string {
		a := []string{"serve", "--source-format", "qcow2", "--destination", "file://" + dst}
		if delta {
			a = append(a, "--delta")
		}
		return a
	}, false},
	{"serve from a file", false, func(img, dst string, delta bool) []string {
		a := []string{"serve", "--source", img, "--destination", dst}
		if delta {
			a = append(a, "--delta")
		}
		return a
	}, false},
	{"stream_decode", true, func(img, dst string, delta bool) []string {
		return []string{"stream_decode", dst}
	}, true},
}

// TestIotestsCorpus runs every row of iotestCases: our imports against
// qemu-img convert, our check against qemu-img check, our map against
// qemu-img map. Each row logs one
// line of what qemu and we did (go test -v -run TestIotestsCorpus).
func TestIotestsCorpus(t *testing.T) {
	qemutest.Need(t)
	for i, c := range iotestCases() {
		name := strings.NewReplacer(" ", "_", ",", "").Replace(c.name)
		t.Run(fmt.Sprintf("%s_%02d_%s", c.iotest, i, name), func(t *testing.T) {
			t.Parallel()
			runIotestCase(t, c)
		})
	}
}

func runIotestCase(t *testing.T, c iotestCase) {
	dir := t.TempDir()
	img := filepath.Join(dir, "t.qcow2")
	base := c.make(t, dir, img)

	// qemu's reading: does it open, what does it read, what does check say.
	opens := exec.Command("qemu-img", "info", img).Run() == nil
	want := filepath.Join(dir, "want.raw")
	out, err := exec.Command("qemu-img", "convert", "-O", "raw", img, want).CombinedOutput()
	reads := err == nil
	qcheck := exitCode(t, exec.Command("qemu-img", "check", img).Run())
	if c.kind == valid && !reads {
		t.Fatalf("qemu-img convert fails on a valid row: %s", out)
	}
	// What qemu reads where it can: what an import may have written
	// before it refused. qemu-img convert --salvage reads past the damage
	// of an image qemu opens; a snapshot table qemu refuses to open is
	// not part of the disk, so qemu's reading without it is the reference.
	var ref []byte
	switch {
	case reads:
	case opens && peekBE(t, img, hdrClusterBits, 4) <= 16:
		// (--salvage retries sector by sector: with 2 MiB compressed
		// clusters that is minutes, so only for smaller clusters.)
		if exec.Command("qemu-img", "convert", "--salvage", "-O", "raw", img, want).Run() != nil {
			want = ""
		}
	case c.streamLate:
		noSnap := filepath.Join(dir, "nosnap.qcow2")
		copyFile(t, img, noSnap)
		pokeBE(t, noSnap, hdrNbSnapshots, 4, 0)
		pokeBE(t, noSnap, hdrSnapOffset, 8, 0)
		qemutest.Img(t, "convert", "-O", "raw", noSnap, want)
	default:
		want = ""
	}
	if want != "" {
		ref = readFile(t, want)
	}
	var wantBytes []byte
	if reads {
		wantBytes = ref
	}

	// The destination's starting content: qemu's reading of the backing
	// file for a delta, a pattern otherwise (zeros for stream_decode).
	size := int64(len(ref))
	if ref == nil {
		size = 4 << 20
	}
	var prefill []byte
	if base != "" {
		braw := filepath.Join(dir, "base.img")
		qemutest.Img(t, "convert", "-O", "raw", base, braw)
		prefill = readFile(t, braw)
		prefill = append(prefill, make([]byte, max(0, size-int64(len(prefill))))...)[:size]
	}

	var results []string
	for _, m := range importModes {
		if c.onePipe && m.name == "serve from a pipe" {
			continue
		}
		dst := filepath.Join(dir, "dst.raw")
		start := prefill
		if start == nil {
			start = make([]byte, size)
			if !m.empty {
				for i := range start {
					start[i] = 0xEE
				}
			}
		}
		if err := os.WriteFile(dst, start, 0o644); err != nil {
			t.Fatal(err)
		}
		var r result
		if m.pipe {
			r = runPiped(t, img, nil, m.args(img, dst, base != "")...)
		} else {
			r = runTool(t, nil, m.args(img, dst, base != "")...)
		}
		got := readFile(t, dst)
		results = append(results, judgeImport(t, c, m, r, opens, wantBytes, ref, start, got))
	}
	if base != "" {
		// Without --delta a backing file is refused, before any write.
		dst := filepath.Join(dir, "dst.raw")
		os.WriteFile(dst, prefill, 0o644)
		r := runTool(t, nil, "serve", "--source", img, "--destination", dst)
		checkOneLineError(t, r, "backing file")
	}

	// check: the exit class qemu-img check gives.
	ours := runTool(t, nil, "check", img)
	if ours.Code == 1 && strings.Count(string(ours.Stderr), "\n") > 1 {
		t.Errorf("check: exit 1 with more than one line on stderr: %q", ours.Stderr)
	}
	if strings.Contains(string(ours.Stderr), "panic") {
		t.Fatalf("check panicked: %s", ours.Stderr)
	}
	if ours.Code != qcheck {
		t.Errorf("check exits %d, qemu-img check %d\nours: %s%s", ours.Code, qcheck, ours.Stdout, ours.Stderr)
	}
	// map: byte for byte qemu-img map's, wherever qemu-img maps the image.
	mapped := judgeMap(t, img, c.kind == valid)
	t.Logf("ROW | %s | %s | qemu: open %v, convert %v, check %d | ours: %s | check %d | %s",
		c.iotest, c.name, opens, reads, qcheck, strings.Join(results, ", "), ours.Code, mapped)
}

// judgeImport applies a row's rule to one import and names its outcome.
// want is qemu-img convert's reading (nil where it fails), ref what qemu
// reads where it can (nil: nothing).
func judgeImport(t *testing.T, c iotestCase, m importMode, r result, opens bool, want, ref, start, got []byte) string {
	t.Helper()
	if strings.Contains(string(r.Stderr), "panic") || strings.Contains(string(r.Stderr), "goroutine ") {
		t.Fatalf("%s panicked: %s", m.name, r.Stderr)
	}
	if r.Code == 0 {
		if c.kind == refused {
			t.Errorf("%s: accepted an image that must be refused", m.name)
		}
		if want == nil {
			t.Errorf("%s: accepted an image qemu cannot read", m.name)
		} else if !bytes.Equal(got, want) {
			t.Errorf("%s: differs from qemu-img convert at offset %d", m.name, firstDiff(got, want))
		}
		return "imported"
	}
	msg := strings.TrimSpace(string(r.Stderr))
	if len(r.Stdout) != 0 || strings.Count(string(r.Stderr), "\n") != 1 || !strings.HasPrefix(msg, "xapi-qcow-tool: ") {
		t.Errorf("%s: refusal is not one line on stderr and nothing on stdout: %q (stdout %d bytes)", m.name, r.Stderr, len(r.Stdout))
	}
	if c.kind == valid {
		t.Errorf("%s: refused a valid image: %s", m.name, msg)
	}
	// What was written before the refusal must be what qemu reads there;
	// where qemu refuses at open (or the data is elsewhere), nothing.
	untouched := !opens && !(m.pipe && c.streamLate) || c.kind == refused
	for i := range got {
		if i >= len(start) || got[i] == start[i] {
			continue
		}
		if untouched || i >= len(ref) || got[i] != ref[i] {
			t.Errorf("%s: refused (%s) after writing offset %d wrongly", m.name, msg, i)
			break
		}
	}
	return "refused (" + m.name + ": " + strings.TrimPrefix(msg, "xapi-qcow-tool: ") + ")"
}

// exitCode is the exit status of a finished command.
func exitCode(t *testing.T, err error) int {
	if ee, ok := err.(*exec.ExitError); ok {
		return ee.ExitCode()
	}
	if err != nil {
		t.Fatal(err)
	}
	return 0
}

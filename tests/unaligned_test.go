package tests

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"testing"
)

// Unaligned VDIs (Xen Orchestra issue #9411): XO rounds an image's virtual
// size up to 64 KiB, the VDI it imports into is not rounded. An image that
// is larger than its destination by less than a cluster imports when what
// lies past the destination's end reads as zeros; the destination is then
// written exactly up to its end.

const (
	unalignedDisk = 8<<20 + 3584 // the VDI: a multiple of 512 (a loop device), not of 4096
	unalignedCS   = 64 << 10
)

// unalignedImage exports a raw disk of size bytes, random up to the VDI's
// size and zero after it, with poke (when >= 0) set to 1: the image's
// virtual size is size.
func unalignedImage(t *testing.T, dir, name string, size, poke int64) (img string, raw []byte) {
	t.Helper()
	src := filepath.Join(dir, name+".raw")
	sparseFile(t, src, size)
	writeRandom(t, newRand(size+poke), src, 0, unalignedDisk)
	if poke >= 0 {
		f, err := os.OpenFile(src, os.O_WRONLY, 0)
		if err != nil {
			t.Fatal(err)
		}
		f.WriteAt([]byte{1}, poke)
		f.Close()
	}
	raw, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	img = filepath.Join(dir, name+".qcow2")
	exportToFile(t, img, "stream", "--source", src)
	return img, raw
}

// unalignedDest is a destination of the VDI's size, filled with 0xAA: a
// regular file or a loop device over one.
type unalignedDest struct {
	name string
	make func(t *testing.T) (dest, back string)
}

var unalignedDests = []unalignedDest{
	{"file", func(t *testing.T) (string, string) {
		p := filepath.Join(t.TempDir(), "vdi.img")
		fill(t, p, unalignedDisk, 0xAA)
		return p, p
	}},
	{"loop", func(t *testing.T) (string, string) {
		p := filepath.Join(t.TempDir(), "vdi.img")
		fill(t, p, unalignedDisk, 0xAA)
		return loopDevice(t, p, false), p
	}},
	{"loop-direct-io", func(t *testing.T) (string, string) {
		p := filepath.Join(t.TempDir(), "vdi.img")
		fill(t, p, unalignedDisk, 0xAA)
		return loopDevice(t, p, true), p
	}},
}

// unalignedCommands import img into dest, through a pipe or from the file;
// size, when not empty, is declared with --destination-size.
var unalignedCommands = []struct {
	name string
	run  func(t *testing.T, img, dest string, size ...string) result
}{
	{"stream_decode", func(t *testing.T, img, dest string, _ ...string) result {
		return runPiped(t, img, nil, "stream_decode", dest)
	}},
	{"serve-pipe", func(t *testing.T, img, dest string, size ...string) result {
		return runPiped(t, img, nil, append([]string{"serve", "--destination", "file://" + dest}, size...)...)
	}},
	{"serve-file-direct", func(t *testing.T, img, dest string, size ...string) result {
		return runTool(t, nil, append([]string{"serve", "--source", img, "--destination", dest, "--direct"}, size...)...)
	}},
}

// TestImportUnalignedDestination: onto a block device, or a file whose
// size serve is told (--destination-size), an image larger by less than a
// cluster imports exactly up to the destination's end when the excess
// reads as zeros, stops at the first non-zero byte past the end (naming
// it, after writing what came before), and one a cluster or more too big
// is refused before any write. A file that stream_decode writes has no
// size of its own: it grows to the virtual size.
func TestImportUnalignedDestination(t *testing.T) {
	dir := t.TempDir()
	zeroTail, raw := unalignedImage(t, dir, "zero-tail", unalignedDisk+60<<10, -1)
	dirty, dirtyRaw := unalignedImage(t, dir, "dirty-tail", unalignedDisk+60<<10, unalignedDisk+100)
	tooBig, tooBigRaw := unalignedImage(t, dir, "too-big", unalignedDisk+unalignedCS, -1)
	for _, d := range unalignedDests {
		for _, c := range unalignedCommands {
			t.Run(d.name+"/"+c.name, func(t *testing.T) {
				var size []string
				if d.name == "file" {
					if c.name == "stream_decode" {
						for _, img := range []struct {
							path string
							raw  []byte
						}{{zeroTail, raw}, {dirty, dirtyRaw}, {tooBig, tooBigRaw}} {
							dest, back := d.make(t)
							mustSucceed(t, c.run(t, img.path, dest), "stream_decode onto a file")
							checkVDI(t, back, img.raw, "stream_decode onto a file: grown to the virtual size")
						}
						return
					}
					size = []string{"--destination-size", fmt.Sprint(unalignedDisk)}
				}
				dest, back := d.make(t)
				mustSucceed(t, c.run(t, zeroTail, dest, size...), "import")
				checkVDI(t, back, raw[:unalignedDisk], "zero tail")

				dest, back = d.make(t)
				r := c.run(t, dirty, dest, size...)
				checkOneLineError(t, r, fmt.Sprintf("guest offset %d", unalignedDisk+100))
				checkOneLineError(t, r, "before it was written")
				checkVDI(t, back, dirtyRaw[:unalignedDisk], "non-zero tail: what came before")

				dest, back = d.make(t)
				r = c.run(t, tooBig, dest, size...)
				checkOneLineError(t, r, "nothing was written")
				checkVDI(t, back, bytes.Repeat([]byte{0xAA}, unalignedDisk), "a cluster too big")
			})
		}
	}
	// serve --destination-size: a new file is made the declared size.
	t.Run("serve-destination-size-new-file", func(t *testing.T) {
		dest := filepath.Join(t.TempDir(), "new.img")
		mustSucceed(t, runPiped(t, zeroTail, nil, "serve", "--destination", dest,
			"--destination-size", fmt.Sprint(unalignedDisk)), "import")
		checkVDI(t, dest, raw[:unalignedDisk], "declared size")
	})
}

// checkVDI asserts the file behind a destination holds exactly want.
func checkVDI(t *testing.T, path string, want []byte, what string) {
	t.Helper()
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != len(want) {
		t.Fatalf("%s: the destination is %d bytes, want %d", what, len(got), len(want))
	}
	if !bytes.Equal(got, want) {
		n := 0
		for got[n] == want[n] {
			n++
		}
		t.Fatalf("%s: the destination differs from offset %d", what, n)
	}
}

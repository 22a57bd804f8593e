package inspect

import (
	"encoding/binary"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/xapi-project/xapi-qcow-tool/tests/zerotail"
)

// craftHeader writes a version 3 header with 64 KiB clusters into img.
func craftHeader(img []byte, size uint64, l1Size uint32, l1Off, rtOff uint64, rtClusters uint32, refcountOrder uint32) {
	be := binary.BigEndian
	be.PutUint32(img[0:], 0x514649fb)
	be.PutUint32(img[4:], 3)
	be.PutUint32(img[20:], 16)
	be.PutUint64(img[24:], size)
	be.PutUint32(img[36:], l1Size)
	be.PutUint64(img[40:], l1Off)
	be.PutUint64(img[48:], rtOff)
	be.PutUint32(img[56:], rtClusters)
	be.PutUint32(img[96:], refcountOrder)
	be.PutUint32(img[100:], 104)
}

// checkWithin runs CheckFile on img and fails if it takes longer than a
// minute: the images below took hours before the bounds they test.
func checkWithin(t *testing.T, img []byte) *CheckResult {
	t.Helper()
	done := make(chan *CheckResult, 1)
	go func() {
		res, err := CheckFile(zerotail.File{B: img, Size: int64(len(img))}, int64(len(img)))
		if err != nil {
			t.Error(err)
		}
		done <- res
	}()
	select {
	case res := <-done:
		return res
	case <-time.After(time.Minute):
		t.Fatal("check still running after a minute")
		return nil
	}
}

// TestCheckRefcountTableNamesOneBlock: a refcount table of 1 Mi entries
// all naming one block of 1-bit refcounts (each covering 512 Ki clusters,
// almost all past the end of an 8 MiB file). The block is scanned once,
// not a million times, and every refcount past the end is a leak.
func TestCheckRefcountTableNamesOneBlock(t *testing.T) {
	const cs = 64 << 10
	img := make([]byte, 131*cs)
	craftHeader(img, 64<<20, 1, 130*cs, cs, 128, 0)
	for i := range 128 * cs / 8 {
		binary.BigEndian.PutUint64(img[cs+8*i:], 129*cs)
	}
	for i := 129 * cs; i < 130*cs; i++ {
		img[i] = 0xff
	}
	res := checkWithin(t, img)
	perBlock := uint64(cs * 8)
	// Entry 0 covers the file's 131 clusters (5 of them referenced: the
	// header, the refcount table's first cluster... see check.go); every
	// other entry covers only clusters past the end.
	if want := (128*cs/8 - 1) * perBlock; res.Leaks < want {
		t.Fatalf("%d leaks, want at least %d", res.Leaks, want)
	}
}

// TestCheckSnapshotsNameTheActiveL1: 4096 snapshots (qemu allows 65536) all
// naming the active L1 table, of 4 Mi entries (32 MiB). Each is an overlap,
// reported; none is walked again.
func TestCheckSnapshotsNameTheActiveL1(t *testing.T) {
	const (
		cs      = 64 << 10
		l1Size  = 4 << 20
		snaps   = 4096
		l1Off   = 2 * cs
		snapOff = l1Off + l1Size*8
	)
	img := make([]byte, snapOff+snaps*40)
	craftHeader(img, 1<<40, l1Size, l1Off, cs, 1, 4)
	be := binary.BigEndian
	be.PutUint32(img[60:], snaps)
	be.PutUint64(img[64:], snapOff)
	for i := range snaps {
		be.PutUint64(img[snapOff+40*i:], l1Off)
		be.PutUint32(img[snapOff+40*i+8:], l1Size)
	}
	res := checkWithin(t, img)
	if res.Corruptions < snaps {
		t.Fatalf("%d corruptions, want at least one per snapshot (%d)", res.Corruptions, snaps)
	}
}

// TestCounterIsBounded: past maxCounterChunks chunks, add refuses.
func TestCounterIsBounded(t *testing.T) {
	k := newCounter()
	for i := range uint64(maxCounterChunks) {
		if _, _, ok := k.add(i*chunkLen, roleData); !ok {
			t.Fatalf("chunk %d refused", i)
		}
	}
	if _, _, ok := k.add(maxCounterChunks*chunkLen, roleData); ok {
		t.Fatal("a chunk past the bound was accepted")
	}
	if _, _, ok := k.add(5, roleData); !ok {
		t.Fatal("a cluster of an existing chunk was refused")
	}
}

// TestMapStreamsManyRuns: an image alternating zero and unallocated
// clusters a million times (512-byte clusters, no data needed) is mapped
// entry by entry as it is walked: every run comes out, in order, and the
// walk stops at the first error of emit.
func TestMapStreamsManyRuns(t *testing.T) {
	const (
		cs     = 512
		per    = cs / 8 // L2 entries per table
		runs   = 1 << 20
		tables = runs / per
		l1Off  = 2 * cs
		l2Off  = l1Off + (tables*8+cs-1)/cs*cs
	)
	img := make([]byte, l2Off+tables*cs)
	be := binary.BigEndian
	craftHeader(img, tables*per*cs, tables, l1Off, cs, 1, 4)
	be.PutUint32(img[20:], 9)
	for i := range tables {
		be.PutUint64(img[l1Off+8*i:], uint64(l2Off+i*cs))
		for j := 0; j < per; j += 2 {
			be.PutUint64(img[l2Off+i*cs+8*j:], 1) // zero flag; the next one is unallocated
		}
	}
	file := zerotail.File{B: img, Size: int64(len(img))}
	var n int
	err := MapFile(file, file.Size, nil, func(e MapEntry) error {
		want := MapEntry{Start: uint64(n) * cs, Length: cs, Present: n%2 == 0, Zero: true}
		if e != want {
			return fmt.Errorf("entry %d: %+v, want %+v", n, e, want)
		}
		n++
		return nil
	})
	if err != nil || n != runs {
		t.Fatalf("MapFile: %v after %d entries, want %d", err, n, runs)
	}
	stop := errors.New("stop")
	n = 0
	if err := MapFile(file, file.Size, nil, func(MapEntry) error { n++; return stop }); err != stop || n != 1 {
		t.Fatalf("MapFile after emit failed: %v, %d entries", err, n)
	}
}

package qcow

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"os"
	"strings"
	"testing"
)

// snapshotEntry is the bytes of one snapshot table entry: extra data of
// extra bytes, an id and a name, padded to 8 bytes.
func snapshotEntry(l1Off uint64, l1Size uint32, extra int, id, name string) []byte {
	e := make([]byte, 40, 40+extra+len(id)+len(name)+7)
	binary.BigEndian.PutUint64(e[0:], l1Off)
	binary.BigEndian.PutUint32(e[8:], l1Size)
	binary.BigEndian.PutUint16(e[12:], uint16(len(id)))
	binary.BigEndian.PutUint16(e[14:], uint16(len(name)))
	binary.BigEndian.PutUint32(e[36:], uint32(extra))
	e = append(e, make([]byte, extra)...)
	e = append(e, id...)
	e = append(e, name...)
	return append(e, make([]byte, (8-len(e)%8)%8)...)
}

// withSnapshots appends a snapshot table made of entries at the next
// cluster boundary of b and points the header at it.
func withSnapshots(b []byte, l *Layout, entries ...[]byte) []byte {
	cs := l.ClusterSize()
	off := (uint64(len(b)) + cs - 1) &^ (cs - 1)
	b = append(b, make([]byte, off-uint64(len(b)))...)
	for _, e := range entries {
		b = append(b, e...)
	}
	be64(b, 64, off)
	be32(b, 60, uint32(len(entries)))
	return b
}

// snapshotMutations are the hostile images about the snapshot table: what
// qemu refuses to open, and a table the image ends before.
func snapshotMutations() []mutation {
	return []mutation{
		{"snapshots_too_many", hdr32(60, MaxSnapshots+1)},
		{"snapshots_offset_unaligned_none", put64(64, 0x1001)},
		{"snapshots_offset_overflow", func(b []byte, l *Layout) []byte {
			be64(b, 64, 0xffffffffffff0000)
			be32(b, 60, 0xffff)
			return b
		}},
		{"snapshot_extra_too_big", func(b []byte, l *Layout) []byte {
			return withSnapshots(b, l, snapshotEntry(l.L1Offset, 1, 24, "1", "ok"), snapshotEntry(l.L1Offset, 1, MaxSnapshotExtraData+1, "2", "big"))
		}},
		{"snapshot_table_past_end", func(b []byte, l *Layout) []byte {
			be64(b, 64, (uint64(len(b))+16*l.ClusterSize())&^(l.ClusterSize()-1))
			be32(b, 60, 1)
			return b
		}},
		{"snapshot_table_truncated", func(b []byte, l *Layout) []byte {
			b = withSnapshots(b, l, snapshotEntry(l.L1Offset, 1, 16, "1", "one"))
			be32(b, 60, 2)
			return b
		}},
	}
}

// TestSnapshotTableValid: qemu's own table (testdata/seeds), read whole
// and fed a byte at a time, gives the same entries and an unpadded end; both
// decoders accept the image.
func TestSnapshotTableValid(t *testing.T) {
	img, err := os.ReadFile("testdata/seeds/qemu-snapshots-4k.qcow2")
	if err != nil {
		t.Fatal(err)
	}
	h, err := ParseHeader(img[:4096])
	if err != nil {
		t.Fatal(err)
	}
	list, end, err := ReadSnapshots(bytes.NewReader(img), h, int64(len(img)))
	if err != nil || len(list) != 2 {
		t.Fatalf("ReadSnapshots: %d entries, %v", len(list), err)
	}
	if end != uint64(len(img)) || end%8 == 0 {
		t.Errorf("table ends at %d, the file at %d: qemu writes the table last and unpadded", end, len(img))
	}
	p := newSnapshotParser(h, true)
	for i := h.SnapshotsOffset; i < uint64(len(img)) && !p.finished(); i++ {
		if _, err := p.feed(img[i : i+1]); err != nil {
			t.Fatal(err)
		}
	}
	if !p.finished() || p.end() != end || len(p.list) != 2 || p.list[1] != list[1] {
		t.Errorf("byte at a time: finished %v, end %d, entries %+v; whole: %+v", p.finished(), p.end(), p.list, list)
	}
	for _, mode := range []string{"stream", "at"} {
		var r *Reader
		if mode == "stream" {
			r, err = NewReader(streamOnly{bytes.NewReader(img)}, ReaderOptions{})
		} else {
			r, err = NewReaderAt(bytes.NewReader(img), int64(len(img)), ReaderOptions{})
		}
		if err == nil {
			_, err = collect(r, nil, 1<<20)
		}
		if err != nil {
			t.Errorf("%s: %v", mode, err)
		}
	}
}

// zeroTable is an image whose snapshot table, from off, holds entries of
// the largest size (1 KiB of extra data, 64 KiB id and name) forever: only
// their fixed parts are non-zero, generated as read.
type zeroTable struct {
	head []byte
	off  uint64
	size int64
}

const bigEntry = 40 + 1024 + 65535 + 65535 + 2

func (z *zeroTable) ReadAt(p []byte, off int64) (int, error) {
	if off >= z.size {
		return 0, io.EOF
	}
	n := min(int64(len(p)), z.size-off)
	clear(p[:n])
	copy(p, z.head[min(off, int64(len(z.head))):])
	var fixed [40]byte
	binary.BigEndian.PutUint32(fixed[12:], 0xffffffff)
	binary.BigEndian.PutUint32(fixed[36:], 1024)
	for i := int64(0); i < n; i++ {
		pos := uint64(off+i) - z.off
		if uint64(off+i) >= z.off && pos%bigEntry < 40 {
			p[i] = fixed[pos%bigEntry]
		}
	}
	var err error
	if n < int64(len(p)) {
		err = io.EOF
	}
	return int(n), err
}

// TestSnapshotTableTooBig: a table past 64 MiB is refused as qemu refuses
// it, by both decoders, reading no more of it than the limit.
func TestSnapshotTableTooBig(t *testing.T) {
	if testing.Short() {
		t.Skip("SKIP: reads 64 MiB")
	}
	base, _, l := hostileBase(t)
	cs := l.ClusterSize()
	off := (uint64(len(base)) + cs - 1) &^ (cs - 1)
	n := uint64(MaxSnapshotTableBytes/bigEntry + 2)
	head := bytes.Clone(base)
	be64(head, 64, off)
	be32(head, 60, uint32(n))
	z := &zeroTable{head: head, off: off, size: int64(off + n*bigEntry)}
	for _, mode := range []string{"stream", "at"} {
		var r *Reader
		var err error
		if mode == "stream" {
			r, err = NewReader(io.NewSectionReader(z, 0, z.size), ReaderOptions{})
		} else {
			r, err = NewReaderAt(z, z.size, ReaderOptions{})
		}
		if err == nil {
			_, err = collect(r, nil, 1<<20)
		}
		if err == nil || !strings.Contains(err.Error(), "larger than qemu allows") {
			t.Errorf("%s: %v", mode, err)
		}
		var fe *FormatError
		if !errors.As(err, &fe) {
			t.Errorf("%s: %T is not a *FormatError", mode, err)
		}
	}
}

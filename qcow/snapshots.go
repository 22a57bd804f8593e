package qcow

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// Limits qemu puts on the internal snapshot table when it opens an image
// (QCOW_MAX_SNAPSHOTS, QCOW_MAX_SNAPSHOTS_SIZE, QCOW_MAX_SNAPSHOT_EXTRA_DATA):
// an image past them is one qemu refuses to open, so we refuse it too.
const (
	MaxSnapshots            = 65536
	MaxSnapshotTableBytes   = 64 << 20
	MaxSnapshotExtraData    = 1024
	SnapshotEntryHeaderSize = 40 // the fixed part of a table entry
)

// Snapshot is one entry of the internal snapshot table, as far as a reader
// of the active image cares: where the entry and its L1 table are.
type Snapshot struct {
	Offset        uint64 // where the entry starts in the image
	L1TableOffset uint64
	L1Size        uint32
	ExtraDataSize uint32
}

// checkSnapshotsField validates the header's snapshot fields the way qemu
// does before reading the table: the count within QCOW_MAX_SNAPSHOTS, the
// offset cluster aligned (even with no snapshots) and the table's fixed
// parts addressable.
func (h *Header) checkSnapshotsField() error {
	if h.NbSnapshots > MaxSnapshots {
		return herr("nb_snapshots", "%d snapshots is more than qemu allows (%d)", h.NbSnapshots, MaxSnapshots)
	}
	cs := h.ClusterSize()
	if h.SnapshotsOffset%cs != 0 {
		return herr("snapshots_offset", "%#x is not aligned to the cluster size", h.SnapshotsOffset)
	}
	if h.NbSnapshots == 0 {
		return nil
	}
	return checkTableOffset("snapshots_offset", h.SnapshotsOffset, uint64(h.NbSnapshots)*SnapshotEntryHeaderSize, cs, false)
}

// snapshotParser walks the snapshot table as its bytes arrive, in pieces
// of any size, keeping only the entry being read: entries start on 8-byte
// boundaries; each is a 40-byte fixed part, extra data, the id and the name.
type snapshotParser struct {
	h     *Header
	done  uint32 // entries complete
	pos   uint64 // bytes of the table consumed
	fixed [SnapshotEntryHeaderSize]byte
	have  int    // bytes of fixed collected
	skip  uint64 // bytes of the entry's variable part still to pass
	keep  bool   // keep the entries in list (ReadSnapshots), not only count them
	list  []Snapshot
	cur   Snapshot
}

func newSnapshotParser(h *Header, keep bool) *snapshotParser {
	return &snapshotParser{h: h, keep: keep}
}

// finished reports whether every entry has been read.
func (p *snapshotParser) finished() bool { return p.done >= p.h.NbSnapshots }

// end is the image offset just past the last entry read (unpadded: qemu
// writes the table without rounding its end).
func (p *snapshotParser) end() uint64 { return p.h.SnapshotsOffset + p.pos }

// want is how many more bytes the parser needs at least before it can say
// more; 0 when finished.
func (p *snapshotParser) want() uint64 {
	switch {
	case p.finished():
		return 0
	case p.skip > 0:
		return p.skip
	case p.have == 0 && p.pos%8 != 0:
		return 8 - p.pos%8 + SnapshotEntryHeaderSize
	}
	return uint64(SnapshotEntryHeaderSize - p.have)
}

func (p *snapshotParser) errf(format string, args ...any) error {
	return &SnapshotTableError{Offset: int64(p.entryStart()), Reason: fmt.Sprintf(format, args...)}
}

func (p *snapshotParser) entryStart() uint64 {
	if p.have > 0 || p.skip > 0 {
		return p.cur.Offset
	}
	return p.h.SnapshotsOffset + (p.pos+7)&^7
}

// feed consumes the table bytes b, which continue those fed before; bytes
// past the table's end are ignored. It returns how many bytes belonged to
// the table.
func (p *snapshotParser) feed(b []byte) (int, error) {
	used := 0
	for used < len(b) && !p.finished() {
		switch {
		case p.skip > 0:
			n := min(p.skip, uint64(len(b)-used))
			p.skip -= n
			p.pos += n
			used += int(n)
			if p.skip == 0 {
				if err := p.finishEntry(); err != nil {
					return used, err
				}
			}
		case p.have == 0 && p.pos%8 != 0:
			n := min(8-p.pos%8, uint64(len(b)-used))
			p.pos += n
			used += int(n)
		default:
			n := copy(p.fixed[p.have:], b[used:])
			if p.have == 0 {
				p.cur = Snapshot{Offset: p.h.SnapshotsOffset + p.pos}
			}
			p.have += n
			p.pos += uint64(n)
			used += n
			if p.have == SnapshotEntryHeaderSize {
				if err := p.startEntry(); err != nil {
					return used, err
				}
			}
		}
	}
	return used, nil
}

// startEntry validates the fixed part of an entry just read: the id and
// name lengths are 16-bit fields, so only the extra data can exceed a limit.
func (p *snapshotParser) startEntry() error {
	be := binary.BigEndian
	f := p.fixed[:]
	p.cur.L1TableOffset, p.cur.L1Size = be.Uint64(f[0:]), be.Uint32(f[8:])
	idLen, nameLen := uint64(be.Uint16(f[12:])), uint64(be.Uint16(f[14:]))
	extra := uint64(be.Uint32(f[36:]))
	p.cur.ExtraDataSize = uint32(extra)
	if extra > MaxSnapshotExtraData {
		return p.errf("snapshot %d has %d bytes of extra data, more than qemu allows (%d)", p.done, extra, MaxSnapshotExtraData)
	}
	p.skip = extra + idLen + nameLen
	if p.skip == 0 {
		return p.finishEntry()
	}
	return nil
}

func (p *snapshotParser) finishEntry() error {
	if p.keep {
		p.list = append(p.list, p.cur)
	}
	p.have = 0
	p.done++
	if p.pos > MaxSnapshotTableBytes {
		return p.errf("the snapshot table is larger than qemu allows (%d bytes)", MaxSnapshotTableBytes)
	}
	return nil
}

// ReadSnapshots reads and validates the snapshot table of the image in r
// (size bytes long) as qemu does when it opens the image, and also requires
// the table to lie inside the image. It returns the entries and the offset
// just past the table (0 when there are none).
func ReadSnapshots(r io.ReaderAt, h *Header, size int64) ([]Snapshot, uint64, error) {
	if h.NbSnapshots == 0 {
		return nil, 0, nil
	}
	p := newSnapshotParser(h, true)
	// Read in pieces of up to 64 KiB, no larger than what the image holds
	// from the table on: memory follows the image, not what it declares.
	var buf []byte
	if size > 0 && h.SnapshotsOffset < uint64(size) {
		buf = make([]byte, min(64<<10, uint64(size)-h.SnapshotsOffset))
	}
	for !p.finished() {
		off := p.end()
		if size < 0 || off >= uint64(size) {
			err := p.errf("snapshot %d of %d lies past the end of the %d-byte image", p.done, h.NbSnapshots, size)
			err.(*SnapshotTableError).Err = io.ErrUnexpectedEOF
			return nil, 0, err
		}
		n := min(uint64(len(buf)), uint64(size)-off)
		got, err := r.ReadAt(buf[:n], int64(off))
		if got == 0 {
			if err == nil || err == io.EOF {
				err = io.ErrUnexpectedEOF
			}
			return nil, 0, errorf("reading the snapshot table at %#x: %w", off, err)
		}
		if _, err := p.feed(buf[:got]); err != nil {
			return nil, 0, err
		}
	}
	return p.list, p.end(), nil
}

// checkSnapshots validates the snapshot table of a random-access image
// before the first extent is returned: an image qemu would not open is
// refused before anything is written.
func (d *decoder) checkSnapshots(r io.ReaderAt) error {
	_, _, err := ReadSnapshots(r, d.h, int64(d.fileSize))
	var se *SnapshotTableError
	switch {
	case err == nil:
		return nil
	case errors.As(err, &se):
		return d.wrapf(err, uint64(se.Offset), "snapshot table: %s", se.Reason)
	}
	return d.wrapf(err, d.h.SnapshotsOffset, "%v", err)
}

// snapshotWatch passes a stream through and validates the snapshot table
// as its bytes go by, whichever part of the decoder reads them (tables,
// data, bytes skipped). A table that is bad, or that the stream ends
// before, fails the read that meets it; where the table comes after the
// data, that is after the data was delivered: a stream cannot look ahead.
type snapshotWatch struct {
	r   io.Reader
	d   *decoder
	pos uint64
	p   *snapshotParser
	err error
}

// watchSnapshots wraps the stream r, positioned at image offset pos, when
// the image has snapshots.
func watchSnapshots(r io.Reader, d *decoder, pos uint64) io.Reader {
	if d.h.NbSnapshots == 0 {
		return r
	}
	return &snapshotWatch{r: r, d: d, pos: pos, p: newSnapshotParser(d.h, false)}
}

func (w *snapshotWatch) Read(b []byte) (int, error) {
	if w.err != nil {
		return 0, w.err
	}
	n, err := w.r.Read(b)
	if end := w.pos + uint64(n); !w.p.finished() && end > w.p.end() && w.p.end() >= w.pos {
		if _, perr := w.p.feed(b[w.p.end()-w.pos : n]); perr != nil {
			var se *SnapshotTableError
			errors.As(perr, &se)
			w.err = w.d.errf(uint64(se.Offset), "snapshot table: %s", se.Reason)
		}
	}
	w.pos += uint64(n)
	if w.err != nil {
		return n, w.err
	}
	return n, err
}

// readFailed turns an error met reading the stream into the decoder's
// error; the snapshot watch's errors are the decoder's already.
func (s *streamState) readFailed(err error) error {
	var fe *FormatError
	if errors.As(err, &fe) {
		return err
	}
	return s.d.wrapf(err, s.pos, "reading the image: %v", err)
}

// snapshotsRead fails when the stream ended before the end of the snapshot
// table; the decoder asks once everything else is out.
func (s *streamState) snapshotsRead() error {
	w, ok := s.r.(*snapshotWatch)
	if !ok || w.p.finished() {
		return nil
	}
	return s.d.wrapf(io.ErrUnexpectedEOF, w.pos, "stream ended before snapshot %d of %d (the snapshot table at %#x)", w.p.done, s.d.h.NbSnapshots, s.d.h.SnapshotsOffset)
}

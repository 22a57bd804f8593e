package qcow

import (
	"encoding/binary"
	"fmt"
	"io"
)

// atState is the random-access decoder: it walks the L1 table in guest
// order, reading each L2 table and the data it maps by offset.
type atState struct {
	d *decoder
	r io.ReaderAt

	l1Tab  []byte // the L1 cluster holding entry l1I
	l1Clu  uint64 // index of the L1 cluster in l1Tab (1<<64-1: none)
	l1I    uint64
	l2     *l2cursor
	l2buf  []byte
	q      queue
	acc    accumulator
	batch  Extent // data not yet queued: Offset, Length, HostOffset
	rbuf   []byte
	cmpBuf []byte
}

// NewReaderAt reads and validates the header, refcount table and L1 table
// of an image that can be read by offset (a file). It accepts every layout,
// and its Reader returns extents in guest order.
func NewReaderAt(r io.ReaderAt, size int64, opts ReaderOptions) (*Reader, error) {
	size = max(size, 0)
	d, err := newDecoder(false, opts, func(buf []byte) error { return readAtFull(r, size, buf) })
	if err != nil {
		return nil, err
	}
	d.fileSize = uint64(size)
	h := d.h
	cs := d.cs
	a := &atState{d: d, r: r, l1Clu: 1<<64 - 1}
	// Learn the metadata first, so data pointing into it is refused
	// whatever the order of the image.
	for c := uint64(0); c < uint64(h.RefcountTableClusters); c++ {
		at := h.RefcountTableOffset + c*cs
		if at >= d.fileSize {
			return nil, d.truncated(io.ErrUnexpectedEOF, at, "the end of the refcount table")
		}
		tab, err := a.readInto(&a.l1Tab, min(cs, d.fileSize-at), at, "the end of the refcount table")
		if err != nil {
			return nil, err
		}
		for i := uint64(0); i+8 <= uint64(len(tab)); i += 8 {
			if err := d.markRefcountBlock(at+i, binary.BigEndian.Uint64(tab[i:])); err != nil {
				return nil, err
			}
		}
	}
	perCluster := cs / 8
	for i := uint64(0); i < d.l1Need; i++ {
		if i%perCluster == 0 {
			at := h.L1TableOffset + i*8
			if _, err := a.readInto(&a.l1Tab, min(cs, (d.l1Need-i)*8), at, "the end of the L1 table"); err != nil {
				return nil, err
			}
		}
		raw := binary.BigEndian.Uint64(a.l1Tab[(i%perCluster)*8:])
		off, err := d.l1Entry(h.L1TableOffset+i*8, i, raw)
		if err != nil {
			return nil, err
		}
		if off != 0 && off+cs > d.fileSize {
			return nil, d.wrapf(io.ErrUnexpectedEOF, h.L1TableOffset+i*8, "L1 entry %d points at an L2 table at %#x past the end of the %d-byte image", i, off, size)
		}
	}
	if err := d.checkSnapshots(r); err != nil {
		return nil, err
	}
	return &Reader{d: d, step: a.step}, nil
}

// ReadHeader reads and validates cluster 0 of the image in r, size bytes
// long, as NewReaderAt does, and nothing else: the header, its extensions
// and the backing file name. Errors are *FormatError.
func ReadHeader(r io.ReaderAt, size int64) (*Header, error) {
	d := &decoder{}
	return d.readHeaderCluster(func(buf []byte) error { return readAtFull(r, size, buf) })
}

// readAtFull fills buf from offset 0 of r, an image of size bytes; a short
// read is io.ErrUnexpectedEOF.
func readAtFull(r io.ReaderAt, size int64, buf []byte) error {
	if size <= 0 {
		return io.ErrUnexpectedEOF
	}
	n, err := r.ReadAt(buf, 0)
	if n == len(buf) {
		return nil
	}
	if err == nil || err == io.EOF {
		err = io.ErrUnexpectedEOF
	}
	return err
}

// readInto reads n bytes at off into *buf, growing it (at least doubling)
// when it is too small. An image too short for them fails before anything
// is allocated, so memory follows the image's length, not the lengths its
// tables declare.
func (a *atState) readInto(buf *[]byte, n, off uint64, what string) ([]byte, error) {
	if off > a.d.fileSize || n > a.d.fileSize-off {
		return nil, a.d.truncated(io.ErrUnexpectedEOF, off, what)
	}
	if uint64(len(*buf)) < n {
		*buf = make([]byte, max(n, min(2*uint64(len(*buf)), max(a.d.cs, batchBytes))))
	}
	b := (*buf)[:n]
	return b, a.readAt(b, off, what)
}

func (a *atState) readAt(buf []byte, off uint64, what string) error {
	n, err := a.r.ReadAt(buf, int64(off))
	if n == len(buf) {
		return nil
	}
	if err == nil || err == io.EOF {
		err = io.ErrUnexpectedEOF
	}
	return a.d.truncated(err, off, what)
}

func (a *atState) step() (Extent, error) {
	d := a.d
	for {
		if !a.q.empty() {
			it := a.q.pop()
			switch {
			case it.read:
				e := it.ext
				b, err := a.readInto(&a.rbuf, e.Length, e.HostOffset, fmt.Sprintf("the data for guest %#x at %#x", e.Offset, e.HostOffset))
				if err != nil {
					return Extent{}, err
				}
				e.Data = b
				return e, nil
			case it.comp:
				src, err := a.readInto(&a.cmpBuf, min(it.clen, d.fileSize-it.coff), it.coff, fmt.Sprintf("the compressed data for guest %#x", it.g<<d.cb))
				if err != nil {
					return Extent{}, err
				}
				return d.compressedExtent(it.coff, it.g, src)
			}
			return it.ext, nil
		}
		if a.l2 != nil {
			if err := a.stepL2(); err != nil {
				return Extent{}, err
			}
			continue
		}
		if a.l1I < d.l1Need {
			if err := a.stepL1(); err != nil {
				return Extent{}, err
			}
			continue
		}
		a.flushBatch()
		a.acc.flush(&a.q)
		if a.q.empty() {
			return Extent{}, io.EOF
		}
	}
}

func (a *atState) stepL1() error {
	d := a.d
	cs := d.cs
	i := a.l1I
	a.l1I++
	perCluster := cs / 8
	if c := i / perCluster; c != a.l1Clu {
		n := min(cs, (d.l1Need-c*perCluster)*8)
		if _, err := a.readInto(&a.l1Tab, n, d.h.L1TableOffset+c*cs, "the L1 table"); err != nil {
			return err
		}
		a.l1Clu = c
	}
	off := L1Entry(binary.BigEndian.Uint64(a.l1Tab[(i%perCluster)*8:])).Offset()
	span := d.h.L2Entries() * cs
	if off == 0 {
		a.other(ExtentUnallocated, i*span, min(span, d.h.Size-i*span))
		return nil
	}
	tab, err := a.readInto(&a.l2buf, cs, off, fmt.Sprintf("the L2 table for guest %#x", i*span))
	if err != nil {
		return err
	}
	a.l2 = d.newL2Cursor(tab, off, i)
	return nil
}

func (a *atState) stepL2() error {
	d := a.d
	e, _, ok, err := d.nextL2(&a.l2)
	if !ok {
		return err
	}
	if e.compressed {
		a.flushBatch()
		a.acc.flush(&a.q)
		a.q.push(item{comp: true, g: e.g, coff: e.coff, clen: e.clen})
		return nil
	}
	d.subRuns(&e, func(kind ExtentKind, guest, within, length uint64) {
		if kind == ExtentData {
			a.data(guest, e.host+within, length)
		} else {
			a.other(kind, guest, length)
		}
	})
	return nil
}

// data adds guest bytes read from host to the pending batch.
func (a *atState) data(guest, host, length uint64) {
	b := &a.batch
	if b.Length > 0 && guest == b.Offset+b.Length && host == b.HostOffset+b.Length && b.Length+length <= batchBytes {
		b.Length += length
		return
	}
	a.flushBatch()
	a.acc.flush(&a.q)
	a.batch = Extent{Kind: ExtentData, Offset: guest, Length: length, HostOffset: host}
}

func (a *atState) other(kind ExtentKind, guest, length uint64) {
	a.flushBatch()
	a.acc.add(&a.q, kind, guest, length)
}

func (a *atState) flushBatch() {
	if a.batch.Length > 0 {
		a.q.push(item{ext: a.batch, read: true})
		a.batch = Extent{}
	}
}

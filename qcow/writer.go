package qcow

import (
	"bufio"
	"encoding/binary"
	"io"

	"github.com/xapi-project/xapi-qcow-tool/qcow/bitmap"
)

// Allocation says what a streamed image holds: which guest clusters carry
// data and which are marked as reading zero. Everything else is unallocated
// (reads as zero, or as the backing file when there is one).
type Allocation struct {
	VirtualSize   uint64
	ClusterBits   uint32
	RefcountOrder uint32
	Data          *bitmap.Bitmap // one bit per guest cluster: stored with data
	Zero          *bitmap.Bitmap // optional: stored as reads-as-zero (version 3 zero flag)
	BackingFile   string         // optional backing file name
	BackingFormat string         // its format, e.g. "raw"
}

// Writer writes a qcow2 image front to back in the layout described by
// Layout: first the metadata (WriteMetadata), then the data clusters in
// guest order (Write). It never seeks, so the output can be a pipe or a
// socket. The caller owns the order of the data: it must write, for each set
// bit of Allocation.Data in increasing order, one full cluster (a partial
// last cluster padded with zeros).
type Writer struct {
	w       io.Writer
	a       Allocation
	layout  *Layout
	header  *Header
	meta    bool
	written uint64 // data bytes accounted so far
}

// NewWriter plans the layout of the image described by a. Nothing is
// written until WriteMetadata.
func NewWriter(w io.Writer, a Allocation) (*Writer, error) {
	if a.Data == nil {
		return nil, errorf("allocation has no data bitmap")
	}
	clusters := (a.VirtualSize + (1 << a.ClusterBits) - 1) >> a.ClusterBits
	if a.Data.Len() < clusters || (a.Zero != nil && a.Zero.Len() < clusters) {
		return nil, errorf("allocation bitmap shorter than the disk")
	}
	l2 := countL2Tables(a, uint64(1)<<(a.ClusterBits-3))
	layout, err := PlanLayout(a.VirtualSize, a.ClusterBits, a.RefcountOrder, l2, a.Data.Count())
	if err != nil {
		return nil, err
	}
	h := layout.Header()
	h.BackingFile, h.BackingFormat = a.BackingFile, a.BackingFormat
	if _, err := h.MarshalCluster0(); err != nil {
		return nil, err
	}
	return &Writer{w: w, a: a, layout: layout, header: h}, nil
}

// Layout returns the planned layout.
func (w *Writer) Layout() *Layout { return w.layout }

// nextTable returns the first L2 table index at or after t holding a data
// or zero cluster.
func nextTable(a Allocation, t, perTable uint64) (uint64, bool) {
	i, ok := a.Data.NextSet(t * perTable)
	if a.Zero != nil {
		if j, zok := a.Zero.NextSet(t * perTable); zok && (!ok || j < i) {
			i, ok = j, true
		}
	}
	return i / perTable, ok
}

func countL2Tables(a Allocation, perTable uint64) uint64 {
	var n uint64
	for t, ok := nextTable(a, 0, perTable); ok; t, ok = nextTable(a, t+1, perTable) {
		n++
	}
	return n
}

// WriteMetadata writes everything before the first data cluster: header,
// refcount table, refcount blocks, L1 table and L2 tables. Memory use is a
// few clusters whatever the size of the disk.
func (w *Writer) WriteMetadata() error {
	if w.meta {
		return errorf("metadata already written")
	}
	w.meta = true
	l := w.layout
	cs := l.ClusterSize()
	bw := bufio.NewWriterSize(w.w, 1<<20)
	cluster0, err := w.header.MarshalCluster0()
	if err != nil {
		return err
	}
	if _, err := bw.Write(cluster0); err != nil {
		return err
	}
	be := binary.BigEndian
	buf := make([]byte, cs)

	// Refcount table: one pointer per refcount block.
	for c := uint64(0); c < l.RefcountTableCluster; c++ {
		clear(buf)
		for i := uint64(0); i < cs/8; i++ {
			if b := c*cs/8 + i; b < l.RefcountBlocks {
				be.PutUint64(buf[i*8:], l.RefcountBlockOffset+b*cs)
			}
		}
		if _, err := bw.Write(buf); err != nil {
			return err
		}
	}
	// Refcount blocks: every cluster of the image has refcount 1.
	perBlock := cs * 8 >> l.RefcountOrder
	for b := uint64(0); b < l.RefcountBlocks; b++ {
		first := b * perBlock
		n := uint64(0)
		if l.TotalClusters > first {
			n = min(perBlock, l.TotalClusters-first)
		}
		fillRefcountBlock(buf, n, l.RefcountOrder)
		if _, err := bw.Write(buf); err != nil {
			return err
		}
	}
	// L1 table, written a cluster at a time.
	perTable := cs / 8
	nextL2 := l.L2Offset
	t, ok := nextTable(w.a, 0, perTable)
	for c := uint64(0); c < l.L1Clusters; c++ {
		clear(buf)
		for i := uint64(0); i < perTable; i++ {
			idx := c*perTable + i
			if ok && idx == t {
				be.PutUint64(buf[i*8:], uint64(MakeL1Entry(nextL2)))
				nextL2 += cs
				t, ok = nextTable(w.a, t+1, perTable)
			}
		}
		if _, err := bw.Write(buf); err != nil {
			return err
		}
	}
	// L2 tables in guest order; data clusters are numbered in guest order.
	nextData := l.DataOffset
	for t, ok := nextTable(w.a, 0, perTable); ok; t, ok = nextTable(w.a, t+1, perTable) {
		clear(buf)
		for i := uint64(0); i < perTable; i++ {
			g := t*perTable + i
			switch {
			case w.a.Data.Test(g):
				be.PutUint64(buf[i*8:], uint64(MakeL2Entry(nextData)))
				nextData += cs
			case w.a.Zero != nil && w.a.Zero.Test(g):
				be.PutUint64(buf[i*8:], uint64(ZeroL2Entry))
			}
		}
		if _, err := bw.Write(buf); err != nil {
			return err
		}
	}
	if nextData != l.Size() {
		return errorf("internal error: data ends at %d, layout at %d", nextData, l.Size())
	}
	return bw.Flush()
}

// fillRefcountBlock sets the first n refcounts of a block to 1 and the rest
// to 0. Entries narrower than a byte are packed from the least significant
// bit, as qemu reads them; wider ones are big-endian.
func fillRefcountBlock(buf []byte, n uint64, order uint32) {
	clear(buf)
	bits := uint64(1) << order
	if bits < 8 {
		for i := uint64(0); i < n; i++ {
			buf[i*bits/8] |= 1 << (i * bits % 8)
		}
		return
	}
	width := bits / 8
	for i := uint64(0); i < n; i++ {
		buf[(i+1)*width-1] = 1
	}
}

// Write writes data cluster bytes. It fails with ErrDataOverrun rather than
// write past the end of the planned image.
func (w *Writer) Write(p []byte) (int, error) {
	if !w.meta {
		if err := w.WriteMetadata(); err != nil {
			return 0, err
		}
	}
	if uint64(len(p)) > w.Remaining() {
		return 0, ErrDataOverrun
	}
	n, err := w.w.Write(p)
	w.written += uint64(n)
	return n, err
}

// Remaining is the number of data bytes still to be written.
func (w *Writer) Remaining() uint64 {
	return w.layout.DataClusters<<w.layout.ClusterBits - w.written
}

// Account records n data bytes that the caller wrote to the underlying
// writer itself (zero-copy paths such as splice).
func (w *Writer) Account(n uint64) error {
	if n > w.Remaining() {
		return ErrDataOverrun
	}
	w.written += n
	return nil
}

// Close checks that the whole image was written. It does not close the
// underlying writer.
func (w *Writer) Close() error {
	if !w.meta {
		if err := w.WriteMetadata(); err != nil {
			return err
		}
	}
	if r := w.Remaining(); r != 0 {
		return errorf("image incomplete: %d data bytes missing", r)
	}
	return nil
}

// Encode writes a whole image for a: the metadata, then each data cluster
// read from src at its guest offset. Bytes past src's end read as zero. It
// is the simple, non-zero-copy path, used by tests and small tools.
func Encode(dst io.Writer, a Allocation, src io.ReaderAt) (*Layout, error) {
	w, err := NewWriter(dst, a)
	if err != nil {
		return nil, err
	}
	if err := w.WriteMetadata(); err != nil {
		return nil, err
	}
	cs := uint64(1) << a.ClusterBits
	buf := make([]byte, cs)
	for g, ok := a.Data.NextSet(0); ok; g, ok = a.Data.NextSet(g + 1) {
		clear(buf)
		n, err := src.ReadAt(buf, int64(g*cs))
		if err != nil && err != io.EOF {
			return nil, err
		}
		_ = n
		if _, err := w.Write(buf); err != nil {
			return nil, err
		}
	}
	return w.Layout(), w.Close()
}

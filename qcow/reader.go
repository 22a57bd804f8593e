package qcow

import (
	"bytes"
	"compress/flate"
	"container/heap"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"slices"

	"github.com/klauspost/compress/zstd"
)

// ReaderOptions bound what a hostile stream can make the decoder hold.
type ReaderOptions struct {
	// MaxBuffered is the number of bytes of data (and tables) that may be
	// held in memory because they arrive before anything maps them. 0 means
	// DefaultMaxBuffered (256 MiB).
	MaxBuffered int64
	// AllowBacking accepts images that name a backing file (import with
	// --delta applies a diff); otherwise such images are refused with an
	// error.
	AllowBacking bool
	// DataBuffer, when set, is asked where the bytes of a run of data
	// clusters read from a stream (NewReader) should land: it returns
	// memory for up to n bytes of the guest disk from off. The decoder
	// reads the stream straight into it, and the next extent Next returns
	// is that run, with Data in that memory (shorter than asked at the
	// end of the disk or of a truncated stream). A caller that writes
	// from its own buffer saves a copy of every byte. Returning less than
	// a cluster (or nil) makes the decoder use its own buffer.
	DataBuffer func(off uint64, n int) []byte
}

// DefaultMaxBuffered is the default ReaderOptions.MaxBuffered.
const DefaultMaxBuffered = 256 << 20

// ExtentKind says how an extent of the guest disk reads.
type ExtentKind uint8

// Extent kinds.
const (
	ExtentData        ExtentKind = iota // Data holds the bytes
	ExtentZero                          // reads as zero: zero flag (or zero subclusters)
	ExtentUnallocated                   // not allocated in the image: reads as zero, or as the backing file
)

func (k ExtentKind) String() string {
	switch k {
	case ExtentData:
		return "data"
	case ExtentZero:
		return "zero"
	case ExtentUnallocated:
		return "unallocated"
	}
	return fmt.Sprintf("ExtentKind(%d)", uint8(k))
}

// Extent is a piece of the guest disk. Extents come in stream order, not
// guest order; together they cover [0, virtual size) exactly once, and never
// extend past the virtual size (a partial last cluster is clipped).
type Extent struct {
	Kind   ExtentKind
	Offset uint64 // guest offset
	Length uint64
	Data   []byte // ExtentData only; valid until the next call to Next
	// HostOffset is, for data, where the bytes sit in the image (compressed:
	// the compressed bytes' offset); 0 otherwise.
	HostOffset uint64
	Compressed bool
}

// ErrNeedRandomAccess is wrapped by the error returned when a stream holds
// more out-of-order data than ReaderOptions.MaxBuffered allows, or more
// pending references than the decoder keeps.
var ErrNeedRandomAccess = errors.New("the image must be given as a file (random access)")

// FormatError reports an image the decoder refuses, with the offset in the
// image where the problem was found. Err, when set, is a wrapped cause such
// as io.ErrUnexpectedEOF, ErrNeedRandomAccess or a *HeaderError.
type FormatError struct {
	Stream bool  // found by the stream decoder (NewReader)
	Offset int64 // image offset at which the problem was seen
	Reason string
	Err    error
}

func (e *FormatError) Error() string {
	what := "qcow2 image"
	if e.Stream {
		what = "qcow2 stream"
	}
	return fmt.Sprintf("%s: offset %#x: %s", what, e.Offset, e.Reason)
}

func (e *FormatError) Unwrap() error { return e.Err }

// limits on what one image can make the decoder hold, besides MaxBuffered.
const (
	maxBitmapChunks = 1 << 17 // host cluster bitmaps: 64 MiB each at most
	minPending      = 4096
	batchBytes      = 1 << 20 // data read and handed out at once
	compOverhead    = 96      // bytes charged per compressed cluster in flight
)

// hostBitmap is a sparse bit set over host clusters (up to 2^47 of them),
// with a hard cap on its memory.
type hostBitmap struct {
	chunks map[uint64]*[64]uint64 // 4096 bits per chunk
}

func (b *hostBitmap) test(i uint64) bool {
	c := b.chunks[i>>12]
	return c != nil && c[(i>>6)&63]&(1<<(i&63)) != 0
}

// set sets bit i; it reports false when the bitmap is full.
func (b *hostBitmap) set(i uint64) bool {
	if b.chunks == nil {
		b.chunks = make(map[uint64]*[64]uint64)
	}
	c := b.chunks[i>>12]
	if c == nil {
		if len(b.chunks) >= maxBitmapChunks {
			return false
		}
		c = new([64]uint64)
		b.chunks[i>>12] = c
	}
	c[(i>>6)&63] |= 1 << (i & 63)
	return true
}

// decoder holds what the stream and random-access decoders share: the
// header, the metadata regions and the host cluster bitmaps.
type decoder struct {
	h      *Header
	stream bool
	cb     uint32
	cs     uint64
	nsub   uint   // subclusters per cluster: 32 with extended L2, else 1
	sc     uint64 // subcluster size
	full   uint32 // allocation mask of a fully allocated cluster
	l1Need uint64 // L1 entries that map the virtual size
	l1End  uint64 // end of the L1 table region (cluster aligned)
	rtEnd  uint64 // end of the refcount table
	// claimed has a bit per host cluster referenced by the L1 or an L2
	// table (L2 tables and standard data clusters); meta one per host
	// cluster holding an L2 table or a refcount block.
	claimed, meta hostBitmap
	fileSize      uint64 // random access only: the image's length
	zdec          *zstd.Decoder
	fdec          io.ReadCloser
	cbuf          []byte // decompression output
}

func (d *decoder) errf(off uint64, format string, args ...any) error {
	return &FormatError{Stream: d.stream, Offset: int64(off), Reason: fmt.Sprintf(format, args...)}
}

func (d *decoder) wrapf(err error, off uint64, format string, args ...any) error {
	return &FormatError{Stream: d.stream, Offset: int64(off), Reason: fmt.Sprintf(format, args...), Err: err}
}

// newDecoder reads cluster 0 with read (which fills buf from offset 0, or
// from where the previous call stopped, or fails) and validates it.
func newDecoder(stream bool, opts ReaderOptions, read func(buf []byte) error) (*decoder, error) {
	d := &decoder{stream: stream}
	first := make([]byte, HeaderSizeV2)
	if err := read(first); err != nil {
		return nil, d.truncated(err, 0, "the header")
	}
	cb := binary.BigEndian.Uint32(first[20:])
	if v := binary.BigEndian.Uint32(first[4:]); binary.BigEndian.Uint32(first) != Magic || v != 2 && v != 3 {
		_, err := ParseHeader(first)
		return nil, d.wrapf(err, 0, "%v", err)
	}
	if cb < MinClusterBits || cb > MaxClusterBits {
		err := herr("cluster_bits", "%d is outside %d..%d", cb, MinClusterBits, MaxClusterBits)
		return nil, d.wrapf(err, 20, "%v", err)
	}
	// Grow towards the declared cluster size only as the bytes arrive: a
	// short image claiming 2 MiB clusters must not cost 2 MiB.
	buf := first
	for cs := 1 << cb; len(buf) < cs; {
		n := min(cs, max(2*len(buf), 4096))
		buf = slices.Grow(buf, n-len(buf))[:n]
		if err := read(buf); err != nil {
			return nil, d.truncated(err, HeaderSizeV2, "the header cluster")
		}
	}
	h, err := ParseHeader(buf)
	if err != nil {
		return nil, d.wrapf(err, 0, "%v", err)
	}
	if h.BackingFile != "" && !opts.AllowBacking {
		return nil, d.errf(h.BackingFileOffset, "image has a backing file (%q); only a delta import accepts one", h.BackingFile)
	}
	d.h = h
	d.cb = h.ClusterBits
	d.cs = h.ClusterSize()
	d.nsub, d.full = 1, 1
	if h.ExtendedL2() {
		d.nsub, d.full = 32, 0xffffffff
	}
	d.sc = d.cs / uint64(d.nsub)
	span := h.L2Entries() * d.cs
	d.l1Need = (h.Size + span - 1) / span
	if h.L1Size > 0 {
		d.l1End = h.L1TableOffset + (uint64(h.L1Size)*8+d.cs-1)&^(d.cs-1)
	}
	d.rtEnd = h.RefcountTableOffset + uint64(h.RefcountTableClusters)*d.cs
	if h.L1Size > 0 && h.L1TableOffset < d.rtEnd && h.RefcountTableOffset < d.l1End {
		return nil, d.errf(h.L1TableOffset, "the L1 table overlaps the refcount table")
	}
	return d, nil
}

// truncated turns a short read into an error naming what was missing.
func (d *decoder) truncated(err error, off uint64, what string) error {
	if err == io.EOF || err == io.ErrUnexpectedEOF {
		return d.wrapf(io.ErrUnexpectedEOF, off, "image ends before %s", what)
	}
	return d.wrapf(err, off, "reading %s: %v", what, err)
}

// region names the fixed metadata region holding host offset off, if any.
func (d *decoder) region(off uint64) string {
	switch {
	case off < d.cs:
		return "the header"
	case off >= d.h.RefcountTableOffset && off < d.rtEnd:
		return "the refcount table"
	case d.h.L1Size > 0 && off >= d.h.L1TableOffset && off < d.l1End:
		return "the L1 table"
	}
	return ""
}

// checkCluster validates a cluster-aligned host offset referenced by what
// (an L2 table or a data cluster) at table offset at, and claims it. what
// is only called for an error: formatting it for every entry would cost
// more than the checks.
func (d *decoder) checkCluster(at, host uint64, what func() string, isL2 bool) error {
	if host%d.cs != 0 {
		return d.errf(at, "%s points at host offset %#x, not aligned to the %d-byte cluster size", what(), host, d.cs)
	}
	if host >= MaxHostOffset {
		return d.errf(at, "%s points at host offset %#x, past 2^56", what(), host)
	}
	if r := d.region(host); r != "" {
		return d.errf(at, "%s points into the metadata (%s) at %#x", what(), r, host)
	}
	if d.fileSize != 0 && host >= d.fileSize {
		return d.wrapf(io.ErrUnexpectedEOF, at, "%s points at host offset %#x, past the end of the %d-byte image", what(), host, d.fileSize)
	}
	c := host >> d.cb
	if d.meta.test(c) {
		return d.errf(at, "%s points into the metadata (an L2 table or refcount block) at %#x", what(), host)
	}
	if d.claimed.test(c) {
		return d.errf(at, "%s points at host cluster %#x, which is already referenced", what(), host)
	}
	if !d.claimed.set(c) || isL2 && !d.meta.set(c) {
		return d.wrapf(ErrNeedRandomAccess, at, "too many distinct host clusters referenced")
	}
	return nil
}

// markRefcountBlock records a refcount block named by the refcount table.
func (d *decoder) markRefcountBlock(at, host uint64) error {
	if host == 0 {
		return nil
	}
	if host%d.cs != 0 || host >= MaxHostOffset {
		return d.errf(at, "refcount block offset %#x is unaligned or past 2^56", host)
	}
	if r := d.region(host); r != "" {
		return d.errf(at, "refcount block at %#x points into the metadata (%s)", host, r)
	}
	c := host >> d.cb
	if d.meta.test(c) || d.claimed.test(c) {
		return d.errf(at, "refcount block at %#x is also used for something else", host)
	}
	if !d.meta.set(c) {
		return d.wrapf(ErrNeedRandomAccess, at, "too many distinct host clusters referenced")
	}
	return nil
}

// checkCompressed validates the host byte range of a compressed cluster.
func (d *decoder) checkCompressed(at, off, length uint64, what func() string) error {
	if off >= MaxHostOffset || length > MaxHostOffset-off {
		return d.errf(at, "%s points at host offset %#x, past 2^56", what(), off)
	}
	for c := off >> d.cb; c <= (off+length-1)>>d.cb; c++ {
		if r := d.region(c << d.cb); r != "" {
			return d.errf(at, "%s points into the metadata (%s) at %#x", what(), r, off)
		}
		if d.meta.test(c) {
			return d.errf(at, "%s points into the metadata (an L2 table or refcount block) at %#x", what(), off)
		}
	}
	if d.fileSize != 0 && off >= d.fileSize {
		return d.wrapf(io.ErrUnexpectedEOF, at, "%s points at host offset %#x, past the end of the %d-byte image", what(), off, d.fileSize)
	}
	return nil
}

// l1Entry validates L1 entry idx read at host offset at; it returns the L2
// table offset (0: unallocated).
func (d *decoder) l1Entry(at, idx uint64, raw uint64) (uint64, error) {
	e := L1Entry(raw)
	if e.Reserved() != 0 {
		return 0, d.errf(at, "L1 entry %d (%#016x) has reserved bits set", idx, raw)
	}
	off := e.Offset()
	if off == 0 {
		return 0, nil
	}
	what := func() string { return fmt.Sprintf("L1 entry %d (guest %#x)", idx, idx*d.h.L2Entries()*d.cs) }
	return off, d.checkCluster(at, off, what, true)
}

// entry is a decoded L2 entry.
type entry struct {
	g          uint64 // guest cluster
	host       uint64 // standard: host cluster offset (0: none)
	alloc      uint32 // standard: subclusters holding data
	zero       uint32 // subclusters that read as zero
	compressed bool
	coff, clen uint64 // compressed: host byte range (length an upper bound)
}

// l2Entry decodes and validates the L2 entry of guest cluster g; at is the
// entry's host offset.
func (d *decoder) l2Entry(at, g, raw, bm uint64) (entry, error) {
	e := L2Entry(raw)
	en := entry{g: g}
	what := func() string { return fmt.Sprintf("L2 entry for guest %#x", g<<d.cb) }
	if e.Compressed() {
		if d.nsub > 1 && bm != 0 {
			return en, d.errf(at, "%s: compressed cluster with a subcluster bitmap %#x", what(), bm)
		}
		en.compressed = true
		en.coff, en.clen = e.CompressedExtent(d.cb)
		return en, d.checkCompressed(at, en.coff, en.clen, what)
	}
	if e.Reserved() != 0 || e.Zero() && (d.h.Version < 3 || d.nsub > 1) {
		return en, d.errf(at, "%s (%#016x) has reserved bits set", what(), raw)
	}
	en.host = e.Offset()
	if d.nsub > 1 {
		en.alloc, en.zero = uint32(bm), uint32(bm>>32)
		if SubclusterBitmap(bm).Invalid() {
			return en, d.errf(at, "%s: subcluster bitmap %#016x marks subclusters both allocated and zero", what(), bm)
		}
		if en.host == 0 && en.alloc != 0 {
			return en, d.errf(at, "%s: allocated subclusters without a host cluster", what())
		}
	} else if e.Zero() {
		en.zero = 1
	} else if en.host != 0 {
		en.alloc = 1
	}
	if en.host != 0 {
		if err := d.checkCluster(at, en.host, what, false); err != nil {
			return en, err
		}
	}
	return en, nil
}

// subKind is the kind of subcluster i of e.
func (e *entry) subKind(i uint) ExtentKind {
	switch {
	case e.alloc>>i&1 != 0:
		return ExtentData
	case e.zero>>i&1 != 0:
		return ExtentZero
	}
	return ExtentUnallocated
}

// subRuns calls f for each run of subclusters of e of one kind, clipped to
// the virtual size: guest offset, offset within the cluster and length.
func (d *decoder) subRuns(e *entry, f func(kind ExtentKind, guest, within, length uint64)) {
	base := e.g << d.cb
	for i := uint(0); i < d.nsub; {
		start := base + uint64(i)*d.sc
		if start >= d.h.Size {
			return
		}
		k := e.subKind(i)
		j := i + 1
		for j < d.nsub && e.subKind(j) == k {
			j++
		}
		end := min(base+uint64(j)*d.sc, d.h.Size)
		f(k, start, uint64(i)*d.sc, end-start)
		i = j
	}
}

// needBytes is how much of host cluster data for guest cluster g with
// allocation mask mask must be present: up to the end of its last allocated
// subcluster, clipped to the virtual size.
func (d *decoder) needBytes(g uint64, mask uint32) uint64 {
	last := uint64(0)
	for i := uint(0); i < d.nsub; i++ {
		if mask>>i&1 != 0 {
			last = uint64(i) + 1
		}
	}
	return min(last*d.sc, d.h.Size-g<<d.cb)
}

// decompress inflates one compressed cluster from src into d.cbuf.
func (d *decoder) decompress(at uint64, g uint64, src []byte) ([]byte, error) {
	if d.cbuf == nil {
		d.cbuf = make([]byte, d.cs)
	}
	out := d.cbuf
	var r io.Reader
	br := bytes.NewReader(src)
	switch d.h.CompressionType {
	case CompressionDeflate:
		if d.fdec == nil {
			d.fdec = flate.NewReader(br)
		} else if err := d.fdec.(flate.Resetter).Reset(br, nil); err != nil {
			return nil, d.errf(at, "compressed cluster for guest %#x: %v", g<<d.cb, err)
		}
		r = d.fdec
	case CompressionZstd:
		// The bytes after the frame may be the next cluster's frame, which
		// a zstd stream decoder would carry on into: decode exactly one.
		n, err := zstdFrameLen(src)
		if err != nil {
			return nil, d.errf(at, "compressed cluster for guest %#x is corrupt: %v", g<<d.cb, err)
		}
		if d.zdec == nil {
			z, err := zstd.NewReader(nil, zstd.WithDecoderConcurrency(1), zstd.WithDecoderLowmem(true),
				zstd.WithDecoderMaxWindow(max(2*d.cs, zstd.MinWindowSize)), zstd.WithDecoderMaxMemory(d.cs))
			if err != nil {
				return nil, d.errf(at, "compressed cluster for guest %#x: %v", g<<d.cb, err)
			}
			d.zdec = z
		}
		res, err := d.zdec.DecodeAll(src[:n], out[:0])
		if err != nil {
			return nil, d.errf(at, "compressed cluster for guest %#x is corrupt: %v", g<<d.cb, err)
		}
		if uint64(len(res)) != d.cs {
			return nil, d.errf(at, "compressed cluster for guest %#x decompresses to %d bytes, not one cluster", g<<d.cb, len(res))
		}
		return res, nil
	}
	if n, err := io.ReadFull(r, out); err != nil {
		if err == io.EOF || err == io.ErrUnexpectedEOF {
			return nil, d.errf(at, "compressed cluster for guest %#x decompresses to %d bytes, not a whole cluster", g<<d.cb, n)
		}
		return nil, d.errf(at, "compressed cluster for guest %#x is corrupt: %v", g<<d.cb, err)
	}
	// The compressed length is only an upper bound: what follows the end
	// of the compressed data is not ours to judge, but more output is.
	var one [1]byte
	if n, _ := r.Read(one[:]); n > 0 {
		return nil, d.errf(at, "compressed cluster for guest %#x decompresses to more than a cluster", g<<d.cb)
	}
	return out, nil
}

// zstdFrameLen returns the length of the zstd frame at the start of src,
// walking its block headers (RFC 8878).
func zstdFrameLen(src []byte) (int, error) {
	if len(src) < 6 || binary.LittleEndian.Uint32(src) != 0xFD2FB528 {
		return 0, errors.New("not a zstd frame")
	}
	fhd := src[4]
	if fhd&0x08 != 0 {
		return 0, errors.New("zstd frame header has its reserved bit set")
	}
	single := fhd>>5&1 != 0
	pos := 5
	if !single {
		pos++
	}
	pos += [4]int{0, 1, 2, 4}[fhd&3]
	fcs := [4]int{0, 2, 4, 8}[fhd>>6]
	if fhd>>6 == 0 && single {
		fcs = 1
	}
	pos += fcs
	for {
		if pos+3 > len(src) {
			return 0, errors.New("zstd frame truncated")
		}
		bh := int(src[pos]) | int(src[pos+1])<<8 | int(src[pos+2])<<16
		pos += 3
		size := bh >> 3
		switch bh >> 1 & 3 {
		case 1: // RLE: one byte repeated
			size = 1
		case 3:
			return 0, errors.New("zstd block of reserved type")
		}
		pos += size
		if pos > len(src) {
			return 0, errors.New("zstd frame truncated")
		}
		if bh&1 != 0 {
			break
		}
	}
	if fhd&0x04 != 0 {
		pos += 4
	}
	if pos > len(src) {
		return 0, errors.New("zstd frame truncated")
	}
	return pos, nil
}

// accumulator merges adjacent zero or unallocated extents before they are
// queued.
type accumulator struct {
	ext Extent
}

// queue is a FIFO of work items handed out by Next.
type item struct {
	ext Extent
	// compressed cluster waiting to be decompressed: its bytes (stream) or
	// its host range (random access)
	comp       bool
	g          uint64
	src        []byte
	coff, clen uint64
	charged    int64
	// random access: data to read at ext.HostOffset
	read bool
}

type queue struct {
	items []item
	head  int
}

func (q *queue) push(it item) { q.items = append(q.items, it) }
func (q *queue) empty() bool  { return q.head == len(q.items) }
func (q *queue) pop() item {
	it := q.items[q.head]
	q.items[q.head] = item{}
	q.head++
	if q.head == len(q.items) {
		q.items, q.head = q.items[:0], 0
	}
	return it
}

// add queues a zero or unallocated range, merging it with the previous one
// when they touch.
func (a *accumulator) add(q *queue, kind ExtentKind, off, length uint64) {
	if a.ext.Length > 0 && a.ext.Kind == kind && a.ext.Offset+a.ext.Length == off {
		a.ext.Length += length
		return
	}
	a.flush(q)
	a.ext = Extent{Kind: kind, Offset: off, Length: length}
}

func (a *accumulator) flush(q *queue) {
	if a.ext.Length > 0 {
		q.push(item{ext: a.ext})
		a.ext = Extent{}
	}
}

// Reader decodes a qcow2 image into extents of the guest disk. See
// NewReader and NewReaderAt.
type Reader struct {
	d *decoder
	s *streamState
	a *atState
}

// Header returns the image header.
func (r *Reader) Header() *Header { return r.d.h }

// Next returns the next extent, or io.EOF after the last one. After an
// error other than io.EOF the Reader is unusable and returns that error.
func (r *Reader) Next() (Extent, error) {
	if r.s != nil {
		return r.s.next()
	}
	return r.a.next()
}

// NewReader reads and validates the header cluster of an image that
// arrives as a stream, front to back, never seeking. Tables and data that
// arrive before anything maps them are held up to opts.MaxBuffered bytes;
// images needing more must be read with NewReaderAt.
func NewReader(r io.Reader, opts ReaderOptions) (*Reader, error) {
	pos := uint64(0)
	d, err := newDecoder(true, opts, func(buf []byte) error {
		n, err := io.ReadFull(r, buf[pos:])
		pos += uint64(n)
		return err
	})
	if err != nil {
		return nil, err
	}
	s := newStream(d, r, opts)
	return &Reader{d: d, s: s}, nil
}

// ---- stream decoder ----

// run is a pending reference to n consecutive host clusters mapped to n
// consecutive guest clusters (n is 1 when mask is partial).
type run struct {
	host, g, n uint64
	mask       uint32
}

type runHeap []run

func (h runHeap) Len() int           { return len(h) }
func (h runHeap) Less(i, j int) bool { return h[i].host < h[j].host }
func (h runHeap) Swap(i, j int)      { h[i], h[j] = h[j], h[i] }
func (h *runHeap) Push(x any)        { *h = append(*h, x.(run)) }
func (h *runHeap) Pop() any {
	old := *h
	x := old[len(old)-1]
	*h = old[:len(old)-1]
	return x
}

// compWant is a compressed cluster whose bytes are being collected.
type compWant struct {
	g, off, length uint64
	at             uint64 // L2 entry offset, for errors
	// buf holds the bytes collected from off (have of them); it grows as
	// they arrive, as the length is only an upper bound declared by the
	// image. The full length is charged to MaxBuffered all the same.
	buf  []byte
	have uint64
}

type compHeap []*compWant

func (h compHeap) Len() int           { return len(h) }
func (h compHeap) Less(i, j int) bool { return h[i].off < h[j].off }
func (h compHeap) Swap(i, j int)      { h[i], h[j] = h[j], h[i] }
func (h *compHeap) Push(x any)        { *h = append(*h, x.(*compWant)) }
func (h *compHeap) Pop() any {
	old := *h
	x := old[len(old)-1]
	old[len(old)-1] = nil
	*h = old[:len(old)-1]
	return x
}

// l2cursor walks one L2 table.
type l2cursor struct {
	tab  []byte
	at   uint64 // host offset of the table
	g0   uint64 // first guest cluster
	i, n uint64 // next entry, entries to walk
}

// next decodes the cursor's next entry and the host offset it was read
// at; done reports that the table has been walked. Both decoders walk L2
// tables with it.
func (c *l2cursor) next(d *decoder) (e entry, at uint64, done bool, err error) {
	if c.i >= c.n {
		return entry{}, 0, true, nil
	}
	i := c.i
	c.i++
	es := d.h.L2EntrySize()
	raw := binary.BigEndian.Uint64(c.tab[i*es:])
	var bm uint64
	if es == 16 {
		bm = binary.BigEndian.Uint64(c.tab[i*es+8:])
	}
	at = c.at + i*es
	e, err = d.l2Entry(at, c.g0+i, raw, bm)
	return e, at, false, err
}

type streamState struct {
	d   *decoder
	r   io.Reader
	pos uint64 // stream offset of the next byte to read
	eof bool
	err error

	maxBuf, buffered int64
	maxPending       int
	buffer           map[uint64][]byte // clusters nothing mapped yet, by host offset
	allL2Known       bool

	rtDone bool
	l1Tab  []byte // the L1 cluster being walked
	l1At   uint64
	l1I    uint64 // next L1 entry index
	l1N    uint64 // end of the entries in l1Tab
	l1Seen uint64 // L1 entries read so far

	l2Pending runHeap // L2 tables not yet read: host, g = L1 index
	l2Work    []run   // L2 tables found in the buffer, to walk
	l2Work1   []byte
	l2        *l2cursor
	runs      runHeap // pending data clusters
	open      run     // the run being extended (n == 0: none)
	comps     compHeap
	active    []*compWant

	q   queue
	acc accumulator

	rbuf  []byte                         // data read buffer (grown by readData)
	lend  func(off uint64, n int) []byte // ReaderOptions.DataBuffer
	l2buf []byte                         // L2 table read buffer
	l1buf []byte                         // L1 cluster read buffer
}

func newStream(d *decoder, r io.Reader, opts ReaderOptions) *streamState {
	s := &streamState{d: d, r: r, pos: d.cs, maxBuf: opts.MaxBuffered, buffer: map[uint64][]byte{}, lend: opts.DataBuffer}
	if s.maxBuf <= 0 {
		s.maxBuf = DefaultMaxBuffered
	}
	s.maxPending = int(max(s.maxBuf/128, minPending))
	if d.l1Need == 0 {
		s.l1Seen = uint64(d.h.L1Size)
	}
	return s
}

func (s *streamState) pending() int {
	return len(s.l2Pending) + len(s.runs) + len(s.comps) + len(s.active) + len(s.l2Work)
}

func (s *streamState) checkPending() error {
	if s.pending() > s.maxPending {
		return s.d.wrapf(ErrNeedRandomAccess, s.pos, "more than %d references to clusters not yet seen; %v", s.maxPending, ErrNeedRandomAccess)
	}
	return nil
}

func (s *streamState) l1Done() bool { return s.l1Seen >= s.d.l1Need && s.l1Tab == nil }

func (s *streamState) l2Known() bool {
	return s.l1Done() && len(s.l2Pending) == 0 && len(s.l2Work) == 0 && s.l2 == nil
}

func (s *streamState) next() (Extent, error) {
	if s.err != nil {
		return Extent{}, s.err
	}
	ext, err := s.step()
	if err != nil {
		s.err = err
	}
	return ext, err
}

func (s *streamState) step() (Extent, error) {
	d := s.d
	for {
		if !s.q.empty() {
			it := s.q.pop()
			if !it.comp {
				return it.ext, nil
			}
			s.buffered -= it.charged
			out, err := d.decompress(it.coff, it.g, it.src)
			if err != nil {
				return Extent{}, err
			}
			length := min(d.cs, d.h.Size-it.g<<d.cb)
			return Extent{Kind: ExtentData, Offset: it.g << d.cb, Length: length, Data: out[:length],
				HostOffset: it.coff, Compressed: true}, nil
		}
		if s.l2 != nil {
			if err := s.stepL2(); err != nil {
				return Extent{}, err
			}
			continue
		}
		if len(s.l2Work) > 0 {
			w := s.l2Work[0]
			s.l2Work = s.l2Work[1:]
			tab := s.buffer[w.host]
			delete(s.buffer, w.host)
			s.buffered -= int64(len(tab))
			if uint64(len(tab)) < d.cs {
				return Extent{}, d.wrapf(io.ErrUnexpectedEOF, w.host, "stream ended inside the L2 table at %#x", w.host)
			}
			s.startL2(tab, w.host, w.g)
			continue
		}
		if s.l1Tab != nil {
			if err := s.stepL1(); err != nil {
				return Extent{}, err
			}
			continue
		}
		if !s.allL2Known && s.l2Known() {
			s.allL2Known = true
			s.buffer, s.buffered = nil, s.buffered-s.bufferBytes()
		}
		if s.acc.ext.Length > 0 {
			s.acc.flush(&s.q)
			continue
		}
		if s.allL2Known && len(s.runs) == 0 && s.open.n == 0 && len(s.comps) == 0 && len(s.active) == 0 {
			// Everything is out: drain the rest without holding it.
			if !s.eof {
				io.Copy(io.Discard, s.r)
				s.eof = true
			}
			return Extent{}, io.EOF
		}
		if s.eof {
			return Extent{}, s.missing()
		}
		if err := s.advance(); err != nil {
			return Extent{}, err
		}
	}
}

func (s *streamState) bufferBytes() int64 {
	var n int64
	for _, b := range s.buffer {
		n += int64(len(b))
	}
	return n
}

// missing names the first thing the stream ended before.
func (s *streamState) missing() error {
	d := s.d
	what, off := "", uint64(1<<64-1)
	if !s.l1Done() {
		what, off = "the L1 table", d.h.L1TableOffset+s.l1Seen*8
	}
	if len(s.l2Pending) > 0 && s.l2Pending[0].host < off {
		off = s.l2Pending[0].host
		what = fmt.Sprintf("the L2 table for guest %#x", s.l2Pending[0].g*d.h.L2Entries()<<d.cb)
	}
	if r, ok := s.peekRun(); ok && r.host < off {
		off = r.host
		what = fmt.Sprintf("the data cluster for guest %#x", r.g<<d.cb)
	}
	if len(s.comps) > 0 && s.comps[0].off < off {
		off = s.comps[0].off
		what = fmt.Sprintf("the compressed cluster for guest %#x", s.comps[0].g<<d.cb)
	}
	if what == "" {
		what, off = "the end of the image", s.pos
	}
	return d.wrapf(io.ErrUnexpectedEOF, s.pos, "stream ended before %s at %#x", what, off)
}

// peekRun returns the pending data run with the lowest host offset.
func (s *streamState) peekRun() (run, bool) {
	if len(s.runs) > 0 && (s.open.n == 0 || s.runs[0].host < s.open.host) {
		return s.runs[0], true
	}
	return s.open, s.open.n > 0
}

// takeRun removes k clusters from the head of the pending run with the
// lowest host offset.
func (s *streamState) takeRun(k uint64) {
	if s.open.n > 0 && (len(s.runs) == 0 || s.open.host < s.runs[0].host) {
		s.open.host += k << s.d.cb
		s.open.g += k
		s.open.n -= k
		return
	}
	r := &s.runs[0]
	r.host += k << s.d.cb
	r.g += k
	r.n -= k
	if r.n == 0 {
		heap.Pop(&s.runs)
	} else {
		heap.Fix(&s.runs, 0)
	}
}

// stepL1 handles one L1 entry of the current L1 cluster.
func (s *streamState) stepL1() error {
	d := s.d
	if s.l1I >= s.l1N {
		s.l1Tab = nil
		return nil
	}
	i := s.l1I
	s.l1I++
	at := s.l1At + (i%(d.cs/8))*8
	raw := binary.BigEndian.Uint64(s.l1Tab[(i%(d.cs/8))*8:])
	off, err := d.l1Entry(at, i, raw)
	if err != nil {
		return err
	}
	span := d.h.L2Entries() << d.cb
	if off == 0 {
		s.acc.add(&s.q, ExtentUnallocated, i*span, min(span, d.h.Size-i*span))
		return nil
	}
	w := run{host: off, g: i}
	if off < s.pos {
		if _, ok := s.buffer[off]; !ok {
			return d.errf(at, "can't read non-sequential clusters: the L2 table for guest %#x at %#x was already passed", i*span, off)
		}
		s.l2Work = append(s.l2Work, w)
		return nil
	}
	heap.Push(&s.l2Pending, w)
	return s.checkPending()
}

func (s *streamState) startL2(tab []byte, at, l1idx uint64) {
	d := s.d
	g0 := l1idx * d.h.L2Entries()
	n := min(d.h.L2Entries(), d.h.VirtualClusters()-g0)
	s.l2 = &l2cursor{tab: tab, at: at, g0: g0, n: n}
}

// stepL2 handles one entry of the L2 table being walked.
func (s *streamState) stepL2() error {
	d := s.d
	e, at, done, err := s.l2.next(d)
	if done {
		s.l2 = nil
		return nil
	}
	if err != nil {
		return err
	}
	if e.compressed {
		return s.wantCompressed(at, &e)
	}
	d.subRuns(&e, func(kind ExtentKind, guest, _, length uint64) {
		if kind != ExtentData {
			s.acc.add(&s.q, kind, guest, length)
		}
	})
	if e.alloc == 0 {
		return nil
	}
	if e.host < s.pos {
		b, ok := s.buffer[e.host]
		if !ok {
			return d.errf(at, "can't read non-sequential clusters: the data for guest %#x at %#x was already passed", e.g<<d.cb, e.host)
		}
		if uint64(len(b)) < d.needBytes(e.g, e.alloc) {
			return d.wrapf(io.ErrUnexpectedEOF, at, "stream ended inside the data cluster for guest %#x at %#x", e.g<<d.cb, e.host)
		}
		delete(s.buffer, e.host)
		s.buffered -= int64(len(b))
		s.acc.flush(&s.q)
		s.emitData(b, e.host, e.g, e.alloc)
		return nil
	}
	if s.open.n > 0 && e.alloc == d.full && s.open.mask == d.full &&
		e.host == s.open.host+s.open.n<<d.cb && e.g == s.open.g+s.open.n {
		s.open.n++
		return nil
	}
	if s.open.n > 0 {
		heap.Push(&s.runs, s.open)
	}
	s.open = run{host: e.host, g: e.g, n: 1, mask: e.alloc}
	return s.checkPending()
}

// emitData queues the data extents of n clusters read at host for guest
// clusters from g, with allocation mask mask (n is 1 when it is partial).
func (s *streamState) emitData(b []byte, host, g uint64, mask uint32) {
	d := s.d
	if mask == d.full {
		off := g << d.cb
		length := min(uint64(len(b)), d.h.Size-off)
		s.q.push(item{ext: Extent{Kind: ExtentData, Offset: off, Length: length, Data: b[:length], HostOffset: host}})
		return
	}
	e := entry{g: g, alloc: mask}
	d.subRuns(&e, func(kind ExtentKind, guest, within, length uint64) {
		if kind == ExtentData {
			s.q.push(item{ext: Extent{Kind: ExtentData, Offset: guest, Length: length,
				Data: b[within : within+length], HostOffset: host + within}})
		}
	})
}

func (s *streamState) wantCompressed(at uint64, e *entry) error {
	d := s.d
	w := &compWant{g: e.g, off: e.coff, length: e.clen, at: at}
	if w.off >= s.pos {
		heap.Push(&s.comps, w)
		return s.checkPending()
	}
	// Some bytes were already passed: they must be in the buffer.
	if err := s.charge(int64(w.length) + compOverhead); err != nil {
		return err
	}
	for c := w.off &^ (d.cs - 1); c < s.pos && c < w.off+w.length; c += d.cs {
		b, ok := s.buffer[c]
		lo, hi := max(c, w.off), min(c+uint64(len(b)), w.off+w.length)
		if !ok || lo != w.off+w.have || lo >= hi {
			return d.errf(at, "can't read non-sequential clusters: the compressed data for guest %#x at %#x was already passed", e.g<<d.cb, w.off)
		}
		w.buf = append(w.buf, b[lo-c:hi-c]...)
		w.have = hi - w.off
	}
	if w.off+w.length <= s.pos || s.eof {
		s.finishComp(w)
		return nil
	}
	s.active = append(s.active, w)
	return s.checkPending()
}

func (s *streamState) finishComp(w *compWant) {
	s.acc.flush(&s.q)
	s.q.push(item{comp: true, g: w.g, src: w.buf, coff: w.off, clen: w.length, charged: int64(w.length) + compOverhead})
}

func (s *streamState) charge(n int64) error {
	s.buffered += n
	if s.buffered > s.maxBuf {
		return s.d.wrapf(ErrNeedRandomAccess, s.pos, "more than %d bytes arrive before the tables that map them; %v", s.maxBuf, ErrNeedRandomAccess)
	}
	return nil
}

// feed hands the bytes b read at host offset p to the compressed clusters
// they belong to. It reports whether those clusters cover all of b.
func (s *streamState) feed(p uint64, b []byte) (bool, error) {
	end := p + uint64(len(b))
	for len(s.comps) > 0 && s.comps[0].off < end {
		w := heap.Pop(&s.comps).(*compWant)
		if err := s.charge(int64(w.length) + compOverhead); err != nil {
			return false, err
		}
		s.active = append(s.active, w)
	}
	if len(s.active) == 0 {
		return false, nil
	}
	covered := p // how far from p the active clusters cover b, contiguously
	kept := s.active[:0]
	for _, w := range s.active {
		if w.off+w.have < p {
			return false, s.d.errf(p, "internal error: compressed data for guest %#x at %#x missed", w.g<<s.d.cb, w.off)
		}
		lo, hi := max(p, w.off+w.have), min(end, w.off+w.length) // lo is w.off+w.have
		if lo < hi {
			w.buf = append(w.buf, b[lo-p:hi-p]...)
			w.have = hi - w.off
		}
		if w.off <= covered && w.off+w.length > covered {
			covered = min(end, w.off+w.length)
		}
		if w.off+w.have >= w.off+w.length {
			s.finishComp(w)
		} else {
			kept = append(kept, w)
		}
	}
	clear(s.active[len(kept):])
	s.active = kept
	return covered >= end, nil
}

// read reads n bytes at the current position into buf. Short reads at the
// end of the stream set eof and return what there is.
func (s *streamState) read(buf []byte) ([]byte, error) {
	n, err := io.ReadFull(s.r, buf)
	s.pos += uint64(n)
	if err == io.EOF || err == io.ErrUnexpectedEOF {
		s.eof = true
		err = nil
	}
	if err != nil {
		return nil, s.d.wrapf(err, s.pos, "reading the image: %v", err)
	}
	return buf[:n], nil
}

// readData reads up to n bytes at the current position into s.rbuf, like
// read. The buffer grows only as the bytes arrive, so a run of clusters
// declared longer than the stream costs no more memory than the stream
// holds.
func (s *streamState) readData(n uint64) ([]byte, error) {
	have := uint64(0)
	for have < n && !s.eof {
		if have == uint64(len(s.rbuf)) {
			grown := make([]byte, min(n, max(2*have, s.d.cs)))
			copy(grown, s.rbuf[:have])
			s.rbuf = grown
		}
		b, err := s.read(s.rbuf[have:min(n, uint64(len(s.rbuf)))])
		if err != nil {
			return nil, err
		}
		have += uint64(len(b))
	}
	return s.rbuf[:have], nil
}

// lentBatch bounds a run read into the caller's memory (DataBuffer): as
// large as the caller's writes, so that each becomes one read.
const lentBatch = 4 << 20

// readRun reads the first clusters of the data run r: k of them into the
// decoder's buffer or, for whole clusters when the caller lends memory
// (DataBuffer), as many as fit there; lent says which. The queue and the
// accumulator are empty when advance runs, so the run's extent is the
// next one the caller receives, unless these bytes also finish compressed
// clusters (advance then takes the bytes back).
func (s *streamState) readRun(r run, k uint64) (b []byte, lent bool, err error) {
	d := s.d
	if s.lend == nil || r.mask != d.full {
		b, err = s.readData(k << d.cb)
		return b, false, err
	}
	want := min(r.n, max(uint64(lentBatch)>>d.cb, 1)) << d.cb
	if end := d.h.Size - r.g<<d.cb; want > end {
		want = end // the last cluster: only its guest part is lent
	}
	dst := s.lend(r.g<<d.cb, int(want))
	if uint64(len(dst)) >= want {
		dst = dst[:want]
	} else {
		dst = dst[:uint64(len(dst))&^(d.cs-1)] // whole clusters
	}
	if len(dst) == 0 {
		b, err = s.readData(k << d.cb)
		return b, false, err
	}
	b, err = s.read(dst)
	return b, true, err
}

// endEOF finishes the compressed clusters still collecting bytes when the
// stream ends: their upper bound may run past the end of the image.
func (s *streamState) endEOF() {
	if !s.eof {
		return
	}
	for _, w := range s.active {
		s.finishComp(w)
	}
	s.active = nil
}

// advance reads the next piece of the stream.
func (s *streamState) advance() error {
	d := s.d
	p := s.pos
	cs := d.cs
	defer s.endEOF()
	// The refcount table: learn where the refcount blocks are.
	if !s.allL2Known && p >= d.h.RefcountTableOffset && p < d.rtEnd {
		b, err := s.readData(cs)
		if err != nil {
			return err
		}
		if _, err := s.feed(p, b); err != nil {
			return err
		}
		for i := 0; i+8 <= len(b); i += 8 {
			if err := d.markRefcountBlock(p+uint64(i), binary.BigEndian.Uint64(b[i:])); err != nil {
				return err
			}
			if off := binary.BigEndian.Uint64(b[i:]); off != 0 && off < p {
				if blk, ok := s.buffer[off]; ok {
					delete(s.buffer, off)
					s.buffered -= int64(len(blk))
				}
			}
		}
		return nil
	}
	// The L1 table.
	if d.h.L1Size > 0 && p >= d.h.L1TableOffset && p < d.l1End {
		if s.l1buf == nil {
			s.l1buf = make([]byte, cs)
		}
		b, err := s.read(s.l1buf)
		if err != nil {
			return err
		}
		first := (p - d.h.L1TableOffset) / 8
		if first < d.l1Need {
			// An image may end right after the entries it needs.
			end := min(first+cs/8, d.l1Need)
			if uint64(len(b)) < (end-first)*8 {
				return d.wrapf(io.ErrUnexpectedEOF, s.pos, "stream ended inside the L1 table")
			}
			s.l1Tab, s.l1At, s.l1I, s.l1N = b, p, first, end
		}
		s.l1Seen = first + cs/8
		return nil
	}
	// An L2 table.
	if len(s.l2Pending) > 0 && s.l2Pending[0].host == p {
		w := heap.Pop(&s.l2Pending).(run)
		if s.l2buf == nil {
			s.l2buf = make([]byte, cs)
		}
		b, err := s.read(s.l2buf)
		if err != nil {
			return err
		}
		if uint64(len(b)) < cs {
			return d.wrapf(io.ErrUnexpectedEOF, s.pos, "stream ended inside the L2 table at %#x", p)
		}
		if _, err := s.feed(p, b); err != nil {
			return err
		}
		s.startL2(b, p, w.g)
		return nil
	}
	// Data clusters.
	if r, ok := s.peekRun(); ok && r.host == p {
		k := min(r.n, max(uint64(batchBytes)>>d.cb, 1))
		if r.mask != d.full {
			k = 1
		}
		b, lent, err := s.readRun(r, k)
		if err != nil {
			return err
		}
		if _, err := s.feed(p, b); err != nil {
			return err
		}
		if lent && !s.q.empty() {
			// Compressed clusters finished by these very bytes (a hostile
			// image: they overlap the run) come out first, and a loan
			// serves the next extent only: keep the bytes ourselves.
			if uint64(cap(s.rbuf)) < uint64(len(b)) {
				s.rbuf = make([]byte, len(b))
			}
			b = s.rbuf[:copy(s.rbuf[:len(b)], b)]
		}
		got := uint64(len(b)) >> d.cb
		if rest := uint64(len(b)) - got<<d.cb; got < r.n && rest > 0 && rest >= d.needBytes(r.g+got, r.mask) {
			got++ // a partial last cluster is enough if it holds the guest part
		}
		if got == 0 {
			return d.wrapf(io.ErrUnexpectedEOF, s.pos, "stream ended inside the data cluster for guest %#x at %#x", r.g<<d.cb, p)
		}
		s.takeRun(got)
		s.emitData(b[:min(uint64(len(b)), got<<d.cb)], p, r.g, r.mask)
		return nil
	}
	// Something nothing maps (yet).
	if s.allL2Known && len(s.active) == 0 {
		next := uint64(1<<64 - 1)
		if r, ok := s.peekRun(); ok {
			next = r.host
		}
		if len(s.comps) > 0 {
			next = min(next, s.comps[0].off&^(cs-1))
		}
		if next > p {
			n, err := io.CopyN(io.Discard, s.r, int64(min(next-p, 1<<62)))
			s.pos += uint64(n)
			if err == io.EOF {
				s.eof = true
				err = nil
			}
			if err != nil {
				return d.wrapf(err, s.pos, "reading the image: %v", err)
			}
			return nil
		}
	}
	if len(s.l2Pending) > 0 && s.l2Pending[0].host < p {
		return d.errf(p, "internal error: L2 table at %#x passed", s.l2Pending[0].host)
	}
	b, err := s.readData(cs)
	if err != nil {
		return err
	}
	covered, err := s.feed(p, b)
	if err != nil {
		return err
	}
	c := p >> d.cb
	if !s.allL2Known && !covered && len(b) > 0 && !d.claimed.test(c) && !d.meta.test(c) && d.region(p) == "" {
		if err := s.charge(int64(len(b))); err != nil {
			return err
		}
		s.buffer[p] = bytes.Clone(b)
	}
	return nil
}

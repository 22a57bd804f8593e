package qcow

import (
	"encoding/binary"
	"fmt"
	"io"
	"slices"

	"github.com/klauspost/compress/zstd"
)

// limits on what one image can make the decoder hold, besides MaxBuffered.
const (
	maxBitmapChunks = 1 << 16 // host cluster bitmaps: 32 MiB each at most (2^28 host clusters)
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
	h, err := d.readHeaderCluster(read)
	if err != nil {
		return nil, err
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

// readHeaderCluster reads cluster 0 with read, as newDecoder does, and
// parses the header, its extensions and the backing file name.
func (d *decoder) readHeaderCluster(read func(buf []byte) error) (*Header, error) {
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
	return h, nil
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
		return d.errBitmapFull(at)
	}
	return nil
}

// errBitmapFull: the image references host clusters spread over more of
// the file than the host bitmaps may describe.
func (d *decoder) errBitmapFull(at uint64) error {
	return d.errf(at, "references to host clusters spread over more than %d groups of 4096 clusters: more than the decoder may hold in memory", maxBitmapChunks)
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
		return d.errBitmapFull(at)
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

// l2cursor walks one L2 table.
type l2cursor struct {
	tab  []byte
	at   uint64 // host offset of the table
	g0   uint64 // first guest cluster
	i, n uint64 // next entry, entries to walk
}

// newL2Cursor walks the L2 table tab, read at host offset at, that L1
// entry l1idx names: its entries up to the virtual size.
func (d *decoder) newL2Cursor(tab []byte, at, l1idx uint64) *l2cursor {
	g0 := l1idx * d.h.L2Entries()
	return &l2cursor{tab: tab, at: at, g0: g0, n: min(d.h.L2Entries(), d.h.VirtualClusters()-g0)}
}

// nextL2 decodes the next entry of the L2 table *cur walks and the host
// offset it was read at. ok is false at the end of the table, where *cur
// is cleared (the walk moves on to the next L1 entry), and on an error.
// Both decoders walk L2 tables with it.
func (d *decoder) nextL2(cur **l2cursor) (e entry, at uint64, ok bool, err error) {
	c := *cur
	if c.i >= c.n {
		*cur = nil
		return entry{}, 0, false, nil
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
	return e, at, err == nil, err
}

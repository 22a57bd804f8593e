// Package export turns a raw disk into a qcow2 stream: an allocation pass
// that decides which clusters the image stores (one bit per cluster), then
// a data pass that writes the metadata and copies those clusters to the
// output in guest order — zero-copy (sendfile) where the kernel allows it.
// Nothing is buffered beyond a few MiB, and the output is never seeked, so
// it can be a pipe or the HTTP socket xapi hands over.
package export

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/xapi-project/xapi-qcow-tool/qcow"
	"github.com/xapi-project/xapi-qcow-tool/qcow/bitmap"
	"github.com/xapi-project/xapi-qcow-tool/vhdcompat/hints"
	"github.com/xapi-project/xapi-qcow-tool/vhdcompat/rawdisk"
	"golang.org/x/sys/unix"
)

// Options describe one export.
type Options struct {
	Source *rawdisk.Disk
	// Base, when set, makes the export a diff: only clusters whose bytes
	// differ from Base are stored. Base may be shorter (its missing tail
	// reads as zeros) or longer than Source.
	Base *rawdisk.Disk

	ClusterBits   uint32 // default 16 (64 KiB)
	RefcountOrder uint32 // default 4 (16-bit refcounts)
	BackingFile   string // name Base as the image's raw backing file

	// SourceExtents, when non-nil, is where the source holds data (from
	// the image behind it: qemu-img map, an image chain, a server's block
	// status). Bytes outside it are taken as zeros and are never read, even
	// if the raw view holds something there. Without a Base disk it is
	// trusted: every cluster it touches is stored as read, each byte read
	// once, with no allocation pass (unless DetectZeros). When nil, the
	// source's own SEEK_DATA extents are scanned (a block device: all of
	// it) and all-zero clusters are left out.
	SourceExtents hints.Extents
	// BaseExtents is where the base holds data. With a Base disk it masks
	// the base's reads; without one it makes the export a diff against the
	// image it describes, decided from the allocation alone: see Compare.
	BaseExtents hints.Extents
	// ExactExtents says SourceExtents (and BaseExtents) come from the
	// metadata of the image behind the disk, in whole clusters: outside
	// them the image reads as zeros, so DetectZeros may probe a cluster's
	// first block instead of reading it whole.
	ExactExtents bool
	// Compare, without a Base disk, is the clusters that may differ from
	// the base image: those either chain writes above the
	// images they share (nil when they share nothing: then every cluster
	// of SourceExtents or BaseExtents). The diff stores each of them, read
	// from the source where SourceExtents has data and as a zero cluster,
	// unread, where it has none; no base disk is read.
	Compare hints.Extents
	// DetectZeros reads the clusters a trusted allocation names before
	// storing them and leaves out those that read as zeros (in a diff,
	// stores them as zero clusters): fewer bytes on the link for a second
	// read of the allocated data.
	DetectZeros bool

	// Changed, when non-nil, is the set of clusters that changed (from a
	// changed block tracking bitmap). Exactly these clusters are stored,
	// without reading a base or scanning: a changed cluster that now reads
	// as zero is still stored, so applying the diff gives the new disk.
	Changed *bitmap.Bitmap

	// Progress, when set, is called with the bytes done and the bytes of
	// work in all; it is called often, the caller rate-limits.
	Progress func(done, total uint64)
}

// Result reports what an export did.
type Result struct {
	Layout       *qcow.Layout
	ScannedBytes uint64 // bytes read by the allocation pass
	DataBytes    uint64 // data bytes written
}

const window = 4 << 20 // read size of both passes

// Run exports opt.Source to out.
func Run(ctx context.Context, out io.Writer, opt Options) (*Result, error) {
	if opt.ClusterBits == 0 {
		opt.ClusterBits = 16
	}
	if opt.RefcountOrder == 0 && opt.ClusterBits != 0 {
		opt.RefcountOrder = 4
	}
	src := opt.Source
	virtualSize := (uint64(src.Size()) + 511) &^ 511
	cs := uint64(1) << opt.ClusterBits
	clusters := (virtualSize + cs - 1) / cs
	if _, err := qcow.PlanLayout(virtualSize, opt.ClusterBits, opt.RefcountOrder, 0, 0); err != nil {
		return nil, fmt.Errorf("%s: %w", src.Path(), err)
	}
	if err := checkClusters(clusters, virtualSize, opt.ClusterBits); err != nil {
		return nil, fmt.Errorf("%s: %w", src.Path(), err)
	}
	e := &exporter{ctx: ctx, opt: opt, cs: int64(cs), clusters: clusters, size: src.Size()}
	var err error
	if e.srcExt, err = e.extentsOf(src, opt.SourceExtents); err != nil {
		return nil, err
	}
	data := bitmap.New(clusters)
	var zero *bitmap.Bitmap // a diff's clusters that read as zeros
	res := &Result{}
	switch {
	case opt.Changed != nil:
		for g, ok := opt.Changed.NextSet(0); ok && g < clusters; g, ok = opt.Changed.NextSet(g + 1) {
			data.Set(g)
		}
	case opt.SourceExtents != nil && opt.Base == nil:
		// The allocation of the image behind the source is trusted, as
		// the reference exporter and vhd-tool trust theirs: each stored
		// cluster is read once, in the data pass, and stored as read. A
		// cluster the image allocates that holds zeros costs its bytes
		// on the link, never correctness (DetectZeros trades a second
		// read for them).
		read, zeros := e.trusted()
		if zeros != nil {
			zero = bitmap.New(clusters)
			setClusters(zero, zeros, e.cs)
		}
		if !opt.DetectZeros {
			setClusters(data, read, e.cs)
			break
		}
		if res.ScannedBytes, err = e.scan(data, read, zero); err != nil {
			return nil, err
		}
	default:
		if opt.Base != nil {
			if e.baseExt, err = e.extentsOf(opt.Base, opt.BaseExtents); err != nil {
				return nil, err
			}
		}
		span64 := int64(clusters) * e.cs
		cand := hints.Union(e.srcExt, e.baseExt, span64).AlignOut(e.cs, span64)
		if res.ScannedBytes, err = e.scan(data, cand, nil); err != nil {
			return nil, err
		}
	}
	a := qcow.Allocation{VirtualSize: virtualSize, ClusterBits: opt.ClusterBits, RefcountOrder: opt.RefcountOrder, Data: data, Zero: zero}
	if opt.BackingFile != "" {
		a.BackingFile, a.BackingFormat = opt.BackingFile, "raw"
	}
	w, err := qcow.NewWriter(out, a)
	if err != nil {
		return nil, err
	}
	res.Layout = w.Layout()
	e.total = res.ScannedBytes + data.Count()*cs
	e.done = res.ScannedBytes
	if err := w.WriteMetadata(); err != nil {
		return nil, outputError(err)
	}
	if err := e.copyData(w, out, data); err != nil {
		return nil, err
	}
	res.DataBytes = data.Count() * cs
	return res, w.Close()
}

type exporter struct {
	ctx      context.Context
	opt      Options
	cs       int64
	clusters uint64
	size     int64 // source size in bytes
	srcExt   hints.Extents
	baseExt  hints.Extents
	done     uint64
	total    uint64
	pool     [][]byte // read-ahead buffers, shared by both passes
}

// OutputError wraps a failure to write the output, so the command can say
// the reader went away rather than blame the disk.
type OutputError struct{ Err error }

func (e *OutputError) Error() string { return "writing output: " + e.Err.Error() }
func (e *OutputError) Unwrap() error { return e.Err }

func outputError(err error) error {
	var oe *OutputError
	if err == nil || errors.As(err, &oe) {
		return err
	}
	return &OutputError{err}
}

func (e *exporter) extentsOf(d *rawdisk.Disk, given hints.Extents) (hints.Extents, error) {
	if given != nil {
		return hints.Normalize(append([]hints.Extent(nil), given...), d.Size()), nil
	}
	return hints.Collect(d.DataExtents, d.Size())
}

// trusted splits the clusters a trusted allocation stores into those to
// read (the source holds data there) and, in a diff against an image
// (BaseExtents or Compare without a Base disk), those where the source
// holds none: they read as zeros while the base may not, and are stored as
// zero clusters without a read.
func (e *exporter) trusted() (read, zeros hints.Extents) {
	span := int64(e.clusters) * e.cs
	read = e.srcExt.AlignOut(e.cs, span)
	if e.opt.BaseExtents == nil && e.opt.Compare == nil {
		return read, nil
	}
	stored := e.opt.Compare
	if stored == nil {
		stored = hints.Union(e.opt.BaseExtents, read, span)
	}
	return stored.AlignOut(e.cs, span).Split(read)
}

// setClusters sets the clusters of b that ext touches.
func setClusters(b *bitmap.Bitmap, ext hints.Extents, cs int64) {
	for _, x := range ext {
		b.SetRange(uint64(x.Start/cs), uint64((x.End+cs-1)/cs))
	}
}

func (e *exporter) progress(n uint64) {
	e.done += n
	if e.opt.Progress != nil {
		e.opt.Progress(e.done, e.total)
	}
}

// readMasked reads [off, off+len(buf)) of d into buf with everything outside
// ext (and past the disk's end) zeroed; bytes outside ext are never read.
// Only the gaps are cleared: clearing the whole window first would write
// every byte twice, a memset of the disk per pass.
func readMasked(d *rawdisk.Disk, ext hints.Extents, buf []byte, off int64) error {
	end := off + int64(len(buf))
	pos := off // buf[:pos-off] is final
	for _, x := range overlapping(ext, off, end) {
		a, b := max(x.Start, off), min(x.End, end)
		clear(buf[pos-off : a-off])
		got, err := readExtent(d, buf, off, a, b)
		if err != nil {
			return err
		}
		clear(buf[a-off+got : b-off]) // the disk ended early (io.EOF)
		pos = b
	}
	clear(buf[pos-off:])
	return nil
}

// readExtent reads [a, b) of d into buf (which holds [off, ...)) and returns
// how many bytes it got. Under O_DIRECT the read is widened to the
// alignment; bytes it brings in outside [a, b) are cleared again.
func readExtent(d *rawdisk.Disk, buf []byte, off, a, b int64) (int64, error) {
	if !d.Direct() {
		n, err := d.ReadAt(buf[a-off:b-off], a)
		if err != nil && err != io.EOF {
			return 0, err
		}
		return int64(n), nil
	}
	end := off + int64(len(buf))
	aa := a &^ (rawdisk.Alignment - 1)
	bb := (b + rawdisk.Alignment - 1) &^ (rawdisk.Alignment - 1)
	if aa >= off && bb <= end && (aa-off)%rawdisk.Alignment == 0 {
		n, err := d.ReadAt(buf[aa-off:bb-off], aa)
		if err != nil && err != io.EOF {
			return 0, err
		}
		clear(buf[aa-off : a-off])
		if int64(n) > b-aa {
			clear(buf[b-off : aa-off+int64(n)])
		}
		return max(min(int64(n)-(a-aa), b-a), 0), nil
	}
	tmp := rawdisk.AlignedBuffer(int(bb - aa))
	n, err := d.ReadAt(tmp, aa)
	if err != nil && err != io.EOF {
		return 0, err
	}
	got := max(min(int64(n)-(a-aa), b-a), 0)
	copy(buf[a-off:a-off+got], tmp[a-aa:])
	return got, nil
}

// overlapping returns the extents of ext that intersect [start, end).
func overlapping(ext hints.Extents, start, end int64) hints.Extents {
	lo, hi := 0, len(ext)
	for lo < hi { // first extent ending after start
		m := (lo + hi) / 2
		if ext[m].End <= start {
			lo = m + 1
		} else {
			hi = m
		}
	}
	i := lo
	for i < len(ext) && ext[i].Start < end {
		i++
	}
	return ext[lo:i]
}

// zeroWindow is window bytes of zeros to compare against and to write. It
// is mapped read-only rather than allocated: every page of it is then the
// kernel's one zero page (always in cache), and it stays out of the Go heap,
// where 4 MiB allocated at start-up set off a garbage collection in every
// run, a noticeable part of the start-up (see docs/PERFORMANCE.md).
var zeroWindow = readOnlyZeros(window)

func readOnlyZeros(n int) []byte {
	b, err := unix.Mmap(-1, 0, n, unix.PROT_READ, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		return make([]byte, n)
	}
	return b
}

// Read-ahead: four 4 MiB windows in the ring keep the reads ahead of the
// consumer within the memory budget (64 MiB).
const ringDepth = 4

// readersFor is how many reads a pass keeps in flight. Under O_DIRECT every
// read waits for the device: as many requests as the ring has windows keep
// it busy while the consumer compares, which is what makes the allocation
// pass (the export's time to first byte: the whole device is read before
// the header) as short as the device allows; the ring, not the readers,
// bounds the memory. From the page cache a read is a copy on our core: a
// second reader helps only when the consumer has a copy of its own to make
// (a diff compares two windows). Measurements in docs/PERFORMANCE.md.
func (e *exporter) readersFor(width int) int {
	switch {
	case e.opt.Source.Direct():
		return ringDepth
	case width == 2:
		return 2
	}
	return 1
}

// windows yields the spans of ext, cut into windows of at most win bytes.
func windows(ext hints.Extents, win int64) func() (span, bool) {
	i, off := 0, int64(-1)
	return func() (span, bool) {
		for i < len(ext) {
			if off < ext[i].Start {
				off = ext[i].Start
			}
			if off < ext[i].End {
				n := min(win, ext[i].End-off)
				s := span{off, n}
				off += n
				return s, true
			}
			i++
		}
		return span{}, false
	}
}

// scan is the allocation pass over the clusters of cand: it reads each
// once (and the base's bytes at the same place), or only its probe where
// that is enough (readProbed), and sets in data the clusters to store —
// those that differ from the base, or hold a non-zero byte. With zero, a
// diff's clusters that read as zeros are set there instead. The reads run
// ahead of the comparison (see readahead).
func (e *exporter) scan(data *bitmap.Bitmap, cand hints.Extents, zero *bitmap.Bitmap) (uint64, error) {
	e.total = 2 * uint64(cand.Bytes())
	width := 1
	if e.opt.Base != nil {
		width = 2
	}
	win := max(int64(window)/e.cs, 1) * e.cs
	ra := readahead{depth: ringDepth, readers: e.readersFor(width), width: width, size: int(win), pool: &e.pool}
	var scanned uint64
	zeros := zeroWindow[:e.cs]
	probe := e.canProbeScan()
	if probe {
		ra, win = e.probeRing()
	}
	err := ra.run(e.ctx, windows(cand, win),
		func(s span, bufs [][]byte) error {
			if probe {
				return e.readProbed(s, bufs[0])
			}
			if err := readMasked(e.opt.Source, e.srcExt, bufs[0], s.off); err != nil {
				return err
			}
			if width == 2 {
				return readMasked(e.opt.Base, e.baseExt, bufs[1], s.off)
			}
			return nil
		},
		func(s span, bufs [][]byte) error {
			sb := bufs[0]
			for c := int64(0); c < s.n; c += e.cs {
				var differs bool
				if width == 2 {
					differs = !bytes.Equal(sb[c:c+e.cs], bufs[1][c:c+e.cs])
				} else {
					differs = !bytes.Equal(sb[c:c+e.cs], zeros)
				}
				switch g := uint64((s.off + c) / e.cs); {
				case differs:
					data.Set(g)
				case zero != nil:
					zero.Set(g)
				}
			}
			scanned += uint64(s.n)
			e.progress(uint64(s.n))
			return e.ctx.Err()
		})
	return scanned, err
}

// copyData is the data pass: for each run of stored clusters, the bytes
// inside the source's extents are copied and the rest, including the
// padding of a partial last cluster, written as zeros. From the page cache
// to a file, pipe or socket this is zero-copy (sendfile); otherwise (O_DIRECT,
// or an output that is no file) reads run ahead of the writes.
func (e *exporter) copyData(w *qcow.Writer, out io.Writer, data *bitmap.Bitmap) error {
	c := newCopier(e.opt.Source, out)
	if f, ok := out.(*os.File); ok && e.opt.Source.Direct() {
		if err := e.copySpliced(w, f, data); !errors.Is(err, errNoSplice) {
			return err
		}
	}
	if !c.sendfile {
		return e.copyBuffered(w, out, data)
	}
	for g, ok := data.NextSet(0); ok; {
		end := data.NextClear(g)
		start, stop := int64(g)*e.cs, int64(end)*e.cs
		for off := start; off < stop; {
			if err := e.ctx.Err(); err != nil {
				return err
			}
			n := min(int64(window), stop-off)
			if err := e.copyRange(c, off, off+n); err != nil {
				return err
			}
			if err := w.Account(uint64(n)); err != nil {
				return err
			}
			e.progress(uint64(n))
			off += n
		}
		g, ok = data.NextSet(end)
	}
	return nil
}

// stored yields the runs of set clusters of data, cut into windows.
func (e *exporter) stored(data *bitmap.Bitmap, win int64) func() (span, bool) {
	var off, stop int64
	next := uint64(0)
	return func() (span, bool) {
		if off >= stop {
			g, ok := data.NextSet(next)
			if !ok {
				return span{}, false
			}
			end := data.NextClear(g)
			off, stop, next = int64(g)*e.cs, int64(end)*e.cs, end
		}
		n := min(win, stop-off)
		s := span{off, n}
		off += n
		return s, true
	}
}

// copyBuffered is the data pass through memory: readers fill aligned
// windows ahead while the current one is written.
func (e *exporter) copyBuffered(w *qcow.Writer, out io.Writer, data *bitmap.Bitmap) error {
	win := max(int64(window)/e.cs, 1) * e.cs
	ra := readahead{depth: ringDepth, readers: e.readersFor(1), width: 1, size: int(win), pool: &e.pool}
	return ra.run(e.ctx, e.stored(data, win),
		func(s span, bufs [][]byte) error {
			return readMasked(e.opt.Source, e.srcExt, bufs[0], s.off)
		},
		func(s span, bufs [][]byte) error {
			if _, err := out.Write(bufs[0]); err != nil {
				return outputError(err)
			}
			if err := w.Account(uint64(s.n)); err != nil {
				return err
			}
			e.progress(uint64(s.n))
			return e.ctx.Err()
		})
}

func (e *exporter) copyRange(c *copier, start, end int64) error {
	pos := start
	for _, x := range overlapping(e.srcExt, start, end) {
		a, b := max(x.Start, start), min(x.End, end)
		if a > pos {
			if err := c.zeros(a - pos); err != nil {
				return err
			}
		}
		if err := c.copy(a, b-a); err != nil {
			return err
		}
		pos = b
	}
	if pos < end {
		return c.zeros(end - pos)
	}
	return nil
}

// copier moves bytes from the source to the output: sendfile when both
// sides allow it, otherwise aligned reads and writes.
type copier struct {
	src      *rawdisk.Disk
	out      io.Writer
	outFile  *os.File
	sendfile bool
	buf      []byte
}

func newCopier(src *rawdisk.Disk, out io.Writer) *copier {
	c := &copier{src: src, out: out}
	if f, ok := out.(*os.File); ok {
		// A large pipe helps writes too: each wakeup of the reader
		// moves 1 MiB instead of 64 KiB.
		rawdisk.GrowPipe(f, pipeSize)
		if !src.Direct() {
			c.outFile, c.sendfile = f, true
		}
	}
	return c
}

func (c *copier) zeros(n int64) error { return writeZeros(c.out, n) }

func (c *copier) copy(off, n int64) error {
	if c.sendfile {
		done, err := sendfile(c.outFile, c.src, off, n)
		switch {
		case err == nil:
			return nil
		case errors.Is(err, errNoSendfile) && done == 0:
			c.sendfile = false // fall back for good
		default:
			return err
		}
	}
	if c.buf == nil {
		c.buf = rawdisk.AlignedBuffer(window)
	}
	// Only a page-cache source gets here (copyData sends O_DIRECT sources
	// through the lanes or the ring): plain reads, no alignment.
	for n > 0 {
		k := min(n, int64(len(c.buf)))
		got, err := c.src.ReadAt(c.buf[:k], off)
		if err != nil && err != io.EOF {
			return err
		}
		if int64(got) < k {
			return errShrank(c.src, off+int64(got))
		}
		if _, err := c.out.Write(c.buf[:k]); err != nil {
			return outputError(err)
		}
		off += k
		n -= k
	}
	return nil
}

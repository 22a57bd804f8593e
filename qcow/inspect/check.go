package inspect

import (
	"errors"
	"fmt"
	"io"
	"sort"

	"github.com/xapi-project/xapi-qcow-tool/qcow"
)

// MaxErrorMessages bounds the messages a CheckResult keeps; counts go on.
const MaxErrorMessages = 100

// CheckResult is the outcome of a check. JSON keys are those of qemu-img
// check --output=json where qemu has one; errors and stream are ours.
type CheckResult struct {
	Filename           string   `json:"filename"`
	Format             string   `json:"format"`
	CheckErrors        uint64   `json:"check-errors"`
	Corruptions        uint64   `json:"corruptions"`
	Leaks              uint64   `json:"leaks"`
	ImageEndOffset     uint64   `json:"image-end-offset,omitempty"`
	TotalClusters      uint64   `json:"total-clusters"`
	AllocatedClusters  uint64   `json:"allocated-clusters"`
	FragmentedClusters uint64   `json:"fragmented-clusters"`
	CompressedClusters uint64   `json:"compressed-clusters"`
	Stream             bool     `json:"stream,omitempty"`
	Errors             []string `json:"errors"`
	ErrorsNotShown     uint64   `json:"errors-not-shown,omitempty"`
}

// ExitCode is qemu-img check's exit status for the result: 1 when the
// check could not be completed, 2 for corruption, 3 for leaks only.
func (r *CheckResult) ExitCode() int {
	switch {
	case r.CheckErrors > 0:
		return 1
	case r.Corruptions > 0:
		return 2
	case r.Leaks > 0:
		return 3
	}
	return 0
}

// note records one message; past MaxErrorMessages it only counts, without
// formatting (a hostile image can make millions).
func (r *CheckResult) note(prefix, format string, args ...any) {
	if len(r.Errors) < MaxErrorMessages {
		r.Errors = append(r.Errors, prefix+fmt.Sprintf(format, args...))
	} else {
		r.ErrorsNotShown++
	}
}

func (r *CheckResult) corrupt(format string, args ...any) {
	r.Corruptions++
	r.note("ERROR: ", format, args...)
}

func (r *CheckResult) leak(format string, args ...any) {
	r.Leaks++
	r.note("Leaked: ", format, args...)
}

func (r *CheckResult) failed(format string, args ...any) {
	r.CheckErrors++
	r.note("Check error: ", format, args...)
}

// WriteHuman prints the result for a person, in the spirit of qemu-img
// check's text output.
func (r *CheckResult) WriteHuman(w io.Writer) error {
	for _, e := range r.Errors {
		fmt.Fprintln(w, e)
	}
	if r.ErrorsNotShown > 0 {
		fmt.Fprintf(w, "(%d more messages not shown)\n", r.ErrorsNotShown)
	}
	if r.Corruptions > 0 {
		fmt.Fprintf(w, "%d errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n", r.Corruptions)
	}
	if r.Leaks > 0 {
		fmt.Fprintf(w, "%d leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n", r.Leaks)
	}
	if r.CheckErrors > 0 {
		fmt.Fprintf(w, "%d internal errors have occurred during the check.\n", r.CheckErrors)
	}
	if r.ExitCode() == 0 {
		fmt.Fprintln(w, "No errors were found on the image.")
	}
	if r.TotalClusters > 0 {
		fmt.Fprintf(w, "%d/%d = %.2f%% allocated, %.2f%% fragmented, %.2f%% compressed clusters\n",
			r.AllocatedClusters, r.TotalClusters,
			100*float64(r.AllocatedClusters)/float64(r.TotalClusters),
			pct(r.FragmentedClusters, r.AllocatedClusters), pct(r.CompressedClusters, r.AllocatedClusters))
	}
	if r.ImageEndOffset > 0 {
		fmt.Fprintf(w, "Image end offset: %d\n", r.ImageEndOffset)
	}
	if r.Stream {
		_, err := fmt.Fprintln(w, "(stream: checked what one pass can check; refcounts were not compared)")
		return err
	}
	return nil
}

func pct(a, b uint64) float64 {
	if b == 0 {
		return 0
	}
	return 100 * float64(a) / float64(b)
}

// checker holds the state of a file check.
type checker struct {
	im  *image
	res *CheckResult
	k   *counter
	rc  *refcounts
	fc  uint64 // clusters in the file
	// fragmentation: the host cluster that would continue the last data cluster
	nextHost uint64
	snaps    []qcow.Snapshot
	snapEnd  uint64 // end of the snapshot table (unpadded)
	tooMany  bool   // the counter is full: references are no longer counted
}

// CheckFile validates the structure of the image in r (size bytes long):
// every reference in range and aligned, no cluster used for two purposes,
// refcounts equal to the references counted, COPIED flags consistent with
// them. An error is returned only when the header cannot be read (nothing
// could be checked); everything else is in the result.
func CheckFile(r io.ReaderAt, size int64) (*CheckResult, error) {
	im, notes, err := openImageFor(r, size, true)
	if err != nil {
		return nil, err
	}
	// Without the L1 and refcount tables there is nothing to compare: the
	// file was cut short (or the header points nowhere), and qemu would
	// not open it either.
	h := im.h
	if !im.inFile(h.RefcountTableOffset, uint64(h.RefcountTableClusters)*im.cs) {
		return nil, fmt.Errorf("%w: the refcount table at %#x is past the end of the file (%d bytes)", ErrTruncated, h.RefcountTableOffset, im.size)
	}
	if !im.inFile(h.L1TableOffset, uint64(h.L1Size)*8) {
		return nil, fmt.Errorf("%w: the L1 table at %#x is past the end of the file (%d bytes)", ErrTruncated, h.L1TableOffset, im.size)
	}
	// qemu cannot open an image whose data is in an external data file it
	// does not name.
	if h.IncompatibleFeatures&qcow.IncompatExternalData != 0 && !hasExtension(h, qcow.ExtExternalDataFile) {
		return nil, fmt.Errorf("the image's data is in an external data file, and the image does not name it")
	}
	// qemu refuses to open an image whose snapshot table is bad, so its
	// check cannot run either.
	// A table past the end of the file, qemu reads as zeros and its
	// check reports.
	res := &CheckResult{Format: "qcow2", Errors: []string{}, TotalClusters: h.VirtualClusters()}
	snaps, snapEnd, err := qcow.ReadSnapshots(r, h, size)
	if errors.Is(err, io.ErrUnexpectedEOF) {
		res.corrupt("%v", err)
	} else if err != nil {
		return nil, err
	}
	c := &checker{im: im, res: res, k: newCounter(), fc: im.fileClusters(), snaps: snaps, snapEnd: snapEnd}
	for _, n := range notes {
		res.note("Note: ", "%s", n)
	}
	c.run()
	return res, nil
}

func (c *checker) run() {
	h, im, res := c.im.h, c.im, c.res
	c.ref(0, im.cs, roleHeader, "header")
	rc, err := im.refcounts()
	if err != nil {
		res.corrupt("%v", err)
	} else {
		c.rc = rc
		c.ref(h.RefcountTableOffset, uint64(h.RefcountTableClusters)*im.cs, roleRefTable, "refcount table")
		for i, e := range rc.table {
			off := e &^ 511
			if e&511 != 0 {
				res.corrupt("refcount table entry %d (%#x) has reserved bits set", i, e)
			}
			if off == 0 {
				continue
			}
			if off%im.cs != 0 {
				res.corrupt("refcount block %d at %#x is not cluster aligned", i, off)
				continue
			}
			c.ref(off, im.cs, roleRefBlock, fmt.Sprintf("refcount block %d", i))
		}
	}
	c.l1(h.L1TableOffset, uint64(h.L1Size), true, "active L1 table")
	c.snapshots()
	c.bitmaps()
	c.compareRefcounts()
}

// ref counts one reference to the clusters [off, off+length) holding r.
// It reports references past the end of the file and clusters used for
// two different purposes; it returns false when the range is unusable.
func (c *checker) ref(off, length uint64, r role, what string) bool {
	if length == 0 {
		return true
	}
	// Like qemu, accept a structure the file ends inside, unless it runs a
	// whole cluster or more past the end: qemu writes the last structure
	// of an image unpadded.
	if off >= qcow.MaxHostOffset || length > qcow.MaxHostOffset-off || off+length > c.im.size && off+length-c.im.size >= c.im.cs {
		c.res.corrupt("%s at %#x (%d bytes) is past the end of the file (%d bytes)", what, off, length, c.im.size)
		return false
	}
	first, last := off/c.im.cs, (off+length-1)/c.im.cs
	for cl := first; cl <= last; cl++ {
		n, old, ok := c.k.add(cl, r)
		if !ok {
			if !c.tooMany {
				c.tooMany = true
				c.res.failed("%s at %#x: the image references clusters spread over more than %d groups of %d: more than check counts in memory; the refcounts were not compared", what, off, maxCounterChunks, chunkLen)
			}
			return false
		}
		if n == 0 {
			continue
		}
		// Data may be shared (snapshots, compressed clusters packed
		// together) and so may L2 tables (snapshots); the refcount
		// comparison judges those. Anything else is an overlap.
		if old != r || (r != roleData && r != roleL2) {
			c.res.corrupt("%s at %#x overlaps %s in cluster %d", what, off, old, cl)
		}
	}
	return true
}

// refcount returns the refcount of host cluster cl, noting read errors.
func (c *checker) refcount(cl uint64) (uint64, bool) {
	if c.rc == nil {
		return 0, false
	}
	n, err := c.rc.get(cl)
	if err != nil {
		c.res.failed("reading the refcount of cluster %d: %v", cl, err)
		return 0, false
	}
	return n, true
}

// copied checks a COPIED flag: it must be set exactly when the refcount is 1.
func (c *checker) copied(what string, off uint64, flag bool) {
	n, ok := c.refcount(off / c.im.cs)
	if ok && (n == 1) != flag {
		c.res.corrupt("%s at %#x: COPIED flag is %v but the refcount is %d", what, off, flag, n)
	}
}

// l1 checks an L1 table and everything it references. active says whether
// it is the image's own table (COPIED flags and statistics apply) or a
// snapshot's.
func (c *checker) l1(off, entries uint64, active bool, what string) {
	if entries == 0 {
		return
	}
	// A second L1 table in the clusters of one already walked (snapshots
	// naming one table) is an overlap, reported by ref; walking it again
	// would let a hostile image make us walk one table 65536 times.
	walked := c.k.get(off/c.im.cs) > 0
	if !c.ref(off, entries*8, roleL1, what) || walked {
		return
	}
	t, err := c.im.readTable(off, entries)
	if err != nil {
		c.res.failed("%s: %v", what, err)
		return
	}
	c.nextHost = 0
	for i, raw := range t {
		e := qcow.L1Entry(raw)
		if e.Reserved() != 0 {
			c.res.corrupt("%s entry %d (%#x) has reserved bits set", what, i, raw)
		}
		l2off := e.Offset()
		if l2off == 0 {
			continue
		}
		name := fmt.Sprintf("L2 table of %s entry %d", what, i)
		if l2off%c.im.cs != 0 {
			c.res.corrupt("%s at %#x is not cluster aligned", name, l2off)
			continue
		}
		if !c.ref(l2off, c.im.cs, roleL2, name) {
			continue
		}
		if active {
			c.copied(name, l2off, e.Copied())
		}
		// An L2 table is shared at most by the active table and each
		// snapshot; past that it is corrupt already, and walking it again
		// would let a hostile image make us read one table millions of times.
		if c.k.get(l2off/c.im.cs) > uint64(c.im.h.NbSnapshots)+1 {
			continue
		}
		l2, err := c.im.l2(l2off)
		if err != nil {
			c.res.failed("%s: %v", name, err)
			continue
		}
		c.l2(l2, uint64(i), active, name)
	}
}

// l2 checks the entries of one L2 table.
func (c *checker) l2(t []uint64, l1Index uint64, active bool, table string) {
	h, cs := c.im.h, c.im.cs
	step := 1
	if h.ExtendedL2() {
		step = 2
	}
	for j := 0; j < len(t); j += step {
		e := qcow.L2Entry(t[j])
		var bm qcow.SubclusterBitmap
		if step == 2 {
			bm = qcow.SubclusterBitmap(t[j+1])
		}
		guest := (l1Index*h.L2Entries() + uint64(j/step)) * cs
		what := fmt.Sprintf("cluster at guest offset %#x", guest)
		if e.Compressed() {
			if e.Copied() {
				c.res.corrupt("%s: compressed cluster with the COPIED flag set", what)
			}
			if step == 2 && bm != 0 {
				c.res.corrupt("%s: compressed cluster with a non-zero subcluster bitmap %#x", what, uint64(bm))
			}
			off, length := e.CompressedExtent(h.ClusterBits)
			start := off &^ 511
			c.ref(start, off+length-start, roleData, "compressed "+what)
			if active {
				c.res.AllocatedClusters++
				c.res.CompressedClusters++
			}
			continue
		}
		// With extended L2 entries bit 0 is reserved too, but qemu's check
		// ignores it (it reads such a cluster normally), and so do we.
		reserved := e.Reserved()
		if reserved != 0 {
			c.res.corrupt("%s: L2 entry %#x has reserved bits set", what, t[j])
		}
		if step == 2 && bm.Invalid() {
			c.res.corrupt("%s: subclusters both allocated and zero (bitmap %#x)", what, uint64(bm))
		}
		host := e.Offset()
		if host == 0 {
			if step == 2 && uint32(bm) != 0 {
				c.res.corrupt("%s: subclusters marked allocated in an unallocated cluster", what)
			}
			continue
		}
		if host%cs != 0 {
			c.res.corrupt("%s: data at %#x is not cluster aligned", what, host)
			continue
		}
		external := h.IncompatibleFeatures&qcow.IncompatExternalData != 0
		if !external && !c.ref(host, cs, roleData, what+" ("+table+")") {
			continue
		}
		if active {
			if !external { // clusters of an external data file have no refcounts
				c.copied(what, host, e.Copied())
			}
			c.res.AllocatedClusters++
			if c.nextHost != 0 && host != c.nextHost {
				c.res.FragmentedClusters++
			}
			c.nextHost = host + cs
		}
	}
}

// snapshots checks the snapshot table (read and validated when the image
// was opened) and every snapshot's L1 table.
func (c *checker) snapshots() {
	for i, sn := range c.snaps {
		// A version 3 entry carries at least the large VM state size and
		// the disk size; qemu's check counts a shorter one as corrupt.
		if c.im.h.Version >= 3 && sn.ExtraDataSize < 16 {
			c.res.corrupt("snapshot %d: table entry is incomplete (%d bytes of extra data, version 3 needs 16)", i, sn.ExtraDataSize)
		}
		if sn.L1TableOffset%c.im.cs != 0 {
			c.res.corrupt("snapshot %d: L1 table at %#x is not cluster aligned", i, sn.L1TableOffset)
			continue
		}
		if uint64(sn.L1Size)*8 > qcow.MaxL1Bytes {
			c.res.corrupt("snapshot %d: L1 table of %d entries is too large", i, sn.L1Size)
			continue
		}
		c.l1(sn.L1TableOffset, uint64(sn.L1Size), false, fmt.Sprintf("L1 table of snapshot %d", i))
	}
	if start := c.im.h.SnapshotsOffset; c.snapEnd > start {
		c.ref(start, c.snapEnd-start, roleSnapshots, "snapshot table")
	}
}

// bitmaps counts the clusters of persistent dirty bitmaps, so that they
// are not reported as leaks.
func (c *checker) bitmaps() {
	for _, e := range c.im.h.Extensions {
		if e.Type != qcow.ExtBitmaps || len(e.Data) < 24 {
			continue
		}
		n := uint64(be.Uint32(e.Data[0:]))
		dirSize, dirOff := be.Uint64(e.Data[8:]), be.Uint64(e.Data[16:])
		if dirSize > 64<<20 || !c.ref(dirOff, dirSize, roleBitmap, "bitmap directory") {
			continue
		}
		dir := make([]byte, dirSize)
		if err := readFull(c.im.r, dir, dirOff); err != nil {
			c.res.failed("bitmap directory: %v", err)
			continue
		}
		pos := uint64(0)
		for i := uint64(0); i < n && pos+24 <= dirSize; i++ {
			tOff, tSize := be.Uint64(dir[pos:]), uint64(be.Uint32(dir[pos+8:]))
			nameLen, extra := uint64(be.Uint16(dir[pos+18:])), uint64(be.Uint32(dir[pos+20:]))
			pos += (24 + extra + nameLen + 7) &^ 7
			name := fmt.Sprintf("bitmap %d table", i)
			if tSize*8 > 64<<20 || !c.ref(tOff, tSize*8, roleBitmap, name) {
				continue
			}
			t, err := c.im.readTable(tOff, tSize)
			if err != nil {
				c.res.failed("%s: %v", name, err)
				continue
			}
			for _, x := range t {
				if o := x & 0x00fffffffffffe00; o != 0 {
					c.ref(o, c.im.cs, roleBitmap, name+" data")
				}
			}
		}
	}
}

// compareRefcounts compares every refcount with the references counted:
// fewer references than the refcount is a leak, more is a corruption.
func (c *checker) compareRefcounts() {
	if c.rc == nil || c.tooMany {
		return
	}
	rc, res := c.rc, c.res
	var highest uint64
	seen := false
	past := map[uint64]pastBlock{}
	for i := range rc.table {
		off := rc.blockOffset(uint64(i))
		if off == 0 {
			continue
		}
		if first := uint64(i) * rc.perBlock; first >= c.fc {
			// Clusters past the end of the file, which nothing can
			// reference: each one with a refcount is a leak. A block is
			// scanned once however many entries name it, or a 14 MiB image
			// naming one 2 MiB block a million times takes hours.
			p, scanned := past[off]
			if !scanned {
				var ok bool
				if p, ok = c.scanPastBlock(i, off); !ok {
					continue
				}
				past[off] = p
				if p.leaks > 0 {
					res.note("Leaked: ", "refcount block %d at %#x: %d clusters past the end of the file have a refcount (counted again for every entry naming it)", i, off, p.leaks)
				}
			}
			if p.leaks > 0 {
				res.Leaks += p.leaks
				highest, seen = first+p.last, true
			}
			continue
		}
		b, err := rc.block(off)
		if err != nil {
			res.failed("reading refcount block %d: %v", i, err)
			continue
		}
		for j := uint64(0); j < rc.perBlock; j++ {
			cl := uint64(i)*rc.perBlock + j
			n := rc.entry(b, j)
			refs := c.k.get(cl)
			if n > 0 {
				highest, seen = cl, true
			}
			switch {
			case n == refs:
			case n < refs:
				res.corrupt("cluster %d: refcount %d but %d references", cl, n, refs)
			default:
				res.leak("cluster %d: refcount %d but %d references", cl, n, refs)
			}
		}
	}
	// The clusters of the file under an unaligned refcount block: qemu's
	// check cannot read their refcounts.
	for i := range rc.table {
		if !rc.unreadable(uint64(i)) {
			continue
		}
		for cl := uint64(i) * rc.perBlock; cl < min(uint64(i+1)*rc.perBlock, c.fc); cl++ {
			res.failed("cannot read the refcount of cluster %d: its refcount block is not cluster aligned", cl)
		}
	}
	// Referenced clusters no refcount block covers.
	keys := make([]uint64, 0, len(c.k.chunks))
	for k := range c.k.chunks {
		keys = append(keys, k)
	}
	sort.Slice(keys, func(a, b int) bool { return keys[a] < keys[b] })
	for _, k := range keys {
		for j, v := range c.k.chunks[k] {
			cl := k*chunkLen + uint64(j)
			switch {
			case v&countMax == 0 || rc.blockOffset(cl/rc.perBlock) != 0:
			case rc.unreadable(cl / rc.perBlock): // counted above when in the file
				if cl >= c.fc {
					res.failed("cannot read the refcount of cluster %d: its refcount block is not cluster aligned", cl)
				}
			default:
				res.corrupt("cluster %d is referenced but no refcount block covers it", cl)
			}
		}
	}
	if seen {
		res.ImageEndOffset = (highest + 1) * c.im.cs
	}
}

func hasExtension(h *qcow.Header, typ uint32) bool {
	for _, e := range h.Extensions {
		if e.Type == typ {
			return true
		}
	}
	return false
}

// pastBlock is what a refcount block says of clusters past the end of the
// file: how many have a refcount, and the last of them.
type pastBlock struct{ leaks, last uint64 }

func (c *checker) scanPastBlock(i int, off uint64) (pastBlock, bool) {
	var p pastBlock
	b, err := c.rc.block(off)
	if err != nil {
		c.res.failed("reading refcount block %d: %v", i, err)
		return p, false
	}
	for j := uint64(0); j < c.rc.perBlock; j++ {
		if c.rc.entry(b, j) > 0 {
			p.leaks, p.last = p.leaks+1, j
		}
	}
	return p, true
}

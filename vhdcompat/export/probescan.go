package export

import (
	"bytes"
	"fmt"
	"io"

	"github.com/xapi-project/xapi-qcow-tool/vhdcompat/rawdisk"
)

// probeBytes is how much of a cluster the probing scan reads first through
// the page cache: data clusters almost always hold a non-zero byte at their
// start, so most of a data cluster is never read by the allocation pass;
// only clusters that start with zeros are read whole. Under O_DIRECT the
// probe is the smallest read the device takes (probeSize).
const probeBytes = 512

// minProbeCluster is the smallest cluster worth probing: below it one
// read per cluster costs more in system calls than it saves in copies.
const minProbeCluster = 16 << 10

// canProbeScan reports whether the allocation pass may probe clusters:
// no base disk (a diff against one must compare whole clusters) and no
// hint mask (bytes outside a hint must read as zero whatever the raw view
// holds; holes found by SEEK_DATA read as zero by themselves — and so do
// the whole clusters of ExactExtents, outside which the image is zeros).
// Under O_DIRECT the probes are whole aligned blocks, several in flight
// (one per reader of the ring), and only over ExactExtents (with
// DetectZeros): they name allocated clusters, mostly data, where the probe
// saves the rest of the cluster; a device scanned whole is mostly
// never-written zeros, where each cluster would cost a probe and then the
// rest, two small reads instead of a share of one large one.
func (e *exporter) canProbeScan() bool {
	return e.opt.Base == nil && ((e.opt.SourceExtents == nil && !e.opt.Source.Direct()) || e.opt.ExactExtents) && e.cs >= minProbeCluster
}

// probeSize is the probe of one cluster: under O_DIRECT the device's
// direct-I/O block (at least a page), the least it can read.
func (e *exporter) probeSize() int64 {
	if e.opt.Source.Direct() {
		return max(rawdisk.Alignment, e.opt.Source.SectorSize())
	}
	return probeBytes
}

// probeDepth is how many O_DIRECT probe windows are read at once: a probe
// is one small read that waits for the device, so the pass is as fast as
// the reads in flight (measured in docs/PERFORMANCE.md).
const probeDepth = 16

// probeRing is the read-ahead ring of a probing pass, in windows of 1 MiB
// (the usual ring's memory split probeDepth ways) kept in a pool of their
// own, dropped after the pass: under O_DIRECT probeDepth readers; from the
// page cache one reader a window ahead of the comparison (a probe is a
// copy on our core). The buffers are under the huge-page size: a probe
// then makes one 4 KiB page resident, not 2 MiB.
func (e *exporter) probeRing() (readahead, int64) {
	win := max(int64(ringDepth*window/probeDepth)/e.cs, 1) * e.cs
	var pool [][]byte
	if e.opt.Source.Direct() {
		return readahead{depth: probeDepth, readers: probeDepth, width: 1, size: int(win), pool: &pool}, win
	}
	return readahead{depth: 2, readers: 1, width: 1, size: int(win), pool: &pool}, win
}

// readProbed is the read side of a probing allocation pass: it fills
// buf (the window s, cluster by cluster at their places) with each
// cluster's probe, and with the rest of the cluster only when the probe
// is all zeros. The consumer's whole-cluster comparison then gives the same
// answer as after reading the window whole: a cluster whose probe holds a
// non-zero byte differs at that byte, whatever the stale rest holds. For
// random data it reads one probe per cluster, far less than the disk (see
// docs/PERFORMANCE.md for the measurement).
func (e *exporter) readProbed(s span, buf []byte) error {
	probe := e.probeSize()
	for c := int64(0); c < s.n; c += e.cs {
		n := min(e.cs, e.size-(s.off+c)) // the last cluster may be partial
		if n <= 0 {
			clear(buf[c:])
			return nil
		}
		p := min(probe, n)
		if err := e.readFull(buf[c:c+p], s.off+c); err != nil {
			return err
		}
		clear(buf[c+n : c+e.cs]) // past the disk's end
		if n == p || !bytes.Equal(buf[c:c+p], zeroWindow[:p]) {
			continue
		}
		if err := e.readFull(buf[c+p:c+n], s.off+c+p); err != nil {
			return err
		}
	}
	return nil
}

// readFull reads exactly len(p) bytes of the source at off; the source
// ending early means it shrank (rawdisk reports that).
func (e *exporter) readFull(p []byte, off int64) error {
	n, err := e.opt.Source.ReadAt(p, off)
	if err == io.EOF && n == len(p) {
		err = nil
	}
	if err == io.EOF {
		return errShrank(e.opt.Source, off+int64(n))
	}
	return err
}

func errShrank(d *rawdisk.Disk, at int64) error {
	return &rawdisk.DiskError{Path: d.Path(), Op: "read", Err: fmt.Errorf("disk shrank: it ends at %d, it was %d bytes when the export started", at, d.Size())}
}

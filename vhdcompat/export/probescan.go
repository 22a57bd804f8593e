package export

import (
	"bytes"
	"fmt"
	"io"

	"github.com/xapi-project/xapi-qcow-tool/qcow/bitmap"
	"github.com/xapi-project/xapi-qcow-tool/vhdcompat/hints"
	"github.com/xapi-project/xapi-qcow-tool/vhdcompat/rawdisk"
)

// probeBytes is how much of a cluster the probing scan reads first: data
// clusters almost always hold a non-zero byte at their start, so most of a
// data cluster is never read by the allocation pass; only clusters that
// start with zeros are read whole.
const probeBytes = 512

// minProbeCluster is the smallest cluster worth probing: below it one
// read per cluster costs more in system calls than it saves in copies.
const minProbeCluster = 16 << 10

// canProbeScan reports whether the allocation pass may probe clusters:
// a full export (no base: a diff must compare whole clusters anyway) of a
// page-cache source (O_DIRECT reads need whole aligned blocks) without a
// hint mask (bytes outside a hint must read as zero whatever the raw view
// holds; holes found by SEEK_DATA read as zero by themselves — and so do
// the whole clusters of ExactExtents, outside which the image is zeros).
func (e *exporter) canProbeScan() bool {
	return e.opt.Base == nil && !e.opt.Source.Direct() && (e.opt.SourceExtents == nil || e.opt.ExactExtents) && e.cs >= minProbeCluster
}

// scanProbed is the allocation pass by probing: for random data it reads
// 512 bytes per 64 KiB cluster, far less than reading the disk (see
// docs/PERFORMANCE.md for the measurement).
func (e *exporter) scanProbed(data *bitmap.Bitmap, cand hints.Extents) (uint64, error) {
	probe := make([]byte, probeBytes)
	var whole []byte
	var scanned uint64
	next := windows(cand, max(int64(window)/e.cs, 1)*e.cs)
	for s, ok := next(); ok; s, ok = next() {
		if err := e.ctx.Err(); err != nil {
			return scanned, err
		}
		for c := s.off; c < s.off+s.n; c += e.cs {
			n := min(e.cs, e.size-c) // the last cluster may be partial
			if n <= 0 {
				break
			}
			p := probe[:min(int64(len(probe)), n)]
			if err := e.readFull(p, c); err != nil {
				return scanned, err
			}
			if !bytes.Equal(p, zeroWindow[:len(p)]) {
				data.Set(uint64(c / e.cs))
				continue
			}
			if n == int64(len(p)) {
				continue
			}
			if whole == nil {
				whole = make([]byte, e.cs)
			}
			rest := whole[:n-int64(len(p))]
			if err := e.readFull(rest, c+int64(len(p))); err != nil {
				return scanned, err
			}
			if !bytes.Equal(rest, zeroWindow[:len(rest)]) {
				data.Set(uint64(c / e.cs))
			}
		}
		scanned += uint64(s.n)
		e.progress(uint64(s.n))
	}
	return scanned, nil
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

package vhdcompat

import (
	"context"
	"errors"
	"fmt"
	"math/bits"
	"os"
	"time"

	"github.com/xapi-project/xapi-qcow-tool/qcow/bitmap"
	"github.com/xapi-project/xapi-qcow-tool/vhdcompat/export"
	"github.com/xapi-project/xapi-qcow-tool/vhdcompat/hints"
	"github.com/xapi-project/xapi-qcow-tool/vhdcompat/rawdisk"
)

// ExportRequest is an export as a command line asks for it: names, numbers
// and hint sources, nothing opened yet. `stream` and the qcow2-to-stdout
// drop-in both hand one to Export, so that both emit the same bytes.
type ExportRequest struct {
	// Source is the raw disk's path, or SourceFile a disk already open
	// (an inherited descriptor or stdin).
	Source     string
	SourceFile *os.File
	Base       string // the base of a diff ("": a full export)
	// IO says how source and base are read: O_DIRECT on block devices
	// unless --buffered, on files too with --direct.
	IO rawdisk.IO

	ClusterSize, RefcountBits uint64
	// ClusterSizeFlag and RefcountBitsFlag name the options that gave
	// them, for messages.
	ClusterSizeFlag, RefcountBitsFlag string
	BackingFile                       string
	Hints                             hints.Request
	// Hybrid, when set, reads the allocation from the image chains behind
	// the source and the base (vhd-tool's --source-format hybrid).
	Hybrid *HybridRequest
	// NBD, when set, reads the source's allocation from the NBD server
	// that serves the same disk (vhd-tool's --source-format nbdhybrid);
	// BaseNBD the base's, for a diff against a base disk.
	NBD, BaseNBD *NBDRequest
	// DetectZeros reads the clusters a trusted allocation (the hybrid
	// source's chains, a map or header hint) names before sending them,
	// to leave out those that read as zeros. By default each is read
	// once and sent as read.
	DetectZeros bool
	// Discover, when set, finds the images behind the source and base
	// devices when no hint and no hybrid image is given (discovery.go).
	Discover *DiscoverRequest

	// Out is the output when it is known before anything is opened (the
	// drop-in's stdout): a terminal is then refused before the source is
	// opened, as the reference does. Otherwise OpenOut opens it once every
	// check of the source has passed, since a file destination is
	// truncated when opened.
	Out            *os.File
	OutName        string
	OpenOut        func() (*os.File, string, error)
	RefuseTerminal bool
	Progress       ProgressFlags
}

// PowerOfTwo returns log2(v) when v is a power of two within [lo, hi].
func PowerOfTwo(what string, v, lo, hi uint64) (uint32, error) {
	if v < lo || v > hi || v&(v-1) != 0 {
		return 0, &UsageError{fmt.Sprintf("%s %d must be a power of two from %d to %d", what, v, lo, hi)}
	}
	return uint32(bits.TrailingZeros64(v)), nil
}

// Export runs the export req asks for: it checks the numbers, opens the
// disks, loads and checks the hints, opens the output and runs the engine.
func Export(env *Env, req *ExportRequest) error {
	clusterBits, err := PowerOfTwo(req.ClusterSizeFlag, req.ClusterSize, 512, 2<<20)
	if err != nil {
		return err
	}
	refOrder, err := PowerOfTwo(req.RefcountBitsFlag, req.RefcountBits, 1, 64)
	if err != nil {
		return err
	}
	if req.Out != nil && req.RefuseTerminal && IsTerminal(req.Out) {
		// Before anything is read, as the reference does; runExport
		// checks again.
		return fmt.Errorf("refusing to write a qcow2 image to a terminal (%s): redirect it to a file or a pipe", req.OutName)
	}
	x := &openedExport{ClusterBits: clusterBits, RefcountOrder: refOrder, BackingFile: req.BackingFile, DetectZeros: req.DetectZeros,
		Out: req.Out, OutName: req.OutName, RefuseTerminal: req.RefuseTerminal}
	defer x.Close()
	disk := env.DiskOptions(req.IO)
	switch f := req.SourceFile; {
	case f == nil:
		x.Source, err = rawdisk.OpenWith(req.Source, disk)
	case f == env.Stdin:
		// A disk redirected onto stdin; a pipe is refused by rawdisk.
		x.Source, err = rawdisk.FromFileWith(f, "stdin", disk)
	default:
		x.Source, err = rawdisk.FromFileWith(f, f.Name(), disk)
	}
	if err != nil {
		return err
	}
	if h := req.Hybrid; h != nil && h.BaseImage != "" && req.Base != "" {
		// The hybrid diff comes from the base's image: a base device
		// given beside it is only checked for its size, never read.
		r, c := *req, *h
		if c.BaseDevice == "" {
			c.BaseDevice = req.Base
		}
		r.Base, r.Hybrid = "", &c
		req = &r
	}
	// Precedence: xapi's hints, an image named on the command line, the
	// images discovery finds, then SEEK_DATA or the scan. Discovery opens
	// the base device itself: a diff from two chains reads nothing of it.
	hinted := req.Hints.Source.Given() || req.Hints.Base.Given() || req.Hints.ChangedBlocks.Given()
	discovering := req.Discover != nil && req.SourceFile == nil && req.Hybrid == nil && !hinted
	var base *hints.Disk
	if req.Base != "" && !discovering {
		if err := x.openBase(req.Base, disk); err != nil {
			return err
		}
		base = &hints.Disk{Name: x.Base.Path(), Size: x.Base.Size()}
	}
	h, err := hints.Load(req.Hints, hints.Disk{Name: x.Source.Path(), Size: x.Source.Size()}, base, clusterBits)
	if err != nil {
		return err
	}
	if h.ClusterBits != 0 {
		x.ClusterBits = h.ClusterBits
	}
	x.SourceExtents, x.BaseExtents, x.Changed = h.SourceExtents, h.BaseExtents, h.Changed
	switch {
	case hinted:
		x.Allocation = AllocHints
	case req.Hybrid != nil:
		if err := x.loadHybrid(req.Hybrid); err != nil {
			return err
		}
		x.SourceImage = req.Hybrid.Image
	case discovering:
		if err := x.discoverExport(env, req, disk); err != nil {
			return err
		}
	}
	if x.Allocation == "" {
		x.Allocation = x.allocationSource()
	}
	if req.NBD != nil || req.BaseNBD != nil {
		if err := x.loadNBD(env, req.NBD, req.BaseNBD); err != nil {
			return err
		}
	}
	if x.Out == nil {
		if x.Out, x.OutName, err = req.OpenOut(); err != nil {
			return err
		}
	}
	x.OutputCarriesStream = x.Out == env.Stdout || x.Out.Fd() == 1
	progress, err := req.Progress.Reporter(env, x.OutputCarriesStream)
	if err != nil {
		return err
	}
	x.Progress = progress.Update
	err = x.run(env)
	progress.Finish(err == nil)
	return err
}

// openedExport is an export with its disks open and its hints loaded.
type openedExport struct {
	Source, Base        *rawdisk.Disk
	Out                 *os.File
	OutName             string
	ClusterBits         uint32
	RefcountOrder       uint32
	BackingFile         string
	SourceExtents       hints.Extents
	BaseExtents         hints.Extents
	ExactExtents        bool          // the extents come from the image behind the disk (hybrid)
	Compare             hints.Extents // a diff against an image: the only clusters that may differ
	DetectZeros         bool          // read a trusted allocation first, leave all-zero clusters out
	BaseName            string        // the base image of a diff without a base disk, for the log
	AllocationAttrs     []any         // more about where the allocation came from (the NBD server), for the log
	Changed             *bitmap.Bitmap
	Progress            func(done, total uint64)
	RefuseTerminal      bool
	OutputCarriesStream bool
	// Allocation names where the allocation comes from (hints, vhd,
	// qcow2, seek-data, scan) and SourceImage the image it was read
	// from, for the journal.
	Allocation  string
	SourceImage string
	// BaseDevice names the base device of a diff that comes from the
	// chains alone (Base is then nil), for the journal.
	BaseDevice string
}

// openBase opens the base disk of a diff.
func (x *openedExport) openBase(path string, disk rawdisk.Options) error {
	var err error
	if x.Base, err = rawdisk.OpenWith(path, disk); err != nil {
		return fmt.Errorf("base %w", err)
	}
	return nil
}

// Close releases the export's disks.
func (r *openedExport) Close() {
	if r.Source != nil {
		r.Source.Close()
	}
	if r.Base != nil {
		r.Base.Close()
	}
}

// run checks the output and runs the export, logging its start and end.
func (r *openedExport) run(env *Env) error {
	if r.RefuseTerminal && IsTerminal(r.Out) {
		return fmt.Errorf("refusing to write a qcow2 image to a terminal (%s): redirect it to a file or a pipe", r.OutName)
	}
	log := logger(env)
	attrs := []any{"source", r.Source.Path(), "destination", r.OutName, "virtual_size", r.Source.Size(),
		"cluster_size", uint64(1) << r.ClusterBits, "direct", r.Source.Direct()}
	if r.Base != nil {
		attrs = append(attrs, "base", r.Base.Path())
	} else if r.BaseDevice != "" {
		attrs = append(attrs, "base", r.BaseDevice)
	}
	attrs = append(attrs, "allocation", r.Allocation)
	if r.SourceImage != "" {
		attrs = append(attrs, "image", r.SourceImage)
	}
	if r.BaseName != "" {
		attrs = append(attrs, "base_image", r.BaseName)
	}
	attrs = append(attrs, r.AllocationAttrs...)
	log.Info("export started", attrs...)
	if r.Source.Direct() {
		SpareProcForIO()
	}
	start := time.Now()
	res, err := export.Run(env.Ctx, r.Out, export.Options{
		Source: r.Source, Base: r.Base, ClusterBits: r.ClusterBits, RefcountOrder: r.RefcountOrder,
		BackingFile: r.BackingFile, SourceExtents: r.SourceExtents, BaseExtents: r.BaseExtents,
		ExactExtents: r.ExactExtents, Compare: r.Compare, DetectZeros: r.DetectZeros, Changed: r.Changed, Progress: r.Progress,
	})
	if err != nil {
		var oe *export.OutputError
		if errors.As(err, &oe) && clientHungUp(oe.Err) {
			return &ClientGoneError{Source: r.Source.Path(), Out: r.OutName, Err: oe.Err}
		}
		if errors.As(err, &oe) {
			return fmt.Errorf("export of %s: writing to %s: %w", r.Source.Path(), r.OutName, oe.Err)
		}
		if errors.Is(err, env.Ctx.Err()) && env.Ctx.Err() != nil {
			return fmt.Errorf("export of %s: interrupted: %w", r.Source.Path(), context.Cause(env.Ctx))
		}
		return fmt.Errorf("export of %s: %w", r.Source.Path(), err)
	}
	log.Info("export finished", append(attrs, "data_clusters", res.Layout.DataClusters,
		"bytes_written", res.Layout.Size(), "elapsed_ms", time.Since(start).Milliseconds())...)
	if r.Out != nil {
		// A file or device destination, stdout redirected to one included
		// (`qcow2-to-stdout DEV > copy.qcow2`): durable before success.
		if st, err := r.Out.Stat(); err == nil && (st.Mode().IsRegular() || st.Mode()&os.ModeDevice != 0 && st.Mode()&os.ModeCharDevice == 0) {
			if err := r.Out.Sync(); err != nil {
				return fmt.Errorf("export of %s: fsync %s: %w", r.Source.Path(), r.OutName, rawdisk.WithoutPath(err))
			}
		}
	}
	return nil
}

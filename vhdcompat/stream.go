package vhdcompat

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/bits"
	"os"
	"time"

	"github.com/xapi-project/xapi-qcow-tool/qcow/bitmap"
	"github.com/xapi-project/xapi-qcow-tool/vhdcompat/export"
	"github.com/xapi-project/xapi-qcow-tool/vhdcompat/hints"
	"github.com/xapi-project/xapi-qcow-tool/vhdcompat/rawdisk"
)

// StreamCmd is `stream`: export a raw disk as a qcow2 stream.
type StreamCmd struct {
	Source              string `help:"Raw disk to export: a path, file://PATH, or fd://N." placeholder:"PATH"`
	SourceFD            *int   `name:"source-fd" help:"Export the disk open on this descriptor." placeholder:"N"`
	SourceFormat        string `default:"raw" enum:"raw" help:"Format of the source (raw)."`
	SourceProtocol      string `default:"none" help:"Protocol of the source (none)."`
	Destination         string `default:"stdout:" help:"Where the stream goes: stdout:, null:, fd://N, file://PATH." placeholder:"URI"`
	DestinationFD       *int   `name:"destination-fd" help:"Write the stream to this open descriptor." placeholder:"N"`
	DestinationFormat   string `default:"qcow2" help:"Format of the stream (qcow2)."`
	DestinationProtocol string `default:"none" help:"Protocol of the stream (none)."`
	RelativeTo          string `name:"relative-to" help:"Export only the clusters that differ from this base disk." placeholder:"BASE"`
	ClusterSize         uint64 `default:"65536" help:"Cluster size in bytes: a power of two from 512 to 2097152."`
	RefcountBits        uint64 `default:"16" help:"Refcount width in bits: a power of two from 1 to 64."`
	BackingFile         string `help:"Name this file as the image's raw backing file (a diff qemu-img can read whole)." placeholder:"NAME"`
	Direct              bool   `aliases:"unbuffered" help:"Read the source and base with O_DIRECT."`
	AllocationMap       string `help:"qemu-img map --output=json of the qcow2 behind the source (a path or fd://N): read only what it allocates." placeholder:"FILE"`
	AllocationInfo      string `help:"qemu-img info --output=json of the qcow2 behind the source: its cluster size replaces --cluster-size." placeholder:"FILE"`
	BaseAllocationMap   string `help:"qemu-img map --output=json of the qcow2 behind the base." placeholder:"FILE"`
	BaseAllocationInfo  string `help:"qemu-img info --output=json of the qcow2 behind the base (checked, for symmetry with qcow2-to-stdout)." placeholder:"FILE"`
	AllocationHeader    string `help:"Older xapi's JSON header for the source (virtual_size, cluster_bits, data_clusters; a path or fd://N): read only those clusters, in its cluster size." placeholder:"FILE"`
	BaseAllocHeader     string `name:"base-allocation-header" help:"Older xapi's JSON header for the base." placeholder:"FILE"`
	ChangedBlocks       string `help:"Changed block tracking bitmap (base64, from VDI.list_changed_blocks; a path or fd://N): export only the flagged 64 KiB blocks." placeholder:"FILE"`
	ProgressFlags
	CompatFlags
}

// Help is shown by --help.
func (c *StreamCmd) Help() string {
	return `Exports a raw disk (regular file or block device) as a qcow2 image,
written front to back to the destination without seeking or temporary files.
All-zero clusters are left unallocated; with --relative-to only clusters that
differ from the base are stored.

Examples:
  xapi-qcow-tool stream --source disk.img > disk.qcow2
  xapi-qcow-tool stream --source /dev/sm/backend/SR/VDI --relative-to /dev/sm/backend/SR/BASE --direct
  # as xapi's vhd_tool_wrapper runs vhd-tool:
  xapi-qcow-tool stream --source-protocol none --source-format raw --source /dev/sm/backend/SR/VDI \
      --destination-protocol none --destination-format qcow2 --destination-fd 5 \
      --tar-filename-prefix "" --progress --machine --direct --path /dev/mapper:.`
}

// ExportRequest is a fully resolved export, shared by `stream` and the
// qcow2-to-stdout drop-in so that both produce the same bytes.
type ExportRequest struct {
	Source, Base        *rawdisk.Disk
	Out                 *os.File
	OutName             string
	ClusterBits         uint32
	RefcountOrder       uint32
	BackingFile         string
	SourceExtents       hints.Extents
	BaseExtents         hints.Extents
	Changed             *bitmap.Bitmap
	Progress            func(done, total uint64)
	RefuseTerminal      bool
	OutputCarriesStream bool
}

// PowerOfTwo returns log2(v) when v is a power of two within [lo, hi].
func PowerOfTwo(what string, v, lo, hi uint64) (uint32, error) {
	if v < lo || v > hi || v&(v-1) != 0 {
		return 0, &UsageError{fmt.Sprintf("%s %d must be a power of two from %d to %d", what, v, lo, hi)}
	}
	return uint32(bits.TrailingZeros64(v)), nil
}

// Run executes the stream command.
func (c *StreamCmd) Run(env *Env) error {
	if c.SourceProtocol != "none" {
		return &UsageError{fmt.Sprintf("--source-protocol %s is not supported (supported: none)", c.SourceProtocol)}
	}
	if c.DestinationProtocol != "none" {
		return &UsageError{fmt.Sprintf("--destination-protocol %s is not supported (supported: none; the tar and chunked protocols are vhd-tool's)", c.DestinationProtocol)}
	}
	if c.DestinationFormat != "qcow2" {
		return &UsageError{fmt.Sprintf("--destination-format %s is not supported (supported: qcow2)", c.DestinationFormat)}
	}
	clusterBits, err := PowerOfTwo("--cluster-size", c.ClusterSize, 512, 2<<20)
	if err != nil {
		return err
	}
	refOrder, err := PowerOfTwo("--refcount-bits", c.RefcountBits, 1, 64)
	if err != nil {
		return err
	}
	req := &ExportRequest{ClusterBits: clusterBits, RefcountOrder: refOrder, BackingFile: c.BackingFile, RefuseTerminal: true}
	defer req.Close()

	srcPath := c.Source
	switch {
	case c.SourceFD != nil:
		f, err := FDFile(*c.SourceFD, "--source-fd")
		if err != nil {
			return err
		}
		if req.Source, err = rawdisk.FromFileDirect(f, f.Name(), c.Direct); err != nil {
			return err
		}
	case srcPath == "":
		return &UsageError{"--source is required (a path, file://PATH or fd://N)"}
	default:
		ep, err := ParseEndpoint(srcPath)
		if err != nil {
			return err
		}
		switch ep.Kind {
		case "file":
			if req.Source, err = rawdisk.Open(ep.Path, c.Direct); err != nil {
				return err
			}
		case "fd":
			f, err := FDFile(ep.FD, "--source")
			if err != nil {
				return err
			}
			if req.Source, err = rawdisk.FromFileDirect(f, f.Name(), c.Direct); err != nil {
				return err
			}
		case "stdin":
			// A disk redirected onto stdin; a pipe is refused by rawdisk.
			if req.Source, err = rawdisk.FromFile(env.Stdin, "stdin"); err != nil {
				return err
			}
		default:
			return &UsageError{fmt.Sprintf("--source %s: a raw disk must be a file, a block device or a descriptor", srcPath)}
		}
	}
	if c.RelativeTo != "" {
		if req.Base, err = rawdisk.Open(c.RelativeTo, c.Direct); err != nil {
			return fmt.Errorf("base %w", err)
		}
	}
	if err := c.loadHints(req); err != nil {
		return err
	}
	// The destination last: a file destination is truncated when opened,
	// so every check of the source comes first. Nothing is read or written
	// before RunExport has refused a terminal.
	switch {
	case c.DestinationFD != nil:
		f, err := FDFile(*c.DestinationFD, "--destination-fd")
		if err != nil {
			return err
		}
		req.Out, req.OutName = f, f.Name()
	default:
		ep, err := ParseEndpoint(c.Destination)
		if err != nil {
			return err
		}
		switch ep.Kind {
		case "stdout":
			req.Out, req.OutName = env.Stdout, "stdout"
		case "null":
			f, err := os.OpenFile(os.DevNull, os.O_WRONLY, 0)
			if err != nil {
				return err
			}
			req.Out, req.OutName, req.RefuseTerminal = f, "null:", false
		case "fd":
			f, err := FDFile(ep.FD, "--destination")
			if err != nil {
				return err
			}
			req.Out, req.OutName = f, f.Name()
		case "file":
			f, err := os.OpenFile(ep.Path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
			if err != nil {
				return fmt.Errorf("destination %s: %w", ep.Path, unwrapPath(err))
			}
			req.Out, req.OutName = f, ep.Path
		default:
			return &UsageError{fmt.Sprintf("--destination %s is not a place to write to", c.Destination)}
		}
	}
	req.OutputCarriesStream = req.Out == env.Stdout || req.Out.Fd() == 1

	progress, err := c.ProgressFlags.Reporter(env, req.OutputCarriesStream)
	if err != nil {
		return err
	}
	req.Progress = progress.Update
	err = RunExport(env, req)
	progress.Finish(err == nil)
	return err
}

func (c *StreamCmd) loadHints(req *ExportRequest) error {
	if c.AllocationInfo != "" {
		info, err := hints.LoadInfo(c.AllocationInfo)
		if err != nil {
			return err
		}
		if info.ClusterBits != 0 {
			req.ClusterBits = info.ClusterBits
		}
	}
	if c.AllocationMap != "" {
		ext, err := hints.LoadMap(c.AllocationMap, req.Source.Size())
		if err != nil {
			return err
		}
		req.SourceExtents = ext
	}
	if c.AllocationHeader != "" {
		if c.AllocationMap != "" || c.AllocationInfo != "" {
			return &UsageError{"--allocation-header replaces --allocation-map and --allocation-info: give one or the other"}
		}
		l, err := hints.LoadLegacy(c.AllocationHeader)
		if err != nil {
			return err
		}
		req.ClusterBits, req.SourceExtents = l.ClusterBits, l.Extents
	}
	if c.BaseAllocationInfo != "" {
		if req.Base == nil {
			return &UsageError{"--base-allocation-info needs --relative-to"}
		}
		if _, err := hints.LoadInfo(c.BaseAllocationInfo); err != nil {
			return fmt.Errorf("base %w", err)
		}
	}
	if c.BaseAllocHeader != "" {
		if req.Base == nil {
			return &UsageError{"--base-allocation-header needs --relative-to"}
		}
		l, err := hints.LoadLegacy(c.BaseAllocHeader)
		if err != nil {
			return fmt.Errorf("base %w", err)
		}
		req.BaseExtents = l.Extents
	}
	if c.BaseAllocationMap != "" {
		if req.Base == nil {
			return &UsageError{"--base-allocation-map needs --relative-to"}
		}
		ext, err := hints.LoadMap(c.BaseAllocationMap, req.Base.Size())
		if err != nil {
			return err
		}
		req.BaseExtents = ext
	}
	if c.ChangedBlocks != "" {
		cs := uint64(1) << req.ClusterBits
		clusters := (uint64(req.Source.Size()) + cs - 1) / cs
		bm, err := hints.LoadChangedBlocks(c.ChangedBlocks, req.ClusterBits, clusters)
		if err != nil {
			return err
		}
		req.Changed = bm
	}
	return nil
}

// Close releases the request's files.
func (r *ExportRequest) Close() {
	if r.Source != nil {
		r.Source.Close()
	}
	if r.Base != nil {
		r.Base.Close()
	}
}

// RunExport checks the output and runs the export, logging its start and
// end.
func RunExport(env *Env, r *ExportRequest) error {
	if r.RefuseTerminal && IsTerminal(r.Out) {
		return fmt.Errorf("refusing to write a qcow2 image to a terminal (%s): redirect it to a file or a pipe", r.OutName)
	}
	log := env.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	attrs := []any{"source", r.Source.Path(), "destination", r.OutName, "virtual_size", r.Source.Size(),
		"cluster_size", uint64(1) << r.ClusterBits}
	if r.Base != nil {
		attrs = append(attrs, "base", r.Base.Path())
	}
	log.Info("export started", attrs...)
	if r.Source.Direct() {
		SpareProcForIO()
	}
	start := time.Now()
	res, err := export.Run(env.Ctx, r.Out, export.Options{
		Source: r.Source, Base: r.Base, ClusterBits: r.ClusterBits, RefcountOrder: r.RefcountOrder,
		BackingFile: r.BackingFile, SourceExtents: r.SourceExtents, BaseExtents: r.BaseExtents,
		Changed: r.Changed, Progress: r.Progress,
	})
	if err != nil {
		var oe *export.OutputError
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
	if r.Out != nil && r.Out.Fd() > 2 {
		// A file destination: make it durable before saying success.
		if st, err := r.Out.Stat(); err == nil && st.Mode().IsRegular() {
			if err := r.Out.Sync(); err != nil {
				return fmt.Errorf("export of %s: fsync %s: %w", r.Source.Path(), r.OutName, err)
			}
		}
	}
	return nil
}

func unwrapPath(err error) error {
	var pe *os.PathError
	if errors.As(err, &pe) {
		return pe.Err
	}
	return err
}

var _ io.Writer = (*os.File)(nil)

package vhdcompat

import (
	"fmt"
	"os"

	"github.com/xapi-project/xapi-qcow-tool/vhdcompat/hints"
	"github.com/xapi-project/xapi-qcow-tool/vhdcompat/rawdisk"
)

// StreamCmd is `stream`: export a raw disk as a qcow2 stream.
type StreamCmd struct {
	Source              string `help:"Raw disk to export: a path, file://PATH, or fd://N." placeholder:"PATH"`
	SourceFD            *int   `name:"source-fd" help:"Export the disk open on this descriptor." placeholder:"N"`
	SourceFormat        string `default:"raw" enum:"raw,hybrid,nbdhybrid" help:"Format of the source: raw; hybrid (DEVICE:IMAGE: data from the raw DEVICE, allocation from IMAGE, a VHD or qcow2 file, and its parents found through --path); or nbdhybrid (RAW:SERVER:EXPORTNAME:SIZE, split at the first three colons: data from the raw disk RAW, allocation from the base:allocation block status of the NBD server on the unix socket SERVER, whose export EXPORTNAME and RAW must both be SIZE bytes; holes and zero extents are not read)."`
	SourceProtocol      string `default:"none" help:"Protocol of the source (none)."`
	Destination         string `default:"stdout:" help:"Where the stream goes: stdout:, null:, fd://N, file://PATH." placeholder:"URI"`
	DestinationFD       *int   `name:"destination-fd" help:"Write the stream to this open descriptor." placeholder:"N"`
	DestinationFormat   string `default:"qcow2" help:"Format of the stream (qcow2)."`
	DestinationProtocol string `default:"none" help:"Protocol of the stream (none)."`
	RelativeTo          string `name:"relative-to" help:"Export only the clusters that differ from this base disk, compared byte for byte. With --source-format hybrid: the base's VHD or qcow2 image (as vhd-tool takes it), or BASE_DEVICE:BASE_IMAGE; the diff comes from the two chains' metadata and no base device is read; a base that is not an image is refused. With --source-format nbdhybrid: the base disk (BASE_RAW, read where it holds data), or BASE_RAW:SERVER:EXPORTNAME:SIZE to take the base's allocation from its NBD server; both disks are compared where either holds data; other forms are refused." placeholder:"BASE"`
	ClusterSize         uint64 `default:"65536" help:"Cluster size in bytes: a power of two from 512 to 2097152."`
	RefcountBits        uint64 `default:"16" help:"Refcount width in bits: a power of two from 1 to 64."`
	BackingFile         string `help:"Name this file as the image's raw backing file (a diff qemu-img can read whole)." placeholder:"NAME"`
	AllocationMap       string `help:"qemu-img map --output=json of the qcow2 behind the source (a path or fd://N): read only what it allocates." placeholder:"FILE"`
	AllocationInfo      string `help:"qemu-img info --output=json of the qcow2 behind the source: its cluster size replaces --cluster-size." placeholder:"FILE"`
	BaseAllocationMap   string `help:"qemu-img map --output=json of the qcow2 behind the base." placeholder:"FILE"`
	BaseAllocationInfo  string `help:"qemu-img info --output=json of the qcow2 behind the base (checked, for symmetry with qcow2-to-stdout)." placeholder:"FILE"`
	AllocationHeader    string `help:"Older xapi's JSON header for the source (virtual_size, cluster_bits, data_clusters; a path or fd://N): read only those clusters, in its cluster size." placeholder:"FILE"`
	BaseAllocHeader     string `name:"base-allocation-header" help:"Older xapi's JSON header for the base." placeholder:"FILE"`
	DetectZeros         bool   `name:"detect-zeros" help:"Read the clusters a trusted allocation names (--source-format hybrid or nbdhybrid, --allocation-map, --allocation-header, an image discovery finds) once more before sending them, and leave out those that read as zeros (a diff sends them as zero clusters): fewer bytes on the link for a second read of the allocated data. By default the allocation is trusted, as vhd-tool and xapi trust theirs: each allocated cluster is read once and sent as read. A raw disk read without any of these is scanned and always leaves its zero clusters out."`
	ChangedBlocks       string `help:"Changed block tracking bitmap (base64, from VDI.list_changed_blocks; a path or fd://N): export only the flagged 64 KiB blocks." placeholder:"FILE"`
	NoDiscovery         bool   `name:"no-discovery" help:"Do not look for the image behind a blktap or NBD device (tap-ctl): without hints, read the whole device."`
	DiskIOFlags
	ProgressFlags
	CompatFlags
}

// Help is shown by --help.
func (c *StreamCmd) Help() string {
	return `Exports a raw disk (regular file or block device) as a qcow2 image,
written front to back to the destination without seeking or temporary files.
All-zero clusters are left unallocated; with --relative-to only clusters that
differ from the base are stored. Where the allocation comes from the image
behind the disk (--source-format hybrid, nbdhybrid, --allocation-map) it is trusted: each
allocated cluster is read once and sent as read (--detect-zeros reads them
first to leave zero clusters out).

Without allocation hints, the image behind a blktap or NBD device (a VHD or
qcow2 chain, or a raw file) is found as xapi finds it (/proc/devices,
/usr/sbin/tap-ctl list, /var/run/nonpersistent/nbd) and only what it
allocates is read; --no-discovery reads the whole device instead. The
journal names where each export's allocation came from.

Examples:
  xapi-qcow-tool stream --source disk.img > disk.qcow2
  xapi-qcow-tool stream --source /dev/sm/backend/SR/VDI --relative-to /dev/sm/backend/SR/BASE --direct
  xapi-qcow-tool stream --source-format hybrid --source /dev/sm/backend/SR/VDI:/var/run/sr-mount/SR/VDI.vhd \
      --relative-to /var/run/sr-mount/SR/BASE.vhd --path /dev/mapper:.
  # a VDI attached to dom0 as an NBD device (xapi's nbdhybrid form):
  xapi-qcow-tool stream --source-format nbdhybrid \
      --source /dev/nbd3:/run/blktap-control/nbd1234.5:EXPORT:10737418240 --direct
  # as xapi's vhd_tool_wrapper runs vhd-tool:
  xapi-qcow-tool stream --source-protocol none --source-format raw --source /dev/sm/backend/SR/VDI \
      --destination-protocol none --destination-format qcow2 --destination-fd 5 \
      --tar-filename-prefix "" --progress --machine --direct --path /dev/mapper:.`
}

// Run executes the stream command: it translates the flags into an
// ExportRequest.
func (c *StreamCmd) Run(env *Env) error {
	if err := onlySupported(
		flagValue{"--source-protocol", c.SourceProtocol, "none", "none"},
		flagValue{"--destination-protocol", c.DestinationProtocol, "none", "none; the tar and chunked protocols are vhd-tool's"},
		flagValue{"--destination-format", c.DestinationFormat, "qcow2", "qcow2"},
	); err != nil {
		return err
	}
	dio, err := c.IO()
	if err != nil {
		return err
	}
	req := &ExportRequest{
		Base: c.RelativeTo, IO: dio,
		ClusterSize: c.ClusterSize, ClusterSizeFlag: "--cluster-size",
		RefcountBits: c.RefcountBits, RefcountBitsFlag: "--refcount-bits",
		BackingFile: c.BackingFile, DetectZeros: c.DetectZeros, RefuseTerminal: true, Progress: c.ProgressFlags,
		OpenOut: func() (*os.File, string, error) { return c.openDestination(env) },
	}
	if err := c.hints(req); err != nil {
		return err
	}
	if c.SourceFD == nil && c.Source == "" {
		return &UsageError{"--source is required (a path, file://PATH or fd://N)"}
	}
	source := c.Source
	if !c.NoDiscovery && c.SourceFormat != "hybrid" && c.SourceFormat != "nbdhybrid" {
		req.Discover = &DiscoverRequest{Search: XapiSearchPath}
		if c.Path != "" {
			req.Discover.Search = searchPath(c.Path)
		}
	}
	switch c.SourceFormat {
	case "hybrid":
		var err error
		if source, req.Hybrid, err = c.hybrid(req); err != nil {
			return err
		}
	case "nbdhybrid":
		var err error
		if source, err = c.nbdHybrid(req); err != nil {
			return err
		}
	}
	src, err := ResolveEndpoint(c.SourceFD, source, "--source")
	if err != nil {
		return err
	}
	switch src.Kind {
	case "file":
		req.Source = src.Path
	case "fd":
		req.SourceFile = src.File
	case "stdin":
		req.SourceFile = env.Stdin
	default:
		return &UsageError{fmt.Sprintf("--source %s: a raw disk must be a file, a block device or a descriptor", c.Source)}
	}
	return Export(env, req)
}

// hints puts the hint flags into req, refusing what does not go together.
func (c *StreamCmd) hints(req *ExportRequest) error {
	if c.AllocationHeader != "" && (c.AllocationMap != "" || c.AllocationInfo != "") {
		return &UsageError{"--allocation-header replaces --allocation-map and --allocation-info: give one or the other"}
	}
	if c.BaseAllocHeader != "" && (c.BaseAllocationMap != "" || c.BaseAllocationInfo != "") {
		return &UsageError{"--base-allocation-header replaces --base-allocation-map and --base-allocation-info: give one or the other"}
	}
	h := &req.Hints
	h.Source.Info = hints.Source{Flag: "--allocation-info", Spec: c.AllocationInfo}
	h.Source.Map = hints.Source{Flag: "--allocation-map", Spec: c.AllocationMap}
	h.Source.Header = hints.Source{Flag: "--allocation-header", Spec: c.AllocationHeader}
	h.Base.Info = hints.Source{Flag: "--base-allocation-info", Spec: c.BaseAllocationInfo}
	h.Base.Map = hints.Source{Flag: "--base-allocation-map", Spec: c.BaseAllocationMap}
	h.Base.Header = hints.Source{Flag: "--base-allocation-header", Spec: c.BaseAllocHeader}
	h.ChangedBlocks = hints.Source{Flag: "--changed-blocks", Spec: c.ChangedBlocks}
	if c.RelativeTo == "" {
		for _, s := range []hints.Source{h.Base.Info, h.Base.Map, h.Base.Header} {
			if s.Given() {
				return &UsageError{s.Flag + " needs --relative-to"}
			}
		}
	}
	return nil
}

// openDestination opens the stream's destination. Export calls it last: a
// file destination is truncated when opened, so every check of the source
// comes first. Nothing is read or written before a terminal is refused.
func (c *StreamCmd) openDestination(env *Env) (*os.File, string, error) {
	ep, err := ResolveEndpoint(c.DestinationFD, c.Destination, "--destination")
	if err != nil {
		return nil, "", err
	}
	switch ep.Kind {
	case "stdout":
		return env.Stdout, "stdout", nil
	case "null":
		f, err := os.OpenFile(os.DevNull, os.O_WRONLY, 0)
		return f, "null:", err
	case "fd":
		return ep.File, ep.File.Name(), nil
	case "file":
		f, err := os.OpenFile(ep.Path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
		if err != nil {
			return nil, "", fmt.Errorf("destination %s: %w", ep.Path, rawdisk.WithoutPath(err))
		}
		return f, ep.Path, nil
	}
	return nil, "", &UsageError{fmt.Sprintf("--destination %s is not a place to write to", c.Destination)}
}

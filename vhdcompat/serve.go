package vhdcompat

import (
	"fmt"
	"os"

	"github.com/xapi-project/xapi-qcow-tool/vhdcompat/importer"
	"github.com/xapi-project/xapi-qcow-tool/vhdcompat/rawdisk"
)

// ServeCmd is `serve`: import a qcow2 stream into a raw disk.
type ServeCmd struct {
	SourceFormat      string `default:"qcow2" help:"Format of the source (qcow2)."`
	SourceProtocol    string `default:"none" help:"Protocol of the source (none)."`
	Source            string `default:"stdin:" help:"Where the image comes from: stdin:, fd://N, file://PATH or a path. A regular file is read with random access (any layout); a pipe or socket front to back." placeholder:"URI"`
	SourceFD          *int   `name:"source-fd" help:"Read the image from this open descriptor." placeholder:"N"`
	Destination       string `help:"Raw disk to write: file://PATH or a path (a regular file, created if missing, or a block device)." placeholder:"URI"`
	DestinationFD     *int   `name:"destination-fd" help:"Write to the raw disk open on this descriptor." placeholder:"N"`
	DestinationFormat string `default:"raw" help:"Format of the destination (raw)."`
	DestinationSize   int64  `name:"destination-size" help:"Size of the destination in bytes: an image larger by a cluster or more is refused before any write; larger by less (an unaligned disk whose image was rounded up) is written up to this size, if the excess reads as zeros." placeholder:"BYTES"`
	Prezeroed         bool   `help:"The destination already reads as zeros: zeros are not written."`
	Delta             bool   `help:"Apply a diff: leave clusters the image does not allocate untouched (zero clusters are still zeroed); a backing file is accepted."`
	MaxBuffer         int64  `name:"max-buffer" help:"Bytes of stream data that may be held in memory before the tables say where they go (0: the decoder's default, 64 MiB)." placeholder:"BYTES"`
	DiskIOFlags
	ProgressFlags
	CompatFlags
}

// Help is shown by --help.
func (c *ServeCmd) Help() string {
	return `Imports a qcow2 image into a raw disk (regular file or block device) in
one forward pass: from a pipe or socket without seeking (qemu-img's and our own
layouts), or from a regular file with random access (any layout). The
destination ends up holding exactly the image's content in [0, virtual size):
what reads as zero is zeroed cheaply (hole punching, BLKZEROOUT) unless
--prezeroed; with --delta, clusters the image does not allocate are left
untouched. Sizes, header and backing file are checked before the first write.

Examples:
  xapi-qcow-tool serve --source disk.qcow2 --destination disk.img
  cat disk.qcow2 | xapi-qcow-tool serve --destination /dev/sdb
  xapi-qcow-tool stream --source new.img --relative-to base.img | \
      xapi-qcow-tool serve --delta --destination copy-of-base.img
  # as xapi's vhd_tool_wrapper runs vhd-tool:
  xapi-qcow-tool serve --source-format qcow2 --source-protocol none --source-fd 5 \
      --tar-filename-prefix "" --destination file:///dev/sm/backend/SR/VDI \
      --destination-format raw --progress --machine --direct \
      --destination-size 10737418240 --prezeroed`
}

// Run executes the serve command.
func (c *ServeCmd) Run(env *Env) error {
	if err := onlySupported(
		flagValue{"--source-format", c.SourceFormat, "qcow2", "qcow2; vhd-tool handles raw and vhd"},
		flagValue{"--source-protocol", c.SourceProtocol, "none", "none"},
		flagValue{"--destination-format", c.DestinationFormat, "raw", "raw"},
	); err != nil {
		return err
	}
	if c.DestinationSize < 0 {
		return &UsageError{fmt.Sprintf("--destination-size %d must not be negative", c.DestinationSize)}
	}
	if c.MaxBuffer < 0 {
		return &UsageError{fmt.Sprintf("--max-buffer %d must not be negative", c.MaxBuffer)}
	}
	if err := raiseForMaxBuffer(c.MaxBuffer); err != nil {
		return err
	}
	dio, err := c.IO()
	if err != nil {
		return err
	}
	opt := importer.Options{
		DestinationSize: c.DestinationSize, Disk: rawdisk.Options{IO: dio}, Delta: c.Delta, Prezeroed: c.Prezeroed,
		MaxBuffered: c.MaxBuffer,
	}

	src, err := ResolveEndpoint(c.SourceFD, c.Source, "--source")
	if err != nil {
		return err
	}
	switch src.Kind {
	case "stdin":
		opt.Source, opt.SourceName = env.Stdin, "stdin"
	case "fd":
		opt.Source, opt.SourceName = src.File, src.File.Name()
	case "file":
		f, err := os.Open(src.Path)
		if err != nil {
			return fmt.Errorf("source %s: %w", src.Path, rawdisk.WithoutPath(err))
		}
		defer f.Close()
		opt.Source, opt.SourceName = f, src.Path
	default:
		return &UsageError{fmt.Sprintf("--source %s: the image must come from stdin:, fd://N, file://PATH or a path", c.Source)}
	}

	if c.DestinationFD == nil && c.Destination == "" {
		return &UsageError{"--destination is required (file://PATH or a path; or --destination-fd N)"}
	}
	dst, err := ResolveEndpoint(c.DestinationFD, c.Destination, "--destination")
	if err != nil {
		return err
	}
	switch dst.Kind {
	case "file":
		opt.DestinationPath = dst.Path
	case "fd":
		opt.Destination, opt.DestinationName = dst.File, dst.File.Name()
	default:
		return &UsageError{fmt.Sprintf("--destination %s: a raw disk must be file://PATH, a path or fd://N", c.Destination)}
	}
	return Import(env, opt, c.ProgressFlags)
}

// Import runs the import opt describes, with the progress the flags ask
// for; `serve` and qcow-stream-tool's stream_decode call it.
func Import(env *Env, opt importer.Options, p ProgressFlags) error {
	progress, err := p.Reporter(env, false)
	if err != nil {
		return err
	}
	opt.Progress = progress.Update
	opt.Log = env.Log
	opt.Disk = env.DiskOptions(opt.Disk.IO)
	SpareProcForIO()
	_, err = importer.Run(env.Ctx, opt)
	progress.Finish(err == nil)
	return err
}

// StreamDecode is qcow-stream-tool's stream_decode: the image on stdin
// into the raw disk at path, leaving what it does not allocate untouched.
func StreamDecode(env *Env, path string, io rawdisk.IO) error {
	if path == "" {
		return &UsageError{"stream_decode: PATH is empty (give the raw file or block device to write)"}
	}
	return Import(env, importer.Options{Source: env.Stdin, SourceName: "stdin", DestinationPath: path, Delta: true,
		Disk: rawdisk.Options{IO: io}}, ProgressFlags{})
}

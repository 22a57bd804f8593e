package wrapper

import (
	"github.com/alecthomas/kong"
	"github.com/xapi-project/xapi-qcow-tool/vhdcompat"
)

// CLI is the command tree. Each command's flags and Run live with the
// command: stream and serve in vhdcompat (vhd-tool's surface), the drop-in
// command lines in dropin.go, the support commands in support.go.
type CLI struct {
	Version kong.VersionFlag `help:"Print the version and exit."`

	Stream        vhdcompat.StreamCmd `cmd:"" help:"Export a raw disk as a qcow2 stream (vhd-tool stream)."`
	Serve         vhdcompat.ServeCmd  `cmd:"" help:"Import a qcow2 stream into a raw disk (vhd-tool serve)."`
	StreamDecode  StreamDecodeCmd     `cmd:"" name:"stream_decode" help:"Import a qcow2 stream on stdin into PATH, leaving unallocated clusters untouched (qcow-stream-tool)."`
	Qcow2ToStdout Qcow2ToStdoutCmd    `cmd:"" name:"qcow2-to-stdout" help:"Export with the command line of qcow2-to-stdout.py (xapi's qcow_to_stdout)."`
	Info          InfoCmd             `cmd:"" help:"Describe a qcow2 or VHD file (with --backing-chain, every image below it), a qcow2 stream, or what is behind a VDI's device."`
	Map           MapCmd              `cmd:"" help:"List the allocation of a qcow2 or VHD file or a qcow2 stream, like qemu-img map, or what an export of a device reads."`
	Check         CheckCmd            `cmd:"" help:"Check the structure of a qcow2 file or stream, or of a VHD and its chain, like qemu-img check."`
	Compare       CompareCmd          `cmd:"" help:"Compare the content of two disks (raw or qcow2)."`
	Completion    CompletionCmd       `cmd:"" help:"Print a shell completion script."`
}

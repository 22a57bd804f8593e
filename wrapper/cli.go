package wrapper

import (
	"github.com/alecthomas/kong"
	"github.com/xapi-project/xapi-qcow-tool/vhdcompat"
)

// CLI is the command tree.
type CLI struct {
	Version kong.VersionFlag `help:"Print the version and exit."`

	Stream vhdcompat.StreamCmd `cmd:"" help:"Export a raw disk as a qcow2 stream (vhd-tool stream)."`
}

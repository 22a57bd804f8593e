package wrapper

import (
	"github.com/xapi-project/xapi-qcow-tool/vhdcompat"
)

// Qcow2ToStdoutCmd is the reference exporter's command line
// (qcow2-to-stdout.py); kong hands over the raw arguments, parsed in
// qcow2tostdout.go the way the script's argparse does.
type Qcow2ToStdoutCmd struct {
	Args []string `arg:"" optional:"" passthrough:""`
}

// Run executes the drop-in export.
func (c *Qcow2ToStdoutCmd) Run(env *vhdcompat.Env) error {
	return runQcow2ToStdout(env, c.Args)
}

// StreamDecodeCmd is qcow-stream-tool's stream_decode: the qcow2 image on
// stdin (xapi's HTTP socket) into PATH, leaving what the image does not
// allocate untouched (serve --delta), nothing on stdout.
type StreamDecodeCmd struct {
	Path string `arg:"" help:"Raw file or block device to write."`
	vhdcompat.DiskIOFlags
	Verbose bool `short:"v" help:"Log details to stderr."`
}

// Run executes stream_decode.
func (c *StreamDecodeCmd) Run(env *vhdcompat.Env) error {
	dio, err := c.IO()
	if err != nil {
		return err
	}
	return vhdcompat.StreamDecode(env, c.Path, dio)
}

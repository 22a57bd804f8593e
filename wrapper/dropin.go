package wrapper

import (
	"errors"

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

// StreamDecodeCmd is qcow-stream-tool's stream_decode.
type StreamDecodeCmd struct {
	Path string `arg:"" help:"Raw file or block device to write."`
}

// Run executes stream_decode.
func (c *StreamDecodeCmd) Run(env *vhdcompat.Env) error {
	return errors.New("stream_decode: not implemented yet")
}

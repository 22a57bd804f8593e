package wrapper

import (
	"errors"

	"github.com/xapi-project/xapi-qcow-tool/vhdcompat"
)

// Qcow2ToStdoutCmd is the reference exporter's command line
// (qcow2-to-stdout.py). (Being written: see issue 4.)
type Qcow2ToStdoutCmd struct {
	Args []string `arg:"" optional:"" passthrough:""`
}

// Run executes the drop-in export.
func (c *Qcow2ToStdoutCmd) Run(env *vhdcompat.Env) error {
	return errors.New("qcow2-to-stdout: not implemented yet")
}

// StreamDecodeCmd is qcow-stream-tool's stream_decode.
type StreamDecodeCmd struct {
	Path string `arg:"" help:"Raw file or block device to write."`
}

// Run executes stream_decode.
func (c *StreamDecodeCmd) Run(env *vhdcompat.Env) error {
	return errors.New("stream_decode: not implemented yet")
}

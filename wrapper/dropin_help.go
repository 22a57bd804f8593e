package wrapper

// Help is shown by `stream_decode --help` (and `qcow-stream-tool
// stream_decode --help`): the command line xapi runs for an import.
func (c *StreamDecodeCmd) Help() string {
	return `Reads a qcow2 image from stdin (xapi's HTTP socket) and writes its clusters
into PATH (a block device or a raw file). Clusters the image does not allocate
are left untouched, so a diff applies on top of a copy of its base; clusters it
allocates are written even when they are zeros. Nothing is written on stdout.

Examples:
  # as xapi runs it (xapi.conf qcow_stream_tool, a symlink to this binary):
  qcow-stream-tool stream_decode /dev/sm/backend/SR/VDI < image.qcow2
  xapi-qcow-tool stream_decode disk.img < diff.qcow2`
}

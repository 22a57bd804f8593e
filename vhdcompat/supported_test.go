package vhdcompat

import "testing"

// The refusals of the vhd-tool values this tool does not support, word
// for word, first refused flag first.
func TestOnlySupported(t *testing.T) {
	for _, tc := range []struct {
		run  func() error
		want string
	}{
		{(&ServeCmd{SourceFormat: "vhd", SourceProtocol: "nbd"}).runRefused, "--source-format vhd is not supported (supported: qcow2; vhd-tool handles raw and vhd)"},
		{(&ServeCmd{SourceFormat: "qcow2", SourceProtocol: "nbd"}).runRefused, "--source-protocol nbd is not supported (supported: none)"},
		{(&ServeCmd{SourceFormat: "qcow2", SourceProtocol: "none", DestinationFormat: "vhd"}).runRefused, "--destination-format vhd is not supported (supported: raw)"},
		{(&StreamCmd{SourceProtocol: "tar"}).runRefused, "--source-protocol tar is not supported (supported: none)"},
		{(&StreamCmd{SourceProtocol: "none", DestinationProtocol: "chunked"}).runRefused, "--destination-protocol chunked is not supported (supported: none; the tar and chunked protocols are vhd-tool's)"},
		{(&StreamCmd{SourceProtocol: "none", DestinationProtocol: "none", DestinationFormat: "vhd"}).runRefused, "--destination-format vhd is not supported (supported: qcow2)"},
	} {
		err := tc.run()
		if _, ok := err.(*UsageError); !ok || err.Error() != tc.want {
			t.Errorf("got %v (%T), want the usage error %q", err, err, tc.want)
		}
	}
}

func (c *ServeCmd) runRefused() error  { return c.Run(nil) }
func (c *StreamCmd) runRefused() error { return c.Run(nil) }

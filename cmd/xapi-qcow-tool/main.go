// Command xapi-qcow-tool moves virtual disks between raw storage and qcow2
// streams for XenServer / XCP-ng. See wrapper for the command surface.
package main

import (
	"os"

	"github.com/xapi-project/xapi-qcow-tool/wrapper"
)

func main() {
	os.Exit(wrapper.Main(os.Args))
}

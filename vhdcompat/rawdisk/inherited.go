package rawdisk

import (
	"fmt"
	"os"
)

// Inherited returns descriptor fd, inherited from the process that started
// us (xapi passes disks, outputs and hints this way), as a file named
// "fd N", which messages use for it. It fails when fd is not open.
func Inherited(fd int) (*os.File, error) {
	f := os.NewFile(uintptr(fd), fmt.Sprintf("fd %d", fd))
	if f == nil {
		return nil, fmt.Errorf("descriptor %d is not valid", fd)
	}
	if _, err := f.Stat(); err != nil {
		return nil, fmt.Errorf("descriptor %d is not open", fd)
	}
	return f, nil
}

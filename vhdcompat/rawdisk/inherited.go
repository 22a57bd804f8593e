package rawdisk

import (
	"errors"
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

// WithoutPath returns the cause inside an *os.PathError ("no such file or
// directory" without "open PATH: "), for messages that name the path
// their own way; other errors are returned as they are.
func WithoutPath(err error) error {
	var pe *os.PathError
	if errors.As(err, &pe) {
		return pe.Err
	}
	return err
}

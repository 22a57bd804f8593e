package vhdcompat

import (
	"errors"
	"fmt"
	"syscall"
)

// ClientGoneError is an export whose reader closed the stream before its
// end: the pipe's reader exited, or the HTTP client hung up (Xen
// Orchestra's NBD backups read the tables, then close). It is the client's
// choice, not a storage failure: the run still exits non-zero, but the
// journal records it as a notice, not an error.
type ClientGoneError struct {
	Source string // the disk exported
	Out    string // where the stream went (stdout, fd N, a path)
	Err    error  // EPIPE or ECONNRESET, as the write saw it
}

func (e *ClientGoneError) Error() string {
	return fmt.Sprintf("export of %s: the client went away: the reader of %s closed it before the end of the stream (%v)", e.Source, e.Out, e.Err)
}

func (e *ClientGoneError) Unwrap() error { return e.Err }

// clientHungUp reports whether a failed write means the reader went away.
func clientHungUp(err error) bool {
	return errors.Is(err, syscall.EPIPE) || errors.Is(err, syscall.ECONNRESET)
}

package nbd

import (
	"fmt"
	"strconv"
)

// ProtocolError is a server that broke the protocol: a bad magic number,
// a length out of bounds, a reply that does not answer the request. The
// connection is dropped (a hard disconnect, as the protocol allows).
type ProtocolError struct {
	Stage string // what the client was doing: "handshake", "block status at offset N"
	Msg   string
}

func (e *ProtocolError) Error() string {
	return fmt.Sprintf("%s: the server broke the NBD protocol: %s", e.Stage, e.Msg)
}

// OptionError is an error reply to an option during the handshake (the
// export does not exist, the server does not support the option, ...).
type OptionError struct {
	Option  string // NBD_OPT_GO, ...
	Code    uint32 // NBD_REP_ERR_*
	Message string // the server's message, quoted if it holds odd bytes
}

var optionErrors = map[uint32]string{
	repErrBit | 1: "unsupported", repErrBit | 2: "refused by policy", repErrBit | 3: "invalid",
	repErrBit | 4: "not supported on this platform", repErrBit | 5: "TLS required",
	repErrBit | 6: "unknown export", repErrBit | 7: "server shutting down",
	repErrBit | 8: "block size required", repErrBit | 9: "too big",
	repErrBit | 10: "extended headers required",
}

func (e *OptionError) Error() string {
	what, ok := optionErrors[e.Code]
	if !ok {
		what = fmt.Sprintf("error %#x", e.Code)
	}
	if e.Message != "" {
		return fmt.Sprintf("%s: %s (%s)", e.Option, what, e.Message)
	}
	return fmt.Sprintf("%s: %s", e.Option, what)
}

// ServerError is an error the server returned for a request (an errno
// value of the protocol: EIO, EINVAL, ...).
type ServerError struct {
	Stage   string
	Code    uint32
	Message string
}

var errnoNames = map[uint32]string{
	1: "EPERM", 5: "EIO", 12: "ENOMEM", 22: "EINVAL", 28: "ENOSPC", 75: "EOVERFLOW",
	95: "ENOTSUP", 108: "ESHUTDOWN",
}

func (e *ServerError) Error() string {
	name, ok := errnoNames[e.Code]
	if !ok {
		name = "error " + strconv.FormatUint(uint64(e.Code), 10)
	}
	if e.Message != "" {
		return fmt.Sprintf("%s: the server answered %s (%s)", e.Stage, name, e.Message)
	}
	return fmt.Sprintf("%s: the server answered %s", e.Stage, name)
}

// printable returns a server's string fit for one line of a message: as
// it is when it is plain printable text, quoted otherwise.
func printable(b []byte) string {
	if s := string(b); strconv.CanBackquote(s) {
		return s
	}
	return strconv.Quote(string(b))
}

package vhdcompat

import (
	"fmt"
	"os"
	"strconv"
	"strings"

	"github.com/xapi-project/xapi-qcow-tool/vhdcompat/rawdisk"
)

// Endpoint is a parsed vhd-tool source or destination: stdin:, stdout:,
// null:, fd://N, file://PATH or a plain path.
type Endpoint struct {
	Kind string   // "stdin", "stdout", "null", "fd", "file"
	Path string   // for "file"
	FD   int      // for "fd"
	File *os.File // for "fd", from ResolveEndpoint: the open descriptor
}

// ResolveEndpoint is the endpoint vhd-tool's pair of options --X-fd N and
// --X URI gives (flag is "--X"): the descriptor when fd is set, else the
// URI. A descriptor, from either, is checked open and set in File.
func ResolveEndpoint(fd *int, uri, flag string) (Endpoint, error) {
	if fd != nil {
		f, err := FDFile(*fd, flag+"-fd")
		return Endpoint{Kind: "fd", FD: *fd, File: f}, err
	}
	ep, err := ParseEndpoint(uri)
	if err != nil || ep.Kind != "fd" {
		return ep, err
	}
	ep.File, err = FDFile(ep.FD, flag)
	return ep, err
}

// ParseEndpoint parses a vhd-tool URI. A string without a scheme is a path.
func ParseEndpoint(s string) (Endpoint, error) {
	switch {
	case s == "stdin:":
		return Endpoint{Kind: "stdin"}, nil
	case s == "stdout:":
		return Endpoint{Kind: "stdout"}, nil
	case s == "null:":
		return Endpoint{Kind: "null"}, nil
	case strings.HasPrefix(s, "fd://"):
		n, err := strconv.Atoi(s[len("fd://"):])
		if err != nil || n < 0 {
			return Endpoint{}, &UsageError{fmt.Sprintf("%q: fd:// needs a descriptor number", s)}
		}
		return Endpoint{Kind: "fd", FD: n}, nil
	case strings.HasPrefix(s, "file://"):
		p := s[len("file://"):]
		if p == "" {
			return Endpoint{}, &UsageError{fmt.Sprintf("%q: file:// needs a path", s)}
		}
		return Endpoint{Kind: "file", Path: p}, nil
	case strings.Contains(s, "://") || strings.HasSuffix(s, ":") && !strings.Contains(s, "/"):
		return Endpoint{}, &UsageError{fmt.Sprintf("%q: unsupported URI (supported: stdin:, stdout:, null:, fd://N, file://PATH, or a path)", s)}
	case s == "":
		return Endpoint{}, &UsageError{"empty source or destination"}
	}
	return Endpoint{Kind: "file", Path: s}, nil
}

// FDFile returns an *os.File for an inherited descriptor, checking that it
// is open. flag names the option that gave it, for errors; the file's Name
// is "fd N", which messages use for it.
func FDFile(fd int, flag string) (*os.File, error) {
	f, err := rawdisk.Inherited(fd)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", flag, err)
	}
	return f, nil
}

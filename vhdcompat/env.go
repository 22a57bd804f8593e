// Package vhdcompat is vhd-tool's command surface for qcow2: the `stream`
// (export) and `serve` (import) commands with vhd-tool's options, source and
// destination URIs, descriptors and machine-readable progress. The engines
// live in subpackages: rawdisk (disk I/O), hints (allocation hints), export
// and importer.
package vhdcompat

import (
	"context"
	"log/slog"
	"os"
)

// Env is what a command runs with. The wrapper builds it: the context is
// cancelled on SIGTERM and SIGINT, the logger writes to the journal.
type Env struct {
	Ctx    context.Context
	Stdin  *os.File
	Stdout *os.File
	Stderr *os.File
	Log    *slog.Logger
}

// ExitError carries an exit status other than 1 (the default for errors).
// Err may be nil when the command already said everything.
type ExitError struct {
	Code int
	Err  error
}

func (e *ExitError) Error() string {
	if e.Err == nil {
		return ""
	}
	return e.Err.Error()
}

func (e *ExitError) Unwrap() error { return e.Err }

// UsageError is a bad command line: exit status 2.
type UsageError struct{ Msg string }

func (e *UsageError) Error() string { return e.Msg }

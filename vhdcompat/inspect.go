package vhdcompat

import (
	"fmt"
	"io"

	"github.com/xapi-project/xapi-qcow-tool/qcow/inspect"
	"github.com/xapi-project/xapi-qcow-tool/vhdcompat/rawdisk"
)

// The support commands' requests: each names a qcow2 file or block device,
// opened read-only, or "-" for a stream on stdin. The errors name the
// command, as the one-line error of every command does.

// Info describes the image at path.
func Info(env *Env, path string) (*inspect.Info, error) {
	return inspectPath(env, "info", path, func(d *rawdisk.Disk) (*inspect.Info, error) { return inspect.InfoFile(d, d.Size()) }, inspect.InfoStream)
}

// Map lists the allocation of the image at path, as qemu-img map does.
func Map(env *Env, path string) ([]inspect.MapEntry, error) {
	return inspectPath(env, "map", path, func(d *rawdisk.Disk) ([]inspect.MapEntry, error) { return inspect.MapFile(d, d.Size(), d) }, inspect.MapStream)
}

// Check checks the structure of the image at path, as qemu-img check does.
func Check(env *Env, path string) (*inspect.CheckResult, error) {
	return inspectPath(env, "check", path, func(d *rawdisk.Disk) (*inspect.CheckResult, error) { return inspect.CheckFile(d, d.Size()) }, inspect.CheckStream)
}

// Compare compares what the disks at paths a and b read as, each raw or
// qcow2.
func Compare(a, b string) (*inspect.CompareResult, error) {
	da, err := rawdisk.Open(a, false)
	if err != nil {
		return nil, err
	}
	defer da.Close()
	db, err := rawdisk.Open(b, false)
	if err != nil {
		return nil, err
	}
	defer db.Close()
	return inspect.Compare(da, da.Size(), db, db.Size())
}

// inspectPath runs file on the disk at path, or stream on stdin for "-".
func inspectPath[T any](env *Env, cmd, path string, file func(*rawdisk.Disk) (T, error), stream func(io.Reader) (T, error)) (T, error) {
	var res T
	var err error
	name := path
	if path == "-" {
		name = "stdin"
		res, err = stream(env.Stdin)
	} else {
		d, oerr := rawdisk.Open(path, false)
		if oerr != nil {
			return res, fmt.Errorf("%s: %w", cmd, oerr)
		}
		defer d.Close()
		res, err = file(d)
	}
	if err != nil {
		return res, fmt.Errorf("%s: %s: %w", cmd, name, err)
	}
	return res, nil
}

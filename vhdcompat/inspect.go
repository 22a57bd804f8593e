package vhdcompat

import (
	"fmt"

	"github.com/xapi-project/xapi-qcow-tool/qcow/inspect"
	"github.com/xapi-project/xapi-qcow-tool/vhdcompat/rawdisk"
)

// The support commands' requests: each names a qcow2 file or block device,
// opened read-only, or "-" for a stream on stdin. The errors name the
// command, as the one-line error of every command does.

// Info describes the image at path.
func Info(env *Env, path string) (*inspect.Info, error) {
	var info *inspect.Info
	err := inspectPath(env, "info", path,
		func(d *rawdisk.Disk) (err error) { info, err = inspect.InfoFile(d, d.Size()); return err },
		func() (err error) { info, err = inspect.InfoStream(env.Stdin); return err })
	return info, err
}

// Map lists the allocation of the image at path, as qemu-img map does.
func Map(env *Env, path string) ([]inspect.MapEntry, error) {
	var m []inspect.MapEntry
	err := inspectPath(env, "map", path,
		func(d *rawdisk.Disk) (err error) { m, err = inspect.MapFile(d, d.Size(), d); return err },
		func() (err error) { m, err = inspect.MapStream(env.Stdin); return err })
	return m, err
}

// Check checks the structure of the image at path, as qemu-img check does.
func Check(env *Env, path string) (*inspect.CheckResult, error) {
	var res *inspect.CheckResult
	err := inspectPath(env, "check", path,
		func(d *rawdisk.Disk) (err error) { res, err = inspect.CheckFile(d, d.Size()); return err },
		func() (err error) { res, err = inspect.CheckStream(env.Stdin); return err })
	return res, err
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

// inspectPath runs file on the disk at path, or stream for "-".
func inspectPath(env *Env, cmd, path string, file func(*rawdisk.Disk) error, stream func() error) error {
	name := path
	var err error
	if path == "-" {
		name, err = "stdin", stream()
	} else {
		d, oerr := rawdisk.Open(path, false)
		if oerr != nil {
			return fmt.Errorf("%s: %w", cmd, oerr)
		}
		defer d.Close()
		err = file(d)
	}
	if err != nil {
		return fmt.Errorf("%s: %s: %w", cmd, name, err)
	}
	return nil
}

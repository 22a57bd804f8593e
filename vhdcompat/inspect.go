package vhdcompat

import (
	"fmt"
	"io"

	"github.com/xapi-project/xapi-qcow-tool/qcow/inspect"
	"github.com/xapi-project/xapi-qcow-tool/vhdcompat/hybrid"
	"github.com/xapi-project/xapi-qcow-tool/vhdcompat/rawdisk"
	"github.com/xapi-project/xapi-qcow-tool/vhdcompat/vhd"
)

// The support commands' requests: each names a qcow2 file or block device,
// opened read-only as io says (a block device with O_DIRECT by default,
// read through rawdisk's Unaligned reader), or "-" for a stream on stdin.
// The errors name the command, as the one-line error of every command
// does.

// Info describes the image at path.
func Info(env *Env, path string, dio rawdisk.IO) (*inspect.Info, error) {
	return inspectPath(env, "info", path, dio, func(d *rawdisk.Disk) (*inspect.Info, error) { return inspect.InfoFile(d.Unaligned(), d.Size()) }, inspect.InfoStream)
}

// Map calls emit with each entry of the map of the image at path (qcow2 or
// VHD, or a qcow2 stream for "-"), as qemu-img map lists it, while the
// image is walked. An error from emit stops the walk and is returned as
// it is, unwrapped: it is the caller's (writing the map), not the image's.
func Map(env *Env, path string, dio rawdisk.IO, emit func(inspect.MapEntry) error) error {
	var emitErr error
	out := func(e inspect.MapEntry) error {
		if err := emit(e); err != nil {
			emitErr = err
			return err
		}
		return nil
	}
	_, err := inspectPath(env, "map", path, dio, func(d *rawdisk.Disk) (struct{}, error) {
		if v, err := hybrid.DetectVHD(d.Unaligned(), d.Size()); err != nil || v != nil {
			return struct{}{}, hybrid.MapVHD(v, err, d, out)
		}
		return struct{}{}, inspect.MapFile(d.Unaligned(), d.Size(), d, out)
	}, func(r io.Reader) (struct{}, error) { return struct{}{}, inspect.MapStream(r, out) })
	if emitErr != nil {
		return emitErr
	}
	return err
}

// CheckReport is what check found in one image and below it: a qcow2
// image's structure (*inspect.CheckResult) or a VHD chain's
// (*hybrid.VHDCheck). Its JSON is the result's own.
type CheckReport interface {
	WriteHuman(w io.Writer) error
	ExitCode() int
}

// Check checks the structure of the image at path, as qemu-img check does:
// a qcow2 file or stream ("-"), or a VHD and its chain, parents searched as
// the hybrid source searches them (next to the child, then in the
// directories of search, vhd-tool's --path: "" is the current directory).
// The disk is opened once and its format told there.
func Check(env *Env, path string, dio rawdisk.IO, search string) (CheckReport, error) {
	return inspectPath(env, "check", path, dio, func(d *rawdisk.Disk) (CheckReport, error) {
		qcow2 := inspect.IsQcow2(d.Unaligned())
		if !qcow2 {
			vr, err := hybrid.CheckVHD(path, d.Unaligned(), d.Size(), searchPath(search))
			if err != nil {
				return nil, err
			}
			if vr != nil {
				return vr, nil
			}
		}
		res, err := inspect.CheckFile(d.Unaligned(), d.Size())
		if err != nil {
			if !qcow2 {
				err = fmt.Errorf("%w, and %v", err, vhd.ErrNotVHD)
			}
			return nil, err
		}
		res.Filename = path
		return res, nil
	}, func(r io.Reader) (CheckReport, error) {
		res, err := inspect.CheckStream(r)
		if err != nil {
			return nil, err
		}
		res.Filename = path
		return res, nil
	})
}

// Compare compares what the disks at paths a and b read as, each raw or
// qcow2.
func Compare(env *Env, a, b string, dio rawdisk.IO) (*inspect.CompareResult, error) {
	da, err := rawdisk.OpenWith(a, env.DiskOptions(dio))
	if err != nil {
		return nil, err
	}
	defer da.Close()
	db, err := rawdisk.OpenWith(b, env.DiskOptions(dio))
	if err != nil {
		return nil, err
	}
	defer db.Close()
	return inspect.Compare(da.Unaligned(), da.Size(), db.Unaligned(), db.Size())
}

// inspectPath runs file on the disk at path, or stream on stdin for "-".
func inspectPath[T any](env *Env, cmd, path string, dio rawdisk.IO, file func(*rawdisk.Disk) (T, error), stream func(io.Reader) (T, error)) (T, error) {
	var res T
	var err error
	name := path
	if path == "-" {
		name = "stdin"
		res, err = stream(env.Stdin)
	} else {
		d, oerr := rawdisk.OpenWith(path, env.DiskOptions(dio))
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

package vhdcompat

import (
	"github.com/xapi-project/xapi-qcow-tool/qcow/inspect"
	"github.com/xapi-project/xapi-qcow-tool/vhdcompat/hybrid"
	"github.com/xapi-project/xapi-qcow-tool/vhdcompat/rawdisk"
)

// InfoVHD describes the VHD file at path; it returns nil, nil when path is
// "-" or holds no VHD (Info then describes it as qcow2).
func InfoVHD(path string, dio rawdisk.IO) (*hybrid.VHDInfo, error) {
	if path == "-" {
		return nil, nil
	}
	return inspectPath(nil, "info", path, dio, func(d *rawdisk.Disk) (*hybrid.VHDInfo, error) {
		v, err := hybrid.DetectVHD(d.Unaligned(), d.Size())
		if err != nil || v == nil {
			return nil, err
		}
		return hybrid.InfoVHD(v)
	}, nil)
}

// CheckVHD checks the VHD file at path and its chain, parents searched as
// the hybrid source searches them (next to the child, then in the
// directories of search, vhd-tool's --path: "" is the current directory);
// it returns nil, nil when path is "-" or holds no VHD (Check then checks
// it as qcow2).
func CheckVHD(env *Env, path string, dio rawdisk.IO, search string) (*hybrid.VHDCheck, error) {
	if path == "-" {
		return nil, nil
	}
	return inspectPath(env, "check", path, dio, func(d *rawdisk.Disk) (*hybrid.VHDCheck, error) {
		if inspect.IsQcow2(d.Unaligned()) {
			return nil, nil
		}
		return hybrid.CheckVHD(path, d.Unaligned(), d.Size(), searchPath(search))
	}, nil)
}

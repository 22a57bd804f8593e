package vhdcompat

import (
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

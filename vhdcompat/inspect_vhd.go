package vhdcompat

import (
	"errors"
	"fmt"

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

// InfoChain describes the image at path and every image below it, top
// first (info --backing-chain). Parents are found as the hybrid source
// finds them: a relative name in the child's directory, then in each
// directory of the colon-separated search (vhd-tool's --path); a parent
// found nowhere is named with every path tried.
func InfoChain(path, search string) ([]hybrid.ImageInfo, error) {
	if path == "-" {
		return nil, &UsageError{"info --backing-chain opens the files of a chain: give the path of the top image, not - (a stream names no files)"}
	}
	c, err := hybrid.Open(path, searchPath(search))
	if err != nil {
		var ni *hybrid.NotImageError
		if errors.As(err, &ni) {
			return nil, fmt.Errorf("info: %s: not a qcow2 or VHD image", path)
		}
		return nil, fmt.Errorf("info: %w", err)
	}
	defer c.Close()
	infos, err := hybrid.InfoChain(c)
	if err != nil {
		return nil, fmt.Errorf("info: %w", err)
	}
	return infos, nil
}

package vhdcompat

import (
	"errors"
	"fmt"
	"strings"

	"github.com/xapi-project/xapi-qcow-tool/vhdcompat/hybrid"
)

// HybridRequest is vhd-tool's hybrid source: the images behind the source
// and base devices, and where their parents are searched.
type HybridRequest struct {
	Image, BaseImage string // BaseImage "": the base is a raw disk alone
	Search           []string
}

// hybrid splits the source and base of --source-format hybrid into the
// devices (left in req and returned) and the images behind them.
func (c *StreamCmd) hybrid(req *ExportRequest) (string, *HybridRequest, error) {
	if c.SourceFD != nil {
		return "", nil, &UsageError{"--source-format hybrid takes --source DEVICE:IMAGE, not --source-fd"}
	}
	if req.Hints.Source.Given() || req.Hints.Base.Given() {
		return "", nil, &UsageError{"--source-format hybrid reads the allocation from the image: it takes no --allocation-* or --base-allocation-* hint"}
	}
	dev, image, base, baseImage, err := splitHybrid(c.Source, c.RelativeTo)
	if err != nil {
		return "", nil, err
	}
	req.Base = base
	return dev, &HybridRequest{Image: image, BaseImage: baseImage, Search: searchPath(c.Path)}, nil
}

// splitHybrid splits vhd-tool's hybrid DEVICE:IMAGE for the source and,
// when given, the base (a base without an image is a raw disk: everything
// it holds is compared). The split is at the first colon, as vhd-tool's.
func splitHybrid(source, base string) (dev, image, baseDev, baseImage string, err error) {
	var ok bool
	dev, image, ok = strings.Cut(source, ":")
	if !ok || dev == "" || image == "" {
		return "", "", "", "", &UsageError{fmt.Sprintf("--source-format hybrid needs --source DEVICE:IMAGE (the raw disk, then the VHD or qcow2 file behind it), not %q", source)}
	}
	if base != "" {
		baseDev, baseImage, _ = strings.Cut(base, ":")
		if baseDev == "" {
			return "", "", "", "", &UsageError{fmt.Sprintf("--relative-to %q names no base disk", base)}
		}
	}
	return dev, image, baseDev, baseImage, nil
}

// searchPath splits --path; an empty one searches the current directory,
// as vhd-tool's default does.
func searchPath(p string) []string {
	if p == "" {
		return []string{"."}
	}
	var out []string
	for _, d := range strings.Split(p, ":") {
		if d != "" {
			out = append(out, d)
		}
	}
	return out
}

// loadHybrid reads the allocation of the image chains behind the source
// (and the base) and turns it into the export's extents. Everything is
// checked here, before the destination is opened.
func (x *openedExport) loadHybrid(h *HybridRequest) error {
	src, err := openChain("source", h.Image, h.Search, x.Source.Size())
	if err != nil {
		return err
	}
	defer src.Close()
	var base *hybrid.Chain
	var baseSize int64
	if x.Base != nil && h.BaseImage != "" {
		baseSize = x.Base.Size()
		if base, err = openChain("base", h.BaseImage, h.Search, baseSize); err != nil {
			return err
		}
		defer base.Close()
	}
	plan, err := hybrid.NewPlan(src, base, x.ClusterBits, x.Source.Size(), baseSize)
	if err != nil {
		return fmt.Errorf("allocation of %s: %w", h.Image, err)
	}
	x.SourceExtents, x.ExactExtents = plan.Source, true
	if base != nil {
		x.BaseExtents, x.Compare = plan.Base, plan.Compare
	}
	return nil
}

// openChain opens an image chain and checks that it describes a disk of
// the device's size.
func openChain(what, image string, search []string, size int64) (*hybrid.Chain, error) {
	ch, err := hybrid.Open(image, search)
	if err != nil {
		var ni *hybrid.NotImageError
		if errors.As(err, &ni) {
			return nil, &UsageError{fmt.Sprintf("%s image %s", what, err)}
		}
		return nil, fmt.Errorf("%s image %w", what, err)
	}
	top := ch.Layers[0]
	if top.VirtualSize != size {
		ch.Close()
		return nil, fmt.Errorf("%s image %s describes a disk of %d bytes, but the %s device has %d: is it the image behind that device?", what, image, top.VirtualSize, what, size)
	}
	return ch, nil
}

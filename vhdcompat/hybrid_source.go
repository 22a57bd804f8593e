package vhdcompat

import (
	"errors"
	"fmt"
	"os"
	"strings"

	"github.com/xapi-project/xapi-qcow-tool/vhdcompat/hybrid"
	"github.com/xapi-project/xapi-qcow-tool/vhdcompat/rawdisk"
)

// HybridRequest is vhd-tool's hybrid source: the image behind the source
// device and, for a diff, the base's image, and where their parents are
// searched. The diff comes from the two chains' metadata: no base device is
// ever read.
type HybridRequest struct {
	Image, BaseImage string // BaseImage "": a full export
	Search           []string
	// BaseDevice, when given (--relative-to BASE_DEVICE:BASE_IMAGE), is
	// the raw disk behind BaseImage: its size is checked against the
	// image's, nothing of it is read.
	BaseDevice string
}

// hybrid splits the source and base of --source-format hybrid into the
// source device (returned) and the images behind source and base.
func (c *StreamCmd) hybrid(req *ExportRequest) (string, *HybridRequest, error) {
	if c.SourceFD != nil {
		return "", nil, &UsageError{"--source-format hybrid takes --source DEVICE:IMAGE, not --source-fd"}
	}
	if req.Hints.Source.Given() || req.Hints.Base.Given() {
		return "", nil, &UsageError{"--source-format hybrid reads the allocation from the image: it takes no --allocation-* or --base-allocation-* hint"}
	}
	dev, image, baseDev, baseImage, err := splitHybrid(c.Source, c.RelativeTo)
	if err != nil {
		return "", nil, err
	}
	req.Base = "" // the base is its image: loadHybrid reads its chain
	return dev, &HybridRequest{Image: image, BaseImage: baseImage, Search: searchPath(c.Path), BaseDevice: baseDev}, nil
}

// splitHybrid splits vhd-tool's hybrid DEVICE:IMAGE for the source and,
// when given, the base: BASE_IMAGE alone (vhd-tool's form, what xapi
// passes) or BASE_DEVICE:BASE_IMAGE. The split is at the first colon, as
// vhd-tool's.
func splitHybrid(source, base string) (dev, image, baseDev, baseImage string, err error) {
	var ok bool
	dev, image, ok = strings.Cut(source, ":")
	if !ok || dev == "" || image == "" {
		return "", "", "", "", &UsageError{fmt.Sprintf("--source-format hybrid needs --source DEVICE:IMAGE (the raw disk, then the VHD or qcow2 file behind it), not %q", source)}
	}
	if base == "" {
		return dev, image, "", "", nil
	}
	if baseDev, baseImage, ok = strings.Cut(base, ":"); !ok {
		return dev, image, "", base, nil
	}
	if baseDev == "" || baseImage == "" {
		return "", "", "", "", &UsageError{fmt.Sprintf("--relative-to %q: with --source-format hybrid give the base's VHD or qcow2 image (BASE_IMAGE), or BASE_DEVICE:BASE_IMAGE", base)}
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
	src, err := openSourceChain(h.Image, h.Search)
	if err != nil {
		return sourceChainError{err}
	}
	defer src.Close()
	if err := sameSize("source", h.Image, src, x.Source.Path(), x.Source.Size()); err != nil {
		return sourceChainError{err}
	}
	var base *hybrid.Chain
	var baseSize int64
	if h.BaseImage != "" {
		if base, err = x.openBaseChain(h); err != nil {
			return err
		}
		defer base.Close()
		baseSize = base.Layers[0].VirtualSize
	}
	plan, err := hybrid.NewPlan(src, base, x.ClusterBits, x.Source.Size(), baseSize)
	if err != nil {
		return fmt.Errorf("allocation of %s: %w", h.Image, err)
	}
	x.SourceExtents, x.ExactExtents = plan.Source, true
	x.Allocation = string(src.Layers[0].Format)
	if base != nil {
		x.BaseExtents, x.Compare, x.BaseName = plan.Base, plan.Compare, h.BaseImage
	}
	return nil
}

// sourceChainError is a failure of the source's own chain (not opened, or
// describing a disk of another size): a diff's base has no part in it.
type sourceChainError struct{ error }

func (e sourceChainError) Unwrap() error { return e.error }

// openBaseChain opens the base's image chain. A base that is not an image
// is refused: in hybrid mode --relative-to names the base's image (what
// vhd-tool takes), and a raw disk given there (the meaning it has with a
// raw source) would otherwise be guessed at.
func (x *openedExport) openBaseChain(h *HybridRequest) (*hybrid.Chain, error) {
	if st, err := os.Stat(h.BaseImage); err == nil {
		if sst, err := x.Source.File().Stat(); err == nil && hybrid.SameDisk(st, sst) {
			return nil, &UsageError{fmt.Sprintf("--relative-to %s is the source device: with --source-format hybrid give the base's VHD or qcow2 image, or BASE_DEVICE:BASE_IMAGE", h.BaseImage)}
		}
	}
	base, err := hybrid.Open(h.BaseImage, h.Search)
	var ni *hybrid.NotImageError
	switch {
	case errors.As(err, &ni) && ni.Path == h.BaseImage:
		return nil, &UsageError{fmt.Sprintf("--relative-to %s is neither a VHD nor a qcow2 image: with --source-format hybrid give the base's image, or BASE_DEVICE:BASE_IMAGE; to diff against a raw disk use --source-format raw", h.BaseImage)}
	case err != nil:
		return nil, fmt.Errorf("base image %w", err)
	}
	if h.BaseDevice != "" {
		// Opened through the page cache, which reads nothing at open
		// (O_DIRECT's alignment probe would): only its size is checked.
		d, err := rawdisk.OpenWith(h.BaseDevice, rawdisk.Options{IO: rawdisk.IOBuffered})
		if err != nil {
			base.Close()
			return nil, fmt.Errorf("base %w", err)
		}
		err = sameSize("base", h.BaseImage, base, d.Path(), d.Size())
		d.Close()
		if err != nil {
			base.Close()
			return nil, err
		}
	}
	return base, nil
}

// openSourceChain opens the image chain behind the source device.
func openSourceChain(image string, search []string) (*hybrid.Chain, error) {
	ch, err := hybrid.Open(image, search)
	var ni *hybrid.NotImageError
	switch {
	case errors.As(err, &ni):
		return nil, &UsageError{"source image " + err.Error()}
	case err != nil:
		return nil, fmt.Errorf("source image %w", err)
	}
	return ch, nil
}

// sameSize checks that an image chain describes a disk of its device's
// size.
func sameSize(what, image string, ch *hybrid.Chain, dev string, size int64) error {
	if top := ch.Layers[0]; top.VirtualSize != size {
		return fmt.Errorf("%s image %s describes a disk of %d bytes, but the %s device %s has %d: is it the image behind that device?", what, image, top.VirtualSize, what, dev, size)
	}
	return nil
}

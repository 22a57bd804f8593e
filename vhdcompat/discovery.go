package vhdcompat

import (
	"context"
	"errors"
	"fmt"

	"github.com/xapi-project/xapi-qcow-tool/vhdcompat/discover"
	"github.com/xapi-project/xapi-qcow-tool/vhdcompat/hints"
	"github.com/xapi-project/xapi-qcow-tool/vhdcompat/rawdisk"
)

// Where an export's allocation comes from, as its journal entry names it.
const (
	AllocHints    = "hints"     // xapi's map/info or legacy header, or a CBT bitmap
	AllocSeekData = "seek-data" // SEEK_DATA on the source file, or on a tapdisk's aio file
	AllocScan     = "scan"      // the whole device, read
	AllocNBD      = "nbd"       // the block status of the NBD server behind the device
)

// DiscoverRequest asks an export to find the images behind its devices
// (vhdcompat/discover) when no hint says what they allocate.
type DiscoverRequest struct {
	// Search is where the parents of a discovered chain are looked for,
	// after the image's own directory: vhd-tool's --path, which xapi
	// passes as "/dev/mapper:.".
	Search []string
}

// XapiSearchPath is the --path xapi gives vhd-tool, the search path of
// every discovered chain unless a command line names another.
var XapiSearchPath = []string{"/dev/mapper", "."}

// discovered is what discovery found behind one device and what the
// export makes of it.
type discovered struct {
	res    *discover.Result
	driver discover.Driver
	image  string
	// extents and size, for an aio image: its SEEK_DATA extents and its
	// size.
	extents hints.Extents
	size    int64
	// nbd, for an NBD device whose server is not a tapdisk: the server
	// to ask for the allocation (the nbdhybrid source).
	nbd *NBDRequest
}

// chain reports whether the image is a VHD or qcow2 chain, read by the
// hybrid source.
func (d *discovered) chain() bool {
	return d != nil && (d.driver == discover.VHD || d.driver == discover.Qcow2)
}

// discoverDisk finds the image behind the device at path (of that kind
// and size) for an export, and says in one warning line why it did not
// when path is a block device (a regular file has nothing behind it: its
// own SEEK_DATA is the allocation). nil means the export reads the device
// as it would without discovery.
func discoverDisk(env *Env, what, path string, kind rawdisk.Kind, size int64) *discovered {
	res, err := discover.Discover(envCtx(env), path)
	if err == nil {
		var d *discovered
		d, err = useDiscovered(res, size)
		if err == nil {
			logDiscovered(env, what, path, res)
			return d
		}
	}
	if errors.Is(err, discover.ErrNotVDIDevice) && kind != rawdisk.BlockDevice {
		return nil
	}
	warnDiscovery(env, what, path, err)
	return nil
}

// logDiscovered is the journal's info line naming what was found behind
// a device: the tapdisk and its image, or the NBD server.
func logDiscovered(env *Env, what, path string, res *discover.Result) {
	if env == nil || env.Log == nil {
		return
	}
	if t := res.Tapdisk; t != nil {
		env.Log.Info(fmt.Sprintf("discovery: the %s %s is served by tapdisk %d (minor %d, through %s): %s:%s", what, path, t.PID, t.Minor, res.Via(), t.Driver, t.Image),
			"disk", path, "tapdisk_pid", t.PID, "tapdisk_minor", t.Minor, "driver", string(t.Driver), "image", t.Image)
	} else if x := res.NBD; x != nil {
		env.Log.Info(fmt.Sprintf("discovery: the %s %s is served over NBD by %s, export %q", what, path, x.SocketReal, x.ExportName),
			"disk", path, "nbd_socket", x.SocketReal, "nbd_export", x.ExportName)
	}
}

// useDiscovered checks what discovery found and, for an aio image, reads
// its SEEK_DATA extents; size is the device's (-1: unknown, not checked).
func useDiscovered(res *discover.Result, size int64) (*discovered, error) {
	if x, ok := res.NBDServer(); ok {
		// The server is no tapdisk: the allocation is the server's block
		// status, as vhd-tool's nbdhybrid source asks it. Its size is
		// checked against the device and the export when it is asked.
		return &discovered{res: res, nbd: &NBDRequest{Server: x.Socket, Export: x.ExportName, Size: size}}, nil
	}
	t := res.Tapdisk
	d := &discovered{res: res, driver: t.Driver, image: t.Image}
	switch t.Driver {
	case discover.VHD, discover.Qcow2:
		return d, nil // the chain is opened and checked by loadHybrid
	case discover.Aio:
		f, err := rawdisk.OpenWith(t.Image, rawdisk.Options{IO: rawdisk.IOBuffered})
		if err != nil {
			return nil, fmt.Errorf("aio image of tapdisk %d: %w", t.PID, err)
		}
		defer f.Close()
		if f.Kind() != rawdisk.RegularFile {
			return nil, fmt.Errorf("aio image %s of tapdisk %d is a %s: it has no allocation of its own to read", t.Image, t.PID, f.Kind())
		}
		if size >= 0 && f.Size() != size {
			return nil, fmt.Errorf("aio image %s has %d bytes, but the device has %d: is it the image behind that device?", t.Image, f.Size(), size)
		}
		d.size = f.Size()
		if d.extents, err = hints.Collect(f.DataExtents, f.Size()); err != nil {
			return nil, fmt.Errorf("aio image %s: %w", t.Image, err)
		}
		return d, nil
	}
	return nil, fmt.Errorf("tapdisk %d serves %s with driver %q: only vhd, qcow2 and aio images are read", t.PID, t.Image, t.Driver)
}

// warnDiscovery is the one journal line of a discovery that failed: the
// export goes on as it would without discovery.
func warnDiscovery(env *Env, what, path string, err error) {
	if env == nil || env.Log == nil {
		return
	}
	env.Log.Warn(fmt.Sprintf("discovery: no image used behind the %s %s: %v; the export reads the device as without discovery", what, path, err),
		"disk", path, "error", err.Error())
}

func envCtx(env *Env) context.Context {
	if env == nil || env.Ctx == nil {
		return context.Background()
	}
	return env.Ctx
}

// discoverExport finds the images behind the source and base devices of
// an export that no hint describes and makes them its allocation source:
// chains through the hybrid source, an aio file's SEEK_DATA as extents.
// It opens the base device (with disk's options) unless the diff comes
// from the two chains alone; an error is one the export without discovery
// would have met too (the base cannot be opened).
func (x *openedExport) discoverExport(env *Env, req *ExportRequest, disk rawdisk.Options) error {
	src := discoverDisk(env, "source", x.Source.Path(), x.Source.Kind(), x.Source.Size())
	var base *discovered
	if req.Base != "" && src != nil && src.nbd == nil {
		// Only a chain or an aio source uses what is behind the base (an
		// NBD source's diff compares the base device as it is).
		// Through the page cache, which reads nothing at open: only
		// the device's kind and size are needed.
		peek, err := rawdisk.OpenWith(req.Base, rawdisk.Options{IO: rawdisk.IOBuffered})
		if err != nil {
			return fmt.Errorf("base %w", err)
		}
		base = discoverDisk(env, "base", peek.Path(), peek.Kind(), peek.Size())
		peek.Close()
	}
	switch {
	case src.chain():
		h := &HybridRequest{Image: src.image, Search: req.Discover.Search}
		if base.chain() {
			// Both chains: the diff comes from their metadata (what
			// is allocated above their common ancestor); the base
			// device is only checked for its size.
			h.BaseImage, h.BaseDevice = base.image, req.Base
		}
		if x.loadDiscoveredHybrid(env, h) && h.BaseImage != "" {
			x.BaseDevice = req.Base
			return nil
		}
	case src != nil && src.nbd != nil:
		// A server that cannot be used is one warning line: the export
		// reads the device as without discovery.
		if err := x.loadNBDSource(env, src.nbd); err != nil {
			if env.Ctx != nil && env.Ctx.Err() != nil {
				return err
			}
			warnDiscovery(env, "source", x.Source.Path(), err)
		}
	case src != nil: // aio
		x.SourceImage, x.SourceExtents, x.Allocation = src.image, src.extents, AllocSeekData
	}
	if req.Base == "" {
		return nil
	}
	if err := x.openBase(req.Base, disk); err != nil {
		return err
	}
	if x.SourceImage != "" && base != nil && base.driver == discover.Aio {
		x.BaseExtents = base.extents
	}
	return nil
}

// loadDiscoveredHybrid loads a hybrid request that discovery made and
// reports whether the base's chain, if any, was loaded too. A failure (a
// parent missing, a chain that fails validation, a size that differs) is
// one warning line, and the export goes on without the chain that failed:
// without the base's when the source's own chain loaded (the base device
// is then compared as it is), else without either. loadHybrid sets
// nothing of x when it fails.
func (x *openedExport) loadDiscoveredHybrid(env *Env, h *HybridRequest) bool {
	err := x.loadHybrid(h)
	if err == nil {
		x.SourceImage = h.Image
		return true
	}
	var own sourceChainError
	if h.BaseImage != "" && !errors.As(err, &own) {
		warnDiscovery(env, "base", h.BaseDevice, fmt.Errorf("image chain of %s: %w", h.BaseImage, err))
		nb := *h
		nb.BaseImage, nb.BaseDevice = "", ""
		if err = x.loadHybrid(&nb); err == nil {
			x.SourceImage = h.Image
			return false
		}
	}
	warnDiscovery(env, "source", x.Source.Path(), fmt.Errorf("image chain of %s: %w", h.Image, err))
	return false
}

// allocationSource names where the allocation of an export comes from,
// when nothing more precise set it.
func (x *openedExport) allocationSource() string {
	if x.Source.Kind() == rawdisk.RegularFile {
		return AllocSeekData
	}
	return AllocScan
}

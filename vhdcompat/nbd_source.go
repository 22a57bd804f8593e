package vhdcompat

import (
	"context"
	"fmt"
	"log/slog"
	"strconv"
	"strings"

	"github.com/xapi-project/xapi-qcow-tool/qcow/inspect"
	"github.com/xapi-project/xapi-qcow-tool/vhdcompat/hints"
	"github.com/xapi-project/xapi-qcow-tool/vhdcompat/hybrid"
	"github.com/xapi-project/xapi-qcow-tool/vhdcompat/nbd"
	"github.com/xapi-project/xapi-qcow-tool/vhdcompat/rawdisk"
)

// NBDRequest is vhd-tool's nbdhybrid source: an NBD server that serves the
// same disk as the raw device, asked which parts of it hold data
// (base:allocation block status). The data itself is read from the device.
type NBDRequest struct {
	Server string // the server's unix socket
	Export string // the export name ("" is the default export)
	// Size is the disk's size as the command line gives it: the export's
	// and the device's must both be this.
	Size int64
}

// String names the server and export for messages and the journal.
func (r *NBDRequest) String() string {
	return fmt.Sprintf("NBD server %s export %s", r.Server, strconv.Quote(r.Export))
}

// nbdHybrid splits the source and base of --source-format nbdhybrid into
// the devices (the source's returned, the base's left in req.Base) and the
// servers behind them.
func (c *StreamCmd) nbdHybrid(req *ExportRequest) (string, error) {
	if c.SourceFD != nil {
		return "", &UsageError{"--source-format nbdhybrid takes --source RAW:SERVER:EXPORTNAME:SIZE, not --source-fd"}
	}
	if req.Hints.Source.Given() || req.Hints.Base.Given() {
		return "", &UsageError{"--source-format nbdhybrid reads the allocation from the NBD server: it takes no --allocation-* or --base-allocation-* hint"}
	}
	dev, src, err := splitNBDHybrid(c.Source)
	if err != nil {
		return "", &UsageError{fmt.Sprintf("--source-format nbdhybrid needs --source RAW:SERVER:EXPORTNAME:SIZE (the raw disk, the NBD server's unix socket, the export name, the size in bytes): %s", err)}
	}
	req.NBD = src
	switch n := strings.Count(c.RelativeTo, ":"); {
	case c.RelativeTo == "":
	case n == 0:
		// A raw base disk alone: compared where it holds data, as with
		// --source-format raw (an image given here is refused when opened).
		req.Base = c.RelativeTo
	case n >= 3:
		if req.Base, req.BaseNBD, err = splitNBDHybrid(c.RelativeTo); err != nil {
			return "", &UsageError{fmt.Sprintf("--relative-to %q: %s", c.RelativeTo, err)}
		}
	default:
		// vhd-tool ignores --relative-to in this mode (xapi never gives
		// one); one or two colons could be a path, or hybrid's
		// DEVICE:IMAGE, which would mean something else.
		return "", &UsageError{fmt.Sprintf("--relative-to %q is ambiguous with --source-format nbdhybrid: give the base disk alone (BASE_RAW) or BASE_RAW:SERVER:EXPORTNAME:SIZE", c.RelativeTo)}
	}
	return dev, nil
}

// splitNBDHybrid splits RAW:SERVER:EXPORTNAME:SIZE at the first three
// colons, as vhd-tool does: only SIZE may hold more, and it must be a
// decimal number (what xapi writes).
func splitNBDHybrid(s string) (string, *NBDRequest, error) {
	f := strings.SplitN(s, ":", 4)
	if len(f) != 4 {
		return "", nil, fmt.Errorf("%q has %d fields, not 4", s, len(f))
	}
	if f[0] == "" || f[1] == "" {
		return "", nil, fmt.Errorf("%q names no raw disk or no server", s)
	}
	size, err := strconv.ParseInt(f[3], 10, 64)
	if err != nil || size < 0 {
		return "", nil, fmt.Errorf("SIZE %q is not a number of bytes", f[3])
	}
	return f[0], &NBDRequest{Server: f[1], Export: f[2], Size: size}, nil
}

// loadNBD reads the allocation of the source (and the base) from their NBD
// servers into the export's extents. Everything is checked here, before
// the destination is opened.
func (x *openedExport) loadNBD(env *Env, src, base *NBDRequest) error {
	if src != nil {
		if err := x.loadNBDSource(env, src); err != nil {
			return err
		}
	}
	if x.Base == nil {
		return nil
	}
	if base == nil {
		return refuseImageBase(x.Base)
	}
	ext, err := x.nbdAllocation(env, "base", base, x.Base)
	if err != nil {
		return err
	}
	x.BaseExtents = ext
	return nil
}

// loadNBDSource makes the source's allocation the block status of its
// server, named in the journal.
func (x *openedExport) loadNBDSource(env *Env, src *NBDRequest) error {
	ext, err := x.nbdAllocation(env, "source", src, x.Source)
	if err != nil {
		return err
	}
	x.SourceExtents, x.ExactExtents = ext, true
	x.Allocation = AllocNBD
	x.AllocationAttrs = []any{"nbd_server", src.Server, "nbd_export", src.Export}
	return nil
}

// refuseImageBase refuses a base that holds a VHD or qcow2 image: compared
// as a raw disk it would give a wrong diff (hybrid's --relative-to is an
// image, nbdhybrid's a raw disk).
func refuseImageBase(d *rawdisk.Disk) error {
	r := d.Unaligned()
	if v, err := hybrid.DetectVHD(r, d.Size()); inspect.IsQcow2(r) || v != nil || err != nil {
		return &UsageError{fmt.Sprintf("--relative-to %s holds a VHD or qcow2 image: with --source-format nbdhybrid the base is the raw disk (BASE_RAW or BASE_RAW:SERVER:EXPORTNAME:SIZE), not its image", d.Path())}
	}
	return nil
}

// nbdAllocation asks the server which parts of the disk hold data; the
// command line's SIZE must be the device's and the export's.
func (x *openedExport) nbdAllocation(env *Env, what string, req *NBDRequest, disk *rawdisk.Disk) (hints.Extents, error) {
	if req.Size != disk.Size() {
		return nil, fmt.Errorf("%s size %d is not the size of the %s device %s (%d bytes)", what, req.Size, what, disk.Path(), disk.Size())
	}
	ext, _, err := nbdDataExtents(envCtx(env), req, x.ClusterBits)
	if err != nil {
		if env.Ctx != nil && env.Ctx.Err() != nil {
			return nil, fmt.Errorf("%s allocation from %s: interrupted: %w", what, req, context.Cause(env.Ctx))
		}
		return nil, fmt.Errorf("%s allocation from %s: %w", what, req, err)
	}
	return ext, nil
}

// nbdDataExtents walks the export's base:allocation block status and
// returns the extents that are neither holes nor zeros (vhd-tool copies
// exactly those), widened to whole clusters and merged, at most
// hints.MaxExtents, with the export's size. req.Size, unless -1, must be
// the export's size.
func nbdDataExtents(ctx context.Context, req *NBDRequest, clusterBits uint32) (hints.Extents, int64, error) {
	c, err := nbd.Connect(ctx, "unix", req.Server, req.Export, nbd.Options{})
	if err != nil {
		return nil, 0, err
	}
	defer c.Close()
	size := c.Size()
	if req.Size >= 0 && size != req.Size {
		return nil, 0, fmt.Errorf("the export has %d bytes, not the %d the disk has: is it the server of that disk?", size, req.Size)
	}
	cs := int64(1) << clusterBits
	out := hints.Extents{}
	err = c.Extents(ctx, func(e nbd.Extent) error {
		if !e.Data() {
			return nil
		}
		start, end := e.Offset/cs*cs, min((e.Offset+e.Length+cs-1)/cs*cs, size)
		if n := len(out); n > 0 && start <= out[n-1].End {
			out[n-1].End = max(out[n-1].End, end)
			return nil
		}
		if len(out) >= hints.MaxExtents {
			return fmt.Errorf("the allocation is split into more than %d extents", hints.MaxExtents)
		}
		out = append(out, hints.Extent{Start: start, End: end})
		return nil
	})
	if err != nil {
		return nil, 0, err
	}
	return out, size, nil
}

// logger is the command's log, or one that discards.
func logger(env *Env) *slog.Logger {
	if env.Log == nil {
		return slog.New(slog.DiscardHandler)
	}
	return env.Log
}

package vhdcompat

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/xapi-project/xapi-qcow-tool/qcow/inspect"
	"github.com/xapi-project/xapi-qcow-tool/vhdcompat/discover"
	"github.com/xapi-project/xapi-qcow-tool/vhdcompat/hints"
	"github.com/xapi-project/xapi-qcow-tool/vhdcompat/hybrid"
	"github.com/xapi-project/xapi-qcow-tool/vhdcompat/rawdisk"
)

// DeviceInfo is what is behind a VDI's device, as an export without hints
// would find it: `info DEVICE` and `map DEVICE` show it so that a support
// engineer sees what an export will read.
type DeviceInfo struct {
	Device   string `json:"device"`
	Resolved string `json:"resolved"`
	Major    uint32 `json:"major"`
	Minor    uint32 `json:"minor"`
	// Via is how the image was found: blktap, nbd-tapdisk or nbd.
	Via     string       `json:"via"`
	Tapdisk *TapdiskInfo `json:"tapdisk,omitempty"`
	NBD     *NBDInfo     `json:"nbd,omitempty"`
	Driver  string       `json:"driver,omitempty"`
	Image   string       `json:"image,omitempty"`
	// ChainDepth is the number of images in the chain (1 for an aio file).
	ChainDepth int          `json:"chain-depth,omitempty"`
	Chain      []ChainLayer `json:"chain,omitempty"`
	// Allocation is where an export's allocation would come from (vhd,
	// qcow2, seek-data, scan) and AllocatedBytes what it would read, in
	// 64 KiB clusters; the whole device for a scan.
	Allocation     string `json:"allocation"`
	AllocatedBytes int64  `json:"allocated-bytes"`
	VirtualSize    int64  `json:"virtual-size"`
	// Error says why discovery failed: an export then reads the whole
	// device.
	Error string `json:"error,omitempty"`

	extents hints.Extents
}

// TapdiskInfo is the tapdisk serving the device.
type TapdiskInfo struct {
	PID   int    `json:"pid"`
	Minor int    `json:"minor"`
	State string `json:"state"`
}

// NBDInfo is an NBD device's attachment.
type NBDInfo struct {
	Index      int    `json:"index"`
	Record     string `json:"record"`
	Socket     string `json:"socket"`
	SocketReal string `json:"socket-real"`
	ExportName string `json:"export-name"`
}

// ChainLayer is one image of a discovered chain.
type ChainLayer struct {
	Path        string `json:"path"`
	Format      string `json:"format"`
	VirtualSize int64  `json:"virtual-size"`
}

// infoClusterBits is the cluster size DescribeDevice counts in: the
// export's default.
const infoClusterBits = 16

// DescribeDevice runs discovery on path as an export would. It returns nil
// when path is not a blktap or NBD device (nothing is behind it, or it is
// no block device at all: info and map then describe its content, or say
// what is wrong with it), and otherwise what is behind it, or why that
// could not be found. The device itself is opened only
// for its size (an NBD device without a server cannot be, and is still
// described).
func DescribeDevice(env *Env, path string, search []string) *DeviceInfo {
	if st, err := os.Stat(path); path == "-" || err != nil || st.Mode()&os.ModeDevice == 0 || st.Mode()&os.ModeCharDevice != 0 {
		return nil // not a block device: its own errors are info's and map's
	}
	res, err := discover.Discover(envCtx(env), path)
	if errors.Is(err, discover.ErrNotVDIDevice) {
		return nil
	}
	in := &DeviceInfo{Device: path, Allocation: AllocScan, VirtualSize: -1}
	size, sizeErr := deviceSize(path)
	if sizeErr == nil {
		in.VirtualSize, in.AllocatedBytes = size, size
	}
	if res == nil {
		in.Error = err.Error()
		return in
	}
	in.Resolved, in.Major, in.Minor, in.Via = res.Resolved, res.Major, res.Minor, res.Via()
	if x := res.NBD; x != nil {
		in.NBD = &NBDInfo{Index: x.Index, Record: x.Record, Socket: x.Socket, SocketReal: x.SocketReal, ExportName: x.ExportName}
	}
	if t := res.Tapdisk; t != nil {
		in.Tapdisk = &TapdiskInfo{PID: t.PID, Minor: t.Minor, State: t.State}
		in.Driver, in.Image = string(t.Driver), t.Image
	}
	if err != nil {
		in.Error = err.Error()
		return in
	}
	if sizeErr != nil {
		in.Error = sizeErr.Error()
		size = -1
	}
	if err := in.readAllocation(envCtx(env), res, size, search); err != nil {
		in.Error = err.Error()
	}
	return in
}

// readAllocation fills in the chain (parents searched in search after the
// image's directory) and the allocation an export would use; size -1
// skips the size checks (the device could not be opened).
func (in *DeviceInfo) readAllocation(ctx context.Context, res *discover.Result, size int64, search []string) error {
	d, err := useDiscovered(res, size)
	if err != nil {
		return err
	}
	if d.nbd != nil {
		// What an export would ask: the server's block status.
		ext, exportSize, err := nbdDataExtents(ctx, d.nbd, infoClusterBits)
		if err != nil {
			return fmt.Errorf("%s: %w", d.nbd, err)
		}
		in.VirtualSize = exportSize
		in.setAllocation(AllocNBD, ext)
		return nil
	}
	if d.driver == discover.Aio {
		in.VirtualSize = d.size
		in.ChainDepth, in.Chain = 1, []ChainLayer{{Path: d.image, Format: "raw", VirtualSize: d.size}}
		in.setAllocation(AllocSeekData, d.extents.AlignOut(1<<infoClusterBits, d.size))
		return nil
	}
	ch, err := openSourceChain(d.image, search)
	if err != nil {
		return fmt.Errorf("image chain of %s: %w", d.image, err)
	}
	defer ch.Close()
	for _, l := range ch.Layers {
		in.Chain = append(in.Chain, ChainLayer{Path: l.Path, Format: string(l.Format), VirtualSize: l.VirtualSize})
	}
	in.ChainDepth = len(ch.Layers)
	top := ch.Layers[0]
	if size >= 0 {
		if err := sameSize("source", d.image, ch, in.Device, size); err != nil {
			return err
		}
	}
	plan, err := hybrid.NewPlan(ch, nil, infoClusterBits, top.VirtualSize, 0)
	if err != nil {
		return fmt.Errorf("allocation of %s: %w", d.image, err)
	}
	in.VirtualSize = top.VirtualSize
	in.setAllocation(string(top.Format), plan.Source)
	return nil
}

func (in *DeviceInfo) setAllocation(source string, ext hints.Extents) {
	in.Allocation, in.extents, in.AllocatedBytes = source, ext, ext.Bytes()
}

// deviceSize opens the device for its size alone.
func deviceSize(path string) (int64, error) {
	d, err := rawdisk.OpenWith(path, rawdisk.Options{IO: rawdisk.IOBuffered})
	if err != nil {
		return 0, fmt.Errorf("the device cannot be opened: %w", err)
	}
	defer d.Close()
	return d.Size(), nil
}

// Map lists the ranges an export would read (data) and leave out
// (unallocated), in qemu-img map's entries; a failed discovery reads the
// whole device.
func (in *DeviceInfo) Map() []inspect.MapEntry {
	size := in.VirtualSize
	ext := in.extents
	if in.Allocation == AllocScan {
		ext = hints.Extents{{Start: 0, End: max(size, 0)}}
	}
	var out []inspect.MapEntry
	pos := int64(0)
	add := func(start, end int64, data bool) {
		if end > start {
			out = append(out, inspect.MapEntry{Start: uint64(start), Length: uint64(end - start), Present: data, Data: data, Zero: !data})
		}
	}
	for _, x := range ext {
		add(pos, x.Start, false)
		add(x.Start, x.End, true)
		pos = x.End
	}
	add(pos, size, false)
	return out
}

// WriteHuman prints the description for a person.
func (in *DeviceInfo) WriteHuman(w io.Writer) error {
	p := func(k string, v any) { fmt.Fprintf(w, "%-22s %v\n", k+":", v) }
	p("device", in.Device)
	if in.Resolved != "" && in.Resolved != in.Device {
		p("resolves to", fmt.Sprintf("%s (%d:%d)", in.Resolved, in.Major, in.Minor))
	}
	if in.Via != "" {
		p("found through", in.Via)
	}
	if x := in.NBD; x != nil {
		p("nbd record", x.Record)
		p("nbd server socket", x.SocketReal)
		p("nbd export name", fmt.Sprintf("%q", x.ExportName))
	}
	if t := in.Tapdisk; t != nil {
		p("tapdisk", fmt.Sprintf("pid %d, minor %d, state %s", t.PID, t.Minor, t.State))
	}
	if in.Driver != "" {
		p("driver", in.Driver)
		p("image", in.Image)
	}
	if in.ChainDepth > 0 {
		p("chain depth", in.ChainDepth)
		for i, l := range in.Chain {
			p(fmt.Sprintf("  %d", i), fmt.Sprintf("%s (%s, %d bytes)", l.Path, l.Format, l.VirtualSize))
		}
	}
	if in.Error != "" {
		p("discovery failed", in.Error)
	}
	read := "the whole device (scan)"
	if in.Allocation != AllocScan {
		read = fmt.Sprintf("%d bytes, as the %s allocation says", in.AllocatedBytes, in.Allocation)
	}
	if in.VirtualSize >= 0 {
		p("virtual size", fmt.Sprintf("%d bytes", in.VirtualSize))
	}
	p("an export reads", read)
	_, err := fmt.Fprintf(w, "%-22s %s\n", "allocation:", in.Allocation)
	return err
}

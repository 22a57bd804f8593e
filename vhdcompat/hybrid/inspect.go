package hybrid

import (
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"strings"

	"github.com/xapi-project/xapi-qcow-tool/qcow/inspect"
	"github.com/xapi-project/xapi-qcow-tool/vhdcompat/vhd"
)

// The support commands info and map on VHD files: what the hybrid export
// will read, in the words of qemu-img info/map (format "vpc").

// DetectVHD returns a reader when r holds a VHD, nil when it holds no VHD
// footer at all, and an error for a VHD the reader refuses.
func DetectVHD(r io.ReaderAt, size int64) (*vhd.Reader, error) {
	if inspect.IsQcow2(r) {
		return nil, nil
	}
	v, err := vhd.NewReader(r, size)
	if errors.Is(err, vhd.ErrNotVHD) {
		return nil, nil
	}
	return v, err
}

// VHDInfo describes a VHD. Keys are qemu-img info's where qemu has one
// (format "vpc", cluster-size the block size); the "vhd" object is ours.
type VHDInfo struct {
	VirtualSize     uint64 `json:"virtual-size"`
	Filename        string `json:"filename"`
	ClusterSize     uint64 `json:"cluster-size,omitempty"`
	Format          string `json:"format"`
	BackingFilename string `json:"backing-filename,omitempty"`
	// FullBackingFilename is where the parent was found, when the chain
	// was opened (info --backing-chain).
	FullBackingFilename string     `json:"full-backing-filename,omitempty"`
	DirtyFlag           bool       `json:"dirty-flag"`
	VHD                 VHDDetails `json:"vhd"`
	Allocation          struct {
		DataBytes        uint64 `json:"data-bytes"`
		UnallocatedBytes uint64 `json:"unallocated-bytes"`
		AllocatedBlocks  int    `json:"allocated-blocks"`
		Blocks           int    `json:"blocks"`
	} `json:"allocation"`
}

// VHDDetails are the footer's and header's fields.
type VHDDetails struct {
	DiskType       string   `json:"disk-type"`
	CreatorApp     string   `json:"creator-app"`
	UniqueID       string   `json:"unique-id"`
	ParentUniqueID string   `json:"parent-unique-id,omitempty"`
	ParentName     string   `json:"parent-name,omitempty"`
	ParentLocators []string `json:"parent-locators,omitempty"`
}

// InfoVHD describes the VHD v; data bytes count the sectors its bitmaps
// mark, not its parents'.
func InfoVHD(v *vhd.Reader) (*VHDInfo, error) {
	in := &VHDInfo{VirtualSize: uint64(v.VirtualSize()), ClusterSize: uint64(v.BlockSize()), Format: "vpc"}
	f := v.Footer
	in.VHD = VHDDetails{DiskType: f.DiskType.String(), CreatorApp: f.CreatorApp, UniqueID: uuid(f.UniqueID)}
	if f.DiskType == vhd.Differencing {
		in.VHD.ParentUniqueID = uuid(v.Header.ParentUniqueID)
		in.VHD.ParentName = v.Header.ParentName
		paths := v.ParentPaths()
		in.VHD.ParentLocators = paths
		in.BackingFilename = v.Header.ParentName
		if len(paths) > 0 {
			in.BackingFilename = paths[0]
		}
	}
	err := v.Extents(func(e vhd.Extent) error {
		if e.Stored {
			in.Allocation.DataBytes += uint64(e.Length)
		} else {
			in.Allocation.UnallocatedBytes += uint64(e.Length)
		}
		return nil
	})
	in.Allocation.AllocatedBlocks, in.Allocation.Blocks = v.AllocatedBlocks(), v.Blocks()
	return in, err
}

func uuid(b [16]byte) string {
	h := hex.EncodeToString(b[:])
	return h[:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:]
}

// WriteHuman prints the description for a person.
func (in *VHDInfo) WriteHuman(w io.Writer) error {
	p := func(k string, v any) { fmt.Fprintf(w, "%-22s %v\n", k+":", v) }
	p("image", in.Filename)
	p("file format", fmt.Sprintf("vpc (VHD, %s)", in.VHD.DiskType))
	p("virtual size", fmt.Sprintf("%d bytes", in.VirtualSize))
	if in.ClusterSize != 0 {
		p("block size", in.ClusterSize)
	}
	p("creator", in.VHD.CreatorApp)
	p("unique id", in.VHD.UniqueID)
	if in.VHD.DiskType == vhd.Differencing.String() {
		p("parent name", in.VHD.ParentName)
		p("parent unique id", in.VHD.ParentUniqueID)
		for _, l := range in.VHD.ParentLocators {
			p("parent locator", l)
		}
		if in.FullBackingFilename != "" {
			p("parent found at", in.FullBackingFilename)
		}
	}
	a := in.Allocation
	p("allocated blocks", fmt.Sprintf("%d of %d", a.AllocatedBlocks, a.Blocks))
	_, err := fmt.Fprintf(w, "%-22s %d bytes in sectors marked in the bitmaps (%d not stored here)\n", "data:", a.DataBytes, a.UnallocatedBytes)
	return err
}

// ImageInfo describes one image of a chain: *inspect.Info for qcow2,
// *VHDInfo for VHD, *RawInfo for a raw backing file.
type ImageInfo interface {
	WriteHuman(w io.Writer) error
}

// RawInfo describes a raw image at the bottom of a qcow2 chain, with
// qemu-img info's keys.
type RawInfo struct {
	VirtualSize uint64 `json:"virtual-size"`
	Filename    string `json:"filename"`
	Format      string `json:"format"`
	DirtyFlag   bool   `json:"dirty-flag"`
}

// WriteHuman prints the description for a person.
func (in *RawInfo) WriteHuman(w io.Writer) error {
	_, err := fmt.Fprintf(w, "%-22s %s\n%-22s %s\n%-22s %d bytes\n", "image:", in.Filename, "file format:", in.Format, "virtual size:", in.VirtualSize)
	return err
}

// InfoChain describes every image of c, top first, as qemu-img info
// --backing-chain does: each names its file, and the file found for its
// parent (full-backing-filename), which is the next one's filename.
func InfoChain(c *Chain) ([]ImageInfo, error) {
	var out []ImageInfo
	names := make([]string, len(c.Layers)) // as qemu-img names them
	for i, l := range c.Layers {
		if i == 0 {
			names[0] = l.Path
		}
		var parent string
		if i+1 < len(c.Layers) {
			var err error
			if parent, err = l.nameOfParent(names[i], c.Layers[i+1]); err != nil {
				return nil, fmt.Errorf("%s: %w", l.Path, err)
			}
			names[i+1] = parent
		}
		l := *l
		l.Path = names[i]
		switch l.Format {
		case Qcow2:
			in, err := inspect.InfoFile(l.f, l.size)
			if err != nil {
				return nil, fmt.Errorf("%s: %w", l.Path, err)
			}
			in.Filename, in.FullBackingFilename = l.Path, parent
			out = append(out, in)
		case VHD:
			in, err := InfoVHD(l.vhd)
			if err != nil {
				return nil, fmt.Errorf("%s: %w", l.Path, err)
			}
			in.Filename, in.FullBackingFilename = l.Path, parent
			out = append(out, in)
		default:
			out = append(out, &RawInfo{VirtualSize: uint64(l.VirtualSize), Filename: l.Path, Format: string(l.Format)})
		}
	}
	return out, nil
}

// nameOfParent is the name qemu-img gives the backing file p of the qcow2
// image l, l being named name: a relative backing name found in l's
// directory is appended to name's directory as it is written (qemu's
// path_combine: "sub/../q1.qcow2", not cleaned). A parent found elsewhere
// (absolute, or in --path), and a VHD's parent, which qemu-img does not
// open, are named by the path they were found at.
func (l *Layer) nameOfParent(name string, p *Layer) (string, error) {
	if l.Format != Qcow2 {
		return p.Path, nil
	}
	names, err := l.parentNames()
	if err != nil {
		return "", err
	}
	for _, n := range names {
		if !filepath.IsAbs(n) && filepath.Join(filepath.Dir(l.Path), n) == p.Path {
			return name[:strings.LastIndex(name, "/")+1] + n, nil
		}
	}
	return p.Path, nil
}

// MapVHD calls emit with each entry of the map of the VHD v, in guest
// order, merged as qemu-img map merges (inspect.MapMerger), as the BAT is
// walked: as qemu-img map does for vpc, stored sectors are data at their
// offset in the file (for a fixed disk, reading as zeros where the file has
// a hole, when holes can tell: qemu asks the file there, and not inside a
// dynamic disk's blocks); the rest reads as zeros in a dynamic disk, and
// comes from the parent (depth 1) in a differencing one. An error given
// with v (from DetectVHD) is returned as it is; an error from emit stops
// the walk and is returned.
func MapVHD(v *vhd.Reader, err error, holes inspect.Holes, emit func(inspect.MapEntry) error) error {
	if err != nil {
		return err
	}
	m := &inspect.MapMerger{Emit: emit}
	diff := v.Footer.DiskType == vhd.Differencing
	if v.Footer.DiskType != vhd.Fixed {
		holes = nil
	}
	err = v.Extents(func(e vhd.Extent) error {
		me := inspect.MapEntry{Start: uint64(e.Start), Length: uint64(e.Length)}
		switch {
		case e.Stored:
			return addStored(m, e, holes)
		case diff:
			me.Depth = 1
		default:
			me.Present, me.Zero = true, true
		}
		return m.Add(me)
	})
	if err != nil {
		return err
	}
	return m.Flush()
}

// addStored adds a stored extent, split where the file has holes.
func addStored(m *inspect.MapMerger, e vhd.Extent, holes inspect.Holes) error {
	for pos := int64(0); pos < e.Length; {
		data, end := true, e.HostOffset+e.Length
		if holes != nil {
			var err error
			if data, end, err = holes.DataAt(e.HostOffset+pos, e.HostOffset+e.Length); err != nil {
				return err
			}
		}
		n := end - (e.HostOffset + pos)
		if n <= 0 {
			n = e.Length - pos
		}
		off := uint64(e.HostOffset + pos)
		if err := m.Add(inspect.MapEntry{Start: uint64(e.Start + pos), Length: uint64(n), Present: true, Data: true, Zero: !data, Offset: &off}); err != nil {
			return err
		}
		pos += n
	}
	return nil
}

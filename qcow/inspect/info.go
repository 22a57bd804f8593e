package inspect

import (
	"fmt"
	"io"

	"github.com/xapi-project/xapi-qcow-tool/qcow"
)

// Info describes an image. Keys are those of qemu-img info --output=json
// where qemu has one; the rest (version, features, header-extensions,
// snapshot-count, allocation) are ours.
type Info struct {
	VirtualSize     uint64 `json:"virtual-size"`
	Filename        string `json:"filename"`
	ClusterSize     uint64 `json:"cluster-size"`
	Format          string `json:"format"`
	BackingFilename string `json:"backing-filename,omitempty"`
	BackingFormat   string `json:"backing-filename-format,omitempty"`
	// FullBackingFilename is where the backing file was found, when the
	// chain was opened (info --backing-chain); set by the caller.
	FullBackingFilename string         `json:"full-backing-filename,omitempty"`
	DirtyFlag           bool           `json:"dirty-flag"`
	FormatSpecific      FormatSpecific `json:"format-specific"`

	Version    uint32          `json:"version"`
	Features   Features        `json:"features"`
	Extensions []ExtensionInfo `json:"header-extensions"`
	Snapshots  uint32          `json:"snapshot-count"`
	Allocation Allocation      `json:"allocation"`
}

// FormatSpecific is qemu-img info's "format-specific" object for qcow2.
type FormatSpecific struct {
	Type string        `json:"type"`
	Data Qcow2Specific `json:"data"`
}

// Qcow2Specific is qemu-img info's "format-specific" → "data" for qcow2.
type Qcow2Specific struct {
	Compat          string `json:"compat"`
	CompressionType string `json:"compression-type"`
	LazyRefcounts   bool   `json:"lazy-refcounts"`
	RefcountBits    uint64 `json:"refcount-bits"`
	Corrupt         bool   `json:"corrupt"`
	ExtendedL2      bool   `json:"extended-l2"`
}

// Features lists the feature bits set in the header, by name.
type Features struct {
	Incompatible []Feature `json:"incompatible"`
	Compatible   []Feature `json:"compatible"`
	Autoclear    []Feature `json:"autoclear"`
}

// Feature is one set feature bit.
type Feature struct {
	Bit  uint8  `json:"bit"`
	Name string `json:"name"`
}

// ExtensionInfo is one header extension.
type ExtensionInfo struct {
	Type   string `json:"type"`
	Name   string `json:"name"`
	Length int    `json:"length"`
}

// Allocation summarises what the guest clusters hold. A cluster counts as
// data if any of it is data, else as zero if any of it reads as zero
// (extended L2 images describe 32 subclusters per cluster).
type Allocation struct {
	DataBytes           uint64 `json:"data-bytes"`
	ZeroBytes           uint64 `json:"zero-bytes"`
	UnallocatedBytes    uint64 `json:"unallocated-bytes"`
	DataClusters        uint64 `json:"data-clusters"`
	ZeroClusters        uint64 `json:"zero-clusters"`
	UnallocatedClusters uint64 `json:"unallocated-clusters"`
	CompressedClusters  uint64 `json:"compressed-clusters"`
}

// allocCounter builds an Allocation from pieces given in guest order.
type allocCounter struct {
	cs       uint64
	a        Allocation
	cur      uint64
	curKind  qcow.ExtentKind
	hasCur   bool
	clusters [3]uint64
}

func (c *allocCounter) add(p piece) {
	if p.length == 0 {
		return
	}
	switch p.kind {
	case qcow.ExtentData:
		c.a.DataBytes += p.length
		if p.compressed {
			c.a.CompressedClusters += (p.length + c.cs - 1) / c.cs
		}
	case qcow.ExtentZero:
		c.a.ZeroBytes += p.length
	default:
		c.a.UnallocatedBytes += p.length
	}
	first, last := p.start/c.cs, (p.start+p.length-1)/c.cs
	if c.hasCur && first == c.cur {
		c.curKind = min(c.curKind, p.kind) // data beats zero beats unallocated
		if last == first {
			return
		}
		c.clusters[c.curKind]++
		first++
	} else if c.hasCur {
		c.clusters[c.curKind]++
	}
	c.clusters[p.kind] += last - first
	c.cur, c.curKind, c.hasCur = last, p.kind, true
}

func (c *allocCounter) done() Allocation {
	if c.hasCur {
		c.clusters[c.curKind]++
		c.hasCur = false
	}
	c.a.DataClusters, c.a.ZeroClusters, c.a.UnallocatedClusters = c.clusters[qcow.ExtentData], c.clusters[qcow.ExtentZero], c.clusters[qcow.ExtentUnallocated]
	return c.a
}

// infoFromHeader fills everything the header says.
func infoFromHeader(h *qcow.Header) *Info {
	in := &Info{
		VirtualSize:     h.Size,
		ClusterSize:     h.ClusterSize(),
		Format:          "qcow2",
		BackingFilename: h.BackingFile,
		BackingFormat:   h.BackingFormat,
		DirtyFlag:       h.IncompatibleFeatures&qcow.IncompatDirty != 0,
		Version:         h.Version,
		Snapshots:       h.NbSnapshots,
		Extensions:      []ExtensionInfo{},
	}
	d := &in.FormatSpecific.Data
	in.FormatSpecific.Type = "qcow2"
	d.Compat = "1.1"
	if h.Version == 2 {
		d.Compat = "0.10"
	}
	d.CompressionType = "zlib"
	if h.CompressionType == qcow.CompressionZstd {
		d.CompressionType = "zstd"
	}
	d.LazyRefcounts = h.CompatibleFeatures&qcow.CompatLazyRefcounts != 0
	d.RefcountBits = h.RefcountBits()
	d.Corrupt = h.IncompatibleFeatures&qcow.IncompatCorrupt != 0
	d.ExtendedL2 = h.ExtendedL2()
	in.Features.Incompatible = featureList(h, qcow.FeatureIncompatible, h.IncompatibleFeatures)
	in.Features.Compatible = featureList(h, qcow.FeatureCompatible, h.CompatibleFeatures)
	in.Features.Autoclear = featureList(h, qcow.FeatureAutoclear, h.AutoclearFeatures)
	for _, e := range h.Extensions {
		in.Extensions = append(in.Extensions, ExtensionInfo{
			Type: fmt.Sprintf("%#08x", e.Type), Name: extensionName(e.Type), Length: len(e.Data),
		})
	}
	return in
}

// featureList names the set bits of one kind, preferring the image's own
// feature name table to the standard names.
func featureList(h *qcow.Header, kind qcow.FeatureKind, bits uint64) []Feature {
	out := []Feature{}
	for b := uint8(0); b < 64; b++ {
		if bits>>b&1 == 0 {
			continue
		}
		name := ""
		for _, tables := range [][]qcow.FeatureName{h.FeatureNames, qcow.StandardFeatureNames} {
			for _, f := range tables {
				if f.Kind == kind && f.Bit == b && name == "" {
					name = f.Name
				}
			}
		}
		if name == "" {
			name = fmt.Sprintf("unknown bit %d", b)
		}
		out = append(out, Feature{Bit: b, Name: name})
	}
	return out
}

func extensionName(t uint32) string {
	switch t {
	case qcow.ExtBackingFormat:
		return "backing file format"
	case qcow.ExtFeatureNameTable:
		return "feature name table"
	case qcow.ExtBitmaps:
		return "bitmaps"
	case qcow.ExtEncryptionHeader:
		return "full disk encryption header"
	case qcow.ExtExternalDataFile:
		return "external data file"
	}
	return "unknown"
}

// InfoFile describes the image in r (size bytes long).
func InfoFile(r io.ReaderAt, size int64) (*Info, error) {
	im, err := openImage(r, size)
	if err != nil {
		return nil, err
	}
	in := infoFromHeader(im.h)
	c := &allocCounter{cs: im.cs}
	if err := walkFile(im, func(p piece) error { c.add(p); return nil }); err != nil {
		return nil, err
	}
	in.Allocation = c.done()
	return in, nil
}

// WriteHuman prints the description for a person.
func (in *Info) WriteHuman(w io.Writer) error {
	d := in.FormatSpecific.Data
	p := func(k string, v any) { fmt.Fprintf(w, "%-22s %v\n", k+":", v) }
	p("image", in.Filename)
	p("file format", fmt.Sprintf("%s (version %d, compat %s)", in.Format, in.Version, d.Compat))
	p("virtual size", fmt.Sprintf("%s (%d bytes)", humanSize(in.VirtualSize), in.VirtualSize))
	p("cluster size", in.ClusterSize)
	p("refcount bits", d.RefcountBits)
	p("compression type", d.CompressionType)
	p("extended L2", d.ExtendedL2)
	p("lazy refcounts", d.LazyRefcounts)
	if in.BackingFilename != "" {
		bf := in.BackingFilename
		if in.BackingFormat != "" {
			bf += " (format " + in.BackingFormat + ")"
		}
		if in.FullBackingFilename != "" && in.FullBackingFilename != in.BackingFilename {
			bf += " (actual path: " + in.FullBackingFilename + ")"
		}
		p("backing file", bf)
	}
	p("snapshots", in.Snapshots)
	for _, f := range []struct {
		kind string
		list []Feature
	}{{"incompatible", in.Features.Incompatible}, {"compatible", in.Features.Compatible}, {"autoclear", in.Features.Autoclear}} {
		names := "none"
		for i, x := range f.list {
			if i == 0 {
				names = ""
			} else {
				names += ", "
			}
			names += fmt.Sprintf("%s (bit %d)", x.Name, x.Bit)
		}
		p(f.kind+" features", names)
	}
	if len(in.Extensions) == 0 {
		p("header extensions", "none")
	}
	for _, e := range in.Extensions {
		p("header extension", fmt.Sprintf("%s %s, %d bytes", e.Type, e.Name, e.Length))
	}
	a := in.Allocation
	p("data", fmt.Sprintf("%s in %d clusters (%d compressed)", humanSize(a.DataBytes), a.DataClusters, a.CompressedClusters))
	p("zero", fmt.Sprintf("%s in %d clusters", humanSize(a.ZeroBytes), a.ZeroClusters))
	_, err := fmt.Fprintf(w, "%-22s %s in %d clusters\n", "unallocated:", humanSize(a.UnallocatedBytes), a.UnallocatedClusters)
	return err
}

// humanSize prints a byte count in binary units, like qemu-img.
func humanSize(n uint64) string {
	units := []string{"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"}
	v, i := float64(n), 0
	for v >= 1024 && i < len(units)-1 {
		v /= 1024
		i++
	}
	if i == 0 {
		return fmt.Sprintf("%d B", n)
	}
	return fmt.Sprintf("%.3g %s", v, units[i])
}

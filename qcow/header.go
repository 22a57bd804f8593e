// Package qcow is the qcow2 format: the header and its extensions, the table
// entries, the layout of a streamed image, an encoder that writes an image
// front to back, and a decoder that reads one front to back.
//
// The package knows nothing about files, flags or processes: it reads from
// io.Reader and writes to io.Writer. docs/interop/qcow2.txt in qemu is the
// authority for every constant here.
package qcow

import (
	"encoding/binary"
)

// Magic is the four bytes that start every qcow2 image: "QFI\xfb".
const Magic = 0x514649fb

// Header sizes by version.
const (
	HeaderSizeV2 = 72
	HeaderSizeV3 = 104 // the minimum header_length of a version 3 image
	// HeaderLength is the header_length we write: 104 plus the compression
	// type byte, padded to a multiple of 8.
	HeaderLength = 112
)

// Limits qemu imposes; we impose the same ones so that anything we write or
// accept is also an image qemu can open.
const (
	MinClusterBits     = 9
	MaxClusterBits     = 21
	MaxL1Bytes         = 32 << 20 // QCOW_MAX_L1_SIZE
	MaxRefcountTable   = 8 << 20  // QCOW_MAX_REFTABLE_SIZE
	MaxHostOffset      = 1 << 56
	MaxRefcountOrder   = 6
	MaxBackingFileSize = 1023
)

// Incompatible feature bits.
const (
	IncompatDirty           = 1 << 0
	IncompatCorrupt         = 1 << 1
	IncompatExternalData    = 1 << 2
	IncompatCompressionType = 1 << 3
	IncompatExtendedL2      = 1 << 4
	// IncompatKnown is every incompatible bit this package understands.
	IncompatKnown = IncompatDirty | IncompatCorrupt | IncompatExternalData |
		IncompatCompressionType | IncompatExtendedL2
)

// Compatible and autoclear feature bits.
const (
	CompatLazyRefcounts = 1 << 0
	AutoclearBitmaps    = 1 << 0
	AutoclearRawData    = 1 << 1
)

// Compression types (header byte 104).
const (
	CompressionDeflate = 0
	CompressionZstd    = 1
)

// Header extension types.
const (
	ExtEnd               = 0x00000000
	ExtBackingFormat     = 0xe2792aca
	ExtFeatureNameTable  = 0x6803f857
	ExtBitmaps           = 0x23852875
	ExtEncryptionHeader  = 0x0537be77
	ExtExternalDataFile  = 0x44415441
	featureNameEntrySize = 48
)

// Header is the qcow2 image header (cluster 0) with its extensions and
// backing file name.
type Header struct {
	Version               uint32
	BackingFileOffset     uint64
	BackingFileSize       uint32
	ClusterBits           uint32
	Size                  uint64 // virtual size in bytes
	CryptMethod           uint32
	L1Size                uint32 // entries
	L1TableOffset         uint64
	RefcountTableOffset   uint64
	RefcountTableClusters uint32
	NbSnapshots           uint32
	SnapshotsOffset       uint64

	// Version 3 fields; for version 2 they read as their implied values
	// (refcount order 4, header length 72).
	IncompatibleFeatures uint64
	CompatibleFeatures   uint64
	AutoclearFeatures    uint64
	RefcountOrder        uint32
	HeaderLength         uint32
	CompressionType      uint8

	Extensions    []Extension
	BackingFile   string
	BackingFormat string // from the backing format extension, if any
	FeatureNames  []FeatureName
}

// Extension is one header extension as found in the image.
type Extension struct {
	Type uint32
	Data []byte
}

// FeatureKind is the kind of bit a FeatureName describes.
type FeatureKind uint8

// Feature kinds of the feature name table.
const (
	FeatureIncompatible FeatureKind = 0
	FeatureCompatible   FeatureKind = 1
	FeatureAutoclear    FeatureKind = 2
)

// FeatureName is one entry of the feature name table extension.
type FeatureName struct {
	Kind FeatureKind
	Bit  uint8
	Name string
}

// StandardFeatureNames are the names qemu gives the bits it knows.
var StandardFeatureNames = []FeatureName{
	{FeatureIncompatible, 0, "dirty bit"},
	{FeatureIncompatible, 1, "corrupt bit"},
	{FeatureIncompatible, 2, "external data file"},
	{FeatureIncompatible, 3, "compression type"},
	{FeatureIncompatible, 4, "extended L2 entries"},
	{FeatureCompatible, 0, "lazy refcounts"},
	{FeatureAutoclear, 0, "bitmaps"},
	{FeatureAutoclear, 1, "raw external data"},
}

// ClusterSize is the cluster size in bytes.
func (h *Header) ClusterSize() uint64 { return 1 << h.ClusterBits }

// ExtendedL2 reports whether L2 entries are 16 bytes with subclusters.
func (h *Header) ExtendedL2() bool { return h.IncompatibleFeatures&IncompatExtendedL2 != 0 }

// L2EntrySize is the size of one L2 entry in bytes.
func (h *Header) L2EntrySize() uint64 {
	if h.ExtendedL2() {
		return 16
	}
	return 8
}

// L2Entries is the number of entries in one L2 table.
func (h *Header) L2Entries() uint64 { return h.ClusterSize() / h.L2EntrySize() }

// RefcountBits is the width of one refcount entry.
func (h *Header) RefcountBits() uint64 { return 1 << h.RefcountOrder }

// VirtualClusters is the number of guest clusters, counting a partial last
// one.
func (h *Header) VirtualClusters() uint64 {
	return (h.Size + h.ClusterSize() - 1) >> h.ClusterBits
}

// ParseHeader decodes and validates a header from buf, which must hold at
// least the image's first cluster (or, when shorter, everything up to the end
// of the extensions and the backing file name). It checks every value that a
// reader would use, so a Header it returns is safe to act on: offsets are
// cluster aligned and below 2^56, sizes are within qemu's limits.
func ParseHeader(buf []byte) (*Header, error) {
	if len(buf) < HeaderSizeV2 {
		return nil, herr("", "image is %d bytes, shorter than a header", len(buf))
	}
	be := binary.BigEndian
	if m := be.Uint32(buf[0:]); m != Magic {
		return nil, herr("magic", "not a qcow2 image (magic %#08x)", m)
	}
	h := &Header{
		Version:               be.Uint32(buf[4:]),
		BackingFileOffset:     be.Uint64(buf[8:]),
		BackingFileSize:       be.Uint32(buf[16:]),
		ClusterBits:           be.Uint32(buf[20:]),
		Size:                  be.Uint64(buf[24:]),
		CryptMethod:           be.Uint32(buf[32:]),
		L1Size:                be.Uint32(buf[36:]),
		L1TableOffset:         be.Uint64(buf[40:]),
		RefcountTableOffset:   be.Uint64(buf[48:]),
		RefcountTableClusters: be.Uint32(buf[56:]),
		NbSnapshots:           be.Uint32(buf[60:]),
		SnapshotsOffset:       be.Uint64(buf[64:]),
		RefcountOrder:         4,
		HeaderLength:          HeaderSizeV2,
	}
	switch h.Version {
	case 2:
	case 3:
		if len(buf) < HeaderSizeV3 {
			return nil, herr("", "version 3 header truncated at %d bytes", len(buf))
		}
		h.IncompatibleFeatures = be.Uint64(buf[72:])
		h.CompatibleFeatures = be.Uint64(buf[80:])
		h.AutoclearFeatures = be.Uint64(buf[88:])
		h.RefcountOrder = be.Uint32(buf[96:])
		h.HeaderLength = be.Uint32(buf[100:])
		if h.HeaderLength < HeaderSizeV3 || h.HeaderLength%8 != 0 && h.HeaderLength != HeaderSizeV3 {
			return nil, herr("header_length", "%d is not a valid header length", h.HeaderLength)
		}
		if h.HeaderLength > 104 {
			if len(buf) < 105 {
				return nil, herr("", "header truncated")
			}
			h.CompressionType = buf[104]
		}
	default:
		return nil, herr("version", "version %d is not supported (only 2 and 3)", h.Version)
	}
	if h.ClusterBits < MinClusterBits || h.ClusterBits > MaxClusterBits {
		return nil, herr("cluster_bits", "%d is outside %d..%d", h.ClusterBits, MinClusterBits, MaxClusterBits)
	}
	cs := h.ClusterSize()
	if uint64(h.HeaderLength) > cs {
		return nil, herr("header_length", "%d is larger than a cluster", h.HeaderLength)
	}
	if h.CryptMethod != 0 {
		return nil, herr("crypt_method", "encrypted images are not supported (method %d)", h.CryptMethod)
	}
	if unknown := h.IncompatibleFeatures &^ IncompatKnown; unknown != 0 {
		return nil, herr("incompatible_features", "unknown incompatible feature bits %#x", unknown)
	}
	if h.IncompatibleFeatures&IncompatCorrupt != 0 {
		return nil, herr("incompatible_features", "image is marked corrupt")
	}
	if h.IncompatibleFeatures&IncompatExternalData != 0 {
		return nil, herr("incompatible_features", "images with an external data file are not supported")
	}
	if h.IncompatibleFeatures&IncompatCompressionType == 0 && h.CompressionType != CompressionDeflate {
		return nil, herr("compression_type", "type %d without the compression type feature bit", h.CompressionType)
	}
	if h.CompressionType > CompressionZstd {
		return nil, herr("compression_type", "unknown compression type %d", h.CompressionType)
	}
	if h.RefcountOrder > MaxRefcountOrder {
		return nil, herr("refcount_order", "%d is larger than %d", h.RefcountOrder, MaxRefcountOrder)
	}
	if h.ExtendedL2() && h.ClusterBits < 14 {
		return nil, herr("cluster_bits", "extended L2 entries need clusters of 16 KiB or more")
	}
	// Virtual size: the L1 table must be able to map it and fit qemu's limit.
	if h.Size > MaxHostOffset {
		return nil, herr("size", "virtual size %d is too large", h.Size)
	}
	l2Span := h.L2Entries() * cs
	needL1 := (h.Size + l2Span - 1) / l2Span
	if uint64(h.L1Size) < needL1 {
		return nil, herr("l1_size", "%d entries cannot map a virtual size of %d bytes (need %d)", h.L1Size, h.Size, needL1)
	}
	if uint64(h.L1Size)*8 > MaxL1Bytes {
		return nil, herr("l1_size", "%d entries exceed the 32 MiB L1 limit", h.L1Size)
	}
	if err := checkTableOffset("l1_table_offset", h.L1TableOffset, uint64(h.L1Size)*8, cs, h.L1Size == 0); err != nil {
		return nil, err
	}
	if h.RefcountTableClusters == 0 {
		return nil, herr("refcount_table_clusters", "is 0")
	}
	if uint64(h.RefcountTableClusters)*cs > MaxRefcountTable {
		return nil, herr("refcount_table_clusters", "%d clusters exceed the 8 MiB refcount table limit", h.RefcountTableClusters)
	}
	if err := checkTableOffset("refcount_table_offset", h.RefcountTableOffset, uint64(h.RefcountTableClusters)*cs, cs, false); err != nil {
		return nil, err
	}
	if err := h.checkSnapshotsField(); err != nil {
		return nil, err
	}
	if err := h.parseExtensions(buf); err != nil {
		return nil, err
	}
	if h.BackingFileOffset != 0 || h.BackingFileSize != 0 {
		if h.BackingFileSize > MaxBackingFileSize {
			return nil, herr("backing_file_size", "%d is longer than %d", h.BackingFileSize, MaxBackingFileSize)
		}
		end := h.BackingFileOffset + uint64(h.BackingFileSize)
		if h.BackingFileOffset < uint64(h.HeaderLength) || end > cs {
			return nil, herr("backing_file_offset", "backing file name at %d+%d is outside the first cluster", h.BackingFileOffset, h.BackingFileSize)
		}
		if end > uint64(len(buf)) {
			return nil, herr("backing_file_offset", "header truncated before the backing file name")
		}
		h.BackingFile = string(buf[h.BackingFileOffset:end])
	}
	return h, nil
}

// checkTableOffset validates a table's offset and length: cluster aligned,
// not in the header cluster, and ending below 2^56.
func checkTableOffset(field string, off, length, cs uint64, emptyOK bool) error {
	if emptyOK && off == 0 {
		return nil
	}
	if off%cs != 0 {
		return herr(field, "%#x is not aligned to the cluster size", off)
	}
	if off == 0 {
		return herr(field, "points into the header cluster")
	}
	if off >= MaxHostOffset || length > MaxHostOffset-off {
		return herr(field, "%#x is past the largest host offset", off)
	}
	return nil
}

// parseExtensions reads the header extensions of a version 3 image; version 2
// images may have them too, straight after the 72-byte header.
func (h *Header) parseExtensions(buf []byte) error {
	be := binary.BigEndian
	limit := h.ClusterSize()
	if uint64(len(buf)) < limit {
		limit = uint64(len(buf))
	}
	if h.BackingFileOffset > uint64(h.HeaderLength) && h.BackingFileOffset < limit {
		limit = h.BackingFileOffset
	}
	off := uint64(h.HeaderLength)
	for n := 0; ; n++ {
		if off+8 > limit {
			if h.Version == 2 {
				return nil // v2 images need no end marker before the backing name
			}
			return herr("extensions", "header extensions run past the first cluster")
		}
		typ, length := be.Uint32(buf[off:]), uint64(be.Uint32(buf[off+4:]))
		off += 8
		if typ == ExtEnd {
			return nil
		}
		if length > limit-off {
			return herr("extensions", "extension %#08x of %d bytes runs past the first cluster", typ, length)
		}
		data := buf[off : off+length]
		off += (length + 7) &^ 7
		h.Extensions = append(h.Extensions, Extension{Type: typ, Data: data})
		switch typ {
		case ExtBackingFormat:
			h.BackingFormat = string(data)
		case ExtFeatureNameTable:
			for i := 0; i+featureNameEntrySize <= len(data); i += featureNameEntrySize {
				name := data[i+2 : i+featureNameEntrySize]
				for j, c := range name {
					if c == 0 {
						name = name[:j]
						break
					}
				}
				h.FeatureNames = append(h.FeatureNames, FeatureName{FeatureKind(data[i]), data[i+1], string(name)})
			}
		case ExtEncryptionHeader:
			return herr("extensions", "encrypted images are not supported")
		case ExtExternalDataFile:
			return herr("extensions", "images with an external data file are not supported")
		}
		if off > limit {
			return herr("extensions", "header extensions run past the first cluster")
		}
	}
}

// MarshalCluster0 encodes h as the image's first cluster: the 112-byte
// version 3 header, the backing format extension when h names a backing
// file, as much of the feature name table as fits, the end marker and the
// backing file name. h.BackingFileOffset and h.BackingFileSize are computed.
func (h *Header) MarshalCluster0() ([]byte, error) {
	if h.Version != 3 {
		return nil, errorf("can only write version 3 headers")
	}
	cs := h.ClusterSize()
	buf := make([]byte, cs)
	be := binary.BigEndian
	off := uint64(HeaderLength)
	var exts []Extension
	if h.BackingFile != "" && h.BackingFormat != "" {
		exts = append(exts, Extension{ExtBackingFormat, []byte(h.BackingFormat)})
	}
	used := off + 8 + uint64(len(h.BackingFile)) // end marker and name
	for _, e := range exts {
		used += 8 + (uint64(len(e.Data))+7)&^7
	}
	if used > cs || len(h.BackingFile) > MaxBackingFileSize {
		return nil, errorf("backing file name of %d bytes does not fit in a %d-byte cluster", len(h.BackingFile), cs)
	}
	// The feature name table is informative: include as many entries as fit.
	if room := cs - used; room >= 8+featureNameEntrySize {
		n := (room - 8) / featureNameEntrySize
		names := h.FeatureNames
		if names == nil {
			names = StandardFeatureNames
		}
		if uint64(len(names)) < n {
			n = uint64(len(names))
		}
		t := make([]byte, n*featureNameEntrySize)
		for i, f := range names[:n] {
			t[i*featureNameEntrySize] = byte(f.Kind)
			t[i*featureNameEntrySize+1] = f.Bit
			copy(t[i*featureNameEntrySize+2:(i+1)*featureNameEntrySize], f.Name)
		}
		exts = append(exts, Extension{ExtFeatureNameTable, t})
	}
	for _, e := range exts {
		be.PutUint32(buf[off:], e.Type)
		be.PutUint32(buf[off+4:], uint32(len(e.Data)))
		copy(buf[off+8:], e.Data)
		off += 8 + (uint64(len(e.Data))+7)&^7
	}
	off += 8 // end of extensions: already zero
	h.HeaderLength = HeaderLength
	h.BackingFileOffset, h.BackingFileSize = 0, 0
	if h.BackingFile != "" {
		h.BackingFileOffset, h.BackingFileSize = off, uint32(len(h.BackingFile))
		copy(buf[off:], h.BackingFile)
	}
	be.PutUint32(buf[0:], Magic)
	be.PutUint32(buf[4:], h.Version)
	be.PutUint64(buf[8:], h.BackingFileOffset)
	be.PutUint32(buf[16:], h.BackingFileSize)
	be.PutUint32(buf[20:], h.ClusterBits)
	be.PutUint64(buf[24:], h.Size)
	be.PutUint32(buf[32:], h.CryptMethod)
	be.PutUint32(buf[36:], h.L1Size)
	be.PutUint64(buf[40:], h.L1TableOffset)
	be.PutUint64(buf[48:], h.RefcountTableOffset)
	be.PutUint32(buf[56:], h.RefcountTableClusters)
	be.PutUint32(buf[60:], h.NbSnapshots)
	be.PutUint64(buf[64:], h.SnapshotsOffset)
	be.PutUint64(buf[72:], h.IncompatibleFeatures)
	be.PutUint64(buf[80:], h.CompatibleFeatures)
	be.PutUint64(buf[88:], h.AutoclearFeatures)
	be.PutUint32(buf[96:], h.RefcountOrder)
	be.PutUint32(buf[100:], h.HeaderLength)
	buf[104] = h.CompressionType
	return buf, nil
}

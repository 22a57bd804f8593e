// Package vhd reads the metadata of VHD images (Microsoft's Virtual Hard
// Disk format, as XenServer's blktap writes it): the footer, the dynamic
// disk header, the block allocation table, the per-block sector bitmaps and
// the parent locators of differencing disks. It answers which sectors an
// image stores and where its parent is; it never reads the guest data.
//
// Like archive/tar, a Reader works over an io.ReaderAt and reports damage
// with typed errors; every allocation driven by the image is bounded.
package vhd

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"strings"
	"unicode/utf16"
)

var be = binary.BigEndian

// Sizes and limits of the format.
const (
	SectorSize = 512
	FooterSize = 512
	HeaderSize = 1024

	// MaxTableEntries bounds the block allocation table read into memory
	// (4 bytes an entry: 64 MiB), which covers 32 TiB in 2 MiB blocks.
	MaxTableEntries = 16 << 20
	// MinBlockSize is the smallest block the specification allows (its
	// sectors per block are a power of two): blktap and qemu write 2 MiB,
	// libvhdi reads any. Every power of two from here to the largest a
	// uint32 holds (2 GiB, a 512 KiB bitmap) is accepted.
	MinBlockSize = SectorSize
	// MaxLocatorBytes bounds the platform data of a parent locator read
	// into memory: a path, at most a few KiB in practice.
	MaxLocatorBytes = 64 << 10
)

var (
	footerCookie = []byte("conectix")
	headerCookie = []byte("cxsparse")
)

// DiskType is the footer's disk type.
type DiskType uint32

// Disk types.
const (
	Fixed        DiskType = 2
	Dynamic      DiskType = 3
	Differencing DiskType = 4
)

func (t DiskType) String() string {
	switch t {
	case Fixed:
		return "fixed"
	case Dynamic:
		return "dynamic"
	case Differencing:
		return "differencing"
	}
	return fmt.Sprintf("DiskType(%d)", uint32(t))
}

// ErrNotVHD is returned when no VHD footer is found.
var ErrNotVHD = errors.New("not a VHD image (no \"conectix\" footer at its start or end)")

// FormatError reports a VHD image the reader refuses: which structure, at
// which offset of the file, and why.
type FormatError struct {
	Offset int64  `json:"offset"`
	What   string `json:"what"` // "footer", "dynamic header", "BAT", ...
	Reason string `json:"reason"`
}

func (e *FormatError) Error() string {
	return fmt.Sprintf("VHD %s at offset %#x: %s", e.What, e.Offset, e.Reason)
}

func formatErr(off int64, what, format string, args ...any) error {
	return &FormatError{Offset: off, What: what, Reason: fmt.Sprintf(format, args...)}
}

// Footer is the 512-byte structure at the end of every VHD (and, for
// dynamic and differencing disks, copied at its start).
type Footer struct {
	Features       uint32
	Version        uint32
	DataOffset     uint64 // the dynamic header; all ones for a fixed disk
	Timestamp      uint32 // seconds since 2000-01-01 UTC
	CreatorApp     string
	CreatorVersion uint32 // major<<16 | minor
	OriginalSize   uint64
	CurrentSize    uint64 // the virtual size in bytes
	DiskType       DiskType
	Checksum       uint32
	UniqueID       [16]byte
	SavedState     bool
	// Hidden is blktap's hidden flag (the byte after the saved state).
	Hidden byte
	// ChecksumWithoutHidden: the checksum matches only with the hidden
	// flag counted as zero, as early tapdisk (tap 0.1 and 1.1) left it
	// when it hid an image; blktap's libvhd accepts it.
	ChecksumWithoutHidden bool

	raw [FooterSize]byte
}

// Offsets of footer fields.
const (
	footerChecksumAt = 64
	footerHiddenAt   = 85
)

// tapVersion is blktap's creator version for major.minor.
func tapVersion(major, minor uint32) uint32 { return major<<16 | minor }

// tapdisk reports whether blktap's tapdisk wrote the image (creator
// application "tap"), which decides its quirks.
func (f *Footer) tapdisk() bool { return f.CreatorApp == "tap" }

// earlyTapdisk is tap 0.1 or 1.1, which set the hidden flag without
// recomputing the checksum.
func (f *Footer) earlyTapdisk() bool {
	return f.tapdisk() && (f.CreatorVersion == tapVersion(0, 1) || f.CreatorVersion == tapVersion(1, 1))
}

// LSBBitmaps reports whether the sector bitmaps are read least
// significant bit first in 32-bit little-endian words, as blktap's libvhd
// reads the images of tap 0.1; every other writer puts the first sector in
// the most significant bit of the first byte.
func (f *Footer) LSBBitmaps() bool { return f.tapdisk() && f.CreatorVersion == tapVersion(0, 1) }

// HasBatmap reports whether the image carries blktap's batmap (a bitmap of
// fully allocated blocks after the BAT): tap 1.2 and later always, tap 1.1
// when its header is there.
func (f *Footer) HasBatmap() (always, maybe bool) {
	if !f.tapdisk() || f.DiskType == Fixed || f.CreatorVersion <= tapVersion(0, 1) {
		return false, false
	}
	return f.CreatorVersion >= tapVersion(1, 2), true
}

// checksum is the one's complement of the sum of the bytes of b, the
// checksum field (4 bytes at skip) counted as zeros.
func checksum(b []byte, skip int) uint32 {
	var s uint32
	for i, c := range b {
		if i >= skip && i < skip+4 {
			continue
		}
		s += uint32(c)
	}
	return ^s
}

// ParseFooter decodes and checks a footer read at off (off only names the
// place in errors).
func ParseFooter(b []byte, off int64) (*Footer, error) {
	if len(b) < FooterSize || !bytes.Equal(b[:8], footerCookie) {
		return nil, ErrNotVHD
	}
	f := &Footer{
		Features:       be.Uint32(b[8:]),
		Version:        be.Uint32(b[12:]),
		DataOffset:     be.Uint64(b[16:]),
		Timestamp:      be.Uint32(b[24:]),
		CreatorApp:     strings.TrimRight(string(b[28:32]), "\x00 "),
		CreatorVersion: be.Uint32(b[32:]),
		OriginalSize:   be.Uint64(b[40:]),
		CurrentSize:    be.Uint64(b[48:]),
		DiskType:       DiskType(be.Uint32(b[60:])),
		Checksum:       be.Uint32(b[footerChecksumAt:]),
		SavedState:     b[84] != 0,
		Hidden:         b[footerHiddenAt],
	}
	copy(f.UniqueID[:], b[68:84])
	copy(f.raw[:], b)
	if sum := checksum(b[:FooterSize], footerChecksumAt); sum != f.Checksum {
		if !f.earlyTapdisk() || f.Hidden == 0 || sum+uint32(f.Hidden) != f.Checksum {
			return nil, formatErr(off, "footer", "bad checksum %#08x (the footer sums to %#08x)", f.Checksum, sum)
		}
		f.ChecksumWithoutHidden = true
	}
	if f.Version>>16 != 1 {
		return nil, formatErr(off, "footer", "file format version %#08x is not 1.x", f.Version)
	}
	switch f.DiskType {
	case Fixed, Dynamic, Differencing:
	default:
		return nil, formatErr(off, "footer", "disk type %d is not fixed (2), dynamic (3) or differencing (4)", uint32(f.DiskType))
	}
	if f.CurrentSize%SectorSize != 0 {
		return nil, formatErr(off, "footer", "current size %d is not a whole number of sectors", f.CurrentSize)
	}
	return f, nil
}

// Locator platform codes (the parent locator's platform code field).
const (
	PlatformNone = 0
	PlatformWi2r = 0x57693272 // "Wi2r": relative Windows path, deprecated
	PlatformWi2k = 0x5769326b // "Wi2k": absolute Windows path, deprecated
	PlatformW2ru = 0x57327275 // "W2ru": relative Windows path, UTF-16LE
	PlatformW2ku = 0x57326b75 // "W2ku": absolute Windows path, UTF-16LE
	PlatformMac  = 0x4d616320 // "Mac ": Mac OS alias blob
	PlatformMacX = 0x4d616358 // "MacX": file URL, UTF-8 (what blktap writes)
)

// Locator is one of the eight parent locator entries of the dynamic header.
type Locator struct {
	Code       uint32
	DataSpace  uint32 // sectors (some writers put bytes here)
	DataLength uint32 // bytes
	DataOffset uint64
}

// Header is the dynamic disk header of dynamic and differencing disks.
type Header struct {
	TableOffset     uint64
	Version         uint32
	MaxTableEntries uint32
	BlockSize       uint32
	Checksum        uint32
	ParentUniqueID  [16]byte
	ParentTimestamp uint32
	ParentName      string // decoded from UTF-16BE
	Locators        [8]Locator
}

// ParseHeader decodes and checks a dynamic header read at off.
func ParseHeader(b []byte, off int64) (*Header, error) {
	if len(b) < HeaderSize || !bytes.Equal(b[:8], headerCookie) {
		return nil, formatErr(off, "dynamic header", "bad cookie %q (want \"cxsparse\")", printable(b[:min(len(b), 8)]))
	}
	h := &Header{
		TableOffset:     be.Uint64(b[16:]),
		Version:         be.Uint32(b[24:]),
		MaxTableEntries: be.Uint32(b[28:]),
		BlockSize:       be.Uint32(b[32:]),
		Checksum:        be.Uint32(b[36:]),
		ParentTimestamp: be.Uint32(b[56:]),
		ParentName:      decodeUTF16(b[64:576], binary.BigEndian),
	}
	copy(h.ParentUniqueID[:], b[40:56])
	for i := range h.Locators {
		e := b[576+24*i:]
		h.Locators[i] = Locator{Code: be.Uint32(e), DataSpace: be.Uint32(e[4:]), DataLength: be.Uint32(e[8:]), DataOffset: be.Uint64(e[16:])}
	}
	if sum := checksum(b[:HeaderSize], 36); sum != h.Checksum {
		return nil, formatErr(off, "dynamic header", "bad checksum %#08x (the header sums to %#08x)", h.Checksum, sum)
	}
	if h.Version>>16 != 1 {
		return nil, formatErr(off, "dynamic header", "header version %#08x is not 1.x", h.Version)
	}
	if bs := h.BlockSize; bs < MinBlockSize || bs&(bs-1) != 0 {
		return nil, formatErr(off, "dynamic header", "block size %d is not a power of two of at least %d bytes (the specification's sectors per block are a power of two)", bs, MinBlockSize)
	}
	if h.MaxTableEntries > MaxTableEntries {
		return nil, formatErr(off, "dynamic header", "%d BAT entries is more than the %d this reader holds", h.MaxTableEntries, MaxTableEntries)
	}
	if h.TableOffset%SectorSize != 0 {
		return nil, formatErr(off, "dynamic header", "BAT offset %#x is not sector aligned", h.TableOffset)
	}
	return h, nil
}

// decodeUTF16 decodes a NUL-terminated UTF-16 string in the given order.
func decodeUTF16(b []byte, order binary.ByteOrder) string {
	u := make([]uint16, 0, len(b)/2)
	for i := 0; i+1 < len(b); i += 2 {
		c := order.Uint16(b[i:])
		if c == 0 {
			break
		}
		u = append(u, c)
	}
	return string(utf16.Decode(u))
}

// LocatorPath decodes the platform data of a locator into a path, as
// written by blktap (MacX: "file://./name.vhd"), Windows (W2ru, W2ku:
// UTF-16LE, backslashes) and older writers (Wi2r, Wi2k: ASCII). ok is false
// for codes that name no path.
func LocatorPath(code uint32, data []byte) (path string, ok bool) {
	switch code {
	case PlatformMacX:
		s := string(bytes.TrimRight(data, "\x00"))
		if i := strings.IndexByte(s, 0); i >= 0 {
			s = s[:i]
		}
		s = strings.TrimPrefix(s, "file://")
		return s, s != ""
	case PlatformW2ru, PlatformW2ku:
		s := decodeUTF16(data, binary.LittleEndian)
		return windowsPath(s), s != ""
	case PlatformWi2r, PlatformWi2k:
		s := string(data)
		if i := strings.IndexByte(s, 0); i >= 0 {
			s = s[:i]
		}
		return windowsPath(s), s != ""
	}
	return "", false
}

// windowsPath turns ".\name.vhd" or "C:\dir\name.vhd" into a slash path;
// a drive letter cannot be resolved here, so only the file name is kept.
func windowsPath(s string) string {
	s = strings.ReplaceAll(s, `\`, "/")
	if len(s) >= 2 && s[1] == ':' {
		if i := strings.LastIndexByte(s, '/'); i >= 0 {
			return s[i+1:]
		}
		return s[2:]
	}
	return s
}

func printable(b []byte) string {
	return strings.Map(func(r rune) rune {
		if r < 0x20 || r > 0x7e {
			return '.'
		}
		return r
	}, string(b))
}

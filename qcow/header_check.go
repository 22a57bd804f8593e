package qcow

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
)

// ParseHeaderForCheck is ParseHeader for a structural check, which must
// look at images that qemu-img check opens although no import accepts them:
// an image marked corrupt, whose refcount table is missing or starts at
// offset 0, or whose data is in an external data file. The header is
// returned with those fields as found, and each of these conditions is
// named in notes; anything else ParseHeader refuses is refused.
func ParseHeaderForCheck(buf []byte) (h *Header, notes []string, err error) {
	if len(buf) < HeaderSizeV2 {
		h, err = ParseHeader(buf)
		return h, nil, err
	}
	be := binary.BigEndian
	b := bytes.Clone(buf)
	version := be.Uint32(b[4:])
	corrupt := version == 3 && len(b) >= HeaderSizeV3 && be.Uint64(b[72:])&IncompatCorrupt != 0
	rtOffset, rtClusters := be.Uint64(b[48:]), be.Uint32(b[56:])
	if corrupt {
		be.PutUint64(b[72:], be.Uint64(b[72:])&^IncompatCorrupt)
		notes = append(notes, "the image is marked corrupt")
	}
	if rtClusters == 0 {
		be.PutUint32(b[56:], 1)
		notes = append(notes, "the image has no refcount table")
	}
	if rtOffset == 0 {
		// Any aligned offset past the header passes ParseHeader; the
		// real one is put back below.
		if cb := be.Uint32(b[20:]); cb >= MinClusterBits && cb <= MaxClusterBits {
			be.PutUint64(b[48:], 1<<cb)
		}
		notes = append(notes, "the refcount table is at offset 0, in the header")
	}
	external := version == 3 && len(b) >= HeaderSizeV3 && be.Uint64(b[72:])&IncompatExternalData != 0
	if external {
		be.PutUint64(b[72:], be.Uint64(b[72:])&^IncompatExternalData)
		hideExternalDataExt(b)
		notes = append(notes, "the data is in an external data file, which is not checked")
	}
	if h, err = ParseHeader(b); err != nil {
		return nil, nil, err
	}
	if external {
		h.IncompatibleFeatures |= IncompatExternalData
		for i := range h.Extensions {
			if h.Extensions[i].Type == hiddenExt {
				h.Extensions[i].Type = ExtExternalDataFile
			}
		}
	}
	if corrupt {
		h.IncompatibleFeatures |= IncompatCorrupt
	}
	h.RefcountTableOffset, h.RefcountTableClusters = rtOffset, rtClusters
	// Slices of the header point into our copy: that is fine, it is ours.
	return h, notes, nil
}

// hiddenExt stands for the external data file extension while ParseHeader,
// which refuses it, reads the header: a type no specification uses.
const hiddenExt = 0xffffffff

// hideExternalDataExt renames the external data file extensions of the
// version 3 header cluster b.
func hideExternalDataExt(b []byte) {
	be := binary.BigEndian
	off := uint64(be.Uint32(b[100:]))
	for off+8 <= uint64(len(b)) {
		typ, n := be.Uint32(b[off:]), uint64(be.Uint32(b[off+4:]))
		if typ == ExtEnd {
			return
		}
		if typ == ExtExternalDataFile {
			be.PutUint32(b[off:], hiddenExt)
		}
		off += 8 + (n+7)&^7
	}
}

// ReadHeaderForCheck is ReadHeader with ParseHeaderForCheck's leniency:
// where ReadHeader refuses the header, cluster 0 is judged again by
// ParseHeaderForCheck; if that refuses it too, ReadHeader's error stands.
func ReadHeaderForCheck(r io.ReaderAt, size int64) (*Header, []string, error) {
	h, err := ReadHeader(r, size)
	var he *HeaderError
	if err == nil || !errors.As(err, &he) {
		return h, nil, err
	}
	var first [HeaderSizeV2]byte
	if readAtFull(r, size, first[:]) != nil {
		return nil, nil, err
	}
	cb := binary.BigEndian.Uint32(first[20:])
	if cb < MinClusterBits || cb > MaxClusterBits {
		return nil, nil, err
	}
	buf := make([]byte, 1<<cb)
	if readAtFull(r, size, buf) != nil {
		return nil, nil, err
	}
	h, notes, perr := ParseHeaderForCheck(buf)
	if perr != nil {
		return nil, nil, err
	}
	return h, notes, nil
}

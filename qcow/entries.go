package qcow

// Table entries are named types so that the bit layout of each lives in one
// place and readers can ask questions of an entry rather than mask it.

const (
	entryCopied     = uint64(1) << 63
	entryCompressed = uint64(1) << 62
	entryZero       = uint64(1) << 0
	offsetMask      = uint64(0x00fffffffffffe00) // bits 9-55
	// reservedL1 and reservedL2 are the bits that must be zero.
	reservedL1 = ^(entryCopied | offsetMask)
	reservedL2 = ^(entryCopied | entryCompressed | offsetMask | entryZero)
)

// L1Entry is one entry of the L1 table: it points at an L2 table.
type L1Entry uint64

// MakeL1Entry returns an entry pointing at an L2 table at offset with
// refcount 1 (COPIED set).
func MakeL1Entry(offset uint64) L1Entry { return L1Entry(offset&offsetMask | entryCopied) }

// Offset is the host offset of the L2 table, 0 when unallocated.
func (e L1Entry) Offset() uint64 { return uint64(e) & offsetMask }

// Copied reports the COPIED flag (refcount exactly 1).
func (e L1Entry) Copied() bool { return uint64(e)&entryCopied != 0 }

// Reserved returns the bits that must be zero.
func (e L1Entry) Reserved() uint64 { return uint64(e) & reservedL1 }

// L2Entry is one (standard) L2 table entry: it describes one guest cluster.
type L2Entry uint64

// MakeL2Entry returns an entry for a standard data cluster at offset with
// refcount 1.
func MakeL2Entry(offset uint64) L2Entry { return L2Entry(offset&offsetMask | entryCopied) }

// ZeroL2Entry is an unallocated cluster that reads as zeros (version 3).
const ZeroL2Entry = L2Entry(entryZero)

// Compressed reports whether the cluster is stored compressed.
func (e L2Entry) Compressed() bool { return uint64(e)&entryCompressed != 0 }

// Copied reports the COPIED flag.
func (e L2Entry) Copied() bool { return uint64(e)&entryCopied != 0 }

// Zero reports the reads-as-zero flag of a standard entry.
func (e L2Entry) Zero() bool { return !e.Compressed() && uint64(e)&entryZero != 0 }

// Offset is the host offset of a standard cluster, 0 when unallocated.
func (e L2Entry) Offset() uint64 {
	if e.Compressed() {
		return 0
	}
	return uint64(e) & offsetMask
}

// Reserved returns the bits of a standard entry that must be zero.
func (e L2Entry) Reserved() uint64 {
	if e.Compressed() {
		return 0
	}
	return uint64(e) & reservedL2
}

// CompressedExtent decodes a compressed cluster descriptor: the host byte
// offset of the compressed data and an upper bound of its length. The bytes
// may start anywhere and may cross a cluster boundary.
func (e L2Entry) CompressedExtent(clusterBits uint32) (offset, length uint64) {
	x := 62 - (clusterBits - 8)
	desc := uint64(e) & (entryCompressed - 1)
	offset = desc & (uint64(1)<<x - 1)
	sectors := desc >> x // additional 512-byte sectors
	// The descriptor counts sectors from the sector holding offset.
	length = (sectors+1)*512 - offset%512
	return offset, length
}

// SubclusterBitmap is the second half of an extended L2 entry: bits 0-31
// say which subclusters are allocated, bits 32-63 which read as zero.
type SubclusterBitmap uint64

// Allocated reports whether subcluster i holds data.
func (b SubclusterBitmap) Allocated(i uint) bool { return uint64(b)>>i&1 != 0 }

// ReadsZero reports whether subcluster i reads as zero.
func (b SubclusterBitmap) ReadsZero(i uint) bool { return uint64(b)>>(32+i)&1 != 0 }

// Invalid reports a subcluster both allocated and zero, which qemu refuses.
func (b SubclusterBitmap) Invalid() bool { return uint64(b)&(uint64(b)>>32)&0xffffffff != 0 }

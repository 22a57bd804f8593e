package qcow

import (
	"fmt"
)

// Layout is where every part of a streamed image lives. A streamed image is
// written in the order of the reference exporter (qcow2-to-stdout.py), which
// xapi's streaming importers rely on:
//
//	cluster 0            header, extensions, backing file name
//	RefcountTable        refcount table
//	RefcountBlocks       refcount blocks (counting every cluster, themselves too)
//	L1Table              L1 table
//	L2Tables             the non-empty L2 tables, in guest order
//	Data                 the data clusters, packed in guest order
//
// Every cluster of the image is used exactly once, so every refcount is 1.
type Layout struct {
	VirtualSize   uint64
	ClusterBits   uint32
	RefcountOrder uint32

	L1Entries            uint64 // entries in the L1 table
	RefcountTableOffset  uint64
	RefcountTableCluster uint64 // clusters in the refcount table
	RefcountBlockOffset  uint64
	RefcountBlocks       uint64 // number of refcount blocks
	L1Offset             uint64
	L1Clusters           uint64
	L2Offset             uint64
	L2Tables             uint64
	DataOffset           uint64
	DataClusters         uint64
	TotalClusters        uint64 // the image's length in clusters
}

// ClusterSize is the cluster size in bytes.
func (l *Layout) ClusterSize() uint64 { return 1 << l.ClusterBits }

// Size is the length of the whole image in bytes.
func (l *Layout) Size() uint64 { return l.TotalClusters << l.ClusterBits }

// L1EntriesFor is the number of L1 entries needed to map virtualSize bytes.
func L1EntriesFor(virtualSize uint64, clusterBits uint32) uint64 {
	span := uint64(1) << (2*clusterBits - 3) // L2 entries * cluster size
	return (virtualSize + span - 1) / span
}

// SmallestClusterBitsFor returns the smallest cluster_bits whose L1 table
// for virtualSize fits qemu's 32 MiB limit, or 0 if none does.
func SmallestClusterBitsFor(virtualSize uint64) uint32 {
	for b := uint32(MinClusterBits); b <= MaxClusterBits; b++ {
		if L1EntriesFor(virtualSize, b)*8 <= MaxL1Bytes {
			return b
		}
	}
	return 0
}

// PlanLayout computes the layout of an image of virtualSize bytes holding
// dataClusters data clusters and l2Tables non-empty L2 tables. The refcount
// structures count themselves, so their size is found as a fixed point.
func PlanLayout(virtualSize uint64, clusterBits, refcountOrder uint32, l2Tables, dataClusters uint64) (*Layout, error) {
	if clusterBits < MinClusterBits || clusterBits > MaxClusterBits {
		return nil, errorf("cluster size %d is outside 512 bytes..2 MiB", uint64(1)<<clusterBits)
	}
	if refcountOrder > MaxRefcountOrder {
		return nil, errorf("refcount width %d is larger than 64 bits", uint64(1)<<refcountOrder)
	}
	cs := uint64(1) << clusterBits
	l := &Layout{VirtualSize: virtualSize, ClusterBits: clusterBits, RefcountOrder: refcountOrder,
		L2Tables: l2Tables, DataClusters: dataClusters}
	l.L1Entries = L1EntriesFor(virtualSize, clusterBits)
	if l.L1Entries*8 > MaxL1Bytes {
		msg := fmt.Sprintf("a %d-byte disk needs an L1 table of %d entries with %d-byte clusters, more than qemu's limit of %d",
			virtualSize, l.L1Entries, cs, MaxL1Bytes/8)
		if b := SmallestClusterBitsFor(virtualSize); b != 0 {
			msg += fmt.Sprintf("; use a cluster size of %d bytes or more", uint64(1)<<b)
		}
		return nil, fmt.Errorf("%w: %s", ErrTooLarge, msg)
	}
	if maxL2 := l.L1Entries; l2Tables > maxL2 {
		return nil, errorf("%d L2 tables for an L1 table of %d entries", l2Tables, maxL2)
	}
	if maxData := (virtualSize + cs - 1) / cs; dataClusters > maxData {
		return nil, errorf("%d data clusters for a disk of %d clusters", dataClusters, maxData)
	}
	l.L1Clusters = (l.L1Entries*8 + cs - 1) / cs
	perBlock := cs * 8 >> refcountOrder // refcounts per refcount block
	perTable := cs / 8                  // refcount block pointers per table cluster
	fixed := 1 + l.L1Clusters + l2Tables + dataClusters
	var rt, rb uint64 = 1, 1
	for {
		total := fixed + rt + rb
		nrb := (total + perBlock - 1) / perBlock
		nrt := (nrb + perTable - 1) / perTable
		if nrb == rb && nrt == rt {
			break
		}
		// Both only grow, so the loop ends: each pass either grows one of
		// them or stops.
		rb, rt = max(rb, nrb), max(rt, nrt)
	}
	if rt*cs > MaxRefcountTable {
		return nil, fmt.Errorf("%w: refcount table of %d clusters exceeds qemu's 8 MiB limit; use a larger cluster size", ErrTooLarge, rt)
	}
	l.RefcountTableCluster, l.RefcountBlocks = rt, rb
	l.RefcountTableOffset = cs
	l.RefcountBlockOffset = l.RefcountTableOffset + rt*cs
	l.L1Offset = l.RefcountBlockOffset + rb*cs
	l.L2Offset = l.L1Offset + l.L1Clusters*cs
	l.DataOffset = l.L2Offset + l2Tables*cs
	l.TotalClusters = fixed + rt + rb
	if l.Size() >= MaxHostOffset {
		return nil, fmt.Errorf("%w: image of %d bytes exceeds the largest host offset", ErrTooLarge, l.Size())
	}
	return l, nil
}

// Header returns the image header for the layout.
func (l *Layout) Header() *Header {
	return &Header{
		Version:               3,
		ClusterBits:           l.ClusterBits,
		Size:                  l.VirtualSize,
		L1Size:                uint32(l.L1Entries),
		L1TableOffset:         l.L1Offset,
		RefcountTableOffset:   l.RefcountTableOffset,
		RefcountTableClusters: uint32(l.RefcountTableCluster),
		RefcountOrder:         l.RefcountOrder,
		HeaderLength:          HeaderLength,
	}
}

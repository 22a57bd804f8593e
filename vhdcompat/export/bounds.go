package export

import (
	"fmt"

	"github.com/xapi-project/xapi-qcow-tool/qcow"
)

// maxClusters bounds the clusters of an export: its allocation bitmap (and
// a changed-block bitmap beside it) holds one bit per cluster, 64 MiB at
// this bound (docs/RELIABILITY.md, "Resource bounds"): 2 TiB of 4 KiB
// clusters, 32 TiB of the default 64 KiB.
const maxClusters = 1 << 29

// checkClusters refuses a disk with more clusters than maxClusters, naming
// the cluster size that fits.
func checkClusters(clusters, virtualSize uint64, clusterBits uint32) error {
	if clusters <= maxClusters {
		return nil
	}
	msg := fmt.Sprintf("a %d-byte disk has %d clusters of %d bytes, more than the %d whose bitmap the export holds in memory",
		virtualSize, clusters, uint64(1)<<clusterBits, maxClusters)
	for b := clusterBits + 1; b <= qcow.MaxClusterBits; b++ {
		if (virtualSize+1<<b-1)>>b <= maxClusters {
			msg += fmt.Sprintf("; use a cluster size of %d bytes or more", uint64(1)<<b)
			break
		}
	}
	return fmt.Errorf("%w: %s", qcow.ErrTooLarge, msg)
}

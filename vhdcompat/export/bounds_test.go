package export

import (
	"errors"
	"strings"
	"testing"

	"github.com/xapi-project/xapi-qcow-tool/qcow"
)

func TestCheckClusters(t *testing.T) {
	if err := checkClusters(maxClusters, maxClusters<<12, 12); err != nil {
		t.Fatalf("2 TiB of 4 KiB clusters refused: %v", err)
	}
	err := checkClusters(maxClusters+1, (maxClusters+1)<<12, 12)
	if !errors.Is(err, qcow.ErrTooLarge) || !strings.Contains(err.Error(), "use a cluster size of 8192 bytes or more") {
		t.Fatalf("one cluster more: %v", err)
	}
}

package vhdcompat

import (
	"fmt"
	"math"
	"os"
	"runtime/debug"
	"sync"

	"github.com/xapi-project/xapi-qcow-tool/qcow"
	"golang.org/x/sys/unix"
)

// MemoryLimit is the Go memory limit set at start-up (SetMemoryLimit): the
// sum of the bounds every input is held to (docs/RELIABILITY.md, "Resource
// bounds") with room for the collector, so that it collects before the
// process nears any cap (peak RSS stays below 256 MiB; a 1 GiB address
// space holds it).
//
// The import's worst case: qcow.DefaultMaxBuffered (64 MiB) of buffered
// stream, the two host-cluster bitmaps (34 MiB each at their cap), pending
// references (max(MaxBuffered/128, 4096) of them, 72 bytes at most each:
// 36 MiB), the sink's three 4 MiB buffers (6 MiB each with their huge-page
// alignment) and the decoder's read, decompression and L2 buffers (about
// 26 MiB): 196 MiB.
const MemoryLimit = 208 << 20

var memLimit struct {
	sync.Mutex
	user bool  // GOMEMLIMIT was set: never touched
	set  int64 // the limit this package set
}

// SetMemoryLimit sets the Go memory limit to MemoryLimit, unless the user
// set GOMEMLIMIT, which the runtime honours as given.
func SetMemoryLimit() {
	memLimit.Lock()
	defer memLimit.Unlock()
	if os.Getenv("GOMEMLIMIT") != "" {
		memLimit.user = true
		return
	}
	memLimit.set = MemoryLimit
	debug.SetMemoryLimit(memLimit.set)
}

// RaiseMemoryLimit adds n bytes to the limit SetMemoryLimit set, for a
// command line that asks for a larger bound than the default (serve
// --max-buffer). A limit from GOMEMLIMIT is left alone.
func RaiseMemoryLimit(n int64) {
	memLimit.Lock()
	defer memLimit.Unlock()
	if memLimit.user || memLimit.set == 0 || n <= 0 {
		return
	}
	if n > math.MaxInt64-memLimit.set {
		memLimit.set = math.MaxInt64
	} else {
		memLimit.set += n
	}
	debug.SetMemoryLimit(memLimit.set)
}

// runtimeReserve is the address space the process takes besides its heap
// arenas: the Go runtime's reservations (page summary 585 MiB, the 32 MiB
// arena index), the binary with its 32 MiB of zeroed data, thread stacks,
// and slack. With a first heap arena, 725 MiB is the smallest cap the
// binary starts under (docs/RELIABILITY.md).
const runtimeReserve = 680 << 20

// heapArena is the unit in which the Go heap takes address space.
const heapArena = 64 << 20

// The runtime also asks for 512 MiB for its scavenger index, and goes on
// without it when the cap refuses it: under a cap of scavengerIndexFits or
// more, the reservation succeeds and those 512 MiB are gone too.
const (
	scavengerIndex     = 512 << 20
	scavengerIndexFits = 1136 << 20
)

// bufferCost is what the decoder may hold at most with MaxBuffered
// maxBuffer beyond what it holds at the default: the buffer and the
// pending references that come with it (1/128 of it, 72 bytes each).
func bufferCost(maxBuffer int64) int64 {
	extra := max(maxBuffer-qcow.DefaultMaxBuffered, 0)
	return extra + extra/128*72
}

// addressSpace is the address space a run under the cap limit needs with
// --max-buffer maxBuffer: the runtime's, and the heap at the memory limit
// in whole arenas.
func addressSpace(maxBuffer int64, limit uint64) uint64 {
	heap := (MemoryLimit + bufferCost(maxBuffer) + heapArena - 1) / heapArena * heapArena
	need := uint64(runtimeReserve + heap)
	if limit >= scavengerIndexFits {
		need += scavengerIndex
	}
	return need
}

// raiseForMaxBuffer raises the memory limit for what --max-buffer asks
// beyond the decoder's default. Under an address-space limit (RLIMIT_AS,
// e.g. prlimit --as) that cannot hold the worst case, the runtime could
// die of it halfway through a stream: refuse it now, naming what fits.
func raiseForMaxBuffer(maxBuffer int64) error {
	if maxBuffer <= qcow.DefaultMaxBuffered {
		return nil
	}
	var rl unix.Rlimit
	if unix.Getrlimit(unix.RLIMIT_AS, &rl) == nil && rl.Cur != unix.RLIM_INFINITY && addressSpace(maxBuffer, rl.Cur) > rl.Cur {
		lo, hi := int64(qcow.DefaultMaxBuffered), maxBuffer // lo fits, hi does not
		for hi-lo > 1<<20 {
			if mid := lo + (hi-lo)/2; addressSpace(mid, rl.Cur) <= rl.Cur {
				lo = mid
			} else {
				hi = mid
			}
		}
		return &UsageError{fmt.Sprintf("--max-buffer %d does not fit the address-space limit of %d MiB (it needs about %d MiB): at most %d MiB fits",
			maxBuffer, rl.Cur>>20, addressSpace(maxBuffer, rl.Cur)>>20, lo>>20)}
	}
	RaiseMemoryLimit(bufferCost(maxBuffer))
	return nil
}

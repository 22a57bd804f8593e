package vhdcompat

import (
	"runtime/debug"
	"testing"

	"github.com/xapi-project/xapi-qcow-tool/qcow"
)

func TestAddressSpace(t *testing.T) {
	const gib = 1 << 30
	if need := addressSpace(qcow.DefaultMaxBuffered, gib); need > gib {
		t.Fatalf("the default bounds need %d MiB, more than a 1 GiB cap", need>>20)
	}
	if need := addressSpace(512<<20, gib); need <= gib {
		t.Fatalf("a 512 MiB buffer fits a 1 GiB cap (%d MiB)?", need>>20)
	}
	// Between about 1.1 and 1.2 GiB the runtime's scavenger index takes
	// 512 MiB more: less room than under 1 GiB.
	if need := addressSpace(qcow.DefaultMaxBuffered, 1200<<20); need <= 1200<<20 {
		t.Fatalf("the default bounds fit a 1200 MiB cap (%d MiB)?", need>>20)
	}
}

func TestMemoryLimit(t *testing.T) {
	old := debug.SetMemoryLimit(-1)
	defer debug.SetMemoryLimit(old)
	t.Setenv("GOMEMLIMIT", "")
	memLimit.user, memLimit.set = false, 0
	SetMemoryLimit()
	if got := debug.SetMemoryLimit(-1); got != MemoryLimit {
		t.Fatalf("limit %d, want %d", got, MemoryLimit)
	}
	RaiseMemoryLimit(1 << 20)
	if got := debug.SetMemoryLimit(-1); got != MemoryLimit+1<<20 {
		t.Fatalf("raised limit %d, want %d", got, MemoryLimit+1<<20)
	}
	// GOMEMLIMIT set by the user: never touched.
	debug.SetMemoryLimit(old)
	t.Setenv("GOMEMLIMIT", "1GiB")
	memLimit.user, memLimit.set = false, 0
	SetMemoryLimit()
	RaiseMemoryLimit(1 << 20)
	if got := debug.SetMemoryLimit(-1); got != old {
		t.Fatalf("GOMEMLIMIT set, yet the limit became %d", got)
	}
}

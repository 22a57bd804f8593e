package zerotail

import (
	"fmt"
	"runtime/metrics"
	"testing"
	"time"
)

// Bounded runs fn, failing the test if it adds more than heap bytes to the
// heap and crashing the worker (which reports the input) if it takes
// longer than hang. The heap is sampled every millisecond: an allocation
// large enough to matter lives longer than that while it is filled.
func Bounded(t *testing.T, what string, heap uint64, hang time.Duration, fn func()) {
	watchdog := time.AfterFunc(hang, func() { panic(fmt.Sprintf("%s: no result after %v", what, hang)) })
	defer watchdog.Stop()
	sample := []metrics.Sample{{Name: "/memory/classes/heap/objects:bytes"}}
	read := func() uint64 { metrics.Read(sample); return sample[0].Value.Uint64() }
	base := read()
	stop, peak := make(chan struct{}), make(chan uint64)
	go func() {
		var top uint64
		tick := time.NewTicker(time.Millisecond)
		defer tick.Stop()
		for {
			top = max(top, read())
			select {
			case <-stop:
				peak <- max(top, read())
				return
			case <-tick.C:
			}
		}
	}()
	fn()
	close(stop)
	if p := <-peak; p > base && p-base > heap {
		t.Fatalf("%s: the heap grew by %d MiB (bound %d MiB)", what, (p-base)>>20, heap>>20)
	}
}

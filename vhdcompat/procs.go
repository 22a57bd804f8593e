package vhdcompat

import (
	"os"
	"runtime"
	"sync"
)

// SpareProcForIO gives the Go scheduler one P more than the cores, for a
// command whose goroutines spend their time blocked in system calls rather
// than running Go code: an import (reading the pipe or socket, writing the
// disk) or an O_DIRECT export (direct reads and splices). With one P per
// core, every P is soon held by a blocked call, and the runtime's monitor
// keeps taking Ps back from blocked calls and handing them around: a 1 GiB
// import from a pipe made 11,700-13,200 context switches with two Ps and
// 7,700-10,400 with three. Medians of 9-15 interleaved runs on two cores,
// faster in six sittings of seven: 4 GiB sparse import 0.727 -> 0.628 s,
// 1 GiB import 0.745 -> 0.702 s, loop --direct export 0.415 -> 0.396 s, by
// allocation map 0.082 -> 0.073 s. Not for page-cache exports: their
// readers copy on the CPU, and a diff went 0.420 -> 0.461 s with the spare
// P. An explicit GOMAXPROCS is left alone.
func SpareProcForIO() {
	spareOnce.Do(func() {
		if os.Getenv("GOMAXPROCS") == "" {
			runtime.GOMAXPROCS(runtime.GOMAXPROCS(0) + 1)
		}
	})
}

var spareOnce sync.Once

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
// keeps taking Ps back from blocked calls and handing them around (fewer
// context switches and faster imports with the spare P: the figures are in
// docs/PERFORMANCE.md, "Measurements behind the code"). Not for page-cache
// exports: their readers copy on the CPU, and a spare P made a diff
// slower. An explicit GOMAXPROCS is left alone.
func SpareProcForIO() {
	spareOnce.Do(func() {
		if os.Getenv("GOMAXPROCS") == "" {
			runtime.GOMAXPROCS(runtime.GOMAXPROCS(0) + 1)
		}
	})
}

var spareOnce sync.Once

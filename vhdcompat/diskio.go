package vhdcompat

import (
	"github.com/xapi-project/xapi-qcow-tool/vhdcompat/rawdisk"
)

// DiskIOFlags choose between O_DIRECT and the page cache for the raw disks
// a command opens. Without either, block devices use O_DIRECT and regular
// files the page cache (rawdisk.IOAuto), on every command line.
type DiskIOFlags struct {
	Direct   bool `aliases:"unbuffered" help:"O_DIRECT on the raw disks, regular files too (the default for block devices)."`
	Buffered bool `help:"Go through the page cache, block devices too (by default they use O_DIRECT)."`
}

// IO is the choice the flags make.
func (f DiskIOFlags) IO() (rawdisk.IO, error) {
	return DiskIO(f.Direct, f.Buffered)
}

// DiskIO turns --direct and --buffered into a rawdisk.IO.
func DiskIO(direct, buffered bool) (rawdisk.IO, error) {
	switch {
	case direct && buffered:
		return 0, &UsageError{"--direct and --buffered contradict each other: give one of them"}
	case direct:
		return rawdisk.IODirect, nil
	case buffered:
		return rawdisk.IOBuffered, nil
	}
	return rawdisk.IOAuto, nil
}

// DiskOptions are the options every command opens its raw disks with: a
// refusal of O_DIRECT is logged once per disk (the journal, and stderr
// with -v) and the command carries on through the page cache.
func (env *Env) DiskOptions(io rawdisk.IO) rawdisk.Options {
	return rawdisk.Options{IO: io, Refused: func(path string, err error) {
		if env.Log != nil {
			env.Log.Warn("O_DIRECT refused: using the page cache", "disk", path, "error", err.Error())
		}
	}}
}

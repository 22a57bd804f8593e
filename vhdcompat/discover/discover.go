// Package discover finds the image behind a VDI's block device the way
// xapi does (xapi_vdi_helpers.ml, tapctl.ml): a blktap device is served by
// a tapdisk that `tap-ctl list` names with its driver and image path; an
// NBD device (/dev/nbdN) has an attachment record naming its server's
// socket, which is a tapdisk's when its real name is nbd<PID>.<MINOR>.
//
// It only looks: it stats the device, reads /proc/devices and the NBD
// attachment record, and runs /usr/sbin/tap-ctl (by that absolute path,
// with a time limit and a bound on what it may print). It opens no image;
// the caller opens the chain (vhdcompat/hybrid) and checks it.
package discover

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// The host's files and programs, fixed: discovery runs as root from xapi,
// so nothing of it is looked up in PATH or taken from the environment.
const (
	TapCtl      = "/usr/sbin/tap-ctl"
	ProcDevices = "/proc/devices"
	// NBDRecords holds xapi's record of each NBD attachment, one file per
	// device index: /var/run/nonpersistent/nbd/N for /dev/nbdN.
	NBDRecords = "/var/run/nonpersistent/nbd"
	// NBDMajor is the block major of /dev/nbdN.
	NBDMajor = 43
	// TapdevName is the name blktap's major has in /proc/devices.
	TapdevName = "tapdev"
)

// Driver is a tapdisk driver: the part of tap-ctl's args before the colon.
type Driver string

// The drivers discovery knows what to do with.
const (
	VHD   Driver = "vhd"   // a VHD chain
	Qcow2 Driver = "qcow2" // a qcow2 chain (XCP-ng qcow2 SRs)
	Aio   Driver = "aio"   // a raw file: SEEK_DATA on it
)

// Result is what is behind a device.
type Result struct {
	Device   string // the path as given
	Resolved string // after symlinks
	Major    uint32
	Minor    uint32
	// Tapdisk, when set, is the tapdisk that serves the device (a blktap
	// device, or an NBD device whose server is a tapdisk), with the image
	// it has open.
	Tapdisk *Tapdisk
	// NBD, when set, is the device's NBD attachment. With Tapdisk nil the
	// server is not a tapdisk: what the disk allocates can only be asked of
	// the server (NBD block status) at NBD.Socket, export NBD.ExportName.
	NBD *NBDExport
}

// Tapdisk is one line of `tap-ctl list`.
type Tapdisk struct {
	PID   int
	Minor int
	State string // as printed: 0 when running; flags in hex otherwise
	// Driver and Image are the args the tapdisk was opened with
	// (DRIVER:PATH); both empty when it has no image open.
	Driver Driver
	Image  string
}

// NBDExport is an NBD device's attachment record.
type NBDExport struct {
	Device     string // the /dev/nbdN path, resolved
	Index      int    // N
	Record     string // the record's path
	Socket     string // the server's unix socket, as recorded
	SocketReal string // the socket's real path (symlinks followed)
	ExportName string
}

// Via says how the image was found: "blktap", "nbd-tapdisk", or "nbd" for
// an NBD server that is not a tapdisk.
func (r *Result) Via() string {
	switch {
	case r.NBD != nil && r.Tapdisk != nil:
		return "nbd-tapdisk"
	case r.NBD != nil:
		return "nbd"
	}
	return "blktap"
}

// NBDServer returns the attachment of an NBD device whose server is not a
// tapdisk: the export can only learn the allocation from the server.
func (r *Result) NBDServer() (*NBDExport, bool) {
	if r.NBD != nil && r.Tapdisk == nil {
		return r.NBD, true
	}
	return nil, false
}

// ErrNotVDIDevice is a path that is neither a blktap nor an NBD device (a
// regular file, a loop device...): nothing is behind it to discover.
var ErrNotVDIDevice = errors.New("neither a blktap nor an NBD device")

// Discover finds what is behind the device at path. An error wrapping
// ErrNotVDIDevice means there is nothing to discover; any other says why
// discovery failed. Both leave the caller to read the device as it is.
func Discover(ctx context.Context, path string) (*Result, error) {
	resolved, err := filepath.EvalSymlinks(path)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, unwrapPath(err))
	}
	var st unix.Stat_t
	if err := unix.Stat(resolved, &st); err != nil {
		return nil, fmt.Errorf("%s: %w", resolved, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFBLK {
		return nil, fmt.Errorf("%s is not a block device: %w", resolved, ErrNotVDIDevice)
	}
	r := &Result{Device: path, Resolved: resolved, Major: unix.Major(st.Rdev), Minor: unix.Minor(st.Rdev)}
	if r.Major == NBDMajor {
		return r, r.nbd(ctx)
	}
	majors, err := readProcDevices()
	if err != nil {
		return nil, err
	}
	names := majors[r.Major]
	if !slices.Contains(names, TapdevName) {
		what := "no name"
		if len(names) > 0 {
			what = strings.Join(names, ", ")
		}
		return nil, fmt.Errorf("%s (major %d: %s in %s): %w", resolved, r.Major, what, ProcDevices, ErrNotVDIDevice)
	}
	t, err := findTapdisk(ctx, -1, int(r.Minor))
	if err != nil {
		return nil, err
	}
	r.Tapdisk = t
	return r, nil
}

// nbd reads the device's attachment record and, when the server is a
// tapdisk, asks tap-ctl for its image.
func (r *Result) nbd(ctx context.Context) error {
	name := filepath.Base(r.Resolved)
	digits, ok := strings.CutPrefix(name, "nbd")
	n, err := strconv.Atoi(digits)
	if !ok || err != nil || n < 0 || strconv.Itoa(n) != digits {
		return fmt.Errorf("%s has the NBD major %d but is not named nbdN (a partition?)", r.Resolved, NBDMajor)
	}
	rec := filepath.Join(NBDRecords, strconv.Itoa(n))
	x, err := readNBDRecord(rec)
	if err != nil {
		return err
	}
	x.Device, x.Index = r.Resolved, n
	r.NBD = x
	real, err := filepath.EvalSymlinks(x.Socket)
	if err != nil {
		return fmt.Errorf("NBD server socket of %s (from %s): %w", r.Resolved, rec, unwrapPath(err))
	}
	x.SocketReal = real
	pid, minor, ok := tapdiskSocket(real)
	if !ok {
		return nil // another NBD server: the caller asks it
	}
	t, err := findTapdisk(ctx, pid, minor)
	if err != nil {
		return err
	}
	r.Tapdisk = t
	return nil
}

// tapdiskSocket parses the name tapdisk gives its NBD socket,
// nbd<PID>.<MINOR>.
func tapdiskSocket(path string) (pid, minor int, ok bool) {
	rest, found := strings.CutPrefix(filepath.Base(path), "nbd")
	if !found {
		return 0, 0, false
	}
	p, m, found := strings.Cut(rest, ".")
	if !found {
		return 0, 0, false
	}
	pid, err1 := parseUint(p)
	minor, err2 := parseUint(m)
	if err1 != nil || err2 != nil {
		return 0, 0, false
	}
	return pid, minor, true
}

// unwrapPath drops the *os.PathError around err: the messages name the
// path themselves.
func unwrapPath(err error) error {
	var pe *os.PathError
	if errors.As(err, &pe) {
		return pe.Err
	}
	return err
}

package rawdisk

import (
	"errors"
	"os"

	"golang.org/x/sys/unix"
)

// IO says whether a disk's bytes go through the page cache.
type IO uint8

// The ways a disk can be opened.
const (
	// IOAuto is the default: O_DIRECT on a block device, the page cache
	// for a regular file. xapi runs vhd-tool with --direct for every VDI
	// transfer, but its qcow2 command lines cannot say so, and on a host a
	// VDI's bytes must not go through dom0's small page cache; a regular
	// file (a scratch copy, a test image) is read and written the usual way.
	IOAuto IO = iota
	// IODirect is O_DIRECT on any disk (--direct).
	IODirect
	// IOBuffered is the page cache on any disk (--buffered).
	IOBuffered
)

func (m IO) String() string {
	switch m {
	case IODirect:
		return "direct"
	case IOBuffered:
		return "buffered"
	}
	return "auto"
}

// ioFor maps the boolean of the older constructors: true forces O_DIRECT,
// false leaves the choice to the default.
func ioFor(direct bool) IO {
	if direct {
		return IODirect
	}
	return IOAuto
}

// Options say how a disk is opened.
type Options struct {
	IO IO
	// Refused, when set, is called once, from the goroutine that met it,
	// when O_DIRECT was asked for but the disk or its file system refused
	// it, at open or at the first direct I/O. The disk has then switched to
	// the page cache for good and the I/O that met the refusal was redone
	// through it: the run carries on.
	Refused func(path string, err error)
}

func (o Options) wantsDirect(k Kind) bool {
	return o.IO == IODirect || o.IO == IOAuto && k == BlockDevice
}

func directFlag(direct bool) int {
	if direct {
		return unix.O_DIRECT
	}
	return 0
}

// The system calls that meet a refusal, replaceable by the package's tests
// to inject one where this machine has no device that refuses.
var (
	openFile = os.OpenFile
	pread    = func(f *os.File, p []byte, off int64) (int, error) { return f.ReadAt(p, off) }
	pwrite   = func(f *os.File, p []byte, off int64) (int, error) { return f.WriteAt(p, off) }
)

// refusal reports whether err is how Linux refuses O_DIRECT: EINVAL at
// open when the file system has no direct I/O, EINVAL at the first I/O
// when the device wants another alignment than the one it reported
// (offsets, lengths and buffers here are aligned to the logical block
// size and to Alignment). Some FUSE file systems answer EOPNOTSUPP.
func refusal(err error) bool {
	return errors.Is(err, unix.EINVAL) || errors.Is(err, unix.EOPNOTSUPP)
}

// fileDirectAlign is the offset alignment a regular file's file system
// asks of direct I/O (statx STATX_DIOALIGN, Linux 6.1), 512 when it does
// not say. Block devices use their logical block size (BLKSSZGET).
func fileDirectAlign(f *os.File) int64 {
	var st unix.Statx_t
	err := unix.Statx(int(f.Fd()), "", unix.AT_EMPTY_PATH, unix.STATX_DIOALIGN, &st)
	if err == nil && st.Mask&unix.STATX_DIOALIGN != 0 && st.Dio_offset_align > 0 && st.Dio_offset_align&(st.Dio_offset_align-1) == 0 {
		return int64(st.Dio_offset_align)
	}
	return 512
}

// directAlign is the alignment of the offsets of direct writes: the
// logical block size, and at least a page (Alignment), the granularity the
// sink and the zero paths work in.
func (d *Disk) directAlign() int64 { return max(Alignment, d.sector) }

// probeDirect reads the first block with O_DIRECT, so that a disk that
// accepts O_DIRECT at open but refuses direct I/O switches to the page
// cache before the engines choose how to move its bytes. The disk's
// content is not changed.
func (d *Disk) probeDirect() {
	n := min(d.directAlign(), d.size)
	if n <= 0 {
		return // an empty file: its first write will tell
	}
	n = (n + d.sector - 1) / d.sector * d.sector
	buf := AlignedBuffer(int(n))
	if _, err := pread(d.f, buf, 0); err != nil && refusal(err) {
		d.refuseDirect(err)
	}
}

// retryBuffered handles an error of an I/O issued while the disk was
// direct (wasDirect): when it is a refusal of O_DIRECT, the disk switches
// to the page cache and the caller redoes the I/O. Concurrent readers may
// meet the refusal together: the first one switches, the others find it
// done and retry too.
func (d *Disk) retryBuffered(err error, wasDirect bool) bool {
	if !wasDirect || !refusal(err) {
		return false
	}
	return d.refuseDirect(err) == nil
}

// errNotRefused says an EINVAL came from a write through the page cache
// (writeBuffered clears O_DIRECT on the descriptor for it): it is no
// refusal of O_DIRECT.
var errNotRefused = errors.New("not a refusal of O_DIRECT")

// refuseDirect clears O_DIRECT on the descriptor after err, once, and
// reports the refusal; nil when the disk now runs through the page cache.
func (d *Disk) refuseDirect(err error) error {
	d.refuseMu.Lock()
	defer d.refuseMu.Unlock()
	if !d.Direct() {
		return nil
	}
	if fl, ferr := unix.FcntlInt(d.f.Fd(), unix.F_GETFL, 0); ferr != nil {
		return ferr
	} else if fl&unix.O_DIRECT == 0 {
		return errNotRefused
	}
	if serr := d.setDirect(false); serr != nil {
		return serr
	}
	d.direct.Store(false)
	d.refused(WithoutPath(err))
	return nil
}

// refused records why the disk runs through the page cache and tells
// Options.Refused.
func (d *Disk) refused(err error) {
	d.refusedBy = err
	if d.opts.Refused != nil {
		d.opts.Refused(d.path, err)
	}
}

// DirectRefused is the error with which the disk refused O_DIRECT, nil
// when it did not (or O_DIRECT was not asked for).
func (d *Disk) DirectRefused() error {
	d.refuseMu.Lock()
	defer d.refuseMu.Unlock()
	return d.refusedBy
}

// setDirect sets or clears O_DIRECT on the descriptor.
func (d *Disk) setDirect(on bool) error {
	fl, err := unix.FcntlInt(d.f.Fd(), unix.F_GETFL, 0)
	if err != nil {
		return err
	}
	want := fl &^ unix.O_DIRECT
	if on {
		want |= unix.O_DIRECT
	}
	if want != fl {
		if _, err := unix.FcntlInt(d.f.Fd(), unix.F_SETFL, want); err != nil {
			return err
		}
	}
	d.direct.Store(on)
	return nil
}

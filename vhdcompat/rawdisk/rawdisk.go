// Package rawdisk opens raw disks — regular files and block devices — for
// reading and writing: their size (BLKGETSIZE64 for devices), O_DIRECT with
// aligned buffers, allocated extents (SEEK_DATA/SEEK_HOLE), cheap zeroing
// (hole punching, BLKZEROOUT) and zero-copy transfer to a pipe or socket.
package rawdisk

import (
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Kind is what a disk path names.
type Kind uint8

// Kinds of disk.
const (
	RegularFile Kind = iota
	BlockDevice
)

func (k Kind) String() string {
	if k == BlockDevice {
		return "block device"
	}
	return "regular file"
}

// Alignment is the buffer and offset alignment used for O_DIRECT. 4 KiB
// covers every logical block size we meet (512 and 4096).
const Alignment = 4096

// Disk is an open raw disk.
type Disk struct {
	f      *os.File
	path   string
	kind   Kind
	size   int64
	sector int64 // logical block size for O_DIRECT
	opts   Options
	// direct is whether the descriptor has O_DIRECT; it is cleared, once,
	// when the disk refuses a direct I/O (see refuseDirect), possibly while
	// readers run on other goroutines.
	direct    atomic.Bool
	refuseMu  sync.Mutex
	refusedBy error
}

// DiskError names the disk and the operation that failed.
type DiskError struct {
	Path string
	Op   string
	Err  error
}

func (e *DiskError) Error() string {
	if e.Op == "" {
		return e.Path + ": " + e.Err.Error()
	}
	return fmt.Sprintf("%s: %s: %v", e.Path, e.Op, e.Err)
}

func (e *DiskError) Unwrap() error { return e.Err }

// ErrNotDisk is wrapped when a path is neither a regular file nor a block
// device.
var ErrNotDisk = errors.New("not a regular file or block device")

// WithoutPath returns the cause inside an *os.PathError ("no such file or
// directory" without "open PATH: "), for messages that name the path
// their own way; other errors are returned as they are.
func WithoutPath(err error) error {
	var pe *os.PathError
	if errors.As(err, &pe) {
		return pe.Err
	}
	return err
}

// Open opens a disk for reading. With direct it uses O_DIRECT; without,
// the default applies: O_DIRECT on a block device, the page cache for a
// regular file (IOAuto). Direct reads must go through ReadAt with buffers
// from AlignedBuffer.
func Open(path string, direct bool) (*Disk, error) {
	return OpenWith(path, Options{IO: ioFor(direct)})
}

// OpenWith opens a disk for reading as o says.
func OpenWith(path string, o Options) (*Disk, error) {
	return open(path, os.O_RDONLY, o, 0)
}

// OpenFile opens a disk for writing (the import destination), with
// O_DIRECT as Open decides. A regular file is created if missing, with
// mode perm.
func OpenFile(path string, direct bool, perm os.FileMode) (*Disk, error) {
	return OpenFileWith(path, perm, Options{IO: ioFor(direct)})
}

// OpenFileWith opens a disk for writing as o says.
func OpenFileWith(path string, perm os.FileMode, o Options) (*Disk, error) {
	return open(path, os.O_RDWR|os.O_CREATE, o, perm)
}

// FromFile wraps an already open descriptor (vhd-tool's --source-fd and
// --destination-fd) as it is: its O_DIRECT flag is left alone.
func FromFile(f *os.File, name string) (*Disk, error) {
	d := &Disk{f: f, path: name}
	if err := d.stat(); err != nil {
		return nil, err
	}
	if fl, err := unix.FcntlInt(f.Fd(), unix.F_GETFL, 0); err == nil && fl&unix.O_DIRECT != 0 {
		d.direct.Store(true)
	}
	return d, nil
}

// FromFileDirect wraps an already open descriptor like FromFile and, with
// direct, turns on O_DIRECT on it (fcntl F_SETFL): xapi opens the disk and
// passes the descriptor, and --direct must still bypass the page cache.
// Without direct, the default of Open applies.
func FromFileDirect(f *os.File, name string, direct bool) (*Disk, error) {
	return FromFileWith(f, name, Options{IO: ioFor(direct)})
}

// FromFileWith wraps an already open descriptor and sets or clears
// O_DIRECT on it as o says (IOAuto: set on a block device, left as it is
// on a regular file).
func FromFileWith(f *os.File, name string, o Options) (*Disk, error) {
	d, err := FromFile(f, name)
	if err != nil {
		return nil, err
	}
	d.opts = o
	switch {
	case o.wantsDirect(d.kind):
		if err := d.setDirect(true); err != nil {
			if !refusal(err) {
				return nil, &DiskError{Path: name, Op: "set O_DIRECT", Err: err}
			}
			d.refused(err)
			return d, nil
		}
		d.probeDirect()
	case o.IO == IOBuffered && d.Direct():
		if err := d.setDirect(false); err != nil {
			return nil, &DiskError{Path: name, Op: "clear O_DIRECT", Err: err}
		}
	}
	return d, nil
}

func open(path string, flag int, o Options, perm os.FileMode) (*Disk, error) {
	// Refuse what is not a disk before opening it: opening a FIFO would
	// block, and opening a character device can have side effects.
	kind := RegularFile
	st, err := os.Stat(path)
	switch {
	case err == nil:
		if m := st.Mode(); !m.IsRegular() && (m&os.ModeDevice == 0 || m&os.ModeCharDevice != 0) {
			return nil, &DiskError{Path: path, Err: fmt.Errorf("%w (it is a %s)", ErrNotDisk, describeMode(m))}
		} else if !m.IsRegular() {
			kind = BlockDevice
		}
	case errors.Is(err, os.ErrNotExist) && flag&os.O_CREATE != 0:
	default:
		return nil, &DiskError{Path: path, Err: WithoutPath(err)}
	}
	direct := o.wantsDirect(kind)
	var refusedErr error
	f, err := openFile(path, flag|directFlag(direct)|unix.O_CLOEXEC, perm)
	if err != nil && direct && refusal(err) {
		// The file system has no direct I/O (ramfs, some FUSE file
		// systems): the page cache it is.
		refusedErr, direct = WithoutPath(err), false
		f, err = openFile(path, flag|unix.O_CLOEXEC, perm)
	}
	if err != nil {
		return nil, &DiskError{Path: path, Err: WithoutPath(err)}
	}
	d := &Disk{f: f, path: path, opts: o}
	d.direct.Store(direct)
	if err := d.stat(); err != nil {
		f.Close()
		return nil, err
	}
	if refusedErr != nil {
		d.refused(refusedErr)
	} else if direct {
		d.probeDirect()
	}
	return d, nil
}

func describeMode(m os.FileMode) string {
	switch {
	case m.IsDir():
		return "directory"
	case m&os.ModeNamedPipe != 0:
		return "FIFO"
	case m&os.ModeCharDevice != 0:
		return "character device"
	case m&os.ModeSocket != 0:
		return "socket"
	case m&os.ModeSymlink != 0:
		return "symbolic link"
	}
	return "special file"
}

func (d *Disk) stat() error {
	st, err := d.f.Stat()
	if err != nil {
		return &DiskError{Path: d.path, Op: "stat", Err: WithoutPath(err)}
	}
	m := st.Mode()
	switch {
	case m.IsRegular():
		d.kind, d.size, d.sector = RegularFile, st.Size(), fileDirectAlign(d.f)
	case m&os.ModeDevice != 0 && m&os.ModeCharDevice == 0:
		d.kind = BlockDevice
		size, err := unix.IoctlGetUint64(int(d.f.Fd()), unix.BLKGETSIZE64)
		if err != nil {
			return &DiskError{Path: d.path, Op: "BLKGETSIZE64", Err: err}
		}
		d.size = int64(size)
		d.sector = 512
		if ss, err := unix.IoctlGetInt(int(d.f.Fd()), unix.BLKSSZGET); err == nil && ss > 0 {
			d.sector = int64(ss)
		}
	default:
		return &DiskError{Path: d.path, Err: fmt.Errorf("%w (it is a %s)", ErrNotDisk, describeMode(m))}
	}
	return nil
}

// Path is the disk's name, for messages.
func (d *Disk) Path() string { return d.path }

// Kind says whether the disk is a regular file or a block device.
func (d *Disk) Kind() Kind { return d.kind }

// Size is the disk's size in bytes when it was opened.
func (d *Disk) Size() int64 { return d.size }

// Direct reports whether the disk's I/O bypasses the page cache
// (O_DIRECT). It turns false if the disk refuses direct I/O.
func (d *Disk) Direct() bool { return d.direct.Load() }

// SectorSize is the disk's logical block size: the alignment of offsets
// and lengths of direct I/O (BLKSSZGET for a block device, the file
// system's direct I/O alignment for a regular file).
func (d *Disk) SectorSize() int64 { return d.sector }

// File is the underlying descriptor, for zero-copy transfers.
func (d *Disk) File() *os.File { return d.f }

// Close closes the disk.
func (d *Disk) Close() error { return d.f.Close() }

// Sync flushes written data to stable storage.
func (d *Disk) Sync() error {
	if err := d.f.Sync(); err != nil {
		return &DiskError{Path: d.path, Op: "fsync", Err: WithoutPath(err)}
	}
	return nil
}

// AlignedBuffer returns a zeroed buffer of n bytes whose address is aligned
// for O_DIRECT. A buffer of 2 MiB or more is aligned to 2 MiB and asked to
// be backed by huge pages: an O_DIRECT read pins the buffer's pages for the
// device, and with 4 KiB pages the pinning (get_user_pages and the bio
// built page by page) was a visible share of a direct scan's CPU (see
// docs/PERFORMANCE.md); one huge page stands for 512 of them.
func AlignedBuffer(n int) []byte {
	align := Alignment
	if n >= hugePage {
		align = hugePage
	}
	b := make([]byte, n+align)
	off := int(uintptr(unsafe.Pointer(&b[0])) & uintptr(align-1))
	if off != 0 {
		off = align - off
	}
	b = b[off : off+n : off+n]
	if align == hugePage {
		// Advice only: without transparent huge pages the buffer
		// works the same, at the cost measured above.
		_ = unix.Madvise(b, unix.MADV_HUGEPAGE)
	}
	return b
}

const hugePage = 2 << 20

// ReadAt reads len(p) bytes at off. With O_DIRECT, p must come from
// AlignedBuffer and off be a multiple of Alignment; a read that reaches the
// end of the disk returns what is there and io.EOF, like os.File.ReadAt.
// A disk that ends before off+len(p) although it was longer when opened is
// reported as having shrunk.
func (d *Disk) ReadAt(p []byte, off int64) (int, error) {
	direct := d.Direct()
	if direct && (off%d.sector != 0 || uintptr(unsafe.Pointer(unsafe.SliceData(p)))%Alignment != 0) {
		return 0, &DiskError{Path: d.path, Op: "read", Err: fmt.Errorf("unaligned direct read at %d", off)}
	}
	want := len(p)
	if direct && want%int(d.sector) != 0 {
		// O_DIRECT needs whole sectors: read the rounded-up length into
		// the buffer's spare capacity when it has some, otherwise the
		// last partial sector through a bounce buffer.
		if rounded := (want + int(d.sector) - 1) &^ (int(d.sector) - 1); rounded <= cap(p) {
			n, err := d.readFull(p[:rounded], off)
			if n > want {
				n = want
				if err == io.EOF {
					err = nil
				}
			}
			return n, err
		}
		head := want &^ (int(d.sector) - 1)
		n, err := d.readFull(p[:head], off)
		if err != nil || n < head {
			return n, err
		}
		bounce := AlignedBuffer(int(d.sector))
		m, err := d.readFull(bounce, off+int64(head))
		m = copy(p[head:], bounce[:m])
		if n+m == want && err == io.EOF {
			err = nil
		}
		return n + m, err
	}
	return d.readFull(p, off)
}

func (d *Disk) readFull(p []byte, off int64) (int, error) {
	direct := d.Direct()
	n, err := pread(d.f, p, off)
	if err != nil && n == 0 && d.retryBuffered(err, direct) {
		n, err = pread(d.f, p, off)
	}
	if err != nil && err != io.EOF {
		return n, &DiskError{Path: d.path, Op: fmt.Sprintf("read at offset %d", off+int64(n)), Err: WithoutPath(err)}
	}
	if n < len(p) && off+int64(n) < d.size {
		return n, &DiskError{Path: d.path, Op: "read", Err: fmt.Errorf("disk shrank: it ends at %d, it was %d bytes when opened", off+int64(n), d.size)}
	}
	return n, err
}

// WriteAt writes p at off. A short write is an error naming the offset.
func (d *Disk) WriteAt(p []byte, off int64) (int, error) {
	direct := d.Direct()
	n, err := pwrite(d.f, p, off)
	if err != nil && n == 0 && d.retryBuffered(err, direct) {
		n, err = pwrite(d.f, p, off)
	}
	if err != nil {
		return n, &DiskError{Path: d.path, Op: fmt.Sprintf("write at offset %d", off+int64(n)), Err: WithoutPath(err)}
	}
	return n, nil
}

// DataExtents calls fn for each extent of a regular file that may hold
// data, as SEEK_DATA/SEEK_HOLE report them, in order. Holes are never read.
// For block devices, or file systems without SEEK_DATA, the whole disk is
// one extent.
func (d *Disk) DataExtents(fn func(start, end int64) error) error {
	for off := int64(0); off < d.size; {
		start, end, err := d.nextData(off)
		if err != nil || start >= d.size {
			return err
		}
		if err := fn(start, end); err != nil {
			return err
		}
		off = end
	}
	return nil
}

// DataAt reports whether off is in data or in a hole, and where that run
// ends, at end at the most (for qemu-img map's "data" and "zero" flags).
func (d *Disk) DataAt(off, end int64) (data bool, runEnd int64, err error) {
	start, stop, err := d.nextData(off)
	switch {
	case err != nil:
		return true, end, err
	case start > off:
		return false, min(start, end), nil
	}
	return true, min(stop, end), nil
}

// nextData returns the run of data at or after off: [start, end), clipped
// to the disk's size; start is the disk's size when only a hole remains. A
// block device, or a file system without SEEK_DATA, is data throughout.
func (d *Disk) nextData(off int64) (start, end int64, err error) {
	if d.kind != RegularFile {
		return off, d.size, nil
	}
	fd := int(d.f.Fd())
	start, err = unix.Seek(fd, off, unix.SEEK_DATA)
	switch {
	case err == unix.ENXIO: // only a hole remains
		return d.size, d.size, nil
	case err == unix.EINVAL || err == unix.EOPNOTSUPP:
		return off, d.size, nil
	case err != nil:
		return 0, 0, &DiskError{Path: d.path, Op: "SEEK_DATA", Err: err}
	}
	end, err = unix.Seek(fd, start, unix.SEEK_HOLE)
	if err != nil {
		return 0, 0, &DiskError{Path: d.path, Op: "SEEK_HOLE", Err: err}
	}
	return min(start, d.size), min(end, d.size), nil
}

// AllocatedBytes is the space the disk takes on its file system (a block
// device: none of it counted there).
func (d *Disk) AllocatedBytes() (int64, error) {
	var st unix.Stat_t
	if err := unix.Fstat(int(d.f.Fd()), &st); err != nil {
		return 0, &DiskError{Path: d.path, Op: "stat", Err: err}
	}
	return st.Blocks * 512, nil
}

// GrowPipe asks F_SETPIPE_SZ for size bytes when f is a pipe: the export's
// output and the import's input move megabytes per wakeup instead of the
// default 64 KiB. Failure is harmless (an unprivileged user is capped by
// /proc/sys/fs/pipe-max-size).
func GrowPipe(f *os.File, size int) {
	var st unix.Stat_t
	if unix.Fstat(int(f.Fd()), &st) == nil && st.Mode&unix.S_IFMT == unix.S_IFIFO {
		unix.FcntlInt(f.Fd(), unix.F_SETPIPE_SZ, size)
	}
}

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
	direct bool
	sector int64 // logical block size for O_DIRECT
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

// Open opens a disk for reading. With direct it uses O_DIRECT: reads must
// then go through ReadAt with buffers from AlignedBuffer.
func Open(path string, direct bool) (*Disk, error) {
	return open(path, os.O_RDONLY, direct, 0)
}

// OpenFile opens a disk for writing (the import destination). A regular file
// is created if missing, with mode perm.
func OpenFile(path string, direct bool, perm os.FileMode) (*Disk, error) {
	return open(path, os.O_RDWR|os.O_CREATE, direct, perm)
}

// FromFile wraps an already open descriptor (vhd-tool's --source-fd and
// --destination-fd).
func FromFile(f *os.File, name string) (*Disk, error) {
	d := &Disk{f: f, path: name}
	if err := d.stat(); err != nil {
		return nil, err
	}
	return d, nil
}

// FromFileDirect wraps an already open descriptor like FromFile and, with
// direct, turns on O_DIRECT on it (fcntl F_SETFL): xapi opens the disk and
// passes the descriptor, and --direct must still bypass the page cache.
func FromFileDirect(f *os.File, name string, direct bool) (*Disk, error) {
	d, err := FromFile(f, name)
	if err != nil || !direct {
		return d, err
	}
	fl, err := unix.FcntlInt(f.Fd(), unix.F_GETFL, 0)
	if err == nil {
		_, err = unix.FcntlInt(f.Fd(), unix.F_SETFL, fl|unix.O_DIRECT)
	}
	if err != nil {
		return nil, &DiskError{Path: name, Op: "set O_DIRECT", Err: err}
	}
	d.direct = true
	return d, nil
}

func open(path string, flag int, direct bool, perm os.FileMode) (*Disk, error) {
	// Refuse what is not a disk before opening it: opening a FIFO would
	// block, and opening a character device can have side effects.
	st, err := os.Stat(path)
	switch {
	case err == nil:
		if m := st.Mode(); !m.IsRegular() && (m&os.ModeDevice == 0 || m&os.ModeCharDevice != 0) {
			return nil, &DiskError{Path: path, Err: fmt.Errorf("%w (it is a %s)", ErrNotDisk, describeMode(m))}
		}
	case errors.Is(err, os.ErrNotExist) && flag&os.O_CREATE != 0:
	default:
		return nil, &DiskError{Path: path, Err: WithoutPath(err)}
	}
	if direct {
		flag |= unix.O_DIRECT
	}
	f, err := os.OpenFile(path, flag|unix.O_CLOEXEC, perm)
	if err != nil {
		return nil, &DiskError{Path: path, Err: WithoutPath(err)}
	}
	d := &Disk{f: f, path: path, direct: direct}
	if err := d.stat(); err != nil {
		f.Close()
		return nil, err
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
		d.kind, d.size, d.sector = RegularFile, st.Size(), 512
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

// Direct reports whether the disk was opened with O_DIRECT.
func (d *Disk) Direct() bool { return d.direct }

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
	if d.direct && (off%d.sector != 0 || uintptr(unsafe.Pointer(unsafe.SliceData(p)))%Alignment != 0) {
		return 0, &DiskError{Path: d.path, Op: "read", Err: fmt.Errorf("unaligned direct read at %d", off)}
	}
	want := len(p)
	if d.direct && want%int(d.sector) != 0 {
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
	n, err := d.f.ReadAt(p, off)
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
	n, err := d.f.WriteAt(p, off)
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

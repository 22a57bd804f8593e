package rawdisk

import (
	"errors"
	"fmt"
	"unsafe"

	"golang.org/x/sys/unix"
)

// zeroChunk bounds the buffer of the write-zeros fallback and the length
// of a single BLKZEROOUT, so that a huge range neither allocates much nor
// blocks signal handling for long.
const zeroChunk = 4 << 20

// Zero makes [off, off+n) read as zeros as cheaply as the disk allows: a
// hole punched in a regular file (FALLOC_FL_PUNCH_HOLE, else
// FALLOC_FL_ZERO_RANGE), BLKZEROOUT on a block device, and written zeros
// only where neither works. The disk's size never changes and nothing
// outside the range is touched.
func (d *Disk) Zero(off, n int64) error {
	if n == 0 {
		return nil
	}
	if off < 0 || n < 0 || off > d.size || n > d.size-off {
		return &DiskError{Path: d.path, Op: fmt.Sprintf("zero %d bytes at offset %d", n, off), Err: fmt.Errorf("outside the disk (%d bytes)", d.size)}
	}
	fd := int(d.f.Fd())
	if d.kind == RegularFile {
		for _, mode := range []uint32{unix.FALLOC_FL_PUNCH_HOLE | unix.FALLOC_FL_KEEP_SIZE, unix.FALLOC_FL_ZERO_RANGE | unix.FALLOC_FL_KEEP_SIZE} {
			err := unix.Fallocate(fd, mode, off, n)
			if err == nil {
				return nil
			}
			if !unsupported(err) {
				return &DiskError{Path: d.path, Op: fmt.Sprintf("zero %d bytes at offset %d", n, off), Err: err}
			}
		}
		return d.WriteZeros(off, n)
	}
	// BLKZEROOUT wants whole logical blocks: the unaligned head and tail
	// are written.
	sec := d.sector
	start := (off + sec - 1) / sec * sec
	end := (off + n) / sec * sec
	if start >= end {
		return d.WriteZeros(off, n)
	}
	if err := d.WriteZeros(off, start-off); err != nil {
		return err
	}
	for pos := start; pos < end; {
		l := min(end-pos, zeroChunk)
		r := [2]uint64{uint64(pos), uint64(l)}
		if _, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), unix.BLKZEROOUT, uintptr(unsafe.Pointer(&r))); errno != 0 {
			if unsupported(errno) {
				if err := d.WriteZeros(pos, end-pos); err != nil {
					return err
				}
				break
			}
			return &DiskError{Path: d.path, Op: fmt.Sprintf("BLKZEROOUT %d bytes at offset %d", l, pos), Err: errno}
		}
		pos += l
	}
	return d.WriteZeros(end, off+n-end)
}

func unsupported(err error) bool {
	return errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.ENOTSUP) || errors.Is(err, unix.ENOSYS) ||
		errors.Is(err, unix.ENOTTY) || errors.Is(err, unix.EINVAL)
}

// WriteZeros writes zeros over [off, off+n). With O_DIRECT the parts that
// are not aligned go through WriteAtAnyAlignment.
func (d *Disk) WriteZeros(off, n int64) error {
	if n <= 0 {
		return nil
	}
	buf := AlignedBuffer(int(min(n+Alignment, zeroChunk)))
	for n > 0 {
		l := min(n, zeroChunk)
		if al := d.directAlign(); d.Direct() && off%al != 0 {
			l = min(l, al-off%al)
		}
		if err := d.WriteAtAnyAlignment(buf[:l], off); err != nil {
			return err
		}
		off, n = off+l, n-l
	}
	return nil
}

// WriteAtAnyAlignment writes all of p at off. Without O_DIRECT it is
// WriteAt. With O_DIRECT, the aligned middle is written directly (p must
// then come from AlignedBuffer, with p[0] standing for a disk offset of the
// same alignment), and the unaligned head and tail — including a last
// block that ends with a disk whose size is not a multiple of the block
// size, which a direct write would extend — are written through the page
// cache by clearing O_DIRECT for that one write. The page cache stays
// coherent: Linux flushes and invalidates it around direct I/O, and Sync
// writes the rest.
func (d *Disk) WriteAtAnyAlignment(p []byte, off int64) error {
	if off < 0 || off > d.size || int64(len(p)) > d.size-off {
		return &DiskError{Path: d.path, Op: fmt.Sprintf("write %d bytes at offset %d", len(p), off), Err: fmt.Errorf("outside the disk (%d bytes)", d.size)}
	}
	if !d.Direct() {
		return d.writeFull(p, off)
	}
	end := off + int64(len(p))
	al := d.directAlign()
	a := (off + al - 1) / al * al
	b := end / al * al
	if a >= b || uintptr(unsafe.Pointer(&p[a-off]))%Alignment != 0 {
		return d.writeBuffered(p, off)
	}
	if a > off {
		if err := d.writeBuffered(p[:a-off], off); err != nil {
			return err
		}
	}
	if err := d.writeFull(p[a-off:b-off], a); err != nil {
		return err
	}
	if end > b {
		return d.writeBuffered(p[b-off:], b)
	}
	return nil
}

func (d *Disk) writeFull(p []byte, off int64) error {
	n, err := d.WriteAt(p, off)
	if err == nil && n < len(p) {
		return &DiskError{Path: d.path, Op: fmt.Sprintf("write at offset %d", off+int64(n)), Err: errors.New("short write")}
	}
	return err
}

// writeBuffered writes through the page cache on a disk opened with
// O_DIRECT.
func (d *Disk) writeBuffered(p []byte, off int64) error {
	fd := int(d.f.Fd())
	flags, err := unix.FcntlInt(uintptr(fd), unix.F_GETFL, 0)
	if err != nil {
		return &DiskError{Path: d.path, Op: "F_GETFL", Err: err}
	}
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_SETFL, flags&^unix.O_DIRECT); err != nil {
		return &DiskError{Path: d.path, Op: "clearing O_DIRECT", Err: err}
	}
	werr := d.writeFull(p, off)
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_SETFL, flags); err != nil && werr == nil {
		werr = &DiskError{Path: d.path, Op: "setting O_DIRECT", Err: err}
	}
	return werr
}

// Truncate sets the size of a regular file (the import destination grows
// to the virtual size). Block devices have a fixed size: asking for
// another one is an error.
func (d *Disk) Truncate(size int64) error {
	if d.kind != RegularFile {
		if size == d.size {
			return nil
		}
		return &DiskError{Path: d.path, Op: "resize", Err: fmt.Errorf("a block device cannot be resized (it has %d bytes, %d asked)", d.size, size)}
	}
	if err := d.f.Truncate(size); err != nil {
		return &DiskError{Path: d.path, Op: fmt.Sprintf("truncate to %d bytes", size), Err: WithoutPath(err)}
	}
	d.size = size
	return nil
}

// StartWriteback starts writing back dirty pages of [off, off+n) without
// waiting (sync_file_range SYNC_FILE_RANGE_WRITE).
func (d *Disk) StartWriteback(off, n int64) error {
	return d.syncRange(off, n, unix.SYNC_FILE_RANGE_WRITE)
}

// WaitWriteback writes back [off, off+n) and waits for it, so that a
// device error is reported for that range rather than at the final fsync,
// where its place on the disk is no longer known.
func (d *Disk) WaitWriteback(off, n int64) error {
	return d.syncRange(off, n, unix.SYNC_FILE_RANGE_WAIT_BEFORE|unix.SYNC_FILE_RANGE_WRITE|unix.SYNC_FILE_RANGE_WAIT_AFTER)
}

func (d *Disk) syncRange(off, n int64, flags int) error {
	if n <= 0 {
		return nil
	}
	for {
		err := unix.SyncFileRange(int(d.f.Fd()), off, n, flags)
		if err == unix.EINTR {
			continue
		}
		if err == nil || err == unix.ESPIPE || err == unix.EINVAL || err == unix.ENOSYS {
			return nil // not a file we can range-sync: the final fsync still checks
		}
		return &DiskError{Path: d.path, Op: fmt.Sprintf("write-back of offsets %d to %d", off, off+n), Err: err}
	}
}

package export

import (
	"errors"
	"fmt"
	"os"

	"github.com/xapi-project/xapi-qcow-tool/vhdcompat/rawdisk"
	"golang.org/x/sys/unix"
)

var errNoSendfile = errors.New("sendfile not supported between these files")

// pipeSize is what we ask of F_SETPIPE_SZ: with the default 64 KiB pipe
// each sendfile call moves 16 pages; 1 MiB moves the data several times
// faster (see docs/PERFORMANCE.md).
const pipeSize = 1 << 20

// sendfile copies n bytes at off of src to out in the kernel. It returns
// errNoSendfile (with nothing copied) when the pair is not supported, and a
// "disk shrank" error when the source ends early.
func sendfile(out *os.File, src *rawdisk.Disk, off, n int64) (int64, error) {
	outFd, inFd := int(out.Fd()), int(src.File().Fd())
	var done int64
	for done < n {
		o := off + done
		k, err := unix.Sendfile(outFd, inFd, &o, int(min(n-done, 1<<30)))
		if err == unix.EINTR || err == unix.EAGAIN && k <= 0 {
			if err == unix.EAGAIN {
				if err := waitWritable(outFd); err != nil {
					return done, &OutputError{err}
				}
			}
			continue
		}
		if err != nil {
			if done == 0 && (err == unix.EINVAL || err == unix.ENOSYS || err == unix.EOPNOTSUPP) {
				return 0, errNoSendfile
			}
			if err == unix.EPIPE || err == unix.ECONNRESET {
				return done, &OutputError{err}
			}
			return done, &rawdisk.DiskError{Path: src.Path(), Op: fmt.Sprintf("sendfile at offset %d", o), Err: err}
		}
		if k == 0 {
			return done, &rawdisk.DiskError{Path: src.Path(), Op: "read", Err: fmt.Errorf("disk shrank: it ends at %d, it was %d bytes when the export started", off+done, src.Size())}
		}
		done += int64(k)
	}
	return done, nil
}

// waitWritable blocks until a non-blocking descriptor can take more data.
func waitWritable(fd int) error {
	fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLOUT}}
	for {
		_, err := unix.Poll(fds, -1)
		if err == unix.EINTR {
			continue
		}
		return err
	}
}

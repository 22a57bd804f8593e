package rawdisk

import (
	"io"
	"sync"
)

// Unaligned returns an io.ReaderAt that takes any offset, length and
// buffer, for readers that parse what they read (the support commands'
// qcow2 walks): under O_DIRECT each read is widened to whole sectors in an
// aligned bounce buffer of its own and the asked bytes copied out; through
// the page cache it is the file itself. Reads past the end return io.EOF,
// as os.File's do.
func (d *Disk) Unaligned() io.ReaderAt { return &unaligned{d: d} }

type unaligned struct {
	d   *Disk
	mu  sync.Mutex
	buf []byte
}

// unalignedChunk bounds the bounce buffer, whatever the caller asks.
const unalignedChunk = 1 << 20

func (u *unaligned) ReadAt(p []byte, off int64) (int, error) {
	if !u.d.Direct() {
		return u.d.f.ReadAt(p, off)
	}
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.buf == nil {
		u.buf = AlignedBuffer(unalignedChunk + 2*int(max(Alignment, u.d.sector)))
	}
	sec := u.d.sector
	done := 0
	for done < len(p) {
		pos := off + int64(done)
		if pos >= u.d.size {
			return done, io.EOF
		}
		a := pos / sec * sec
		end := min(pos+int64(min(len(p)-done, unalignedChunk)), u.d.size)
		b := (end + sec - 1) / sec * sec
		n, err := u.d.ReadAt(u.buf[:b-a], a)
		if int64(n) <= pos-a {
			if err == nil {
				err = io.ErrUnexpectedEOF
			}
			return done, err
		}
		done += copy(p[done:], u.buf[pos-a:min(int64(n), end-a)])
		if err != nil && err != io.EOF {
			return done, err
		}
	}
	return done, nil
}

package export

import (
	"context"
	"sync"

	"github.com/xapi-project/xapi-qcow-tool/vhdcompat/rawdisk"
)

// span is a byte range [off, off+n) of the disk, one window of a pass.
type span struct{ off, n int64 }

// readahead runs a pass as a pipeline: readers fill a ring of aligned
// buffers with the next windows while the consumer works on the current
// one, so that reading (a copy from the page cache, or an O_DIRECT request
// to the device) overlaps comparing or writing. Windows reach the consumer
// in order. With more than one reader, several reads are in flight at
// once, which is what keeps a block device busy under O_DIRECT.
type readahead struct {
	depth   int // slots in the ring
	readers int
	width   int       // buffers per slot (2: source and base)
	size    int       // bytes per buffer
	pool    *[][]byte // buffers kept from one pass to the next
}

type slot struct {
	bufs  [][]byte
	free  chan struct{} // a token while the consumer is done with the slot
	ready chan filled   // the window read into the slot
}

type filled struct {
	s   span
	err error
}

// buffer returns the i-th buffer of the pool, allocating it when missing:
// the data pass reuses the allocation pass's buffers, so the peak stays at
// one ring.
func (ra readahead) buffer(i int) []byte {
	for len(*ra.pool) <= i {
		*ra.pool = append(*ra.pool, nil)
	}
	if b := (*ra.pool)[i]; cap(b) >= ra.size {
		return b[:ra.size]
	}
	b := rawdisk.AlignedBuffer(ra.size)
	(*ra.pool)[i] = b
	return b
}

// run reads every window next yields with read, and hands each to consume
// in order. It returns the first error of either side, and only after every
// reader has stopped (the caller may close the disks right after).
func (ra readahead) run(ctx context.Context, next func() (span, bool),
	read func(s span, bufs [][]byte) error, consume func(s span, bufs [][]byte) error) error {
	slots := make([]*slot, ra.depth)
	for i := range slots {
		s := &slot{free: make(chan struct{}, 1), ready: make(chan filled, 1)}
		for range ra.width {
			s.bufs = append(s.bufs, ra.buffer(i*ra.width+len(s.bufs)))
		}
		s.free <- struct{}{}
		slots[i] = s
	}
	stop := make(chan struct{})
	var (
		mu   sync.Mutex // hands out windows and slots in the same order
		seq  int
		done bool
		wg   sync.WaitGroup
	)
	// claim takes the next window and its slot; the lock makes the slot
	// order follow the window order whatever the readers' timing.
	claim := func() (*slot, span, bool) {
		mu.Lock()
		defer mu.Unlock()
		if done {
			return nil, span{}, false
		}
		select {
		case <-stop:
			return nil, span{}, false
		default:
		}
		sl := slots[seq%ra.depth]
		select {
		case <-sl.free:
		case <-stop:
			return nil, span{}, false
		}
		s, ok := next()
		if !ok {
			done = true
			sl.free <- struct{}{}
			sl.ready <- filled{s: span{n: -1}} // end marker
			return nil, span{}, false
		}
		seq++
		return sl, s, true
	}
	for range ra.readers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				sl, s, ok := claim()
				if !ok {
					return
				}
				bufs := make([][]byte, len(sl.bufs))
				for i, b := range sl.bufs {
					bufs[i] = b[:s.n]
				}
				err := ctx.Err()
				if err == nil {
					err = read(s, bufs)
				}
				sl.ready <- filled{s, err}
				if err != nil {
					return
				}
			}
		}()
	}
	err := func() error {
		for i := 0; ; i++ {
			sl := slots[i%ra.depth]
			f := <-sl.ready
			if f.err != nil {
				return f.err
			}
			if f.s.n < 0 {
				return nil
			}
			bufs := make([][]byte, len(sl.bufs))
			for j, b := range sl.bufs {
				bufs[j] = b[:f.s.n]
			}
			if err := consume(f.s, bufs); err != nil {
				return err
			}
			sl.free <- struct{}{}
		}
	}()
	// A reader never blocks on ready (a slot holds at most one window
	// until the consumer frees it), so once stop is closed they all end.
	close(stop)
	wg.Wait()
	return err
}

package importer

import (
	"sync"

	"github.com/xapi-project/xapi-qcow-tool/vhdcompat/rawdisk"
)

// asyncTarget performs a Target's operations in order on a goroutine of
// its own, so that writing the disk overlaps reading and decoding the
// stream: with two cores, one reads the pipe while the other writes (see
// docs/PERFORMANCE.md). The first error stops all later
// operations but buffer releases, and is returned by every call after it
// and by Wait; it carries the offset of the failed operation.
type asyncTarget struct {
	t   Target
	wb  Writebacker // nil when t has no range write-back
	ops chan asyncOp
	wg  sync.WaitGroup

	mu  sync.Mutex
	err error
}

type asyncOp struct {
	do     func() error
	always bool // run even after an error (buffer releases)
}

// asyncDepth bounds the operations queued ahead of the disk; the data they
// refer to is bounded by the sink's buffer pool, not by this.
const asyncDepth = 64

func newAsyncTarget(t Target) *asyncTarget {
	a := &asyncTarget{t: t, ops: make(chan asyncOp, asyncDepth)}
	a.wb, _ = t.(Writebacker)
	go a.run()
	return a
}

func (a *asyncTarget) run() {
	for op := range a.ops {
		if op.always || a.Err() == nil {
			if err := op.do(); err != nil {
				a.mu.Lock()
				if a.err == nil {
					a.err = err
				}
				a.mu.Unlock()
			}
		}
		a.wg.Done()
	}
}

// Err is the first error of an operation so far.
func (a *asyncTarget) Err() error {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.err
}

func (a *asyncTarget) enqueue(op asyncOp) error {
	if err := a.Err(); err != nil && !op.always {
		return err
	}
	a.wg.Add(1)
	a.ops <- op
	return nil
}

// WriteAtAnyAlignment queues a write; p must not change until the write
// is done (the sink releases its buffers through release).
func (a *asyncTarget) WriteAtAnyAlignment(p []byte, off int64) error {
	return a.enqueue(asyncOp{do: func() error { return a.t.WriteAtAnyAlignment(p, off) }})
}

func (a *asyncTarget) Zero(off, n int64) error {
	return a.enqueue(asyncOp{do: func() error { return a.t.Zero(off, n) }})
}

func (a *asyncTarget) Direct() bool { return a.t.Direct() }

func (a *asyncTarget) StartWriteback(off, n int64) error {
	if a.wb == nil {
		return nil
	}
	return a.enqueue(asyncOp{do: func() error { return a.wb.StartWriteback(off, n) }})
}

func (a *asyncTarget) WaitWriteback(off, n int64) error {
	if a.wb == nil {
		return nil
	}
	return a.enqueue(asyncOp{do: func() error { return a.wb.WaitWriteback(off, n) }})
}

// release hands buf back to free once every operation queued before it is
// done.
func (a *asyncTarget) release(buf []byte, free chan []byte) {
	a.enqueue(asyncOp{always: true, do: func() error { free <- buf; return nil }})
}

// Wait waits for every queued operation and returns the first error.
func (a *asyncTarget) Wait() error {
	a.wg.Wait()
	return a.Err()
}

// Close waits for the queue and stops the goroutine.
func (a *asyncTarget) Close() error {
	err := a.Wait()
	close(a.ops)
	return err
}

var _ Target = (*asyncTarget)(nil)
var _ Writebacker = (*asyncTarget)(nil)

// asyncBuffers is the sink's buffer pool with an asyncTarget: one being
// filled, the others being written.
const asyncBuffers = 3

func newBufferPool(n, size int) chan []byte {
	free := make(chan []byte, n)
	for range n {
		free <- rawdisk.AlignedBuffer(size)
	}
	return free
}

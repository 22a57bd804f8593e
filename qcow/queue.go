package qcow

// accumulator merges adjacent zero or unallocated extents before they are
// queued.
type accumulator struct {
	ext Extent
}

// queue is a FIFO of work items handed out by Next.
type item struct {
	ext Extent
	// compressed cluster waiting to be decompressed: its bytes (stream) or
	// its host range (random access)
	comp       bool
	g          uint64
	src        []byte
	coff, clen uint64
	charged    int64
	// random access: data to read at ext.HostOffset
	read bool
}

type queue struct {
	items []item
	head  int
}

func (q *queue) push(it item) { q.items = append(q.items, it) }
func (q *queue) empty() bool  { return q.head == len(q.items) }
func (q *queue) pop() item {
	it := q.items[q.head]
	q.items[q.head] = item{}
	q.head++
	if q.head == len(q.items) {
		q.items, q.head = q.items[:0], 0
	}
	return it
}

// add queues a zero or unallocated range, merging it with the previous one
// when they touch.
func (a *accumulator) add(q *queue, kind ExtentKind, off, length uint64) {
	if a.ext.Length > 0 && a.ext.Kind == kind && a.ext.Offset+a.ext.Length == off {
		a.ext.Length += length
		return
	}
	a.flush(q)
	a.ext = Extent{Kind: kind, Offset: off, Length: length}
}

func (a *accumulator) flush(q *queue) {
	if a.ext.Length > 0 {
		q.push(item{ext: a.ext})
		a.ext = Extent{}
	}
}

package inspect

import (
	"bytes"
	"errors"
	"fmt"
	"io"

	"github.com/xapi-project/xapi-qcow-tool/qcow"
)

// chunk is a guest range of a disk's content; nil data reads as zeros.
type chunk struct {
	off, length uint64
	data        []byte
}

// content yields a disk's content in guest order, without gaps.
type content interface {
	size() uint64
	next() (chunk, error) // io.EOF at the end
}

// IsQcow2 reports whether r starts with the qcow2 magic.
func IsQcow2(r io.ReaderAt) bool {
	var m [4]byte
	if _, err := r.ReadAt(m[:], 0); err != nil {
		return false
	}
	return be.Uint32(m[:]) == qcow.Magic
}

// openContent reads r as qcow2 when it has the magic, as raw otherwise.
func openContent(r io.ReaderAt, size int64) (content, error) {
	if !IsQcow2(r) {
		return &rawContent{r: r, n: uint64(size), buf: make([]byte, 1<<20)}, nil
	}
	d, err := qcow.NewReaderAt(r, size, qcow.ReaderOptions{})
	if err != nil {
		return nil, err
	}
	return &qcowContent{d: d, n: d.Header().Size}, nil
}

type rawContent struct {
	r   io.ReaderAt
	n   uint64
	pos uint64
	buf []byte
}

func (c *rawContent) size() uint64 { return c.n }

func (c *rawContent) next() (chunk, error) {
	if c.pos >= c.n {
		return chunk{}, io.EOF
	}
	l := min(uint64(len(c.buf)), c.n-c.pos)
	if err := readFull(c.r, c.buf[:l], c.pos); err != nil {
		return chunk{}, err
	}
	ch := chunk{off: c.pos, length: l, data: c.buf[:l]}
	c.pos += l
	return ch, nil
}

type qcowContent struct {
	d       *qcow.Reader
	n       uint64
	pos     uint64
	pending *chunk
}

func (c *qcowContent) size() uint64 { return c.n }

func (c *qcowContent) next() (chunk, error) {
	for {
		if c.pending != nil {
			p := *c.pending
			if p.off > c.pos { // a gap the decoder did not describe: zeros
				ch := chunk{off: c.pos, length: p.off - c.pos}
				c.pos = p.off
				return ch, nil
			}
			c.pending = nil
			c.pos = p.off + p.length
			return p, nil
		}
		if c.pos >= c.n {
			return chunk{}, io.EOF
		}
		x, err := c.d.Next()
		if errors.Is(err, io.EOF) {
			ch := chunk{off: c.pos, length: c.n - c.pos}
			c.pos = c.n
			return ch, nil
		}
		if err != nil {
			return chunk{}, err
		}
		if x.Offset < c.pos || x.Offset >= c.n {
			continue // nothing new (or past the end)
		}
		ch := chunk{off: x.Offset, length: min(x.Length, c.n-x.Offset)}
		if x.Kind == qcow.ExtentData {
			if uint64(len(x.Data)) < ch.length {
				return chunk{}, fmt.Errorf("decoder returned %d bytes for an extent of %d", len(x.Data), ch.length)
			}
			ch.data = x.Data[:ch.length]
		}
		c.pending = &ch
	}
}

// cursor walks a content, handing out pieces of its chunks.
type cursor struct {
	c   content
	cur chunk
	eof bool
}

// avail loads the next chunk when needed and returns how many bytes are
// ready at the cursor; 0 at the end.
func (k *cursor) avail() (uint64, error) {
	for k.cur.length == 0 && !k.eof {
		ch, err := k.c.next()
		if errors.Is(err, io.EOF) {
			k.eof = true
			break
		}
		if err != nil {
			return 0, err
		}
		k.cur = ch
	}
	return k.cur.length, nil
}

// take returns the next n bytes (n <= avail; data nil for zeros).
func (k *cursor) take(n uint64) chunk {
	out := chunk{off: k.cur.off, length: n}
	if k.cur.data != nil {
		out.data = k.cur.data[:n]
		k.cur.data = k.cur.data[n:]
	}
	k.cur.off += n
	k.cur.length -= n
	return out
}

// firstNonZero returns the index of the first non-zero byte of b, or -1.
func firstNonZero(b []byte) int {
	for i, x := range b {
		if x != 0 {
			return i
		}
	}
	return -1
}

// firstDiff returns the index of the first differing byte of a and b
// (chunks of equal length), or -1.
func firstDiff(a, b chunk) int {
	switch {
	case a.data == nil && b.data == nil:
		return -1
	case a.data == nil:
		return firstNonZero(b.data)
	case b.data == nil:
		return firstNonZero(a.data)
	}
	if bytes.Equal(a.data, b.data) {
		return -1
	}
	for i := range a.data {
		if a.data[i] != b.data[i] {
			return i
		}
	}
	return -1
}

// CompareResult says whether two disks hold the same bytes.
type CompareResult struct {
	Identical    bool
	Offset       uint64 // first differing byte when not identical
	SizeMismatch bool   // the sizes differ (the longer one's tail was compared with zeros)
	SizeA, SizeB uint64
}

// Compare compares the content of two disks, each raw or qcow2 (told apart
// by the magic). As qemu-img compare does, disks of different sizes are
// identical when the longer one's tail reads as zeros.
func Compare(a io.ReaderAt, sizeA int64, b io.ReaderAt, sizeB int64) (*CompareResult, error) {
	ca, err := openContent(a, sizeA)
	if err != nil {
		return nil, fmt.Errorf("first image: %w", err)
	}
	cb, err := openContent(b, sizeB)
	if err != nil {
		return nil, fmt.Errorf("second image: %w", err)
	}
	res := &CompareResult{SizeA: ca.size(), SizeB: cb.size(), SizeMismatch: ca.size() != cb.size()}
	ka, kb := &cursor{c: ca}, &cursor{c: cb}
	pos := uint64(0)
	for {
		na, err := ka.avail()
		if err != nil {
			return nil, fmt.Errorf("first image: %w", err)
		}
		nb, err := kb.avail()
		if err != nil {
			return nil, fmt.Errorf("second image: %w", err)
		}
		var x, y chunk
		switch {
		case na == 0 && nb == 0:
			res.Identical = true
			return res, nil
		case na == 0: // a ended: the rest of b must read as zeros
			y = kb.take(nb)
			x = chunk{length: nb}
		case nb == 0:
			x = ka.take(na)
			y = chunk{length: na}
		default:
			n := min(na, nb)
			x, y = ka.take(n), kb.take(n)
		}
		if i := firstDiff(x, y); i >= 0 {
			res.Offset = pos + uint64(i)
			return res, nil
		}
		pos += x.length
	}
}

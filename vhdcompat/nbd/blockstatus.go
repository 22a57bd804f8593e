package nbd

import (
	"context"
	"encoding/binary"
	"fmt"
)

// Extents reports the base:allocation status of the whole export, in
// order, as consecutive extents that cover [0, Size) exactly, asking for
// windows of at most Window bytes. fn's error stops the walk.
func (c *Client) Extents(ctx context.Context, fn func(Extent) error) error {
	for off := int64(0); off < c.size; {
		if c.broken {
			return fmt.Errorf("block status at offset %d: the connection is out of step after an earlier error", off)
		}
		if off%c.minBlock != 0 {
			return &ProtocolError{Stage: fmt.Sprintf("block status at offset %d", off),
				Msg: fmt.Sprintf("an extent ended at %d, not a multiple of the minimum block size %d the server advertised", off, c.minBlock)}
		}
		length := min(int64(Window), c.size-off)
		var covered int64
		err := c.exchange(ctx, func() error {
			var err error
			covered, err = c.blockStatus(off, uint32(length), fn)
			return err
		})
		if err != nil {
			return err
		}
		off += covered
	}
	return nil
}

// spend counts n pieces of work against MaxPieces.
func (c *Client) spend(n uint64, stage string) error {
	c.pieces += n
	if c.pieces > MaxPieces {
		return &ProtocolError{Stage: stage, Msg: fmt.Sprintf("the export is described in more than %d requests and extents", MaxPieces)}
	}
	return nil
}

// blockStatus sends one NBD_CMD_BLOCK_STATUS for [off, off+length) and
// reads its reply, calling fn for each extent clipped to the request. It
// returns how much of the request the extents cover (at least a byte).
func (c *Client) blockStatus(off int64, length uint32, fn func(Extent) error) (int64, error) {
	stage := fmt.Sprintf("block status at offset %d", off)
	if err := c.spend(1, stage); err != nil {
		return 0, err
	}
	if err := c.write(c.request(cmdBlockStatus, uint64(off), length), stage); err != nil {
		return 0, err
	}
	r := replyReader{c: c, stage: stage, off: off, length: int64(length), fn: fn}
	return r.read()
}

// replyReader reads the structured reply to one block status request.
type replyReader struct {
	c          *Client
	stage      string
	off        int64
	length     int64
	fn         func(Extent) error
	covered    int64
	seenStatus bool
	serverErr  error
}

func (r *replyReader) violation(format string, args ...any) error {
	return &ProtocolError{Stage: r.stage, Msg: fmt.Sprintf(format, args...)}
}

func (r *replyReader) read() (int64, error) {
	c := r.c
	for chunk := 0; ; chunk++ {
		if chunk == maxChunks {
			return 0, r.violation("more than %d chunks in one reply", maxChunks)
		}
		magic := c.buf[:4]
		if err := c.read(magic, r.stage); err != nil {
			return 0, err
		}
		switch m := binary.BigEndian.Uint32(magic); m {
		case magicSimple:
			return 0, r.simple()
		case magicChunk:
		default:
			return 0, r.violation("bad reply magic %#x", m)
		}
		h := c.buf[:16]
		if err := c.read(h, r.stage); err != nil {
			return 0, err
		}
		flags, typ := binary.BigEndian.Uint16(h), binary.BigEndian.Uint16(h[2:])
		cookie, n := binary.BigEndian.Uint64(h[4:]), binary.BigEndian.Uint32(h[12:])
		if cookie != c.cookie {
			return 0, r.violation("a reply to request %d, not to %d", cookie, c.cookie)
		}
		if flags&^chunkFlagDone != 0 {
			return 0, r.violation("unknown reply flags %#x", flags)
		}
		var err error
		switch {
		case typ == chunkNone:
			if n != 0 || flags&chunkFlagDone == 0 {
				return 0, r.violation("an empty chunk of %d bytes, flags %#x", n, flags)
			}
		case typ == chunkBlockStatus:
			err = r.status(n)
		case typ&chunkErrBit != 0:
			err = r.errorChunk(typ, n)
		default:
			return 0, r.violation("unexpected reply chunk type %d", typ)
		}
		if err != nil {
			return 0, err
		}
		if flags&chunkFlagDone != 0 {
			break
		}
	}
	if r.serverErr != nil {
		// The reply is complete: the stream is still in step.
		return 0, r.serverErr
	}
	if !r.seenStatus {
		return 0, r.violation("the reply holds no block status")
	}
	return r.covered, nil
}

// simple handles a simple reply, which a server may send for an error.
func (r *replyReader) simple() error {
	c := r.c
	h := c.buf[:12]
	if err := c.read(h, r.stage); err != nil {
		return err
	}
	code, cookie := binary.BigEndian.Uint32(h), binary.BigEndian.Uint64(h[4:])
	if cookie != c.cookie {
		return r.violation("a reply to request %d, not to %d", cookie, c.cookie)
	}
	if code == 0 {
		return r.violation("a simple reply without error to block status, which needs a structured one")
	}
	return &ServerError{Stage: r.stage, Code: code}
}

// status reads a block status chunk of n bytes, descriptor by descriptor
// (nothing of it is held): the extents run from the request's offset, none
// empty, all but the last inside the request; the last is clipped to it.
func (r *replyReader) status(n uint32) error {
	c := r.c
	if r.seenStatus {
		return r.violation("a second block status chunk for the one context selected")
	}
	r.seenStatus = true
	if n < 12 || (n-4)%8 != 0 || (n-4)/8 > maxExtentsPerChunk {
		return r.violation("a block status chunk of %d bytes (4 + 8 per extent, 1 to %d extents)", n, maxExtentsPerChunk)
	}
	count := (n - 4) / 8
	if err := c.spend(uint64(count), r.stage); err != nil {
		return err
	}
	id := c.buf[:4]
	if err := c.read(id, r.stage); err != nil {
		return err
	}
	if got := binary.BigEndian.Uint32(id); got != c.contextID {
		return r.violation("block status for context %d, not %d (%s)", got, c.contextID, MetaContext)
	}
	var sum int64
	d := c.buf[:8]
	for i := uint32(0); i < count; i++ {
		if err := c.read(d, r.stage); err != nil {
			return err
		}
		length, flags := int64(binary.BigEndian.Uint32(d)), binary.BigEndian.Uint32(d[4:])
		if length == 0 {
			return r.violation("extent %d has length 0", i)
		}
		if sum >= r.length {
			return r.violation("extent %d starts at %d, past the %d bytes asked for", i, r.off+sum, r.length)
		}
		end := min(sum+length, r.length)
		if err := r.fn(Extent{Offset: r.off + sum, Length: end - sum, Flags: flags}); err != nil {
			return err
		}
		sum = end
	}
	r.covered = sum
	return nil
}

// errorChunk reads an error chunk of n bytes and keeps the first error.
func (r *replyReader) errorChunk(typ uint16, n uint32) error {
	c := r.c
	fixed := uint32(6)
	if typ == chunkErrorOffset {
		fixed = 14
	}
	if n < fixed || n > fixed+maxString {
		return r.violation("an error chunk of %d bytes", n)
	}
	h := c.buf[:6]
	if err := c.read(h, r.stage); err != nil {
		return err
	}
	code, msgLen := binary.BigEndian.Uint32(h), uint32(binary.BigEndian.Uint16(h[4:]))
	if msgLen > n-fixed {
		return r.violation("an error message of %d bytes in a chunk of %d", msgLen, n)
	}
	msg := make([]byte, msgLen)
	if err := c.read(msg, r.stage); err != nil {
		return err
	}
	rest := int64(n - 6 - msgLen)
	if typ == chunkErrorOffset {
		o := c.buf[:8]
		if err := c.read(o, r.stage); err != nil {
			return err
		}
		rest -= 8
		if at := binary.BigEndian.Uint64(o); at < uint64(r.off) || at >= uint64(r.off+r.length) {
			return r.violation("an error at offset %d, outside the request", at)
		}
	}
	if err := c.discard(rest, r.stage); err != nil {
		return err
	}
	if code == 0 {
		return r.violation("an error chunk with error 0")
	}
	if r.serverErr == nil {
		r.serverErr = &ServerError{Stage: r.stage, Code: code, Message: printable(msg)}
	}
	return nil
}

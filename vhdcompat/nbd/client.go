// Package nbd is a read-only NBD client for one question: which parts of an
// export hold data. It speaks the fixed newstyle handshake over a unix
// socket or TCP, negotiates structured replies and the base:allocation
// metadata context, enters transmission with NBD_OPT_GO, walks the export
// with NBD_CMD_BLOCK_STATUS and leaves with NBD_CMD_DISC
// (NetworkBlockDevice/nbd, doc/proto.md). It never reads or writes data.
//
// Every byte from the server is hostile: each length is checked against a
// bound before it is used (so memory stays small whatever the server
// sends), each exchange has a deadline, and the caller's context
// interrupts a blocked read.
package nbd

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"syscall"
	"time"
)

// DefaultTimeout bounds each exchange with the server when Options gives
// none: the handshake, and each block status request with its reply.
const DefaultTimeout = 30 * time.Second

// Options tune a connection.
type Options struct {
	// Timeout bounds each exchange (0: DefaultTimeout).
	Timeout time.Duration
}

// Extent is a run of an export with the same base:allocation status.
type Extent struct {
	Offset, Length int64
	Flags          uint32 // StateHole, StateZero; other bits are reserved and ignored
}

// Data reports whether the extent may hold data: neither a hole nor known
// to read as zeros (vhd-tool copies exactly these).
func (e Extent) Data() bool { return e.Flags&(StateHole|StateZero) == 0 }

// Client is a connection in the transmission phase, with base:allocation
// selected.
type Client struct {
	conn    net.Conn // nil when the client runs over a plain stream (tests)
	r       *bufio.Reader
	w       io.Writer
	timeout time.Duration

	size      int64
	minBlock  int64
	contextID uint32

	cookie  uint64
	pieces  uint64 // requests and extents so far, bounded by MaxPieces
	broken  bool   // the stream is out of step: no NBD_CMD_DISC, just close
	buf     [64]byte
	scratch []byte // option reply payloads, at most maxOptionReply
}

// Connect dials the server (network "unix" with a socket path, or "tcp"
// with host:port), negotiates base:allocation for the export and enters
// transmission.
func Connect(ctx context.Context, network, address, export string, opt Options) (*Client, error) {
	timeout := opt.Timeout
	if timeout <= 0 {
		timeout = DefaultTimeout
	}
	d := net.Dialer{Timeout: timeout}
	conn, err := d.DialContext(ctx, network, address)
	if err != nil {
		return nil, err
	}
	c := newClient(conn, conn, timeout)
	c.conn = conn
	if err := c.exchange(ctx, func() error { return c.handshake(export) }); err != nil {
		conn.Close()
		return nil, err
	}
	return c, nil
}

// newClient is a client over rw, not yet connected.
func newClient(r io.Reader, w io.Writer, timeout time.Duration) *Client {
	return &Client{r: bufio.NewReaderSize(r, 64<<10), w: w, timeout: timeout}
}

// Size is the export's size in bytes.
func (c *Client) Size() int64 { return c.size }

// exchange runs fn under the connection's deadline, interrupted when ctx
// is done; a failure leaves the stream out of step.
func (c *Client) exchange(ctx context.Context, fn func() error) error {
	if c.conn != nil {
		if err := c.conn.SetDeadline(time.Now().Add(c.timeout)); err != nil {
			c.broken = true
			return err
		}
		stop := context.AfterFunc(ctx, func() { c.conn.SetDeadline(time.Unix(1, 0)) })
		defer stop()
	}
	err := fn()
	var se *ServerError
	var oe *OptionError
	switch {
	case err == nil:
		return nil
	case errors.As(err, &se):
		// The reply was whole: the stream is still in step.
	case errors.As(err, &oe):
		// Refused during the handshake: leave politely (a soft
		// disconnect), without waiting for the server's ack.
		c.sendOption(optAbort, nil, "NBD_OPT_ABORT")
		c.broken = true
	default:
		c.broken = true
	}
	if ctx.Err() != nil {
		return context.Cause(ctx)
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return fmt.Errorf("the server did not answer within %s", c.timeout)
	}
	return err
}

// read fills p from the server; a short stream is the server closing
// mid-message.
func (c *Client) read(p []byte, stage string) error {
	if _, err := io.ReadFull(c.r, p); err != nil {
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return &ProtocolError{Stage: stage, Msg: "the connection closed in the middle of a message"}
		}
		return fmt.Errorf("%s: %w", stage, err)
	}
	return nil
}

// discard skips n bytes of the server's message.
func (c *Client) discard(n int64, stage string) error {
	if m, err := c.r.Discard(int(n)); int64(m) != n || err != nil {
		return c.read(make([]byte, 1), stage) // reports the close or the error
	}
	return nil
}

func (c *Client) write(p []byte, stage string) error {
	if _, err := c.w.Write(p); err != nil {
		if errors.Is(err, syscall.EPIPE) || errors.Is(err, syscall.ECONNRESET) {
			return fmt.Errorf("%s: the server closed the connection", stage)
		}
		return fmt.Errorf("%s: %w", stage, err)
	}
	return nil
}

// handshake runs the fixed newstyle negotiation up to transmission.
func (c *Client) handshake(export string) error {
	if len(export) > maxString {
		return fmt.Errorf("export name of %d bytes: the protocol allows %d", len(export), maxString)
	}
	const stage = "handshake"
	g := c.buf[:18]
	if err := c.read(g, stage); err != nil {
		return err
	}
	if binary.BigEndian.Uint64(g) != magicInit {
		return &ProtocolError{Stage: stage, Msg: "no NBDMAGIC greeting: not an NBD server"}
	}
	switch binary.BigEndian.Uint64(g[8:]) {
	case magicOpt:
	case magicOld:
		return &ProtocolError{Stage: stage, Msg: "an oldstyle server; this client speaks the fixed newstyle handshake only"}
	default:
		return &ProtocolError{Stage: stage, Msg: fmt.Sprintf("unknown handshake magic %#x", binary.BigEndian.Uint64(g[8:]))}
	}
	hflags := binary.BigEndian.Uint16(g[16:])
	if hflags&flagFixedNewstyle == 0 {
		return &ProtocolError{Stage: stage, Msg: "the server does not offer the fixed newstyle handshake"}
	}
	if hflags&^(flagFixedNewstyle|flagNoZeroes) != 0 {
		return &ProtocolError{Stage: stage, Msg: fmt.Sprintf("unknown handshake flags %#x", hflags)}
	}
	cflags := uint32(flagFixedNewstyle)
	if hflags&flagNoZeroes != 0 {
		cflags |= flagNoZeroes
	}
	if err := c.write(binary.BigEndian.AppendUint32(nil, cflags), stage); err != nil {
		return err
	}
	if err := c.structuredReplies(); err != nil {
		return err
	}
	if err := c.setMetaContext(export); err != nil {
		return err
	}
	if err := c.goExport(export); err != nil {
		return err
	}
	return nil
}

// sendOption sends one option with its payload.
func (c *Client) sendOption(opt uint32, payload []byte, name string) error {
	m := binary.BigEndian.AppendUint64(make([]byte, 0, 16+len(payload)), magicOpt)
	m = binary.BigEndian.AppendUint32(m, opt)
	m = binary.BigEndian.AppendUint32(m, uint32(len(payload)))
	return c.write(append(m, payload...), name)
}

// optionReply reads one reply to opt: its type and payload (valid until
// the next reply). An error reply is returned as an *OptionError.
func (c *Client) optionReply(opt uint32, name string) (uint32, []byte, error) {
	h := c.buf[:20]
	if err := c.read(h, name); err != nil {
		return 0, nil, err
	}
	if binary.BigEndian.Uint64(h) != magicReply {
		return 0, nil, &ProtocolError{Stage: name, Msg: fmt.Sprintf("bad option reply magic %#x", binary.BigEndian.Uint64(h))}
	}
	if got := binary.BigEndian.Uint32(h[8:]); got != opt {
		return 0, nil, &ProtocolError{Stage: name, Msg: fmt.Sprintf("a reply to option %d, not to %d", got, opt)}
	}
	typ, n := binary.BigEndian.Uint32(h[12:]), binary.BigEndian.Uint32(h[16:])
	if n > maxOptionReply {
		return 0, nil, &ProtocolError{Stage: name, Msg: fmt.Sprintf("an option reply of %d bytes (at most %d expected)", n, maxOptionReply)}
	}
	if cap(c.scratch) < int(n) {
		c.scratch = make([]byte, maxOptionReply)
	}
	p := c.scratch[:n]
	if err := c.read(p, name); err != nil {
		return 0, nil, err
	}
	if typ&repErrBit != 0 {
		return 0, nil, &OptionError{Option: name, Code: typ, Message: printable(p)}
	}
	return typ, p, nil
}

// structuredReplies negotiates structured replies, which block status
// needs.
func (c *Client) structuredReplies() error {
	const name = "NBD_OPT_STRUCTURED_REPLY"
	if err := c.sendOption(optStructuredReply, nil, name); err != nil {
		return err
	}
	typ, p, err := c.optionReply(optStructuredReply, name)
	if err != nil {
		return err
	}
	if typ != repAck || len(p) != 0 {
		return &ProtocolError{Stage: name, Msg: fmt.Sprintf("reply type %d of %d bytes, not an ack", typ, len(p))}
	}
	return nil
}

// appendString appends a string as the protocol frames it: 32-bit length,
// bytes.
func appendString(b []byte, s string) []byte {
	return append(binary.BigEndian.AppendUint32(b, uint32(len(s))), s...)
}

// setMetaContext selects base:allocation for the export and learns its
// context id.
func (c *Client) setMetaContext(export string) error {
	const name = "NBD_OPT_SET_META_CONTEXT"
	p := appendString(nil, export)
	p = binary.BigEndian.AppendUint32(p, 1)
	p = appendString(p, MetaContext)
	if err := c.sendOption(optSetMetaContext, p, name); err != nil {
		return err
	}
	found := false
	err := c.eachOptionReply(optSetMetaContext, name, func(typ uint32, p []byte) error {
		if typ != repMetaContext {
			return &ProtocolError{Stage: name, Msg: fmt.Sprintf("unexpected reply type %d", typ)}
		}
		if len(p) < 4 {
			return &ProtocolError{Stage: name, Msg: fmt.Sprintf("a context reply of %d bytes", len(p))}
		}
		if string(p[4:]) != MetaContext {
			return &ProtocolError{Stage: name, Msg: fmt.Sprintf("selected context %s, which was not asked for", printable(p[4:]))}
		}
		if found {
			return &ProtocolError{Stage: name, Msg: MetaContext + " selected twice"}
		}
		c.contextID, found = binary.BigEndian.Uint32(p), true
		return nil
	})
	if err == nil && !found {
		err = fmt.Errorf("%s: the server does not report %s for export %s: it cannot tell which parts hold data", name, MetaContext, printable([]byte(export)))
	}
	return err
}

// eachOptionReply reads the replies to opt up to its ack, at most
// maxOptionReplies, and hands every other one to fn.
func (c *Client) eachOptionReply(opt uint32, name string, fn func(typ uint32, p []byte) error) error {
	for range maxOptionReplies {
		typ, p, err := c.optionReply(opt, name)
		if err != nil {
			return err
		}
		if typ == repAck {
			return nil
		}
		if err := fn(typ, p); err != nil {
			return err
		}
	}
	return &ProtocolError{Stage: name, Msg: fmt.Sprintf("more than %d replies", maxOptionReplies)}
}

// goExport enters transmission with NBD_OPT_GO, asking for the block size
// constraints (which every request then honours).
func (c *Client) goExport(export string) error {
	const name = "NBD_OPT_GO"
	p := appendString(nil, export)
	p = binary.BigEndian.AppendUint16(p, 1)
	p = binary.BigEndian.AppendUint16(p, infoBlockSize)
	if err := c.sendOption(optGo, p, name); err != nil {
		return err
	}
	haveSize := false
	c.minBlock = 1
	err := c.eachOptionReply(optGo, name, func(typ uint32, p []byte) error {
		if typ != repInfo {
			return &ProtocolError{Stage: name, Msg: fmt.Sprintf("unexpected reply type %d", typ)}
		}
		if len(p) < 2 {
			return &ProtocolError{Stage: name, Msg: fmt.Sprintf("an info reply of %d bytes", len(p))}
		}
		switch binary.BigEndian.Uint16(p) {
		case infoExport:
			if len(p) != 12 {
				return &ProtocolError{Stage: name, Msg: fmt.Sprintf("export info of %d bytes, not 12", len(p))}
			}
			size := binary.BigEndian.Uint64(p[2:])
			if size > math.MaxInt64 {
				return &ProtocolError{Stage: name, Msg: fmt.Sprintf("export size %d", size)}
			}
			c.size, haveSize = int64(size), true
		case infoBlockSize:
			if len(p) != 14 {
				return &ProtocolError{Stage: name, Msg: fmt.Sprintf("block size info of %d bytes, not 14", len(p))}
			}
			minimum := binary.BigEndian.Uint32(p[2:])
			if minimum == 0 || minimum&(minimum-1) != 0 || minimum > maxMinBlock {
				return &ProtocolError{Stage: name, Msg: fmt.Sprintf("minimum block size %d (a power of two up to %d)", minimum, maxMinBlock)}
			}
			c.minBlock = int64(minimum)
		}
		// Other information (name, description, what a newer protocol
		// adds) is not needed: the protocol says to ignore it.
		return nil
	})
	if err == nil && !haveSize {
		err = &ProtocolError{Stage: name, Msg: "no export information before the ack"}
	}
	return err
}

// Close leaves transmission with NBD_CMD_DISC (a soft disconnect) unless
// the stream is out of step, then closes the connection.
func (c *Client) Close() error {
	if c.conn == nil {
		return nil
	}
	var discErr error
	if !c.broken {
		c.conn.SetDeadline(time.Now().Add(c.timeout))
		c.broken = true
		discErr = c.write(c.request(cmdDisc, 0, 0), "NBD_CMD_DISC")
	}
	err := c.conn.Close()
	c.conn = nil
	if discErr != nil {
		return discErr
	}
	return err
}

// request encodes a transmission request with the next cookie.
func (c *Client) request(cmd uint16, off uint64, length uint32) []byte {
	c.cookie++
	m := binary.BigEndian.AppendUint32(make([]byte, 0, 28), magicReq)
	m = binary.BigEndian.AppendUint16(m, 0)
	m = binary.BigEndian.AppendUint16(m, cmd)
	m = binary.BigEndian.AppendUint64(m, c.cookie)
	m = binary.BigEndian.AppendUint64(m, off)
	return binary.BigEndian.AppendUint32(m, length)
}

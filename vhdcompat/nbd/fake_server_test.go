package nbd

import (
	"bufio"
	"encoding/binary"
	"io"
	"net"
	"path/filepath"
	"sync"
	"testing"
)

// The messages a server sends, built byte by byte as doc/proto.md lays
// them out: for the fake server below and the fuzz seeds.

func greeting(flags uint16) []byte {
	b := binary.BigEndian.AppendUint64(nil, magicInit)
	b = binary.BigEndian.AppendUint64(b, magicOpt)
	return binary.BigEndian.AppendUint16(b, flags)
}

func optReply(opt, typ uint32, payload []byte) []byte {
	b := binary.BigEndian.AppendUint64(nil, magicReply)
	b = binary.BigEndian.AppendUint32(b, opt)
	b = binary.BigEndian.AppendUint32(b, typ)
	b = binary.BigEndian.AppendUint32(b, uint32(len(payload)))
	return append(b, payload...)
}

func exportInfo(size uint64, flags uint16) []byte {
	b := binary.BigEndian.AppendUint16(nil, infoExport)
	b = binary.BigEndian.AppendUint64(b, size)
	return binary.BigEndian.AppendUint16(b, flags)
}

func blockSizeInfo(minimum, preferred, maximum uint32) []byte {
	b := binary.BigEndian.AppendUint16(nil, infoBlockSize)
	b = binary.BigEndian.AppendUint32(b, minimum)
	b = binary.BigEndian.AppendUint32(b, preferred)
	return binary.BigEndian.AppendUint32(b, maximum)
}

func metaContextReply(id uint32, name string) []byte {
	return optReply(optSetMetaContext, repMetaContext, append(binary.BigEndian.AppendUint32(nil, id), name...))
}

// handshakeReplies is a well-behaved server's side of the handshake for an
// export of size bytes, base:allocation as context id.
func handshakeReplies(size uint64, id uint32) []byte {
	b := greeting(flagFixedNewstyle | flagNoZeroes)
	b = append(b, optReply(optStructuredReply, repAck, nil)...)
	b = append(b, metaContextReply(id, MetaContext)...)
	b = append(b, optReply(optSetMetaContext, repAck, nil)...)
	b = append(b, optReply(optGo, repInfo, exportInfo(size, 1|2))...)
	b = append(b, optReply(optGo, repInfo, blockSizeInfo(1, 4096, 32<<20))...)
	return append(b, optReply(optGo, repAck, nil)...)
}

func chunk(flags, typ uint16, cookie uint64, payload []byte) []byte {
	b := binary.BigEndian.AppendUint32(nil, magicChunk)
	b = binary.BigEndian.AppendUint16(b, flags)
	b = binary.BigEndian.AppendUint16(b, typ)
	b = binary.BigEndian.AppendUint64(b, cookie)
	b = binary.BigEndian.AppendUint32(b, uint32(len(payload)))
	return append(b, payload...)
}

// statusChunk is a final block status chunk: id, then (length, flags)
// pairs.
func statusChunk(cookie uint64, id uint32, pairs ...uint32) []byte {
	p := binary.BigEndian.AppendUint32(nil, id)
	for _, v := range pairs {
		p = binary.BigEndian.AppendUint32(p, v)
	}
	return chunk(chunkFlagDone, chunkBlockStatus, cookie, p)
}

func errorChunk(flags uint16, cookie uint64, code uint32, msg string) []byte {
	p := binary.BigEndian.AppendUint32(nil, code)
	p = binary.BigEndian.AppendUint16(p, uint16(len(msg)))
	return chunk(flags, chunkErrBit+1, cookie, append(p, msg...))
}

// request is a block status request as the fake server read it.
type request struct {
	Cookie, Offset uint64
	Length         uint32
	N              int // its number, from 0
}

// fakeServer is a scripted NBD server on a real unix socket: it reads
// every message the client sends, answers the handshake with handshake (a
// well-behaved one when nil) and each block status request with reply.
// A reply that returns false closes the connection.
type fakeServer struct {
	Socket    string
	Handshake []byte
	Reply     func(w io.Writer, r request) bool

	mu    sync.Mutex
	Discs int // NBD_CMD_DISC received
	conns []net.Conn
	ln    net.Listener
	wg    sync.WaitGroup
}

// newFakeServer serves an export of size bytes; handshake, when given,
// replaces the well-behaved handshake.
func newFakeServer(t *testing.T, size uint64, reply func(w io.Writer, r request) bool, handshake ...[]byte) *fakeServer {
	t.Helper()
	s := &fakeServer{Socket: filepath.Join(t.TempDir(), "fake.sock"), Handshake: handshakeReplies(size, 7), Reply: reply}
	if len(handshake) > 0 {
		s.Handshake = handshake[0]
	}
	ln, err := net.Listen("unix", s.Socket)
	if err != nil {
		t.Fatal(err)
	}
	s.ln = ln
	s.wg.Add(1)
	go s.serve()
	t.Cleanup(func() {
		ln.Close()
		s.mu.Lock()
		for _, c := range s.conns {
			c.Close()
		}
		s.mu.Unlock()
		s.wg.Wait()
	})
	return s
}

func (s *fakeServer) serve() {
	defer s.wg.Done()
	for {
		c, err := s.ln.Accept()
		if err != nil {
			return
		}
		s.mu.Lock()
		s.conns = append(s.conns, c)
		s.mu.Unlock()
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			defer c.Close()
			s.conn(c)
		}()
	}
}

// conn plays the handshake (the client's options are read and skipped:
// the replies are scripted) and then the transmission phase.
func (s *fakeServer) conn(c net.Conn) {
	r := bufio.NewReader(c)
	// The scripted handshake goes out as a stream: the greeting, then,
	// once the client flags are in, every option reply at once (the
	// client reads them as it sends its options, which are skipped).
	hs := s.Handshake
	greet := min(len(hs), 18)
	if _, err := c.Write(hs[:greet]); err != nil || greet < 18 {
		return // a greeting cut short: the server hangs up
	}
	if _, err := io.ReadFull(r, make([]byte, 4)); err != nil {
		return
	}
	if _, err := c.Write(hs[greet:]); err != nil {
		return
	}
	for range 3 {
		h := make([]byte, 16)
		if _, err := io.ReadFull(r, h); err != nil {
			return
		}
		if _, err := r.Discard(int(binary.BigEndian.Uint32(h[12:]))); err != nil {
			return
		}
		if binary.BigEndian.Uint32(h[8:]) == optAbort {
			return
		}
	}
	if s.Reply == nil {
		return // no transmission: the server hangs up after the options
	}
	for n := 0; ; n++ {
		h := make([]byte, 28)
		if _, err := io.ReadFull(r, h); err != nil {
			return
		}
		switch binary.BigEndian.Uint16(h[6:]) {
		case cmdDisc:
			s.mu.Lock()
			s.Discs++
			s.mu.Unlock()
			return
		case cmdBlockStatus:
			req := request{Cookie: binary.BigEndian.Uint64(h[8:]), Offset: binary.BigEndian.Uint64(h[16:]), Length: binary.BigEndian.Uint32(h[24:]), N: n}
			if !s.Reply(c, req) {
				return
			}
		default:
			return
		}
	}
}

func (s *fakeServer) discs() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.Discs
}

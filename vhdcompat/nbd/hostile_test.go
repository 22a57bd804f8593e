package nbd

import (
	"context"
	"encoding/binary"
	"errors"
	"io"
	"runtime"
	"strings"
	"testing"
	"time"
)

// walkFake connects to the fake server and walks the export with a short
// timeout, returning the extents and the error.
func walkFake(t *testing.T, s *fakeServer, ctx context.Context) ([]Extent, error) {
	t.Helper()
	c, err := Connect(ctx, "unix", s.Socket, "x", Options{Timeout: 300 * time.Millisecond})
	if err != nil {
		return nil, err
	}
	defer c.Close()
	var got []Extent
	err = c.Extents(ctx, func(e Extent) error {
		got = append(got, e)
		return nil
	})
	return got, err
}

// TestWellBehavedFake: the scripted server answers short (less than the
// window), long (the last extent past it) and with unknown status bits;
// the client asks again from where the answer ended and clips.
func TestWellBehavedFake(t *testing.T) {
	const size = 3<<30 + 4096
	s := newFakeServer(t, size, func(w io.Writer, r request) bool {
		switch r.N {
		case 0: // 1 MiB data, then a hole: short of the 1 GiB window
			w.Write(statusChunk(r.Cookie, 7, 1<<20, 0, 1<<20, 3))
		case 1: // an unknown flag and an extent far past the window
			w.Write(statusChunk(r.Cookie, 7, 4096, 1<<7, 0xffffffff, 3))
		default:
			w.Write(statusChunk(r.Cookie, 7, r.Length, 0))
		}
		return true
	})
	got, err := walkFake(t, s, context.Background())
	if err != nil {
		t.Fatal(err)
	}
	checkCover(t, got, size)
	if got[0] != (Extent{0, 1 << 20, 0}) || got[2] != (Extent{2 << 20, 4096, 1 << 7}) || !got[2].Data() || got[3].Data() {
		t.Fatalf("extents %v", got[:4])
	}
	if got[3].Offset+got[3].Length != 2<<20+1<<30 {
		t.Fatalf("the long extent was not clipped to its window: %v", got[3])
	}
	time.Sleep(50 * time.Millisecond)
	if s.discs() != 1 {
		t.Fatalf("%d NBD_CMD_DISC received, want 1", s.discs())
	}
}

// TestHostileHandshake: a server that breaks the handshake is refused with
// one line, before transmission.
func TestHostileHandshake(t *testing.T) {
	const size = 1 << 20
	good := handshakeReplies(size, 7)
	after := func(b []byte, n int) []byte { return append(append([]byte(nil), good[:n]...), b...) }
	afterGreeting := func(b ...[]byte) []byte {
		out := append([]byte(nil), good[:18]...)
		for _, x := range b {
			out = append(out, x...)
		}
		return out
	}
	sr := optReply(optStructuredReply, repAck, nil)
	meta := append(metaContextReply(7, MetaContext), optReply(optSetMetaContext, repAck, nil)...)
	for _, tc := range []struct {
		name, want string
		hs         []byte
	}{
		{"not nbd", "not an NBD server", []byte("SSH-2.0-OpenSSH_9.2 hello there.\r\n")},
		{"oldstyle", "oldstyle", append(binary.BigEndian.AppendUint64(binary.BigEndian.AppendUint64(nil, magicInit), magicOld), 0, 0)},
		{"not fixed", "fixed newstyle", greeting(0)},
		{"unknown handshake flags", "unknown handshake flags", greeting(flagFixedNewstyle | 1<<9)},
		{"closed in the greeting", "closed in the middle", good[:11]},
		{"no structured replies", "unsupported", afterGreeting(optReply(optStructuredReply, repErrBit|1, []byte("nope")))},
		{"huge option reply", "option reply of 4294967295 bytes", afterGreeting(binary.BigEndian.AppendUint32(optReply(optStructuredReply, repAck, nil)[:16], 0xffffffff))},
		{"reply to another option", "not to 8", afterGreeting(optReply(optGo, repAck, nil))},
		{"bad reply magic", "bad option reply magic", afterGreeting([]byte("0123456789abcdefghij"))},
		{"no base:allocation", "does not report base:allocation", afterGreeting(sr, optReply(optSetMetaContext, repAck, nil))},
		{"other context", "not asked for", afterGreeting(sr, metaContextReply(1, "qemu:dirty-bitmap:x"))},
		{"context twice", "selected twice", afterGreeting(sr, metaContextReply(1, MetaContext), metaContextReply(1, MetaContext))},
		{"endless information", "more than 64 replies", afterGreeting(sr, meta, endless(optReply(optGo, repInfo, []byte{0, 9})))},
		{"unknown export", "unknown export", afterGreeting(sr, meta, optReply(optGo, repErrBit|6, []byte("no such export\x1b[31m")))},
		{"no export info", "no export information", afterGreeting(sr, meta, optReply(optGo, repAck, nil))},
		{"short export info", "export info of 10 bytes", afterGreeting(sr, meta, optReply(optGo, repInfo, exportInfo(1, 1)[:10]))},
		{"size past int64", "export size", afterGreeting(sr, meta, optReply(optGo, repInfo, exportInfo(1<<63, 1)))},
		{"odd minimum block", "minimum block size 3", afterGreeting(sr, meta, optReply(optGo, repInfo, exportInfo(size, 1)), optReply(optGo, repInfo, blockSizeInfo(3, 4096, 1<<25)))},
		{"closed after go", "closed in the middle", after(nil, len(good)-10)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := newFakeServer(t, size, nil, tc.hs)
			_, err := Connect(context.Background(), "unix", s.Socket, "x", Options{Timeout: 2 * time.Second})
			if err == nil || !strings.Contains(err.Error(), tc.want) || strings.ContainsAny(err.Error(), "\n\x1b") {
				t.Fatalf("Connect: %v, want one line with %q", err, tc.want)
			}
		})
	}
}

// endless repeats an option reply past the bound on replies.
func endless(m []byte) []byte {
	return []byte(strings.Repeat(string(m), maxOptionReplies+1))
}

// TestHostileReplies: every way a block status reply can lie is refused
// with one line and no panic, memory bounded (nothing near the lengths
// claimed is allocated).
func TestHostileReplies(t *testing.T) {
	const size = 1 << 30
	payload := func(cookie uint64, ext ...uint32) []byte { return statusChunk(cookie, 7, ext...) }
	for _, tc := range []struct {
		name, want string
		reply      func(r request) []byte
	}{
		{"huge chunk", "block status chunk of 4294967295 bytes", func(r request) []byte {
			return binary.BigEndian.AppendUint32(chunk(chunkFlagDone, chunkBlockStatus, r.Cookie, nil)[:16], 0xffffffff)
		}},
		{"too many extents", "1 to 1048576 extents", func(r request) []byte {
			return binary.BigEndian.AppendUint32(chunk(chunkFlagDone, chunkBlockStatus, r.Cookie, nil)[:16], 4+8*(1<<20+1))
		}},
		{"chunk of odd length", "block status chunk of 9 bytes", func(r request) []byte {
			return chunk(chunkFlagDone, chunkBlockStatus, r.Cookie, make([]byte, 9))
		}},
		{"no extent", "block status chunk of 4 bytes", func(r request) []byte { return payload(r.Cookie) }},
		{"zero-length extent", "extent 1 has length 0", func(r request) []byte { return payload(r.Cookie, 4096, 0, 0, 0) }},
		{"extents past the window", "past the 1073741824 bytes asked for", func(r request) []byte {
			return payload(r.Cookie, 1<<30, 0, 4096, 3)
		}},
		{"other context", "context 8, not 7", func(r request) []byte { return statusChunk(r.Cookie, 8, 4096, 0) }},
		{"two status chunks", "second block status chunk", func(r request) []byte {
			one := chunk(0, chunkBlockStatus, r.Cookie, binary.BigEndian.AppendUint32(binary.BigEndian.AppendUint32(binary.BigEndian.AppendUint32(nil, 7), 4096), 0))
			return append(one, payload(r.Cookie, 4096, 0)...)
		}},
		{"wrong cookie", "a reply to request 99", func(r request) []byte { return payload(99, 4096, 0) }},
		{"unknown chunk flags", "unknown reply flags 0x3", func(r request) []byte {
			return chunk(chunkFlagDone|2, chunkBlockStatus, r.Cookie, nil)
		}},
		{"read data chunk", "unexpected reply chunk type 1", func(r request) []byte {
			return chunk(chunkFlagDone, 1, r.Cookie, make([]byte, 16))
		}},
		{"empty chunk not last", "an empty chunk", func(r request) []byte { return chunk(0, chunkNone, r.Cookie, nil) }},
		{"done without status", "holds no block status", func(r request) []byte { return chunk(chunkFlagDone, chunkNone, r.Cookie, nil) }},
		{"endless chunks", "more than 32 chunks", func(r request) []byte {
			return []byte(strings.Repeat(string(errorChunk(0, r.Cookie, 5, "again")), 40))
		}},
		{"simple reply", "simple reply without error", func(r request) []byte {
			return binary.BigEndian.AppendUint64(binary.BigEndian.AppendUint32(binary.BigEndian.AppendUint32(nil, magicSimple), 0), r.Cookie)
		}},
		{"simple error", "the server answered EINVAL", func(r request) []byte {
			return binary.BigEndian.AppendUint64(binary.BigEndian.AppendUint32(binary.BigEndian.AppendUint32(nil, magicSimple), 22), r.Cookie)
		}},
		{"error chunk", "the server answered EIO (disk on fire)", func(r request) []byte {
			return errorChunk(chunkFlagDone, r.Cookie, 5, "disk on fire")
		}},
		{"error message longer than its chunk", "an error message of 65535 bytes", func(r request) []byte {
			c := errorChunk(chunkFlagDone, r.Cookie, 5, "x")
			binary.BigEndian.PutUint16(c[24:], 0xffff)
			return c
		}},
		{"huge error chunk", "an error chunk of 1000000 bytes", func(r request) []byte {
			return binary.BigEndian.AppendUint32(errorChunk(chunkFlagDone, r.Cookie, 5, "")[:16], 1000000)
		}},
		{"error offset outside", "outside the request", func(r request) []byte {
			p := binary.BigEndian.AppendUint64(binary.BigEndian.AppendUint16(binary.BigEndian.AppendUint32(nil, 5), 0), 1<<40)
			return chunk(chunkFlagDone, chunkErrorOffset, r.Cookie, p)
		}},
		{"bad magic", "bad reply magic", func(r request) []byte { return []byte("HTTP/1.1 400 Bad Request\r\n") }},
		{"closed mid-chunk", "closed in the middle", func(r request) []byte { return payload(r.Cookie, 4096, 0, 4096, 0)[:30] }},
		{"closed mid-header", "closed in the middle", func(r request) []byte { return payload(r.Cookie, 4096, 0)[:9] }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := newFakeServer(t, size, func(w io.Writer, r request) bool {
				w.Write(tc.reply(r))
				return false
			})
			var before runtime.MemStats
			runtime.ReadMemStats(&before)
			_, err := walkFake(t, s, context.Background())
			var after runtime.MemStats
			runtime.ReadMemStats(&after)
			if err == nil || !strings.Contains(err.Error(), tc.want) || strings.Contains(err.Error(), "\n") {
				t.Fatalf("walk: %v, want one line with %q", err, tc.want)
			}
			if grew := after.TotalAlloc - before.TotalAlloc; grew > 4<<20 {
				t.Fatalf("the client allocated %d bytes", grew)
			}
		})
	}
}

// TestStalls: a server that stops answering in the handshake, in the
// middle of a reply, or that trickles, is given up on at the timeout, and
// a cancelled context interrupts a blocked read at once.
func TestStalls(t *testing.T) {
	const size = 1 << 30
	// stalling serves the export with reply and a stall channel that is
	// closed when the subtest ends (before the server is shut down).
	stalling := func(t *testing.T, reply func(w io.Writer, r request, stall chan struct{}) bool, handshake ...[]byte) *fakeServer {
		stall := make(chan struct{})
		s := newFakeServer(t, size, func(w io.Writer, r request) bool { return reply(w, r, stall) }, handshake...)
		t.Cleanup(func() { close(stall) })
		return s
	}
	hold := func(w io.Writer, r request, stall chan struct{}) bool {
		w.Write(statusChunk(r.Cookie, 7, 4096, 0)[:12])
		<-stall
		return false
	}
	t.Run("mid-reply", func(t *testing.T) {
		s := stalling(t, hold)
		start := time.Now()
		_, err := walkFake(t, s, context.Background())
		if err == nil || !strings.Contains(err.Error(), "did not answer within 300ms") || time.Since(start) > 5*time.Second {
			t.Fatalf("walk: %v after %v", err, time.Since(start))
		}
	})
	t.Run("handshake", func(t *testing.T) {
		s := stalling(t, hold, handshakeReplies(size, 7)[:18])
		start := time.Now()
		_, err := walkFake(t, s, context.Background())
		if err == nil || !strings.Contains(err.Error(), "did not answer") || time.Since(start) > 5*time.Second {
			t.Fatalf("walk: %v after %v", err, time.Since(start))
		}
	})
	t.Run("cancelled", func(t *testing.T) {
		s := stalling(t, hold)
		c, err := Connect(context.Background(), "unix", s.Socket, "x", Options{Timeout: time.Hour})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		cause := errors.New("SIGTERM")
		ctx, cancel := context.WithCancelCause(context.Background())
		time.AfterFunc(100*time.Millisecond, func() { cancel(cause) })
		start := time.Now()
		err = c.Extents(ctx, func(Extent) error { return nil })
		if !errors.Is(err, cause) || time.Since(start) > 5*time.Second {
			t.Fatalf("walk: %v after %v", err, time.Since(start))
		}
	})
	t.Run("trickle", func(t *testing.T) {
		// One byte every 50 ms: each byte is in time, the reply is not.
		s := stalling(t, func(w io.Writer, r request, stall chan struct{}) bool {
			for _, b := range statusChunk(r.Cookie, 7, 4096, 0) {
				if _, err := w.Write([]byte{b}); err != nil {
					return false
				}
				select {
				case <-stall:
					return false
				case <-time.After(50 * time.Millisecond):
				}
			}
			return true
		})
		start := time.Now()
		_, err := walkFake(t, s, context.Background())
		if err == nil || !strings.Contains(err.Error(), "did not answer") || time.Since(start) > 5*time.Second {
			t.Fatalf("walk: %v after %v", err, time.Since(start))
		}
	})
}

// TestCallerStops: the caller's error ends the walk and is returned as is.
func TestCallerStops(t *testing.T) {
	s := newFakeServer(t, 1<<30, func(w io.Writer, r request) bool {
		w.Write(statusChunk(r.Cookie, 7, 4096, 0, 4096, 3))
		return true
	})
	stop := errors.New("enough")
	_, err := walkFakeWith(t, s, func(Extent) error { return stop })
	if !errors.Is(err, stop) {
		t.Fatalf("walk: %v", err)
	}
}

func walkFakeWith(t *testing.T, s *fakeServer, fn func(Extent) error) (*Client, error) {
	c, err := Connect(context.Background(), "unix", s.Socket, "x", Options{Timeout: time.Second})
	if err != nil {
		return nil, err
	}
	defer c.Close()
	return c, c.Extents(context.Background(), fn)
}

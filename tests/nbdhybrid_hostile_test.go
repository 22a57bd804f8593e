package tests

import (
	"bufio"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"
)

// A misbehaving NBD server, small and written here: a correct fixed
// newstyle handshake (structured replies, base:allocation as context 1, an
// export of the size given), then one bad answer to the first block
// status request. The binary must refuse it with one line, in bounded
// time, and write nothing.

// lyingServer listens on a unix socket and answers each connection with
// answer after the handshake.
func lyingServer(t *testing.T, size uint64, answer func(c net.Conn, cookie uint64)) string {
	t.Helper()
	socket := filepath.Join(t.TempDir(), "liar.sock")
	ln, err := net.Listen("unix", socket)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	t.Cleanup(func() { close(done); ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				cookie, ok := liarHandshake(c, size)
				if ok {
					answer(c, cookie)
				}
				select { // hold the connection until the test ends
				case <-done:
				case <-time.After(time.Minute):
				}
			}()
		}
	}()
	return socket
}

// liarHandshake plays a well-behaved server's handshake and reads the
// first transmission request, returning its cookie.
func liarHandshake(c net.Conn, size uint64) (uint64, bool) {
	be := binary.BigEndian
	r := bufio.NewReader(c)
	w := func(b []byte) bool { _, err := c.Write(b); return err == nil }
	optReply := func(opt, typ uint32, payload []byte) []byte {
		b := be.AppendUint64(nil, 0x3e889045565a9)
		b = be.AppendUint32(be.AppendUint32(b, opt), typ)
		return append(be.AppendUint32(b, uint32(len(payload))), payload...)
	}
	if !w(be.AppendUint16(be.AppendUint64(be.AppendUint64(nil, 0x4e42444d41474943), 0x49484156454f5054), 3)) {
		return 0, false
	}
	if _, err := io.ReadFull(r, make([]byte, 4)); err != nil {
		return 0, false
	}
	for {
		h := make([]byte, 16)
		if _, err := io.ReadFull(r, h); err != nil {
			return 0, false
		}
		opt := be.Uint32(h[8:])
		if _, err := r.Discard(int(be.Uint32(h[12:]))); err != nil {
			return 0, false
		}
		var reply []byte
		switch opt {
		case 8: // structured replies
			reply = optReply(8, 1, nil)
		case 10: // base:allocation is context 1
			reply = append(optReply(10, 4, append(be.AppendUint32(nil, 1), "base:allocation"...)), optReply(10, 1, nil)...)
		case 7: // go: the export's size, read-only
			info := be.AppendUint16(be.AppendUint64(be.AppendUint16(nil, 0), size), 3)
			reply = append(optReply(7, 3, info), optReply(7, 1, nil)...)
		default:
			return 0, false
		}
		if !w(reply) {
			return 0, false
		}
		if opt == 7 {
			break
		}
	}
	req := make([]byte, 28)
	if _, err := io.ReadFull(r, req); err != nil {
		return 0, false
	}
	return be.Uint64(req[8:]), true
}

// statusReply is a block status chunk (done) with the given extents.
func statusReply(cookie uint64, pairs ...uint32) []byte {
	be := binary.BigEndian
	b := be.AppendUint16(be.AppendUint16(be.AppendUint32(nil, 0x668e33ef), 1), 5)
	b = be.AppendUint32(be.AppendUint64(b, cookie), uint32(4+4*len(pairs)))
	b = be.AppendUint32(b, 1)
	for _, v := range pairs {
		b = be.AppendUint32(b, v)
	}
	return b
}

// TestNBDHybridLyingServer: lengths that lie, an extent count past the
// chunk, a server that closes in the middle of a reply or stalls: one
// line, exit 1, nothing written, within seconds (a stalled server is left
// at SIGTERM, as xapi stops a task; the client's own deadline is 30 s).
func TestNBDHybridLyingServer(t *testing.T) {
	const size = 16 << 20
	raw := filepath.Join(t.TempDir(), "disk.raw")
	writeFile(t, raw, make([]byte, size))
	for _, tc := range []struct {
		name   string
		answer func(c net.Conn, cookie uint64)
		want   []string
	}{
		{"extents past the request", func(c net.Conn, cookie uint64) {
			c.Write(statusReply(cookie, size, 0, 4096, 0))
		}, []string{"broke the NBD protocol", "past the 16777216 bytes asked for"}},
		{"chunk longer than it says", func(c net.Conn, cookie uint64) {
			b := statusReply(cookie, 4096, 0)
			binary.BigEndian.PutUint32(b[16:], 0xfffffff4)
			c.Write(b)
		}, []string{"block status chunk of 4294967284 bytes"}},
		{"zero-length extent", func(c net.Conn, cookie uint64) {
			c.Write(statusReply(cookie, 0, 0))
		}, []string{"length 0"}},
		{"closes mid-reply", func(c net.Conn, cookie uint64) {
			c.Write(statusReply(cookie, 4096, 0, 4096, 3)[:26])
			c.Close()
		}, []string{"closed in the middle"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			socket := lyingServer(t, size, tc.answer)
			out := filepath.Join(t.TempDir(), "out.qcow2")
			start := time.Now()
			r := runTool(t, nil, "stream", "--source-format", "nbdhybrid", "--source", fmt.Sprintf("%s:%s:x:%d", raw, socket, size), "--destination", "file://"+out)
			checkFailureLine(t, r.Code, string(r.Stderr), append([]string{"source allocation from NBD server"}, tc.want...)...)
			if time.Since(start) > 10*time.Second {
				t.Fatalf("refused after %v", time.Since(start))
			}
			if _, err := os.Stat(out); err == nil {
				t.Fatal("the destination was created")
			}
		})
	}
	t.Run("stalls", func(t *testing.T) {
		socket := lyingServer(t, size, func(c net.Conn, cookie uint64) { c.Write(statusReply(cookie, 4096, 0)[:10]) })
		p := start(t, cmdSpec{args: []string{"stream", "--source-format", "nbdhybrid", "--source", fmt.Sprintf("%s:%s:x:%d", raw, socket, size), "--destination", "null:"}})
		time.Sleep(time.Second)
		p.cmd.Process.Signal(syscall.SIGTERM)
		began := time.Now()
		code := p.wait(t, 10*time.Second)
		checkFailureLine(t, code, p.stderr.String(), "interrupted")
		if time.Since(began) > 3*time.Second {
			t.Fatalf("exited %v after SIGTERM", time.Since(began))
		}
	})
}

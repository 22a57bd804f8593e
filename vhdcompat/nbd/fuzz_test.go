package nbd

import (
	"bytes"
	"context"
	"io"
	"testing"
	"time"
)

// FuzzClient feeds the client a server's whole side of the conversation
// (handshake, then the replies to its block status requests): whatever
// the bytes, it returns or fails without panicking, and what it reports
// is consecutive extents from 0, never past the export.
func FuzzClient(f *testing.F) {
	hs := handshakeReplies(3<<30, 7)
	f.Add(hs)
	f.Add(append(append(hs, statusChunk(1, 7, 1<<20, 0, 1<<20, 3)...), statusChunk(2, 7, 0xffffffff, 1)...))
	f.Add(append(append(hs, errorChunk(0, 1, 5, "oops")...), statusChunk(1, 7, 4096, 0)...))
	f.Add(append(hs, chunk(chunkFlagDone, chunkBlockStatus, 1, make([]byte, 12))...))
	f.Add(append(hs, chunk(chunkFlagDone, chunkNone, 1, nil)...))
	f.Fuzz(func(t *testing.T, server []byte) {
		c := newClient(bytes.NewReader(server), io.Discard, time.Second)
		if err := c.handshake("x"); err != nil {
			return
		}
		var off int64
		err := c.Extents(context.Background(), func(e Extent) error {
			if e.Offset != off || e.Length <= 0 || e.Offset+e.Length > c.Size() {
				t.Fatalf("extent %+v after %d, export of %d bytes", e, off, c.Size())
			}
			off += e.Length
			return nil
		})
		if err == nil && off != c.Size() {
			t.Fatalf("the walk ended at %d of %d", off, c.Size())
		}
	})
}

package importer

import (
	"bytes"
	"errors"
	"fmt"
	"testing"
)

// failingTarget fails its n-th write with an error naming the offset.
type failingTarget struct {
	*countingTarget
	failAt int
}

func (f *failingTarget) WriteAtAnyAlignment(p []byte, off int64) error {
	if len(f.writes)+1 == f.failAt {
		f.writes = append(f.writes, [2]int64{off, int64(len(p))})
		return fmt.Errorf("write at offset %d: injected", off)
	}
	return f.countingTarget.WriteAtAnyAlignment(p, off)
}

// TestSinkAsyncSameContent: through the asynchronous target the sink
// leaves exactly what the synchronous one leaves, with buffers recycled
// many times over (far more data than the pool holds).
func TestSinkAsyncSameContent(t *testing.T) {
	const size = 64 << 20
	data := randomBytes(11, size)
	for i := 0; i < size; i += 3 << 20 {
		clear(data[i : i+256<<10]) // zero runs: punched or skipped
	}
	var want []byte
	for _, async := range []bool{false, true} {
		ct, p := disk(t, size, false)
		var target Target = ct
		var at *asyncTarget
		if async {
			at = newAsyncTarget(ct)
			target = at
		}
		s := NewSink(target, SinkOptions{Size: size, KnownZeroFrom: size})
		// Out of order, in 1 MiB extents, as a decoder hands them out.
		for _, half := range []int{1, 0} {
			for off := half * size / 2; off < (half+1)*size/2; off += 1 << 20 {
				if err := s.Data(int64(off), data[off:off+1<<20]); err != nil {
					t.Fatal(err)
				}
			}
		}
		if err := s.Finish(); err != nil {
			t.Fatal(err)
		}
		if at != nil {
			at.Close()
		}
		got := content(t, p)
		if !bytes.Equal(got, data) {
			t.Fatalf("async=%v: content differs from the data", async)
		}
		if want == nil {
			want = got
		}
	}
}

// TestSinkAsyncError: a failed write stops the import with that write's
// error (and offset), at the latest at Finish, and later writes are not
// performed.
func TestSinkAsyncError(t *testing.T) {
	const size = 32 << 20
	ct, _ := disk(t, size, false)
	ft := &failingTarget{countingTarget: ct, failAt: 2}
	at := newAsyncTarget(ft)
	defer at.Close()
	s := NewSink(at, SinkOptions{Size: size, KnownZeroFrom: size})
	data := randomBytes(12, size)
	var err error
	for off := 0; off < size && err == nil; off += 1 << 20 {
		err = s.Data(int64(off), data[off:off+1<<20])
	}
	if err == nil {
		err = s.Finish()
	}
	if err == nil || !bytes.Contains([]byte(err.Error()), []byte("write at offset 4194304: injected")) {
		t.Fatalf("got %v, want the second write's error", err)
	}
	at.Wait()
	if n := len(ft.writes); n > 2 {
		t.Fatalf("%d writes attempted after the failure", n-2)
	}
	if !errors.Is(at.Err(), err) && at.Err().Error() != err.Error() {
		t.Fatalf("Err() = %v", at.Err())
	}
}

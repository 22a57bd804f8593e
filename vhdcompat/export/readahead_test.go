package export

import (
	"context"
	"errors"
	"testing"
	"time"
)

func spans(n int) func() (span, bool) {
	i := 0
	return func() (span, bool) {
		if i == n {
			return span{}, false
		}
		i++
		return span{int64(i-1) * 8, 8}, true
	}
}

// Windows reach the consumer in order, each with what its reader put in
// it, whatever the number of readers and the depth of the ring.
func TestReadaheadOrder(t *testing.T) {
	for _, ra := range []readahead{{depth: 1, readers: 1}, {depth: 4, readers: 1}, {depth: 3, readers: 2}, {depth: 4, readers: 4}} {
		var pool [][]byte
		ra.width, ra.size, ra.pool = 2, 8, &pool
		var got []int64
		err := ra.run(context.Background(), spans(100),
			func(s span, bufs [][]byte) error {
				if s.off%24 == 0 {
					time.Sleep(time.Millisecond) // let later reads overtake
				}
				bufs[0][0], bufs[1][0] = byte(s.off), byte(s.off+1)
				return nil
			},
			func(s span, bufs [][]byte) error {
				if bufs[0][0] != byte(s.off) || bufs[1][0] != byte(s.off+1) || len(bufs[0]) != int(s.n) {
					t.Fatalf("window at %d holds another window's bytes", s.off)
				}
				got = append(got, s.off)
				return nil
			})
		if err != nil {
			t.Fatal(err)
		}
		if len(got) != 100 {
			t.Fatalf("%+v: consumed %d windows, want 100", ra, len(got))
		}
		for i, off := range got {
			if off != int64(i)*8 {
				t.Fatalf("%+v: window %d is at %d: out of order", ra, i, off)
			}
		}
		if len(pool) != ra.depth*2 {
			t.Fatalf("pool holds %d buffers, want %d", len(pool), ra.depth*2)
		}
	}
}

// A read error and a consumer error both end the pass with that error, and
// run returns only once the readers have stopped.
func TestReadaheadErrors(t *testing.T) {
	boom := errors.New("boom")
	for _, readers := range []int{1, 3} {
		var pool [][]byte
		ra := readahead{depth: 2, readers: readers, width: 1, size: 8, pool: &pool}
		consumed := 0
		err := ra.run(context.Background(), spans(50),
			func(s span, _ [][]byte) error {
				if s.off == 10*8 {
					return boom
				}
				return nil
			},
			func(span, [][]byte) error { consumed++; return nil })
		if !errors.Is(err, boom) || consumed != 10 {
			t.Fatalf("read error: got %v after %d windows, want boom after 10", err, consumed)
		}
		err = ra.run(context.Background(), spans(50),
			func(span, [][]byte) error { return nil },
			func(s span, _ [][]byte) error {
				if s.off == 5*8 {
					return boom
				}
				return nil
			})
		if !errors.Is(err, boom) {
			t.Fatalf("consumer error: got %v", err)
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	var pool [][]byte
	err := readahead{depth: 2, readers: 2, width: 1, size: 8, pool: &pool}.run(ctx, spans(50),
		func(span, [][]byte) error { return nil }, func(span, [][]byte) error { return nil })
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled: got %v", err)
	}
}

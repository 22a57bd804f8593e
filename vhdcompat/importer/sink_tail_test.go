package importer

import (
	"bytes"
	"errors"
	"testing"
)

// TestSinkTailPastEnd: an image rounded up past an unaligned destination
// (End < Size). Zero and unallocated ranges and all-zero data past the end
// are dropped; the destination is written exactly up to its end, never
// past it.
func TestSinkTailPastEnd(t *testing.T) {
	const cs = 64 << 10
	const end = 3*cs + 4096 // the disk
	const size = 4 * cs     // the image, rounded up
	for _, direct := range []bool{false, true} {
		ct, p := disk(t, end, direct)
		s := NewSink(ct, SinkOptions{Size: size, End: end, KnownZeroFrom: end})
		want := randomBytes(7, end)
		data := append(bytes.Clone(want[:3*cs]), make([]byte, cs)...)
		copy(data[3*cs:], want[3*cs:]) // the last cluster: 4 KiB of data, then zeros
		if err := s.Unallocated(0, cs); err != nil {
			t.Fatal(err)
		}
		if err := s.Data(cs, data[cs:2*cs]); err != nil {
			t.Fatal(err)
		}
		// The decoder may lend the sink's memory: never past the end.
		if b := s.Lend(2*cs, 2*cs); len(b) != cs+4096 {
			t.Fatalf("Lend lent %d bytes, want up to the end (%d)", len(b), cs+4096)
		}
		if err := s.Data(2*cs, data[2*cs:]); err != nil {
			t.Fatal(err)
		}
		if err := s.Finish(); err != nil {
			t.Fatal(err)
		}
		for _, w := range append(ct.writes, ct.zeros...) {
			if w[0]+w[1] > end {
				t.Fatalf("direct=%v: %d bytes at %d: past the end (%d)", direct, w[1], w[0], end)
			}
		}
		got := content(t, p)
		clear(want[:cs])
		if len(got) != end || !bytes.Equal(got, want) {
			t.Fatalf("direct=%v: destination differs (%d bytes)", direct, len(got))
		}

		// A zero cluster across the end is zeroed up to the end.
		ct, p = disk(t, end, direct)
		s = NewSink(ct, SinkOptions{Size: size, End: end, KnownZeroFrom: end})
		if err := s.Data(0, want[:3*cs]); err != nil {
			t.Fatal(err)
		}
		if err := s.Zero(3*cs, cs); err != nil {
			t.Fatal(err)
		}
		if err := s.Finish(); err != nil {
			t.Fatal(err)
		}
		clear(want[3*cs:])
		if got := content(t, p); !bytes.Equal(got, want) {
			t.Fatalf("direct=%v: zero cluster across the end: destination differs (%d bytes)", direct, len(got))
		}
		for _, w := range append(ct.writes, ct.zeros...) {
			if w[0]+w[1] > end {
				t.Fatalf("direct=%v: %d bytes at %d: past the end (%d)", direct, w[1], w[0], end)
			}
		}
	}
}

// TestSinkTailNonZero: a non-zero byte past the end stops the import with
// its guest offset; what came before it is written.
func TestSinkTailNonZero(t *testing.T) {
	const cs = 64 << 10
	const end = cs + 512
	const size = 2 * cs
	ct, p := disk(t, end, false)
	s := NewSink(ct, SinkOptions{Size: size, End: end, KnownZeroFrom: end})
	data := randomBytes(8, size)
	clear(data[end : end+100])
	err := s.Data(0, data)
	var te *TailError
	if !errors.As(err, &te) || te.Off != end+100 || te.End != end {
		t.Fatalf("got %v, want a TailError at %d", err, end+100)
	}
	if err := s.Finish(); err != nil {
		t.Fatal(err)
	}
	if got := content(t, p); !bytes.Equal(got, data[:end]) {
		t.Fatal("what came before the non-zero byte was not written")
	}
	// Wholly past the end.
	s = NewSink(ct, SinkOptions{Size: size, End: end, KnownZeroFrom: end})
	if err := s.Data(end+512, []byte{0, 0, 1}); !errors.As(err, &te) || te.Off != end+514 {
		t.Fatalf("got %v, want a TailError at %d", err, end+514)
	}
}

// TestFitEnd: where an image is written on a destination of a given size.
func TestFitEnd(t *testing.T) {
	const cs = 64 << 10
	for _, tc := range []struct {
		vsize, size, end int64
		refused          bool
	}{
		{100 << 20, 200 << 20, 100 << 20, false},              // fits
		{100 << 20, 100 << 20, 100 << 20, false},              // exactly
		{100<<20 + cs, 100<<20 + 4096, 100<<20 + 4096, false}, // XO's rounding
		{100 << 20, 100<<20 - cs + 1, 100<<20 - cs + 1, false},
		{100 << 20, 100<<20 - cs, 0, true}, // a whole cluster too big
		{cs, 0, 0, true},                   // an empty device
	} {
		end, err := fitEnd(tc.vsize, cs, tc.size, "d", "")
		var se *SizeError
		if tc.refused != errors.As(err, &se) || !tc.refused && end != tc.end {
			t.Errorf("fitEnd(%d, %d) = %d, %v; want %d, refused %v", tc.vsize, tc.size, end, err, tc.end, tc.refused)
		}
	}
}

package bitmap

import (
	"math/rand"
	"testing"
)

func TestBitmapAgainstBoolSlice(t *testing.T) {
	const n = 3*chunkBits + 77
	b := New(n)
	ref := make([]bool, n)
	r := rand.New(rand.NewSource(1))
	for k := 0; k < 5000; k++ {
		i := uint64(r.Intn(n))
		if r.Intn(4) == 0 {
			b.Clear(i)
			ref[i] = false
		} else {
			b.Set(i)
			ref[i] = true
		}
	}
	var count uint64
	for i := range ref {
		if ref[i] {
			count++
		}
		if b.Test(uint64(i)) != ref[i] {
			t.Fatalf("bit %d: got %v want %v", i, b.Test(uint64(i)), ref[i])
		}
	}
	if b.Count() != count {
		t.Fatalf("count %d want %d", b.Count(), count)
	}
	// NextSet / NextClear walk
	for i := uint64(0); i < n; i += 13 {
		want := uint64(n)
		for j := i; j < n; j++ {
			if ref[j] {
				want = j
				break
			}
		}
		got, ok := b.NextSet(i)
		if got != want || ok != (want < n) {
			t.Fatalf("NextSet(%d)=%d,%v want %d", i, got, ok, want)
		}
		want = n
		for j := i; j < n; j++ {
			if !ref[j] {
				want = j
				break
			}
		}
		if got := b.NextClear(i); got != want {
			t.Fatalf("NextClear(%d)=%d want %d", i, got, want)
		}
	}
}

func TestBitmapSparseMemory(t *testing.T) {
	b := New(1 << 32) // 4 Gi bits: flat would be 512 MiB
	b.Set(1<<32 - 1)
	b.Set(5)
	allocated := 0
	for _, c := range b.chunks {
		if c != nil {
			allocated++
		}
	}
	if allocated != 2 {
		t.Fatalf("allocated %d chunks", allocated)
	}
	if i, ok := b.NextSet(6); !ok || i != 1<<32-1 {
		t.Fatalf("NextSet got %d %v", i, ok)
	}
	if _, ok := b.NextSet(1 << 32); ok {
		t.Fatal("NextSet past end")
	}
}

func TestSetRange(t *testing.T) {
	for _, r := range [][2]uint64{{0, 0}, {3, 200}, {64, 128}, {5, chunkBits*2 + 9}, {100, 1 << 20}} {
		b := New(1 << 20)
		b.Set(70)
		b.SetRange(r[0], r[1])
		want := r[1] - r[0]
		if r[0] > 70 || r[1] <= 70 {
			want++
		}
		if b.Count() != want {
			t.Fatalf("%v: count %d want %d", r, b.Count(), want)
		}
		if r[1] > r[0] && (!b.Test(r[0]) || !b.Test(r[1]-1) || (r[1] < 1<<20 && b.Test(r[1]) && r[1] != 70)) {
			t.Fatalf("%v: bad edges", r)
		}
	}
}

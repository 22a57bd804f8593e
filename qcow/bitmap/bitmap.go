// Package bitmap is a sparse bit set with one bit per cluster.
//
// Exports and imports of multi-TiB disks keep one bit per cluster in memory
// (never the data). A flat bit set for a 16 TiB disk with 64 KiB clusters is
// 32 MiB even when only a few MiB of the disk hold data, so bits are kept in
// fixed-size chunks that are allocated only when a bit in them is set: memory
// follows the allocated part of the disk, bounded above by one bit per
// cluster plus one pointer per chunk.
package bitmap

import "math/bits"

const (
	chunkWords = 512 // 4 KiB of bits per chunk
	chunkBits  = chunkWords * 64
)

// Bitmap is a fixed-length sparse bit set. The zero value is an empty
// bitmap of length 0; use New.
type Bitmap struct {
	n      uint64
	chunks [][]uint64
	count  uint64
}

// New returns a bitmap of n bits, all clear.
func New(n uint64) *Bitmap {
	return &Bitmap{n: n, chunks: make([][]uint64, (n+chunkBits-1)/chunkBits)}
}

// Len is the number of bits.
func (b *Bitmap) Len() uint64 { return b.n }

// Count is the number of set bits.
func (b *Bitmap) Count() uint64 { return b.count }

// Set sets bit i. Bits at or past Len are ignored.
func (b *Bitmap) Set(i uint64) {
	if i >= b.n {
		return
	}
	c := b.chunks[i/chunkBits]
	if c == nil {
		c = make([]uint64, chunkWords)
		b.chunks[i/chunkBits] = c
	}
	w, m := (i%chunkBits)/64, uint64(1)<<(i%64)
	if c[w]&m == 0 {
		c[w] |= m
		b.count++
	}
}

// Clear clears bit i.
func (b *Bitmap) Clear(i uint64) {
	if i >= b.n {
		return
	}
	c := b.chunks[i/chunkBits]
	if c == nil {
		return
	}
	w, m := (i%chunkBits)/64, uint64(1)<<(i%64)
	if c[w]&m != 0 {
		c[w] &^= m
		b.count--
	}
}

// SetRange sets bits [first, end).
func (b *Bitmap) SetRange(first, end uint64) {
	if end > b.n {
		end = b.n
	}
	for i := first; i < end; {
		// Whole words at a time: hints and changed-block maps set ranges
		// of millions of clusters.
		if i%64 == 0 && end-i >= 64 {
			c := b.chunks[i/chunkBits]
			if c == nil {
				c = make([]uint64, chunkWords)
				b.chunks[i/chunkBits] = c
			}
			w := (i % chunkBits) / 64
			b.count += 64 - uint64(bits.OnesCount64(c[w]))
			c[w] = ^uint64(0)
			i += 64
			continue
		}
		b.Set(i)
		i++
	}
}

// Test reports whether bit i is set.
func (b *Bitmap) Test(i uint64) bool {
	if i >= b.n {
		return false
	}
	c := b.chunks[i/chunkBits]
	return c != nil && c[(i%chunkBits)/64]&(1<<(i%64)) != 0
}

// NextSet returns the index of the first set bit at or after i, or
// (Len, false) if there is none.
func (b *Bitmap) NextSet(i uint64) (uint64, bool) {
	for i < b.n {
		ci := i / chunkBits
		c := b.chunks[ci]
		if c == nil {
			i = (ci + 1) * chunkBits
			continue
		}
		w := (i % chunkBits) / 64
		word := c[w] >> (i % 64)
		if word != 0 {
			j := i + uint64(bits.TrailingZeros64(word))
			if j < b.n {
				return j, true
			}
			return b.n, false
		}
		i = ci*chunkBits + (w+1)*64
	}
	return b.n, false
}

// NextClear returns the index of the first clear bit at or after i, or Len
// if there is none.
func (b *Bitmap) NextClear(i uint64) uint64 {
	for i < b.n {
		ci := i / chunkBits
		c := b.chunks[ci]
		if c == nil {
			return i
		}
		w := (i % chunkBits) / 64
		word := ^c[w] >> (i % 64)
		if word != 0 {
			j := i + uint64(bits.TrailingZeros64(word))
			if j < b.n {
				return j
			}
			return b.n
		}
		i = ci*chunkBits + (w+1)*64
	}
	return b.n
}

// CountRange returns the number of set bits in [first, end).
func (b *Bitmap) CountRange(first, end uint64) uint64 {
	var n uint64
	for i, ok := b.NextSet(first); ok && i < end; i, ok = b.NextSet(i + 1) {
		n++
	}
	return n
}

// AnyInRange reports whether a bit in [first, end) is set.
func (b *Bitmap) AnyInRange(first, end uint64) bool {
	i, ok := b.NextSet(first)
	return ok && i < end
}

package hints

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/bits"
	"os"
	"strconv"
	"strings"

	"github.com/xapi-project/xapi-qcow-tool/vhdcompat/rawdisk"
)

// MaxHintBytes bounds how much hint text is read: a qemu-img map of a
// badly fragmented multi-TiB image is tens of MiB; a stream that never
// ends must not be read forever.
const MaxHintBytes = 1 << 30

// Open opens a hint source: fd://N or a bare descriptor number (what xapi's
// launcher passes once it has replaced its placeholder), or a path.
func Open(spec string) (io.ReadCloser, string, error) {
	fdText := strings.TrimPrefix(spec, "fd://")
	if n, err := strconv.Atoi(fdText); err == nil && n >= 0 && (fdText != spec || !fileExists(spec)) {
		f, err := rawdisk.Inherited(n)
		if err != nil {
			return nil, "", err
		}
		return f, "descriptor " + fdText, nil
	}
	f, err := os.Open(spec)
	if err != nil {
		return nil, "", fmt.Errorf("%s: %w", spec, rawdisk.WithoutPath(err))
	}
	return f, spec, nil
}

func fileExists(p string) bool { _, err := os.Stat(p); return err == nil }

// MapEntry is one element of `qemu-img map --output=json`.
type MapEntry struct {
	Start   int64  `json:"start"`
	Length  int64  `json:"length"`
	Depth   int    `json:"depth"`
	Present *bool  `json:"present"`
	Zero    bool   `json:"zero"`
	Data    bool   `json:"data"`
	Offset  *int64 `json:"offset"`
}

// ParseMap reads qemu-img map JSON and returns the extents that hold data
// (data true and zero false), clipped to size. Everything else reads as
// zero in the raw view of the image.
func ParseMap(r io.Reader, size int64) (Extents, error) {
	ext, _, err := parseMap(r, size)
	return ext, err
}

// parseMap is ParseMap, and also returns where the map ends: the virtual
// size of the image it was made of.
func parseMap(r io.Reader, size int64) (Extents, int64, error) {
	dec := json.NewDecoder(io.LimitReader(r, MaxHintBytes))
	tok, err := dec.Token()
	if err != nil {
		return nil, 0, fmt.Errorf("qemu-img map JSON: %w", jsonErr(err))
	}
	if d, ok := tok.(json.Delim); !ok || d != '[' {
		return nil, 0, errors.New("qemu-img map JSON: expected a list of extents")
	}
	var out []Extent
	var end int64
	for dec.More() {
		var e MapEntry
		if err := dec.Decode(&e); err != nil {
			return nil, 0, fmt.Errorf("qemu-img map JSON: extent %d: %w", len(out), jsonErr(err))
		}
		if e.Start < 0 || e.Length < 0 {
			return nil, 0, fmt.Errorf("qemu-img map JSON: extent at %d has a negative start or length", e.Start)
		}
		if e.Start > (1<<62)-e.Length {
			return nil, 0, fmt.Errorf("qemu-img map JSON: extent at %d is too large", e.Start)
		}
		end = max(end, e.Start+e.Length)
		if e.Data && !e.Zero && e.Length > 0 {
			// qemu-img lists extents in order, and splits data where the
			// host offset jumps: merge what touches the last one.
			if n := len(out); n > 0 && e.Start >= out[n-1].Start && e.Start <= out[n-1].End {
				out[n-1].End = max(out[n-1].End, e.Start+e.Length)
				continue
			}
			if len(out) >= MaxExtents {
				return nil, 0, fmt.Errorf("qemu-img map JSON: more than %d extents", MaxExtents)
			}
			out = append(out, Extent{e.Start, e.Start + e.Length})
		}
	}
	if _, err := dec.Token(); err != nil {
		return nil, 0, fmt.Errorf("qemu-img map JSON: %w", jsonErr(err))
	}
	return Normalize(out, size), end, nil
}

func jsonErr(err error) error {
	if err == io.EOF {
		return io.ErrUnexpectedEOF
	}
	return err
}

// Info is what we use of `qemu-img info --output=json`.
type Info struct {
	VirtualSize int64
	ClusterBits uint32 // 0 when the image has no cluster size (raw)
	Format      string
}

// ParseInfo reads qemu-img info JSON.
func ParseInfo(r io.Reader) (*Info, error) {
	var raw struct {
		VirtualSize *int64 `json:"virtual-size"`
		ClusterSize *int64 `json:"cluster-size"`
		Format      string `json:"format"`
	}
	if err := json.NewDecoder(io.LimitReader(r, 64<<20)).Decode(&raw); err != nil {
		return nil, fmt.Errorf("qemu-img info JSON: %w", jsonErr(err))
	}
	info := &Info{Format: raw.Format}
	if raw.VirtualSize != nil {
		if *raw.VirtualSize < 0 {
			return nil, errors.New("qemu-img info JSON: negative virtual-size")
		}
		info.VirtualSize = *raw.VirtualSize
	}
	if raw.ClusterSize != nil {
		cs := *raw.ClusterSize
		if cs < 512 || cs > 2<<20 || cs&(cs-1) != 0 {
			return nil, fmt.Errorf("qemu-img info JSON: cluster-size %d is not a power of two from 512 to 2097152", cs)
		}
		info.ClusterBits = uint32(bits.TrailingZeros64(uint64(cs)))
	}
	return info, nil
}

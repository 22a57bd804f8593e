package hints

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
)

// Legacy is the JSON header older xapi passes to qcow2-to-stdout.py
// (--json-header on stdin, --json-header-diff on a descriptor):
//
//	{"virtual_size": N, "cluster_bits": B, "data_clusters": [...]}
//
// where data_clusters is either a flat list of cluster indices or a list
// of [first, last] intervals (both ends included).
type Legacy struct {
	VirtualSize int64
	ClusterBits uint32
	// Extents are the data clusters as byte ranges, clipped to the
	// virtual size.
	Extents Extents
}

// MaxLegacyBytes bounds the header text. A flat list of every cluster of
// a 2 TiB disk with 64 KiB clusters is about 300 MiB; more than this is
// not a header xapi wrote.
const MaxLegacyBytes = 512 << 20

// maxLegacyBytes is MaxLegacyBytes, lowered by tests.
var maxLegacyBytes int64 = MaxLegacyBytes

// ParseLegacy reads a legacy JSON header. The list is decoded token by
// token, merging neighbouring clusters as it goes, so memory grows with the
// number of separate runs (capped at MaxExtents), not with the text.
func ParseLegacy(r io.Reader) (*Legacy, error) {
	lr := &io.LimitedReader{R: r, N: maxLegacyBytes + 1}
	l, err := parseLegacy(json.NewDecoder(lr))
	if lr.N <= 0 {
		return nil, fmt.Errorf("JSON header: longer than %d bytes", maxLegacyBytes)
	}
	if err != nil {
		return nil, fmt.Errorf("JSON header: %w", err)
	}
	return l, nil
}

func parseLegacy(dec *json.Decoder) (*Legacy, error) {
	dec.UseNumber()
	if err := expectDelim(dec, '{', "an object"); err != nil {
		return nil, err
	}
	var (
		size, bits   *int64
		runs         []Extent // in clusters: [first, last+1)
		seenClusters bool
	)
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return nil, jsonErr(err)
		}
		key, _ := tok.(string)
		switch key {
		case "virtual_size":
			v, err := integer(dec, key)
			if err != nil {
				return nil, err
			}
			size = &v
		case "cluster_bits":
			v, err := integer(dec, key)
			if err != nil {
				return nil, err
			}
			bits = &v
		case "data_clusters":
			if runs, err = clusterRuns(dec); err != nil {
				return nil, err
			}
			seenClusters = true
		default:
			// Unknown keys are skipped whole, whatever they hold.
			var skip json.RawMessage
			if err := dec.Decode(&skip); err != nil {
				return nil, jsonErr(err)
			}
		}
	}
	if _, err := dec.Token(); err != nil {
		return nil, jsonErr(err)
	}
	switch {
	case size == nil:
		return nil, errors.New("missing virtual_size")
	case bits == nil:
		return nil, errors.New("missing cluster_bits")
	case !seenClusters:
		return nil, errors.New("missing data_clusters")
	case *size < 0 || *size > 1<<62:
		return nil, fmt.Errorf("virtual_size %d is out of range", *size)
	case *bits < 9 || *bits > 21:
		return nil, fmt.Errorf("cluster_bits %d is not from 9 to 21", *bits)
	}
	l := &Legacy{VirtualSize: *size, ClusterBits: uint32(*bits)}
	cs := int64(1) << l.ClusterBits
	clusters := (l.VirtualSize + cs - 1) / cs
	for i, c := range runs { // to bytes, in place
		if c.End > clusters {
			return nil, fmt.Errorf("data cluster %d is past the end of a %d-byte disk (%d clusters of %d bytes)", c.End-1, l.VirtualSize, clusters, cs)
		}
		runs[i] = Extent{c.Start * cs, c.End * cs}
	}
	l.Extents = Normalize(runs, l.VirtualSize)
	return l, nil
}

func expectDelim(dec *json.Decoder, want json.Delim, what string) error {
	tok, err := dec.Token()
	if err != nil {
		return jsonErr(err)
	}
	if d, ok := tok.(json.Delim); !ok || d != want {
		return fmt.Errorf("expected %s, found %v", what, tok)
	}
	return nil
}

func integer(dec *json.Decoder, key string) (int64, error) {
	tok, err := dec.Token()
	if err != nil {
		return 0, jsonErr(err)
	}
	return toInt(tok, key)
}

func toInt(tok json.Token, what string) (int64, error) {
	n, ok := tok.(json.Number)
	if !ok {
		return 0, fmt.Errorf("%s: expected an integer, found %v", what, tok)
	}
	v, err := n.Int64()
	if err != nil {
		return 0, fmt.Errorf("%s: %s is not an integer", what, n)
	}
	return v, nil
}

// clusterRuns decodes data_clusters in either form into runs of clusters
// [first, last+1), merging a run with the previous one when they touch (the
// usual case: sorted output of a map).
func clusterRuns(dec *json.Decoder) ([]Extent, error) {
	if err := expectDelim(dec, '[', "data_clusters to be a list"); err != nil {
		return nil, err
	}
	var runs []Extent
	add := func(first, last int64) error {
		if first < 0 || last < first || last >= math.MaxInt64/2 {
			return fmt.Errorf("data_clusters: [%d, %d] is not an interval of cluster indices", first, last)
		}
		if n := len(runs); n > 0 && first >= runs[n-1].Start && first <= runs[n-1].End {
			runs[n-1].End = max(runs[n-1].End, last+1)
			return nil
		}
		if len(runs) >= MaxExtents {
			return fmt.Errorf("data_clusters: more than %d separate runs", MaxExtents)
		}
		runs = append(runs, Extent{first, last + 1})
		return nil
	}
	for i := 0; dec.More(); i++ {
		tok, err := dec.Token()
		if err != nil {
			return nil, jsonErr(err)
		}
		if d, ok := tok.(json.Delim); ok && d == '[' {
			// [first, last]
			var pair [2]int64
			for k := range pair {
				t, err := dec.Token()
				if err != nil {
					return nil, jsonErr(err)
				}
				if pair[k], err = toInt(t, fmt.Sprintf("data_clusters[%d]", i)); err != nil {
					return nil, err
				}
			}
			if err := expectDelim(dec, ']', fmt.Sprintf("data_clusters[%d] to be [first, last]", i)); err != nil {
				return nil, err
			}
			if err := add(pair[0], pair[1]); err != nil {
				return nil, err
			}
			continue
		}
		c, err := toInt(tok, fmt.Sprintf("data_clusters[%d]", i))
		if err != nil {
			return nil, err
		}
		if err := add(c, c); err != nil {
			return nil, err
		}
	}
	if _, err := dec.Token(); err != nil {
		return nil, jsonErr(err)
	}
	return runs, nil
}

package hints

import (
	"fmt"
	"io"

	"github.com/xapi-project/xapi-qcow-tool/qcow/bitmap"
)

// Source is one hint as a command line gives it: Flag is the option that
// named it (for messages), Spec a path or a descriptor (fd://N or N), or
// Reader one already open (stdin, for the drop-in's --json-header).
type Source struct {
	Flag   string
	Spec   string
	Reader io.Reader
}

// Given reports whether the command line gave this hint.
func (s Source) Given() bool { return s.Spec != "" || s.Reader != nil }

// DiskHints are the hints for one disk: qemu-img info and map of the qcow2
// file behind it, or xapi's older JSON header, which replaces both (a
// command line refuses the two together; given both, the header wins).
type DiskHints struct {
	Info, Map, Header Source
}

// Given reports whether any hint is given for the disk.
func (h DiskHints) Given() bool { return h.Info.Given() || h.Map.Given() || h.Header.Given() }

// Disk is what hints are checked against: the disk's name for messages,
// and its size.
type Disk struct {
	Name string
	Size int64
}

// Request is every hint of one export, as both exporters' command lines
// (`stream` and the qcow2-to-stdout drop-in) give them.
type Request struct {
	Source, Base  DiskHints
	ChangedBlocks Source
}

// Loaded is what the hints of a Request say.
type Loaded struct {
	// ClusterBits is the cluster size the source's hints were written
	// for (qemu-img info's cluster size, the header's cluster_bits); 0
	// when they name none and the asked size stands.
	ClusterBits   uint32
	SourceExtents Extents // nil: no hint, the disk's own extents are used
	BaseExtents   Extents
	Changed       *bitmap.Bitmap // nil: no changed-block bitmap
}

// Load reads every hint of req and checks each one that states a disk
// size against the disk it is given for: hints for a larger disk belong to
// another one, and are refused. base is nil for a full export, and any base
// hint is then refused. clusterBits is the cluster size asked for; the
// changed blocks are mapped onto the hints' cluster size when they give
// one, else onto it.
func Load(req Request, src Disk, base *Disk, clusterBits uint32) (*Loaded, error) {
	out := &Loaded{}
	var err error
	if out.SourceExtents, out.ClusterBits, err = loadDisk(req.Source, src); err != nil {
		return nil, err
	}
	if req.Base.Given() {
		if base == nil {
			return nil, fmt.Errorf("%s: hints for a base, but there is no base", firstGiven(req.Base).Flag)
		}
		// The base's clusters are byte ranges here: a base hinted in
		// another cluster size compares just as well.
		if out.BaseExtents, _, err = loadDisk(req.Base, *base); err != nil {
			return nil, err
		}
	}
	if s := req.ChangedBlocks; s.Given() {
		if out.ClusterBits != 0 {
			clusterBits = out.ClusterBits
		}
		cs := uint64(1) << clusterBits
		clusters := (uint64(src.Size) + cs - 1) / cs
		err := s.read("changed blocks", func(r io.Reader) (err error) {
			out.Changed, err = ParseChangedBlocks(r, clusterBits, clusters)
			return err
		})
		if err != nil {
			return nil, err
		}
	}
	return out, nil
}

func firstGiven(h DiskHints) Source {
	for _, s := range []Source{h.Info, h.Map, h.Header} {
		if s.Given() {
			return s
		}
	}
	return Source{}
}

// loadDisk reads the hints of one disk: its extents (nil without a map or
// header) and the cluster size they were written for (0: none said).
func loadDisk(h DiskHints, d Disk) (ext Extents, clusterBits uint32, err error) {
	if s := h.Info; s.Given() {
		err := s.read("image info", func(r io.Reader) error {
			info, err := ParseInfo(r)
			if err == nil {
				clusterBits = info.ClusterBits
				err = checkSize(info.VirtualSize, d)
			}
			return err
		})
		if err != nil {
			return nil, 0, err
		}
	}
	if s := h.Map; s.Given() {
		err := s.read("allocation map", func(r io.Reader) error {
			m, end, err := parseMap(r, d.Size)
			if err == nil {
				ext = m
				err = checkSize(end, d)
			}
			return err
		})
		if err != nil {
			return nil, 0, err
		}
	}
	if s := h.Header; s.Given() {
		err := s.read("JSON header", func(r io.Reader) error {
			l, err := ParseLegacy(r)
			if err == nil {
				clusterBits, ext = l.ClusterBits, l.Extents
				err = checkSize(l.VirtualSize, d)
			}
			return err
		})
		if err != nil {
			return nil, 0, err
		}
	}
	return ext, clusterBits, nil
}

// read opens the hint, hands it to parse and closes it. Errors name the
// option and where the hint came from; what names the kind of hint.
func (s Source) read(what string, parse func(io.Reader) error) error {
	if s.Reader != nil {
		if err := parse(s.Reader); err != nil {
			return fmt.Errorf("%s: stdin: %w", s.Flag, err)
		}
		return nil
	}
	r, name, err := Open(s.Spec)
	if err != nil {
		return fmt.Errorf("%s: %s: %w", s.Flag, what, err)
	}
	defer r.Close()
	if err := parse(r); err != nil {
		return fmt.Errorf("%s: %s: %w", s.Flag, name, err)
	}
	return nil
}

// checkSize refuses hints that describe a larger disk than the one read:
// they do not belong to it. A smaller one is fine (a logical volume is
// rounded up to its extent size); what lies past it reads as zero.
func checkSize(hinted int64, d Disk) error {
	if hinted > (d.Size+511)&^511 {
		return fmt.Errorf("the image is %d bytes but %s is only %d bytes: the hints are for another disk", hinted, d.Name, d.Size)
	}
	return nil
}

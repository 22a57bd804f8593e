// Package hybrid is vhd-tool's hybrid source: the data of a disk comes from
// a raw device, what it allocates from the image behind the device (a VHD
// or qcow2 file) and every image below it in its chain. It opens the chain,
// finding parents as vhd-tool does, and tells the export engine which
// clusters may hold data and, against a base, which may differ.
package hybrid

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/xapi-project/xapi-qcow-tool/qcow"
	"github.com/xapi-project/xapi-qcow-tool/qcow/inspect"
	"github.com/xapi-project/xapi-qcow-tool/vhdcompat/vhd"
)

// MaxDepth is the longest chain followed. XenServer coalesces VHD chains
// long before 30 images; a chain this deep is a loop the identity check
// missed or a damaged image.
const MaxDepth = 64

// Format of one image of a chain.
type Format string

// Formats.
const (
	VHD   Format = "vhd"
	Qcow2 Format = "qcow2"
	Raw   Format = "raw" // a qcow2 backing file with backing format raw
)

// Layer is one image of a chain.
type Layer struct {
	Path   string
	Format Format
	// VirtualSize is the size of the disk the image describes.
	VirtualSize int64

	f    *os.File
	size int64 // of the file (or block device)
	vhd  *vhd.Reader
}

// Chain is an image and its ancestors, the image first.
type Chain struct {
	Layers []*Layer
}

// NotImageError is returned for a top image that is neither VHD nor qcow2.
type NotImageError struct{ Path string }

func (e *NotImageError) Error() string {
	return fmt.Sprintf("%s is neither a VHD nor a qcow2 image: give the raw disk alone with --source-format raw", e.Path)
}

// MissingParentError names a parent that is nowhere in the search path.
type MissingParentError struct {
	Child  string
	Parent string   // the name the child gives
	Tried  []string // the candidates looked at
	Search []string
}

func (e *MissingParentError) Error() string {
	return fmt.Sprintf("parent %q of %s not found (tried %s; search path %s)", e.Parent, e.Child,
		strings.Join(e.Tried, ", "), strings.Join(e.Search, ":"))
}

// LoopError is a chain that comes back to an image already in it.
type LoopError struct{ Child, Parent string }

func (e *LoopError) Error() string {
	return fmt.Sprintf("chain has a loop: the parent of %s is %s, already in the chain", e.Child, e.Parent)
}

// ErrTooDeep is a chain longer than MaxDepth.
var ErrTooDeep = fmt.Errorf("chain is deeper than %d images", MaxDepth)

// Open opens image and its ancestors. Parents with relative names are
// searched in the child's directory, then in each directory of search
// (vhd-tool's --path, which xapi passes as "/dev/mapper:."); absolute names
// are taken as they are. Every VHD of the chain is validated as check
// validates it, and refused at its first corruption in check's words.
func Open(image string, search []string) (*Chain, error) {
	top, err := openLayer(image)
	if err != nil {
		return nil, err
	}
	c := &Chain{Layers: []*Layer{top}}
	if top.Format == Raw {
		c.Close()
		return nil, &NotImageError{Path: image}
	}
	if err := c.openParents(search); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

// openParents opens the parents of the chain's last layer, and theirs.
func (c *Chain) openParents(search []string) error {
	for l := c.Layers[len(c.Layers)-1]; ; {
		names, err := l.parentNames()
		if err != nil {
			return fmt.Errorf("%s: %w", l.Path, err)
		}
		if len(names) == 0 {
			return nil
		}
		if len(c.Layers) >= MaxDepth {
			return fmt.Errorf("%s: %w", c.Layers[0].Path, ErrTooDeep)
		}
		p, err := findParent(l, names, search)
		if err != nil {
			return err
		}
		for _, seen := range c.Layers {
			if sameFile(seen.f, p.f) {
				p.close()
				return &LoopError{Child: l.Path, Parent: p.Path}
			}
		}
		if l.Format == VHD && p.Format != VHD {
			p.close()
			return fmt.Errorf("%s: parent %s is not a VHD image", l.Path, p.Path)
		}
		c.Layers = append(c.Layers, p)
		l = p
	}
}

// Close closes the chain's files.
func (c *Chain) Close() {
	for _, l := range c.Layers {
		l.close()
	}
}

func (l *Layer) close() {
	if l.f != nil {
		l.f.Close()
		l.f = nil
	}
}

func sameFile(a, b *os.File) bool {
	sa, err1 := a.Stat()
	sb, err2 := b.Stat()
	return err1 == nil && err2 == nil && SameDisk(sa, sb)
}

// SameDisk reports whether two files are the same: the same inode, or
// two device nodes of one block device (an LVM volume reached through
// /dev/VG/LV and through a node of its own under --path).
func SameDisk(a, b os.FileInfo) bool {
	if os.SameFile(a, b) {
		return true
	}
	sa, ok1 := a.Sys().(*syscall.Stat_t)
	sb, ok2 := b.Sys().(*syscall.Stat_t)
	isDev := func(fi os.FileInfo) bool { return fi.Mode()&os.ModeDevice != 0 && fi.Mode()&os.ModeCharDevice == 0 }
	return ok1 && ok2 && isDev(a) && isDev(b) && sa.Rdev == sb.Rdev
}

// openLayer opens one image and reads its metadata: a VHD (footer at the
// start or end) or a qcow2 (magic); anything else is a raw layer.
func openLayer(path string) (*Layer, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	l := &Layer{Path: path, f: f}
	fail := func(err error) (*Layer, error) {
		f.Close()
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	fi, err := f.Stat()
	if err != nil {
		return fail(err)
	}
	switch {
	case fi.Mode().IsRegular():
		l.size = fi.Size()
	case fi.Mode()&os.ModeDevice != 0:
		if l.size, err = f.Seek(0, io.SeekEnd); err != nil {
			return fail(err)
		}
	default:
		return fail(errors.New("not a regular file or block device"))
	}
	if inspect.IsQcow2(f) {
		h, err := qcow.ReadHeader(f, l.size)
		if err != nil {
			return fail(err)
		}
		l.Format, l.VirtualSize = Qcow2, int64(h.Size)
		return l, nil
	}
	v, err := vhd.NewReader(f, l.size)
	switch {
	case err == nil:
		l.Format, l.VirtualSize, l.vhd = VHD, v.VirtualSize(), v
		return l, nil
	case errors.Is(err, vhd.ErrNotVHD):
		l.Format, l.VirtualSize = Raw, l.size
		return l, nil
	default:
		return fail(err)
	}
}

// parentNames lists the names under which the image knows its parent, best
// first: for a VHD the parent locators then the parent's unicode name; for
// a qcow2 its backing file.
func (l *Layer) parentNames() ([]string, error) {
	switch l.Format {
	case VHD:
		return l.vhd.ParentNames(), nil
	case Qcow2:
		h, err := qcow.ReadHeader(l.f, l.size)
		if err != nil {
			return nil, err
		}
		if h.BackingFile == "" {
			return nil, nil
		}
		return []string{h.BackingFile}, nil
	}
	return nil, nil
}

// findParent looks for the parent under each of its names: an absolute
// name as it is, a relative one in the child's directory then in each
// search directory (a "." entry is the current directory). A VHD whose
// unique id is not the one the child names is passed over (a file of the
// same name from another chain): the search goes on, and when nothing fits
// the error names every candidate tried and why it did not fit.
func findParent(child *Layer, names, search []string) (*Layer, error) {
	var tried []string
	var wrong []string // candidates of another chain, with their ids
	var damaged error  // the first candidate that is no image we can read
	seen := map[string]bool{}
	dirs := append([]string{filepath.Dir(child.Path)}, search...)
	for _, name := range names {
		var cands []string
		if filepath.IsAbs(name) {
			cands = []string{name}
		} else {
			for _, d := range dirs {
				cands = append(cands, filepath.Join(d, name))
			}
		}
		for _, p := range cands {
			if seen[p] {
				continue
			}
			seen[p] = true
			tried = append(tried, p)
			if _, err := os.Stat(p); err != nil {
				continue
			}
			l, err := openLayer(p)
			if err != nil {
				if damaged == nil {
					damaged = fmt.Errorf("parent of %s: %w", child.Path, err)
				}
				continue
			}
			if why := notParent(child, l); why != "" {
				wrong = append(wrong, why)
				l.close()
				continue
			}
			return l, nil
		}
	}
	switch {
	case damaged != nil:
		return nil, damaged
	case len(wrong) > 0:
		want := child.vhd.Header.ParentUniqueID
		return nil, &WrongParentError{Child: child.Path, Parent: names[0], UniqueID: uuid(want), Candidates: wrong, Tried: tried}
	}
	return nil, &MissingParentError{Child: child.Path, Parent: names[0], Tried: tried, Search: search}
}

// WrongParentError is a parent found under its name, in every place
// searched, only in files whose unique id is not the one the child names.
type WrongParentError struct {
	Child, Parent string
	UniqueID      string   // the one the child names
	Candidates    []string // each file of the right name, and its id
	Tried         []string
}

func (e *WrongParentError) Error() string {
	return fmt.Sprintf("parent %q of %s not found: no file of that name has the unique id %s the child names (%s; tried %s)",
		e.Parent, e.Child, e.UniqueID, strings.Join(e.Candidates, ", "), strings.Join(e.Tried, ", "))
}

// notParent says why a VHD is not the parent a VHD child names: its unique
// id is not the one the child recorded, and a file of the same name from
// another chain would give the child wrong data. tapdisk compares only the
// unique id (its time stamp check is disabled: coalescing and hiding a
// parent change it), and so does this.
func notParent(child, parent *Layer) string {
	if child.Format != VHD || parent.Format != VHD {
		return ""
	}
	want := child.vhd.Header.ParentUniqueID
	if want == ([16]byte{}) || bytes.Equal(want[:], parent.vhd.Footer.UniqueID[:]) {
		return ""
	}
	return fmt.Sprintf("%s is not the parent of %s: its unique id is %s", parent.Path, child.Path, uuid(parent.vhd.Footer.UniqueID))
}

// Kind is what a layer says about a range of the guest disk.
type Kind uint8

// Kinds of range.
const (
	Data        Kind = iota // the layer stores it
	Zero                    // the layer says it reads as zeros (qcow2 zero flag)
	Unallocated             // left to the parent (or zeros at the bottom)
)

// Walk calls fn for the ranges of the guest disk the layer describes, in
// guest order, clipped to limit bytes.
func (l *Layer) Walk(limit int64, fn func(start, end int64, k Kind) error) error {
	clip := func(start, end int64, k Kind) error {
		end = min(end, limit)
		if start >= end {
			return nil
		}
		return fn(start, end, k)
	}
	switch l.Format {
	case VHD:
		return l.vhd.Extents(func(e vhd.Extent) error {
			k := Unallocated
			if e.Stored {
				k = Data
			}
			return clip(e.Start, e.Start+e.Length, k)
		})
	case Qcow2:
		return inspect.Walk(l.f, l.size, func(start, length uint64, kind qcow.ExtentKind) error {
			k := Unallocated
			switch kind {
			case qcow.ExtentData:
				k = Data
			case qcow.ExtentZero:
				k = Zero
			}
			return clip(int64(start), int64(start+length), k)
		})
	default:
		return clip(0, l.size, Data)
	}
}

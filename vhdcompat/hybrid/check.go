package hybrid

import (
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/xapi-project/xapi-qcow-tool/vhdcompat/vhd"
)

// VHDCheck is check on a VHD and its chain: every finding of the image
// (vhd.Check), then its parents, found as the hybrid source finds them
// (locators, then the parent name, in the child's directory then the
// search path), each checked too; the parent's unique id and time stamp
// against what the child records, loops and the depth of the chain.
type VHDCheck struct {
	Filename    string       `json:"filename"`
	Format      string       `json:"format"` // "vpc", as qemu-img names VHD
	Chain       []string     `json:"chain"`  // the images checked, top first
	CheckErrors int          `json:"check-errors"`
	Corruptions int          `json:"corruptions"`
	Warnings    int          `json:"warnings"`
	Findings    []VHDFinding `json:"findings"`
	NotShown    int          `json:"findings-not-shown,omitempty"`
	// The top image's blocks: mapping the virtual size, allocated in the
	// BAT, and the bytes their sector bitmaps mark.
	Blocks          int   `json:"blocks"`
	AllocatedBlocks int   `json:"allocated-blocks"`
	MarkedBytes     int64 `json:"marked-bytes"`
}

// VHDFinding is one line of check's report.
type VHDFinding struct {
	Severity string `json:"severity"` // corruption, warning or check-error
	File     string `json:"file"`
	Offset   *int64 `json:"offset,omitempty"`
	Message  string `json:"message"`
}

// Severities of a VHDFinding beyond vhd's.
const checkError = "check-error"

// ExitCode is check's exit status, as for qcow2 (qemu-img check's): 1 when
// the check could not be completed (a parent not found), 2 for corruption,
// 0 otherwise (warnings included).
func (r *VHDCheck) ExitCode() int {
	switch {
	case r.CheckErrors > 0:
		return 1
	case r.Corruptions > 0:
		return 2
	}
	return 0
}

// add counts a finding of the chain and shows it.
func (r *VHDCheck) add(f VHDFinding) {
	switch f.Severity {
	case checkError:
		r.CheckErrors++
	case vhd.Warning.String():
		r.Warnings++
	default:
		r.Corruptions++
	}
	r.show(f)
}

// show lists a finding, or past MaxFindings only counts it as not shown.
func (r *VHDCheck) show(f VHDFinding) {
	if len(r.Findings) < vhd.MaxFindings {
		r.Findings = append(r.Findings, f)
	} else {
		r.NotShown++
	}
}

// addReport takes one image's findings, counted by the image's report
// (past its MaxFindings counted only).
func (r *VHDCheck) addReport(file string, rep *vhd.Report) {
	for _, f := range rep.Findings {
		off := f.Offset
		r.show(VHDFinding{Severity: f.Severity.String(), File: file, Offset: &off, Message: f.String()})
	}
	r.NotShown += rep.NotShown
	r.Corruptions += rep.Corruptions
	r.Warnings += rep.Warnings
}

// CheckVHD checks the VHD at path, read through r (size bytes long), and
// its chain. It returns nil, nil when r holds no VHD (and is not qcow2
// either: a qcow2 is checked by qcow/inspect), and an error when the check
// could not run at all (a read that failed).
func CheckVHD(path string, r io.ReaderAt, size int64, search []string) (*VHDCheck, error) {
	rep, err := vhd.Check(r, size)
	if errors.Is(err, vhd.ErrNotVHD) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	res := &VHDCheck{Filename: path, Format: "vpc", Chain: []string{path}, Findings: []VHDFinding{},
		Blocks: rep.Blocks, AllocatedBlocks: rep.AllocatedBlocks, MarkedBytes: rep.MarkedBytes}
	res.addReport(path, rep)
	v := rep.Reader
	if v == nil || v.Footer.DiskType != vhd.Differencing || len(v.ParentNames()) == 0 {
		return res, nil
	}
	// The chain, opened as the hybrid source opens it (each parent
	// validated as NewReader validates it), from a layer over the image
	// already read; the file is opened again only to tell a loop.
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	c := &Chain{Layers: []*Layer{{Path: path, Format: VHD, VirtualSize: v.VirtualSize(), f: f, size: size, vhd: v}}}
	defer c.Close()
	chainErr := c.openParents(search)
	for i, l := range c.Layers[1:] {
		res.Chain = append(res.Chain, l.Path)
		res.checkTimestamp(c.Layers[i], l)
		// Each parent passed NewReader; what only a full check sees
		// (warnings, the bitmaps against the batmap) is added.
		prep, err := vhd.Check(l.f, l.size)
		if err != nil {
			res.add(VHDFinding{Severity: checkError, File: l.Path, Message: err.Error()})
			continue
		}
		res.addReport(l.Path, prep)
	}
	if chainErr != nil {
		sev := vhd.Corruption.String()
		var mp *MissingParentError
		if errors.As(chainErr, &mp) {
			sev = checkError // the chain could not be followed
		}
		// The finding is the child's: its dynamic header names the
		// parent (name and locators).
		child := c.Layers[len(c.Layers)-1]
		var off *int64
		if child.Format == VHD && child.vhd.Header != nil {
			o := int64(child.vhd.Footer.DataOffset)
			off = &o
		}
		res.add(VHDFinding{Severity: sev, File: child.Path, Offset: off, Message: chainErr.Error()})
	}
	return res, nil
}

// vhdEpoch is where VHD time stamps count from.
var vhdEpoch = time.Date(2000, 1, 1, 0, 0, 0, 0, time.UTC)

func vhdTime(t uint32) string {
	return vhdEpoch.Add(time.Duration(t) * time.Second).Format(time.RFC3339)
}

// checkTimestamp warns when the parent's footer time stamp is not the one
// the child records. tapdisk does not refuse it (its check is disabled:
// hiding and coalescing a parent change it, and blktap records the
// parent file's modification time there), so neither does the hybrid
// source; check says so.
func (r *VHDCheck) checkTimestamp(child, parent *Layer) {
	if child.Format != VHD || parent.Format != VHD {
		return
	}
	want, got := child.vhd.Header.ParentTimestamp, parent.vhd.Footer.Timestamp
	if want == got {
		return
	}
	off := int64(child.vhd.Footer.DataOffset) + 56
	finding := &vhd.FormatError{Offset: off, What: "dynamic header", Reason: fmt.Sprintf(
		"the parent time stamp %d (%s) is not the footer time stamp %d (%s) of the parent %s; tapdisk does not compare them (hiding and coalescing a parent change it) and reads the chain",
		want, vhdTime(want), got, vhdTime(got), parent.Path)}
	r.add(VHDFinding{Severity: vhd.Warning.String(), File: child.Path, Offset: &off, Message: finding.Error()})
}

// WriteHuman prints the result for a person, a finding a line, in the
// words of qemu-img check's text output.
func (r *VHDCheck) WriteHuman(w io.Writer) error {
	for _, f := range r.Findings {
		prefix := "ERROR: "
		switch f.Severity {
		case vhd.Warning.String():
			prefix = "Warning: "
		case checkError:
			prefix = "Check error: "
		}
		file, where := "", ""
		if f.File != r.Filename && !strings.HasPrefix(f.Message, "parent") && !strings.HasPrefix(f.Message, f.File) {
			file = f.File + ": "
		}
		if f.Offset != nil && !strings.Contains(f.Message, "offset 0x") {
			// A chain finding: the dynamic header naming the parent.
			where = fmt.Sprintf(" (the parent named by the dynamic header at offset %#x of %s)", *f.Offset, f.File)
		}
		fmt.Fprintf(w, "%s%s%s%s\n", prefix, file, f.Message, where)
	}
	if r.NotShown > 0 {
		fmt.Fprintf(w, "(%d more findings not shown)\n", r.NotShown)
	}
	if r.Corruptions > 0 {
		fmt.Fprintf(w, "%d errors were found on the image.\nData may be corrupted: the hybrid source refuses this chain.\n", r.Corruptions)
	}
	if r.CheckErrors > 0 {
		fmt.Fprintf(w, "%d errors stopped the check of the chain.\n", r.CheckErrors)
	}
	if r.ExitCode() == 0 {
		fmt.Fprintln(w, "No errors were found on the image.")
	}
	if r.Warnings > 0 {
		fmt.Fprintf(w, "%d warnings: quirks blktap's libvhd accepts (see docs/SUPPORT.md).\n", r.Warnings)
	}
	if r.Blocks > 0 {
		fmt.Fprintf(w, "%d/%d blocks allocated, %d bytes marked in their sector bitmaps\n", r.AllocatedBlocks, r.Blocks, r.MarkedBytes)
	}
	if len(r.Chain) > 1 {
		fmt.Fprintf(w, "Chain checked: %d images, top first:\n", len(r.Chain))
		for _, p := range r.Chain {
			fmt.Fprintf(w, "    %s\n", p)
		}
	}
	return nil
}

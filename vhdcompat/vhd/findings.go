package vhd

import "fmt"

// Severity says what a finding means for the readers of an image.
type Severity uint8

// Severities.
const (
	// Corruption: readers would refuse the image or could read wrong
	// data from it. The hybrid source refuses it, and check exits 2.
	Corruption Severity = iota
	// Warning: a quirk that blktap's libvhd accepts (early tapdisk's
	// footers, a parent time stamp that tapdisk does not compare); the
	// image is read as libvhd reads it.
	Warning
)

func (s Severity) String() string {
	if s == Warning {
		return "warning"
	}
	return "corruption"
}

// MarshalText names the severity in JSON.
func (s Severity) MarshalText() ([]byte, error) { return []byte(s.String()), nil }

// Finding is one thing Check found: where (the structure and its offset in
// the file) and what. Its text is the error the readers refuse the image
// with when it is a corruption.
type Finding struct {
	Severity Severity `json:"severity"`
	FormatError
}

func (f Finding) String() string { return f.FormatError.Error() }

// MaxFindings bounds the findings kept in a Report: a hostile image can
// make millions (a BAT of overlapping entries); past it they are counted.
const MaxFindings = 1000

// Report is the result of Check on one image.
type Report struct {
	// Reader reads the image; nil when its metadata could not be read
	// far enough (a damaged footer or header, a BAT outside the file).
	Reader      *Reader
	Findings    []Finding
	NotShown    int // findings past MaxFindings
	Corruptions int // all of them, shown or not
	Warnings    int
	// What was walked: blocks mapping the virtual size, blocks the BAT
	// allocates, bytes their sector bitmaps mark.
	Blocks, AllocatedBlocks int
	MarkedBytes             int64
}

// validator collects findings while an image is opened. In strict mode
// (NewReader) the first corruption ends the open and is its error; in
// check mode every finding is kept and the open goes on where it can.
type validator struct {
	strict bool
	rep    Report
	first  *FormatError // the first corruption
}

func (c *validator) add(sev Severity, off int64, what, format string, args ...any) {
	if sev == Corruption {
		c.rep.Corruptions++
	} else {
		c.rep.Warnings++
	}
	if len(c.rep.Findings) >= MaxFindings {
		c.rep.NotShown++ // counted, not formatted: there may be millions
		return
	}
	f := Finding{Severity: sev, FormatError: FormatError{Offset: off, What: what, Reason: fmt.Sprintf(format, args...)}}
	if sev == Corruption && c.first == nil {
		c.first = &f.FormatError
	}
	c.rep.Findings = append(c.rep.Findings, f)
}

// corrupt records a corruption and reports whether the open goes on.
func (c *validator) corrupt(off int64, what, format string, args ...any) bool {
	c.add(Corruption, off, what, format, args...)
	return !c.strict
}

// corruptErr records err (a *FormatError from a parser) as a corruption.
func (c *validator) corruptErr(err error) bool {
	fe, ok := err.(*FormatError)
	if !ok {
		fe = &FormatError{What: "image", Reason: err.Error()}
	}
	return c.corrupt(fe.Offset, fe.What, "%s", fe.Reason)
}

func (c *validator) warn(off int64, what, format string, args ...any) {
	c.add(Warning, off, what, format, args...)
}

// stopped reports whether strict mode has met a corruption.
func (c *validator) stopped() bool { return c.strict && c.first != nil }

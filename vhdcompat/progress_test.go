package vhdcompat

import (
	"bytes"
	"strings"
	"testing"
	"time"
)

// TestProgressBarClearsItsLine: a redraw that is shorter than the one
// before must not leave the old line's tail on screen ("0s left eft").
func TestProgressBarClearsItsLine(t *testing.T) {
	var out bytes.Buffer
	r := &Reporter{last: -1, start: time.Now().Add(-time.Hour), bar: &out}
	r.done, r.total = 1, 1<<50 // hours left: a long line
	r.drawBar(0)
	long := out.Len()
	r.Finish(true) // 0s left: shorter
	draws := strings.Split(strings.TrimSuffix(out.String(), "\n"), "\r")[1:]
	if len(draws) != 2 {
		t.Fatalf("want 2 redraws, got %q", out.String())
	}
	if len(draws[1]) >= long {
		t.Fatalf("the test needs a shorter second draw: %q after %q", draws[1], draws[0])
	}
	for _, d := range draws {
		if !strings.HasSuffix(d, eraseToEOL) {
			t.Errorf("redraw %q does not erase the rest of the line", d)
		}
	}
	if !strings.HasSuffix(out.String(), "0s left"+eraseToEOL+"\n") {
		t.Errorf("final line %q", out.String())
	}
}

package tests

import (
	"bytes"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
	"unicode/utf8"
)

// TestProgressBarOnTerminal: `serve --progress` with stderr on a pty draws
// its bar in place. Rendered as a terminal would, every redraw leaves
// exactly its own text on the line: nothing of a longer line before it
// ("0s left eft"). Whether a run's redraws shrink depends on timing:
// TestProgressBarClearsItsLine (vhdcompat) forces a shorter one.
func TestProgressBarOnTerminal(t *testing.T) {
	master, slave := openPty(t)
	dir := t.TempDir()
	raw := filepath.Join(dir, "src.img")
	// 64 GiB, sparse: the rates printed are large and change from one
	// redraw to the next.
	sparseFile(t, raw, 64<<30)
	writeRandom(t, newRand(61), raw, 0, 4<<20)
	img := filepath.Join(dir, "src.qcow2")
	exportToFile(t, img, "stream", "--source", raw)
	data, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}

	r, w := pipe(t)
	p := start(t, cmdSpec{args: []string{"serve", "--progress", "--destination", filepath.Join(dir, "out.img")}, stdin: r, stderr: slave})
	r.Close()
	slave.Close() // the child holds it: EOF on the master when it exits
	var screen bytes.Buffer
	read := make(chan struct{})
	go func() { io.Copy(&screen, master); close(read) }() // EIO at the end: fine
	time.Sleep(time.Second)
	if _, err := w.Write(data); err != nil {
		t.Fatal(err)
	}
	w.Close()
	if code := p.wait(t, 20*time.Second); code != 0 {
		t.Fatalf("serve: exit %d", code)
	}
	select {
	case <-read:
	case <-time.After(5 * time.Second):
		t.Fatal("the pty did not reach EOF")
	}
	if st, err := os.Stat(filepath.Join(dir, "out.img")); err != nil || st.Size() != 64<<30 {
		t.Fatalf("imported disk: %v, %v", st, err)
	}

	// Render it as a minimal VT100 would: \r to column 0, ESC[K erases to
	// the end of the line, \n starts a new line, anything else overwrites.
	// After each redraw (the text up to the next \r or \n) the line must
	// read exactly that text.
	out := screen.String()
	var line []rune
	var text strings.Builder
	col, draws := 0, 0
	redrawn := func() {
		if text.Len() == 0 {
			return
		}
		if string(line) != text.String() {
			t.Fatalf("after the redraw %q the line reads %q (terminal output %q)", text.String(), string(line), out)
		}
		draws++
		text.Reset()
	}
	for i := 0; i < len(out); {
		switch {
		case strings.HasPrefix(out[i:], "\x1b[K"):
			line = line[:col]
			i += 3
		case out[i] == '\r':
			redrawn()
			col = 0
			i++
		case out[i] == '\n':
			redrawn()
			line, col = nil, 0
			i++
		default:
			ch, n := utf8.DecodeRuneInString(out[i:])
			if col < len(line) {
				line[col] = ch
			} else {
				line = append(line, ch)
			}
			col++
			text.WriteRune(ch)
			i += n
		}
	}
	redrawn()
	if draws < 2 || !strings.Contains(out, "100%") {
		t.Fatalf("expected redraws ending at 100%%, got %d: %q", draws, out)
	}
}

package vhdcompat

import (
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// IsTerminal reports whether f is a terminal.
func IsTerminal(f *os.File) bool {
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}

// ProgressFlags are vhd-tool's progress options.
type ProgressFlags struct {
	Progress bool `help:"Report progress: with --machine as three digits (000..100) on stdout, otherwise as a bar on stderr when it is a terminal."`
	Machine  bool `help:"Machine-readable progress for xapi: each time the percentage changes, exactly three digits, no newline, on stdout."`
}

// CompatFlags are vhd-tool options xapi passes that do not change what a
// qcow2 transfer does; they are accepted so that xapi's command lines work.
type CompatFlags struct {
	TarFilenamePrefix string `name:"tar-filename-prefix" help:"Accepted for vhd-tool compatibility (the tar protocol is not supported)." placeholder:"P"`
	Path              string `help:"Colon-separated directories where the parent images of --source-format hybrid, and of a discovered image, are searched after the image's own directory (xapi passes /dev/mapper:.; a discovered image's default)." placeholder:"PATHS"`
	Debug             bool   `help:"Log debug detail to stderr."`
	Verbose           bool   `short:"v" help:"Log progress and details to stderr."`
}

// Reporter turns byte counts into progress output.
type Reporter struct {
	mu      sync.Mutex
	machine io.Writer // three digits per change
	bar     io.Writer // a bar on a terminal
	last    int
	start   time.Time
	lastBar time.Time
	done    uint64
	total   uint64
}

// Reporter returns the progress reporter the flags ask for. Machine
// progress needs stdout: it is refused when stdout carries the data.
func (p ProgressFlags) Reporter(env *Env, stdoutCarriesData bool) (*Reporter, error) {
	r := &Reporter{last: -1, start: time.Now()}
	if !p.Progress && !p.Machine {
		return r, nil
	}
	if p.Machine {
		if stdoutCarriesData {
			// vhd-tool's rule: progress goes to stdout only when stdout is
			// not the data channel. Say nothing rather than corrupt data.
			return r, nil
		}
		r.machine = env.Stdout
		return r, nil
	}
	if env.Stderr != nil && IsTerminal(env.Stderr) {
		r.bar = env.Stderr
	}
	return r, nil
}

// Update records progress: done of total bytes of work.
func (r *Reporter) Update(done, total uint64) {
	if r == nil || r.machine == nil && r.bar == nil {
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.done, r.total = done, total
	pct := 100
	if total > 0 {
		pct = int(done * 100 / total)
	}
	pct = min(pct, 100)
	if r.machine != nil {
		// Never report 100 before the end: xapi takes 100 as done.
		if pct >= 100 {
			pct = 99
		}
		if pct > r.last {
			r.last = pct
			fmt.Fprintf(r.machine, "%03d", pct)
		}
	}
	if r.bar != nil && time.Since(r.lastBar) > 200*time.Millisecond {
		r.lastBar = time.Now()
		r.drawBar(pct)
	}
}

func (r *Reporter) drawBar(pct int) {
	el := time.Since(r.start).Seconds()
	rate := float64(r.done) / max(el, 0.001)
	left := "?"
	if rate > 0 && r.total >= r.done {
		left = (time.Duration(float64(r.total-r.done)/rate) * time.Second).Round(time.Second).String()
	}
	const width = 30
	fill := pct * width / 100
	// The line is redrawn in place: clear what is left of it after the
	// text (erase to end of line), since a redraw can be shorter than the
	// one before ("1m2s left" then "0s left").
	fmt.Fprintf(r.bar, "\r[%s%s] %3d%% %s/%s %s/s, %s left%s", strings.Repeat("#", fill), strings.Repeat(".", width-fill),
		pct, human(r.done), human(r.total), human(uint64(rate)), left, eraseToEOL)
}

// eraseToEOL is the ANSI/VT100 sequence "erase in line" (EL, cursor to
// end): every terminal a dom0 console or ssh session offers supports it.
const eraseToEOL = "\x1b[K"

// Finish prints the final 100 on success and ends the bar's line.
func (r *Reporter) Finish(ok bool) {
	if r == nil {
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if ok && r.machine != nil && r.last < 100 {
		r.last = 100
		fmt.Fprint(r.machine, "100")
	}
	if r.bar != nil {
		if ok {
			r.done = r.total
			r.drawBar(100)
		}
		fmt.Fprintln(r.bar)
	}
}

func human(n uint64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%dB", n)
	}
	div, exp := uint64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f%ciB", float64(n)/float64(div), "KMGTPE"[exp])
}

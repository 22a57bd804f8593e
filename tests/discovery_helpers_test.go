package tests

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// xapiHost is what a XenServer host has around a VDI's device and this
// machine lacks, built around the unchanged binary in a private mount
// namespace: a copy of /proc/devices that names the loop major "tapdev", a
// stand-in /usr/sbin/tap-ctl (an overlay over /usr/sbin) that prints
// tap-ctl's lines for the tapdisks the test declares and filters them by
// -p and -m as tap-ctl does, xapi's NBD attachment records bound on
// /var/run/nonpersistent/nbd, and a /dev of its own (a tmpfs) holding the
// nodes and symlinks a host has: /dev/sm/backend/SR/VDI → the tapdev node,
// logical volumes under /dev/VG_XenStorage-SR, /dev/nbdN. The journal is
// the fakeJournal of journal_test.go.
type xapiHost struct {
	t        *testing.T
	dir      string
	standins string   // lower layer over /usr/sbin
	tapdisks string   // what `tap-ctl list` knows, one line per tapdisk
	calls    string   // the stand-in's log of its command lines
	devices  string   // the /proc/devices bound over the real one
	nbd      string   // bound on /var/run/nonpersistent/nbd
	dev      []string // shell commands building /dev in the namespace
}

// tapCtlStandin answers `tap-ctl list [-p PID] [-m MINOR]` from the
// tapdisks file, in tap-ctl's own line format.
const tapCtlStandin = `#!/bin/sh
echo "$*" >> %[1]q
[ "$1" = list ] || { echo "tap-ctl: only list is simulated" >&2; exit 1; }
shift; pid=; minor=
while [ $# -gt 0 ]; do
	case "$1" in
	-p) pid=$2; shift 2 ;;
	-m) minor=$2; shift 2 ;;
	*) echo "tap-ctl: unknown option $1" >&2; exit 1 ;;
	esac
done
exec awk -v pid="$pid" -v minor="$minor" '{ p = $1; sub(/^pid=/, "", p); m = $2; sub(/^minor=/, "", m) } (pid == "" || p == pid) && (minor == "" || m == minor)' %[2]q
`

const xapiHostScript = `set -e
mount -t tmpfs -o size=1m tmpfs /run
mkdir -p /run/systemd/journal /run/nonpersistent/nbd
touch /run/systemd/journal/socket
mount --bind "$JOURNAL_SOCK" /run/systemd/journal/socket
mount --bind "$HOST_NBD" /run/nonpersistent/nbd
mount --bind "$HOST_DEVICES" /proc/devices
mount -t overlay overlay -o lowerdir="$HOST_STANDINS":/usr/sbin /usr/sbin
mount -t tmpfs -o size=1m,mode=755 tmpfs /dev
mknod -m 666 /dev/null c 1 3
. "$HOST_DEV"
exec "$@"`

func newXapiHost(t *testing.T) *xapiHost {
	t.Helper()
	needUnshare(t)
	if os.Geteuid() != 0 {
		t.Skip("SKIP: mount namespaces and loop devices need root")
	}
	dir := t.TempDir()
	h := &xapiHost{t: t, dir: dir, standins: filepath.Join(dir, "standins"), tapdisks: filepath.Join(dir, "tapdisks"),
		calls: filepath.Join(dir, "tap-ctl.calls"), devices: filepath.Join(dir, "devices"), nbd: filepath.Join(dir, "nbd")}
	for _, d := range []string{h.standins, h.nbd} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	writeFile(t, h.tapdisks, nil)
	h.tapCtl(fmt.Sprintf(tapCtlStandin, h.calls, h.tapdisks))
	h.tapdevMajor(true)
	return h
}

// tapCtl replaces the stand-in with script; "" removes it (a host
// without tap-ctl).
func (h *xapiHost) tapCtl(script string) {
	p := filepath.Join(h.standins, "tap-ctl")
	os.Remove(p)
	if script != "" {
		if err := os.WriteFile(p, []byte(script), 0o755); err != nil {
			h.t.Fatal(err)
		}
	}
}

// tapdevMajor writes the /proc/devices of the namespace: the real one,
// with the loop major renamed tapdev when on.
func (h *xapiHost) tapdevMajor(on bool) {
	b := readFile(h.t, "/proc/devices")
	if on {
		var lines []string
		block := false
		for _, l := range strings.Split(string(b), "\n") {
			block = block || strings.HasPrefix(l, "Block devices")
			if f := strings.Fields(l); block && len(f) == 2 && f[1] == "loop" {
				l = strings.Replace(l, "loop", "tapdev", 1)
			}
			lines = append(lines, l)
		}
		b = []byte(strings.Join(lines, "\n"))
	}
	writeFile(h.t, h.devices, b)
}

// tapdisk declares a tapdisk: `tap-ctl list` prints the line.
func (h *xapiHost) tapdisk(pid int, minor uint32, state, args string) {
	f, err := os.OpenFile(h.tapdisks, os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		h.t.Fatal(err)
	}
	defer f.Close()
	fmt.Fprintf(f, "pid=%d minor=%d state=%s args=%s\n", pid, minor, state, args)
}

// tapCtlCalls is what the stand-in was run with, a line per run.
func (h *xapiHost) tapCtlCalls() []string {
	b, err := os.ReadFile(h.calls)
	if err != nil {
		return nil
	}
	return strings.Split(strings.TrimSpace(string(b)), "\n")
}

func devNumbers(t testing.TB, dev string) (uint32, uint32) {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(dev, &st); err != nil {
		t.Fatal(err)
	}
	return unix.Major(st.Rdev), unix.Minor(st.Rdev)
}

// node makes, in the namespace's /dev, a block node at path with the
// numbers of the host's device dev, and the symlinks links to it.
func (h *xapiHost) node(path, dev string, links ...string) {
	major, minor := devNumbers(h.t, dev)
	h.dev = append(h.dev, fmt.Sprintf("mkdir -p %q && mknod %q b %d %d", filepath.Dir(path), path, major, minor))
	for _, l := range links {
		h.symlink(l, path)
	}
}

func (h *xapiHost) symlink(link, target string) {
	h.dev = append(h.dev, fmt.Sprintf("mkdir -p %q && ln -s %q %q", filepath.Dir(link), target, link))
}

// vdi attaches dev as blktap does: a tapdev node with dev's numbers and
// /dev/sm/backend/SR/NAME pointing at it. It returns that path and the
// minor tap-ctl knows the device by.
func (h *xapiHost) vdi(dev, name string) (string, uint32) {
	_, minor := devNumbers(h.t, dev)
	path := "/dev/sm/backend/7f3c-sr/" + name
	h.node(fmt.Sprintf("/dev/xen/blktap-2/tapdev%d", minor), dev, path)
	return path, minor
}

// run runs xapi's command line, the binary under the name xapi gives it
// (args[0]: qcow2-to-stdout.py) or as xapi-qcow-tool (args[0] a command),
// on this host, stdout into the file stdout ("" to capture it).
func (h *xapiHost) run(stdout string, args ...string) (result, []journalEntry) {
	h.t.Helper()
	j := newFakeJournal(h.t)
	devScript := filepath.Join(h.t.TempDir(), "dev.sh")
	writeFile(h.t, devScript, []byte(strings.Join(append(h.dev, ""), "\n")))
	prog := bin
	if args[0] == "qcow2-to-stdout.py" {
		prog, args = linkAs(h.t, args[0]), args[1:]
	}
	s := cmdSpec{path: "unshare", args: append([]string{"-m", "--propagation", "private", "sh", "-c", xapiHostScript, "sh", prog}, args...),
		env: []string{j.env(), "HOST_NBD=" + h.nbd, "HOST_DEVICES=" + h.devices, "HOST_STANDINS=" + h.standins, "HOST_DEV=" + devScript}}
	if stdout != "" {
		s.stdout = createFile(h.t, stdout)
	}
	r := run(h.t, s)
	if stderr := string(r.Stderr); r.Code != 0 && !strings.HasPrefix(stderr, "xapi-qcow-tool:") {
		h.t.Skipf("SKIP: the host's namespace could not be built here: %s", stderr)
	}
	return r, j.drain(h.t)
}

// export runs xapi's export command line on this host into out and
// returns the journal's "export started" entry and the warning entries.
func (h *xapiHost) export(out string, args ...string) (started journalEntry, warnings []string) {
	h.t.Helper()
	r, entries := h.run(out, args...)
	mustSucceed(h.t, r, strings.Join(args, " "))
	for _, e := range entries {
		if e["PRIORITY"] == "4" {
			warnings = append(warnings, e["MESSAGE"])
		}
	}
	started = findEntry(entries, "export started")
	if started == nil {
		h.t.Fatalf("no \"export started\" entry in %v", entries)
	}
	return started, warnings
}

// checkAllocation asserts that the export named its allocation source and
// image, and logged no warning.
func checkAllocation(t testing.TB, started journalEntry, warnings []string, alloc, image string) {
	t.Helper()
	if started["ALLOCATION"] != alloc || started["IMAGE"] != image {
		t.Fatalf("export entry names allocation %q image %q, want %q %q (%v)", started["ALLOCATION"], started["IMAGE"], alloc, image, started)
	}
	if len(warnings) != 0 {
		t.Fatalf("warnings: %q", warnings)
	}
}

// checkFallback asserts one warning line naming why, and the allocation
// source of today's export.
func checkFallback(t testing.TB, started journalEntry, warnings []string, alloc, why string) {
	t.Helper()
	if len(warnings) != 1 || !strings.Contains(warnings[0], why) || !strings.HasPrefix(warnings[0], "discovery: ") {
		t.Fatalf("want one warning saying %q, got %q", why, warnings)
	}
	if started["ALLOCATION"] != alloc || started["IMAGE"] != "" {
		t.Fatalf("export entry names allocation %q image %q, want %q and no image", started["ALLOCATION"], started["IMAGE"], alloc)
	}
}

// hybridReadBound is the most an export through an image chain may read
// from the device: each allocated cluster once (the chain's allocation is
// trusted), plus rawdisk's alignment probes of an O_DIRECT open.
func hybridReadBound(alloc int64) int64 { return alloc + directProbes }

// reset puts the host back as newXapiHost built it, with no tapdisk.
func (h *xapiHost) reset() {
	writeFile(h.t, h.tapdisks, nil)
	h.tapCtl(fmt.Sprintf(tapCtlStandin, h.calls, h.tapdisks))
	h.tapdevMajor(true)
}

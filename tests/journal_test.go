package tests

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"math/rand"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// journalEntry is one datagram of the journal's native protocol.
type journalEntry map[string]string

// parseJournal decodes the native protocol: KEY=value lines, and for
// values with newlines KEY\n, a little-endian 64-bit length, the value and
// a newline.
func parseJournal(b []byte) (journalEntry, error) {
	e := journalEntry{}
	for len(b) > 0 {
		nl := bytes.IndexByte(b, '\n')
		if nl < 0 {
			return nil, fmt.Errorf("unterminated field %q", b)
		}
		line := b[:nl]
		if eq := bytes.IndexByte(line, '='); eq >= 0 {
			e[string(line[:eq])] = string(line[eq+1:])
			b = b[nl+1:]
			continue
		}
		key, rest := string(line), b[nl+1:]
		if len(rest) < 8 {
			return nil, fmt.Errorf("field %s: short length", key)
		}
		n := binary.LittleEndian.Uint64(rest)
		rest = rest[8:]
		if uint64(len(rest)) < n+1 || rest[n] != '\n' {
			return nil, fmt.Errorf("field %s: bad binary value", key)
		}
		e[key] = string(rest[:n])
		b = rest[n+1:]
	}
	return e, nil
}

// fakeJournal is a unix datagram socket standing in for journald: the
// binary runs in a private mount namespace where a tmpfs hides /run and
// the socket's inode is bound over /run/systemd/journal/socket, so the
// binary connects to the journal's real path and reaches this test.
type fakeJournal struct {
	sock string
	conn *net.UnixConn
	done chan struct{}

	mu  sync.Mutex
	got []journalEntry
	bad []string // datagrams that did not parse
}

const journalScript = `set -e
mount -t tmpfs -o size=1m tmpfs /run
mkdir -p /run/systemd/journal
touch /run/systemd/journal/socket
mount --bind "$JOURNAL_SOCK" /run/systemd/journal/socket
exec "$@"`

// newFakeJournal listens and collects entries until the test ends. It
// skips, visibly, where unshare -m is refused.
func newFakeJournal(t *testing.T) *fakeJournal {
	t.Helper()
	needUnshare(t)
	j := &fakeJournal{sock: filepath.Join(t.TempDir(), "journal.socket"), done: make(chan struct{})}
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: j.sock, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	conn.SetReadBuffer(4 << 20)
	j.conn = conn
	t.Cleanup(func() { conn.Close() })
	go func() {
		defer close(j.done)
		buf := make([]byte, 1<<20)
		for {
			n, _, err := conn.ReadFromUnix(buf)
			if err != nil {
				return
			}
			e, err := parseJournal(buf[:n])
			j.mu.Lock()
			if err != nil {
				j.bad = append(j.bad, fmt.Sprintf("%q: %v", buf[:n], err))
			} else {
				j.got = append(j.got, e)
			}
			j.mu.Unlock()
		}
	}()
	return j
}

// unshareArgs is the unshare command line that runs the binary with args
// against this journal (with env() in its environment).
func (j *fakeJournal) unshareArgs(args ...string) []string {
	return append([]string{"-m", "--propagation", "private", "sh", "-c", journalScript, "sh", bin}, args...)
}

func (j *fakeJournal) env() string { return "JOURNAL_SOCK=" + j.sock }

// entries returns what the journal received so far.
func (j *fakeJournal) entries() []journalEntry {
	j.mu.Lock()
	defer j.mu.Unlock()
	return append([]journalEntry(nil), j.got...)
}

// drain waits for the datagrams already queued (they are, by the time the
// sender exits) and stops listening; it fails the test on any that did not
// parse.
func (j *fakeJournal) drain(t *testing.T) []journalEntry {
	t.Helper()
	j.conn.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
	<-j.done
	for _, b := range j.bad {
		t.Errorf("journal datagram %s", b)
	}
	return j.entries()
}

// runWithJournal runs the binary against a fakeJournal and returns the
// entries it received.
func runWithJournal(t *testing.T, stdout string, args ...string) (result, []journalEntry) {
	t.Helper()
	j := newFakeJournal(t)
	s := cmdSpec{path: "unshare", args: j.unshareArgs(args...), env: []string{j.env()}}
	if stdout != "" {
		s.stdout = createFile(t, stdout)
	}
	r := run(t, s)
	if stderr := string(r.Stderr); strings.Contains(stderr, "mount") && r.Code != 0 && !strings.HasPrefix(stderr, "xapi-qcow-tool:") {
		t.Skipf("SKIP: mounting in the namespace refused: %s", stderr)
	}
	return r, j.drain(t)
}

func findEntry(entries []journalEntry, msg string) journalEntry {
	for _, e := range entries {
		if e["MESSAGE"] == msg {
			return e
		}
	}
	return nil
}

// TestJournalEntries: a successful export logs its start and end with
// structured fields; a failure logs at error priority; every entry
// carries SYSLOG_IDENTIFIER and COMMAND. Stderr stays quiet on success.
func TestJournalEntries(t *testing.T) {
	dir := t.TempDir()
	// A newline in the path makes the arguments field use the binary form.
	src := filepath.Join(dir, "disk\nwith newline.img")
	sparseFile(t, src, 4<<20)
	writeRandom(t, newRand(21), src, 1<<20, 3*65536)
	out := filepath.Join(dir, "out.qcow2")
	res, entries := runWithJournal(t, out, "qcow2-to-stdout", src)
	if res.Code != 0 {
		t.Fatalf("export: exit %d: %s", res.Code, res.Stderr)
	}
	if len(res.Stderr) != 0 {
		t.Fatalf("stderr on success: %q", res.Stderr)
	}
	for _, e := range entries {
		if e["SYSLOG_IDENTIFIER"] != "xapi-qcow-tool" || e["COMMAND"] != "qcow2-to-stdout" {
			t.Fatalf("entry without identifier or command: %v", e)
		}
	}
	if len(entries) == 0 {
		t.Fatal("no journal entries received")
	}
	t.Logf("%d journal entries", len(entries))
	started := findEntry(entries, "started")
	if started == nil || started["PRIORITY"] != "6" || !strings.Contains(started["ARGS"], "disk\nwith newline.img") {
		t.Fatalf("no start entry with the arguments in %v", entries)
	}
	exp := findEntry(entries, "export started")
	if exp == nil || exp["SOURCE"] != src || exp["VIRTUAL_SIZE"] != fmt.Sprint(4<<20) || exp["DESTINATION"] != "stdout" {
		t.Fatalf("export start entry %v", exp)
	}
	fin := findEntry(entries, "export finished")
	if fin == nil || fin["DATA_CLUSTERS"] != "3" || fin["BYTES_WRITTEN"] == "" || fin["ELAPSED_MS"] == "" {
		t.Fatalf("export end entry %v", fin)
	}
	if st, err := os.Stat(out); err != nil || fin["BYTES_WRITTEN"] != fmt.Sprint(st.Size()) {
		t.Fatalf("BYTES_WRITTEN %s, the image is %v bytes", fin["BYTES_WRITTEN"], st.Size())
	}
	if end := findEntry(entries, "finished"); end == nil || end["EXIT_STATUS"] != "0" {
		t.Fatalf("no end entry with EXIT_STATUS=0 in %v", entries)
	}

	// A failure: one line on stderr, and an error entry in the journal.
	res, entries = runWithJournal(t, "", "stream", "--source", filepath.Join(dir, "missing.img"))
	checkOneLineError(t, res, "no such file")
	var failed journalEntry
	for _, e := range entries {
		if e["PRIORITY"] == "3" {
			failed = e
		}
	}
	if failed == nil || !strings.Contains(failed["MESSAGE"], "no such file") || failed["EXIT_STATUS"] != "1" ||
		failed["SYSLOG_IDENTIFIER"] != "xapi-qcow-tool" || failed["COMMAND"] != "stream" {
		t.Fatalf("no error entry (PRIORITY=3, EXIT_STATUS=1) for the failure in %v", entries)
	}
	if findEntry(entries, "started") == nil {
		t.Fatalf("the failed run logged no start: %v", entries)
	}

	// A usage error is logged too, with its exit status.
	res, entries = runWithJournal(t, "", "qcow2-to-stdout", src, "-d")
	if res.Code != 2 {
		t.Fatalf("-d: exit %d", res.Code)
	}
	failed = nil
	for _, e := range entries {
		if e["PRIORITY"] == "3" {
			failed = e
		}
	}
	if failed == nil || failed["EXIT_STATUS"] != "2" {
		t.Fatalf("no error entry with EXIT_STATUS=2 in %v", entries)
	}
}

// TestJournalAbsent: without a journal socket the tool runs, failures
// still reach stderr, and -v sends the log to stderr.
func TestJournalAbsent(t *testing.T) {
	if _, err := os.Stat("/run/systemd/journal/socket"); err == nil {
		t.Skip("SKIP: this host has a journal (covered by TestJournalEntries in a namespace)")
	}
	dir := t.TempDir()
	src := filepath.Join(dir, "disk.img")
	sparseFile(t, src, 1<<20)
	r := runTool(t, nil, "stream", "--source", src, "--destination", "null:", "-v")
	if r.Code != 0 || !strings.Contains(string(r.Stderr), "export finished") {
		t.Fatalf("-v: exit %d, stderr %q", r.Code, r.Stderr)
	}
	checkOneLineError(t, runTool(t, nil, "stream", "--source", filepath.Join(dir, "missing")), "no such file")
}

func newRand(seed int64) *rand.Rand { return rand.New(rand.NewSource(seed)) }

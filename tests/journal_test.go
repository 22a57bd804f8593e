package tests

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"math/rand"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
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

// runWithJournal runs the binary inside a private mount namespace where a
// tmpfs hides /run and /run/systemd/journal/socket is a unix datagram
// socket this test reads, and returns the entries it received.
func runWithJournal(t *testing.T, stdout string, args ...string) (result, []journalEntry) {
	t.Helper()
	needUnshare(t)
	sockPath := filepath.Join(t.TempDir(), "journal.socket")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sockPath, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetReadBuffer(4 << 20)

	// The socket's inode is bound over a file at the journal's path in the
	// namespace: the binary connects to /run/systemd/journal/socket and
	// reaches this test.
	script := `set -e
mount -t tmpfs -o size=1m tmpfs /run
mkdir -p /run/systemd/journal
touch /run/systemd/journal/socket
mount --bind "$JOURNAL_SOCK" /run/systemd/journal/socket
exec "$@"`
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "unshare", append([]string{"-m", "--propagation", "private", "sh", "-c", script, "sh", bin}, args...)...)
	cmd.Env = append(os.Environ(), "JOURNAL_SOCK="+sockPath)
	var out, errb bytes.Buffer
	cmd.Stderr = &errb
	if stdout != "" {
		f, err := os.Create(stdout)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		cmd.Stdout = f
	} else {
		cmd.Stdout = &out
	}
	var entries []journalEntry
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 1<<20)
		for {
			n, _, err := conn.ReadFromUnix(buf)
			if err != nil {
				return
			}
			e, err := parseJournal(buf[:n])
			if err != nil {
				t.Errorf("journal datagram %q: %v", buf[:n], err)
				continue
			}
			entries = append(entries, e)
		}
	}()
	err = cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(errb.String(), "mount") && code != 0 && !strings.HasPrefix(errb.String(), "xapi-qcow-tool:") {
		t.Skipf("SKIP: mounting in the namespace refused: %s", errb.String())
	}
	// Datagrams are queued by the time the sender exits; drain them.
	conn.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
	<-done
	return result{out.Bytes(), errb.Bytes(), code}, entries
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

package discover

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

// TestParseTapCtlLine: tap-ctl's line format as xapi's tapctl.ml parses
// it, paths with spaces and colons included.
func TestParseTapCtlLine(t *testing.T) {
	for _, c := range []struct {
		line string
		want *Tapdisk // nil: not a tapdisk line
	}{
		{"pid=855 minor=0 state=0 args=aio:/run/sr-mount/dev/disk/by-id/ata-WDC-part3/win8 0",
			&Tapdisk{PID: 855, Minor: 0, State: "0", Driver: Aio, Image: "/run/sr-mount/dev/disk/by-id/ata-WDC-part3/win8 0"}},
		{"pid=12 minor=3 state=0 args=vhd:/dev/VG_XenStorage-1/VHD-2",
			&Tapdisk{PID: 12, Minor: 3, State: "0", Driver: VHD, Image: "/dev/VG_XenStorage-1/VHD-2"}},
		{"pid=12 minor=3 state=0x2a args=vhd:/var/run/sr-mount/a  b:c.vhd",
			&Tapdisk{PID: 12, Minor: 3, State: "0x2a", Driver: VHD, Image: "/var/run/sr-mount/a  b:c.vhd"}},
		{"pid=12 minor=3 state=0 args=qcow2:/x.qcow2\r", &Tapdisk{PID: 12, Minor: 3, State: "0", Driver: Qcow2, Image: "/x.qcow2"}},
		{"pid=12 minor=3 state=0", &Tapdisk{PID: 12, Minor: 3, State: "0"}},
		{"pid=12 minor=3 state=0 args=", &Tapdisk{PID: 12, Minor: 3, State: "0"}},
		{"pid=12 minor=3 state=0 args=noimage", &Tapdisk{PID: 12, Minor: 3, State: "0"}},
		{"pid=12  minor=3 state=0 args=vhd:/x", nil}, // two spaces: a field is empty
		{"pid=-1 minor=3 state=0 args=vhd:/x", nil},
		{"pid=12 minor=+3 state=0 args=vhd:/x", nil},
		{"pid=12 minor=99999999999 state=0 args=vhd:/x", nil},
		{"minor=3 pid=12 state=0 args=vhd:/x", nil},
		{"pid=12 minor=3 state= args=vhd:/x", nil},
		{"pid=12 minor=3 state=0 img=vhd:/x", nil},
		{"", nil},
		{"tap-ctl: error", nil},
	} {
		got, ok := parseTapCtlLine(c.line)
		if (c.want == nil) != !ok || (ok && !reflect.DeepEqual(got, c.want)) {
			t.Errorf("%q: got %+v, %v; want %+v", c.line, got, ok, c.want)
		}
	}
}

func TestParseProcDevices(t *testing.T) {
	got := parseProcDevices([]byte("Character devices:\n  1 mem\n  4 /dev/vc/0\n  4 tty\n254 tapdev\n\nBlock devices:\n  7 loop\n 43 nbd\n253 tapdev\n259 blkext\nnot a line\n12\n"))
	want := map[uint32][]string{1: {"mem"}, 4: {"/dev/vc/0", "tty"}, 254: {"tapdev"}, 7: {"loop"}, 43: {"nbd"}, 253: {"tapdev"}, 259: {"blkext"}}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("got %v, want %v", got, want)
	}
}

func TestParseNBDRecord(t *testing.T) {
	x, err := parseNBDRecord([]byte(`{"path": "/run/blktap-control/nbd4242.3", "exportname": "a b", "extra": 1}`))
	if err != nil || x.Socket != "/run/blktap-control/nbd4242.3" || x.ExportName != "a b" {
		t.Fatalf("got %+v, %v", x, err)
	}
	for _, bad := range []string{``, `[]`, `{"exportname": "x"}`, `{"path": "", "exportname": "x"}`,
		`{"path": "rel/sock", "exportname": "x"}`, `{"path": "/s"}`, `{"path": 3, "exportname": "x"}`,
		`{"path": "/s", "exportname": "` + strings.Repeat("x", 4097) + `"}`} {
		if x, err := parseNBDRecord([]byte(bad)); err == nil {
			t.Errorf("%q: accepted as %+v", bad, x)
		}
	}
}

func TestTapdiskSocket(t *testing.T) {
	for _, c := range []struct {
		path       string
		pid, minor int
		ok         bool
	}{
		{"/run/blktap-control/nbd4242.3", 4242, 3, true},
		{"nbd1.0", 1, 0, true},
		{"/run/qemu/nbd.sock", 0, 0, false},
		{"/run/blktap-control/nbd4242", 0, 0, false},
		{"/run/blktap-control/nbd4242.3.4", 0, 0, false},
		{"/run/blktap-control/nbd-1.3", 0, 0, false},
		{"/run/blktap-control/xnbd1.3", 0, 0, false},
	} {
		pid, minor, ok := tapdiskSocket(c.path)
		if pid != c.pid || minor != c.minor || ok != c.ok {
			t.Errorf("%s: got %d, %d, %v", c.path, pid, minor, ok)
		}
	}
}

func TestHeadWriter(t *testing.T) {
	full := 0
	w := &headWriter{max: 5, full: func() { full++ }}
	for _, s := range []string{"abc", "def", "ghi"} {
		if n, err := w.Write([]byte(s)); n != 3 || err != nil {
			t.Fatalf("write: %d, %v", n, err)
		}
	}
	if w.String() != "abcde" || !w.over || full != 1 {
		t.Fatalf("kept %q, over %v, full called %d times", w.String(), w.over, full)
	}
}

// TestNotVDIDevice: a regular file and a character device have nothing
// behind them; a missing path is a failure, not "nothing".
func TestNotVDIDevice(t *testing.T) {
	f := filepath.Join(t.TempDir(), "disk.img")
	if err := os.WriteFile(f, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{f, "/dev/null"} {
		if _, err := Discover(context.Background(), p); !errors.Is(err, ErrNotVDIDevice) {
			t.Errorf("%s: %v, want ErrNotVDIDevice", p, err)
		}
	}
	if _, err := Discover(context.Background(), f+".missing"); err == nil || errors.Is(err, ErrNotVDIDevice) {
		t.Errorf("missing path: %v", err)
	}
}

func FuzzParseTapCtlLine(f *testing.F) {
	f.Add("pid=855 minor=0 state=0 args=aio:/run/sr-mount/win8 0")
	f.Add("pid=12 minor=3 state=0x2a args=vhd:/dev/VG_XenStorage-1/VHD-2")
	f.Fuzz(func(t *testing.T, line string) {
		d, ok := parseTapCtlLine(line)
		if !ok {
			return
		}
		if d.PID < 0 || d.Minor < 0 || d.State == "" || strings.Contains(d.State, " ") {
			t.Fatalf("%q: %+v", line, d)
		}
		if d.Image != "" && !strings.Contains(line, string(d.Driver)+":"+d.Image) {
			t.Fatalf("%q: image %q not in the line", line, d.Image)
		}
	})
}

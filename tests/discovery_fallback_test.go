package tests

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/xapi-project/xapi-qcow-tool/tests/qemutest"
	"github.com/xapi-project/xapi-qcow-tool/tests/vhdtest"
)

// TestDiscoveryFallbacks: whatever goes wrong in discovery, the export is
// today's — right, and read by scanning the device — with one warning line
// in the journal that says why.
func TestDiscoveryFallbacks(t *testing.T) {
	qemutest.Need(t)
	h := newXapiHost(t)
	const size = 16 << 20
	raw := filepath.Join(h.dir, "disk.raw")
	sparseFile(t, raw, size)
	r := newRand(190)
	writeRandom(t, r, raw, 0, 2*kib64)
	writeRandom(t, r, raw, 9<<20, 1<<20)
	dev := quietLoop(t, raw)
	vdi, minor := h.vdi(dev, "fallback-vdi")
	sr := filepath.Join(h.dir, "sr")
	if err := os.MkdirAll(sr, 0o755); err != nil {
		t.Fatal(err)
	}

	good := filepath.Join(sr, "good.vhd")
	qemutest.Img(t, "create", "-q", "-f", "vpc", "-o", "subformat=dynamic,force_size=on", good, "16M")
	small := filepath.Join(sr, "small.vhd")
	qemutest.Img(t, "create", "-q", "-f", "vpc", "-o", "subformat=dynamic,force_size=on", small, "8M")
	batOut := filepath.Join(sr, "bat.vhd")
	b := readFile(t, good)
	copy(b[1536:], []byte{0x7f, 0, 0, 0}) // BAT entry 0 far past the end
	writeFile(t, batOut, b)
	// A child whose parent is nowhere, and one whose parent is damaged.
	parent := vhdtest.New(size)
	orphan := filepath.Join(sr, "orphan.vhd")
	if err := vhdtest.Child(parent, "gone.vhd").Save(orphan); err != nil {
		t.Fatal(err)
	}
	damagedChild := filepath.Join(sr, "child-of-damaged.vhd")
	if err := vhdtest.Child(parent, "damaged.vhd").Save(damagedChild); err != nil {
		t.Fatal(err)
	}
	if err := parent.Save(filepath.Join(sr, "damaged.vhd")); err != nil {
		t.Fatal(err)
	}
	b = readFile(t, filepath.Join(sr, "damaged.vhd"))
	b[len(b)-512+40]++ // both footers' checksums wrong
	b[40]++
	writeFile(t, filepath.Join(sr, "damaged.vhd"), b)
	otherSize := filepath.Join(sr, "other.img")
	sparseFile(t, otherSize, size/2)

	for _, c := range []struct {
		name  string
		setup func()
		why   string
	}{
		{"no tap-ctl", func() { h.tapCtl("") }, "/usr/sbin/tap-ctl list -m"},
		{"not blktap", func() { h.tapdevMajor(false) }, "neither a blktap nor an NBD device"},
		{"tap-ctl output unparsable", func() { h.tapCtl("#!/bin/sh\necho 'tapdisk 12 on minor " + fmt.Sprint(minor) + "'\n") }, "no tapdisk serves minor"},
		{"tap-ctl fails", func() { h.tapCtl("#!/bin/sh\necho 'tap-ctl: control socket refused' >&2\nexit 1\n") }, "control socket refused"},
		{"tap-ctl prints too much", func() {
			h.tapCtl("#!/bin/sh\nyes 'pid=1 minor=" + fmt.Sprint(minor) + " state=0 args=vhd:/x' | head -c 3000000\n")
		}, "printed more than 1048576 bytes"},
		{"tap-ctl hangs", func() { h.tapCtl("#!/bin/sh\nsleep 60 &\nexec sleep 60\n") }, "no answer within 10s"},
		{"tapdisk paused", func() { h.tapdisk(4, minor, "0x2a", "vhd:"+good) }, "is not running (state 0x2a)"},
		{"no image open", func() { h.tapdisk(4, minor, "0", "") }, "has no image open"},
		{"unknown driver", func() { h.tapdisk(4, minor, "0", "ntnx:"+good) }, `driver "ntnx"`},
		{"missing image", func() { h.tapdisk(4, minor, "0", "vhd:"+filepath.Join(sr, "nowhere.vhd")) }, "no such file"},
		{"missing parent", func() { h.tapdisk(4, minor, "0", "vhd:"+orphan) }, `parent "./gone.vhd"`},
		{"damaged parent", func() { h.tapdisk(4, minor, "0", "vhd:"+damagedChild) }, "checksum"},
		{"size differs", func() { h.tapdisk(4, minor, "0", "vhd:"+small) }, "describes a disk of 8388608 bytes"},
		{"chain fails validation", func() { h.tapdisk(4, minor, "0", "vhd:"+batOut) }, "VHD BAT at offset 0x600: entry 0"},
		{"aio size differs", func() { h.tapdisk(4, minor, "0", "aio:"+otherSize) }, "has 8388608 bytes, but the device has"},
	} {
		t.Run(c.name, func(t *testing.T) {
			h.t = t
			h.reset()
			c.setup()
			out := filepath.Join(h.dir, "out.qcow2")
			os.Remove(out)
			started, warnings := h.export(out, "qcow2-to-stdout.py", vdi)
			qemutest.Compare(t, out, raw)
			checkFallback(t, started, warnings, "scan", c.why)
			t.Logf("warning: %s", warnings[0])
		})
	}
}

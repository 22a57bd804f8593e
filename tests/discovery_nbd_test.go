package tests

import (
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/xapi-project/xapi-qcow-tool/tests/qemutest"
)

// deviceInfo is `info --output=json DEVICE` for a blktap or NBD device.
type deviceInfo struct {
	Device     string `json:"device"`
	Resolved   string `json:"resolved"`
	Via        string `json:"via"`
	Driver     string `json:"driver"`
	Image      string `json:"image"`
	ChainDepth int    `json:"chain-depth"`
	Chain      []struct {
		Path   string `json:"path"`
		Format string `json:"format"`
	} `json:"chain"`
	Tapdisk *struct {
		PID   int `json:"pid"`
		Minor int `json:"minor"`
	} `json:"tapdisk"`
	NBD *struct {
		Index      int    `json:"index"`
		SocketReal string `json:"socket-real"`
		ExportName string `json:"export-name"`
	} `json:"nbd"`
	Allocation     string `json:"allocation"`
	AllocatedBytes int64  `json:"allocated-bytes"`
	Error          string `json:"error"`
	Extents        []struct {
		Start, Length int64
		Data          bool
	} `json:"extents"`
}

func (h *xapiHost) deviceInfo(args ...string) deviceInfo {
	h.t.Helper()
	r, _ := h.run("", args...)
	mustSucceed(h.t, r, strings.Join(args, " "))
	var in deviceInfo
	if err := json.Unmarshal(r.Stdout, &in); err != nil {
		h.t.Fatalf("%s: %v: %s", strings.Join(args, " "), err, r.Stdout)
	}
	return in
}

// TestDiscoveryInfoMap: info and map on a VDI's device say what an export
// will read: the tapdisk, the driver, the image, the chain and its depth,
// the bytes; or why discovery failed.
func TestDiscoveryInfoMap(t *testing.T) {
	h := newXapiHost(t)
	sr := filepath.Join(h.dir, "sr mount")
	paths := []string{filepath.Join(sr, "parent.vhd"), filepath.Join(sr, "leaf.vhd")}
	const size = 12 << 20
	raw, regions := layeredVHDs(t, size, paths, [][][2]int64{{{0, 1 << 20}}, {{5 << 20, 4096}, {size - 512, 512}}})
	dev := loopDevice(t, raw, false)
	vdi, minor := h.vdi(dev, "info-vdi")
	h.tapdisk(31, minor, "0", "vhd:"+paths[1])
	alloc := clustersOf(regions)

	in := h.deviceInfo("info", "--output=json", vdi)
	if in.Via != "blktap" || in.Driver != "vhd" || in.Image != paths[1] || in.ChainDepth != 2 || len(in.Chain) != 2 ||
		in.Chain[1].Path != paths[0] || in.Allocation != "vhd" || in.AllocatedBytes != alloc || in.Error != "" ||
		in.Tapdisk == nil || in.Tapdisk.PID != 31 || !strings.HasPrefix(in.Resolved, "/dev/xen/blktap-2/tapdev") {
		t.Fatalf("info: %+v; want blktap, vhd %s, depth 2, %d bytes", in, paths[1], alloc)
	}
	r, _ := h.run("", "info", vdi)
	mustSucceed(t, r, "info")
	for _, want := range []string{"driver:                vhd", "image:                 " + paths[1], "chain depth:           2", fmt.Sprintf("an export reads:       %d bytes", alloc)} {
		if !strings.Contains(string(r.Stdout), want) {
			t.Fatalf("info does not say %q:\n%s", want, r.Stdout)
		}
	}

	m := h.deviceInfo("map", "--output=json", vdi)
	var data int64
	pos := int64(0)
	for _, e := range m.Extents {
		if e.Start != pos {
			t.Fatalf("map extents not contiguous at %d: %+v", pos, m.Extents)
		}
		pos += e.Length
		if e.Data {
			data += e.Length
		}
	}
	if data != alloc || pos != size || m.ChainDepth != 2 || m.Driver != "vhd" {
		t.Fatalf("map: %d data bytes over %d, depth %d; want %d over %d, depth 2", data, pos, m.ChainDepth, alloc, int64(size))
	}
	r, _ = h.run("", "map", vdi)
	mustSucceed(t, r, "map")
	if head := strings.SplitN(string(r.Stdout), "\n", 2)[0]; !strings.Contains(head, "vhd:"+paths[1]+", chain depth 2") {
		t.Fatalf("map heading %q", head)
	}

	// No tap-ctl: info says why, and that an export reads the device.
	h.tapCtl("")
	in = h.deviceInfo("info", "--output=json", vdi)
	if in.Allocation != "scan" || !strings.Contains(in.Error, "/usr/sbin/tap-ctl") || in.AllocatedBytes != size {
		t.Fatalf("info without tap-ctl: %+v", in)
	}
	// --no-discovery: the device's own content (raw: not an image).
	h.reset()
	h.tapdisk(31, minor, "0", "vhd:"+paths[1])
	r, _ = h.run("", "info", "--no-discovery", vdi)
	if strings.Contains(string(r.Stdout)+string(r.Stderr), "tapdisk") {
		t.Fatalf("info --no-discovery looked behind the device: %s%s", r.Stdout, r.Stderr)
	}
	if n := len(h.tapCtlCalls()); n != 4 {
		t.Fatalf("tap-ctl ran %d times, want 4 (not for --no-discovery)", n)
	}
}

// listenUnix serves a unix socket at path for the test's duration.
func listenUnix(t testing.TB, path string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
}

// nbdRecord writes xapi's attachment record of /dev/nbdN.
func (h *xapiHost) nbdRecord(n int, socket, export string) {
	b, _ := json.Marshal(map[string]string{"path": socket, "exportname": export})
	writeFile(h.t, filepath.Join(h.nbd, fmt.Sprint(n)), b)
}

// TestDiscoveryNBD: a VDI attached to dom0 as /dev/nbdN. Served by a
// tapdisk (its socket's real name nbd<PID>.<MINOR>), the image is the
// tapdisk's; served by another server, discovery says so (socket and
// export name: the allocation can only be asked of the server). The
// resolution runs on a node made with mknod and real unix sockets; the
// export through a real /dev/nbdN needs the nbd module.
func TestDiscoveryNBD(t *testing.T) {
	h := newXapiHost(t)
	sr := filepath.Join(h.dir, "sr")
	paths := []string{filepath.Join(sr, "parent.vhd"), filepath.Join(sr, "leaf.vhd")}
	const size = 8 << 20
	raw, regions := layeredVHDs(t, size, paths, [][][2]int64{{{0, 64 << 10}}, {{3 << 20, 4096}}})

	tapSock := filepath.Join(h.dir, "blktap-control", "nbd4242.7")
	listenUnix(t, tapSock)
	link := filepath.Join(h.dir, "vbd-socket")
	if err := os.Symlink(tapSock, link); err != nil {
		t.Fatal(err)
	}
	h.nbdRecord(5, link, "0b9e-vdi")
	h.dev = append(h.dev, "mknod /dev/nbd5 b 43 80", "mknod /dev/nbd6 b 43 96")
	h.tapdisk(4242, 7, "0", "vhd:"+paths[1])
	h.tapdisk(4242, 80, "0", "aio:/wrong/minor.img") // the NBD device's minor is not the tapdisk's

	in := h.deviceInfo("info", "--output=json", "/dev/nbd5")
	if in.Via != "nbd-tapdisk" || in.Driver != "vhd" || in.Image != paths[1] || in.ChainDepth != 2 ||
		in.NBD == nil || in.NBD.SocketReal != tapSock || in.NBD.ExportName != "0b9e-vdi" || in.NBD.Index != 5 ||
		in.Tapdisk == nil || in.Tapdisk.PID != 4242 || in.Tapdisk.Minor != 7 || in.Allocation != "vhd" || in.AllocatedBytes != clustersOf(regions) {
		t.Fatalf("info /dev/nbd5: %+v", in)
	}
	if !strings.Contains(in.Error, "cannot be opened") {
		t.Fatalf("info /dev/nbd5 (no nbd driver behind the node) should say the device cannot be opened: %q", in.Error)
	}
	if calls := h.tapCtlCalls(); !slices.Contains(calls, "list -p 4242 -m 7") {
		t.Fatalf("tap-ctl was run as %q, want list -p 4242 -m 7", calls)
	}

	// Another NBD server (qemu-nbd on a unix socket, as xapi's NBD
	// attachments of non-tapdisk SRs are).
	qemutest.Need(t, "qemu-nbd")
	qsock := filepath.Join(h.dir, "qemu nbd.sock")
	qn := exec.Command("qemu-nbd", "-r", "-k", qsock, "--persistent", "-x", "export one", "-f", "raw", raw)
	if err := qn.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { qn.Process.Kill(); qn.Wait() })
	for i := 0; i < 100; i++ {
		if _, err := os.Stat(qsock); err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	h.nbdRecord(6, qsock, "export one")
	// Its allocation is the server's block status (the nbdhybrid source),
	// which is what the raw file holds (the node itself, without the nbd
	// driver, cannot be opened: said as for /dev/nbd5).
	in = h.deviceInfo("info", "--output=json", "/dev/nbd6")
	if in.Via != "nbd" || in.NBD == nil || in.NBD.SocketReal != qsock || in.NBD.ExportName != "export one" ||
		in.Tapdisk != nil || in.Allocation != "nbd" || !strings.Contains(in.Error, "cannot be opened") || in.AllocatedBytes != clustersOf(regions) {
		t.Fatalf("info /dev/nbd6: %+v; want the allocation of server %s, %d bytes", in, qsock, clustersOf(regions))
	}
	// A record naming a socket where something else answers: said, and
	// the device would be scanned.
	other := filepath.Join(h.dir, "not-nbd.sock")
	ln, err := net.Listen("unix", other)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Write([]byte("HTTP/1.0 400 Bad Request\r\n\r\n"))
			c.Close()
		}
	}()
	h.nbdRecord(6, other, "export one")
	in = h.deviceInfo("info", "--output=json", "/dev/nbd6")
	if in.Via != "nbd" || in.Allocation != "scan" || !strings.Contains(in.Error, "not an NBD server") || !strings.Contains(in.Error, other) {
		t.Fatalf("info /dev/nbd6 with another server: %+v", in)
	}

	t.Run("export through /dev/nbdN", func(t *testing.T) {
		h.t = t
		nbdExport(h, raw, paths[1])
	})
}

// nbdExport exports through a real /dev/nbd0 connected to a server on a
// socket named as tapdisk names its own, and checks the export reads the
// chain's allocation; then through another server, and checks the export
// takes the allocation from that server's block status.
func nbdExport(h *xapiHost, raw, leaf string) {
	t := h.t
	if _, err := os.Stat("/sys/module/nbd"); err != nil {
		t.Skip("SKIP: no nbd kernel module here (/sys/module/nbd): the export through a real /dev/nbdN is not run; the resolution above ran on a mknod'ed node")
	}
	if _, err := exec.LookPath("nbd-client"); err != nil {
		t.Skip("SKIP: nbd-client not installed: the export through a real /dev/nbdN is not run")
	}
	h.node("/dev/nbd0", "/dev/nbd0")
	h.tapdisk(5151, 9, "0", "vhd:"+leaf)
	for i, c := range []struct {
		sock, alloc, warn string
	}{
		{filepath.Join(h.dir, "blktap-control", "nbd5151.9"), "vhd", ""},
		{filepath.Join(h.dir, "other.sock"), "nbd", ""},
	} {
		qn := exec.Command("qemu-nbd", "-r", "-k", c.sock, "--persistent", "-x", "vdi", "-f", "raw", raw)
		if err := qn.Start(); err != nil {
			t.Fatal(err)
		}
		defer func() { qn.Process.Kill(); qn.Wait() }()
		time.Sleep(200 * time.Millisecond)
		if out, err := exec.Command("nbd-client", "-unix", c.sock, "/dev/nbd0", "-N", "vdi").CombinedOutput(); err != nil {
			t.Skipf("SKIP: nbd-client refused: %v: %s", err, out)
		}
		defer exec.Command("nbd-client", "-d", "/dev/nbd0").Run()
		h.nbdRecord(0, c.sock, "vdi")
		out := filepath.Join(h.dir, fmt.Sprintf("nbd%d.qcow2", i))
		started, warnings := h.export(out, "qcow2-to-stdout.py", "/dev/nbd0")
		qemutest.Compare(t, out, raw)
		switch {
		case c.alloc == "nbd": // the server's block status: no image
			checkAllocation(t, started, warnings, c.alloc, "")
		case c.warn == "":
			checkAllocation(t, started, warnings, c.alloc, leaf)
		default:
			checkFallback(t, started, warnings, c.alloc, c.warn)
		}
		exec.Command("nbd-client", "-d", "/dev/nbd0").Run()
	}
}

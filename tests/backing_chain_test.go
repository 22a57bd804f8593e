package tests

// info --backing-chain judged by qemu-img info --backing-chain on qcow2
// chains and dynamic VHDs (filenames, formats, virtual sizes, backing
// names), and by libvhdi on differencing VHD chains, which qemu-img cannot
// read; parents found through --path; a missing one named with every path
// tried.

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/xapi-project/xapi-qcow-tool/tests/qemutest"
	"github.com/xapi-project/xapi-qcow-tool/tests/vhdtest"
)

// chainFields are the fields of one image that qemu-img info
// --backing-chain --output=json and ours must agree on.
type chainFields struct {
	Filename            string `json:"filename"`
	Format              string `json:"format"`
	VirtualSize         int64  `json:"virtual-size"`
	BackingFilename     string `json:"backing-filename"`
	FullBackingFilename string `json:"full-backing-filename"`
	BackingFormat       string `json:"backing-filename-format"`
}

func parseChain(t *testing.T, what string, b []byte) []chainFields {
	t.Helper()
	var c []chainFields
	if err := json.Unmarshal(b, &c); err != nil {
		t.Fatalf("%s: %v\n%s", what, err, b)
	}
	return c
}

// sameChain compares ours with qemu-img's, image by image, field by field.
func sameChain(t *testing.T, ours, qemus []chainFields) {
	t.Helper()
	if len(ours) != len(qemus) {
		t.Fatalf("%d images, qemu-img %d:\nours %+v\nqemu %+v", len(ours), len(qemus), ours, qemus)
	}
	for i := range ours {
		if ours[i] != qemus[i] {
			t.Errorf("image %d:\nours %+v\nqemu %+v", i, ours[i], qemus[i])
		}
	}
}

func TestInfoBackingChainQcow2(t *testing.T) {
	qemutest.Need(t)
	dir := t.TempDir()
	raw := filepath.Join(dir, "base.raw")
	sparseFile(t, raw, 8<<20)
	// raw <- q1 (backing format raw, absolute name) <- q2 <- q3 (relative
	// names), q3 bigger than its backing file, as a resize leaves it.
	q1 := filepath.Join(dir, "q1.qcow2")
	qemutest.Img(t, "create", "-q", "-f", "qcow2", "-b", raw, "-F", "raw", q1)
	sub := filepath.Join(dir, "sub")
	os.Mkdir(sub, 0o755)
	q2 := filepath.Join(sub, "q2.qcow2")
	qemutest.Img(t, "create", "-q", "-f", "qcow2", "-b", "../q1.qcow2", "-F", "qcow2", q2)
	q3 := filepath.Join(sub, "q3.qcow2")
	qemutest.Img(t, "create", "-q", "-f", "qcow2", "-b", "q2.qcow2", "-F", "qcow2", q3, "12M")
	qemutest.IO(t, q3, "write -P 3 9M 64k")

	for _, top := range []string{q3, q2} {
		ours := parseChain(t, "ours", mustRun(t, nil, "info", "--backing-chain", "--output=json", top))
		qemus := parseChain(t, "qemu-img", qemutest.Img(t, "info", "--backing-chain", "--output=json", top))
		sameChain(t, ours, qemus)
	}
	// A relative path, as a person types it (run from dir).
	r := run(t, cmdSpec{args: []string{"info", "--backing-chain", "--output=json", "sub/q3.qcow2"}, dir: dir})
	mustSucceed(t, r, "info --backing-chain sub/q3.qcow2")
	cmd := exec.Command("qemu-img", "info", "--backing-chain", "--output=json", "sub/q3.qcow2")
	cmd.Dir = dir
	want, err := cmd.Output()
	if err != nil {
		t.Fatal(err)
	}
	sameChain(t, parseChain(t, "ours", r.Stdout), parseChain(t, "qemu-img", want))

	// Text: every image, top first, each with where its parent was found.
	out := string(mustRun(t, nil, "info", "--backing-chain", q3))
	for _, want := range []string{"image:                 " + q3, "image:                 " + q2, "image:                 " + sub + "/../q1.qcow2", "image:                 " + raw,
		"backing file:          q2.qcow2 (format qcow2) (actual path: " + q2 + ")", "file format:           raw"} {
		if !strings.Contains(out, want) {
			t.Errorf("text output lacks %q:\n%s", want, out)
		}
	}
	if n := strings.Count(out, "image: "); n != 4 {
		t.Errorf("%d images in the text output, want 4", n)
	}
}

// TestInfoBackingChainMissingParent: a parent found nowhere is named, with
// every path tried, on one line, exit 1 (qemu-img fails too); the same
// parent moved to a --path directory is found there.
func TestInfoBackingChainMissingParent(t *testing.T) {
	qemutest.Need(t)
	dir := t.TempDir()
	lib := filepath.Join(dir, "lib")
	os.Mkdir(lib, 0o755)
	qemutest.Create(t, filepath.Join(dir, "base.qcow2"), "", "4M")
	top := filepath.Join(dir, "top.qcow2")
	qemutest.Img(t, "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
	base := filepath.Join(lib, "base.qcow2")
	if err := os.Rename(filepath.Join(dir, "base.qcow2"), base); err != nil {
		t.Fatal(err)
	}
	for _, layout := range []string{"human", "json"} {
		r := runTool(t, nil, "info", "--backing-chain", "--output="+layout, "--path", "/nonexistent:"+filepath.Join(dir, "empty"), top)
		checkOneLineError(t, r, `info: parent "base.qcow2" of `+top+" not found")
		for _, p := range []string{filepath.Join(dir, "base.qcow2"), "/nonexistent/base.qcow2", filepath.Join(dir, "empty", "base.qcow2")} {
			if !strings.Contains(string(r.Stderr), p) {
				t.Errorf("the error does not name %s: %s", p, r.Stderr)
			}
		}
		if r.Code != 1 || len(r.Stdout) != 0 {
			t.Errorf("exit %d, stdout %q", r.Code, r.Stdout)
		}
	}
	ours := parseChain(t, "ours", mustRun(t, nil, "info", "--backing-chain", "--output=json", "--path", "/nonexistent:"+lib, top))
	if len(ours) != 2 || ours[1].Filename != base || ours[0].FullBackingFilename != base || ours[1].Format != "qcow2" {
		t.Fatalf("the parent in --path: %+v", ours)
	}
	// A chain that comes back on itself is named as a loop.
	a, bb := filepath.Join(dir, "a.qcow2"), filepath.Join(dir, "b.qcow2")
	qemutest.Create(t, bb, "", "4M")
	qemutest.Img(t, "create", "-q", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", a)
	qemutest.Img(t, "rebase", "-u", "-f", "qcow2", "-F", "qcow2", "-b", "a.qcow2", bb)
	r := runTool(t, nil, "info", "--backing-chain", a)
	checkOneLineError(t, r, "chain has a loop")
	if r.Code != 1 {
		t.Errorf("a loop: exit %d", r.Code)
	}
	// Without --backing-chain, --path means nothing: said so.
	checkOneLineError(t, runTool(t, nil, "info", "--path", lib, top), "--backing-chain")
	// A stream names no files; --direct does not apply.
	checkOneLineError(t, runTool(t, nil, "info", "--backing-chain", "-"), "stream")
	checkOneLineError(t, runTool(t, nil, "info", "--backing-chain", "--direct", top), "--direct does not apply")
}

func TestInfoBackingChainVHD(t *testing.T) {
	qemutest.Need(t)
	dir := t.TempDir()
	// A dynamic VHD: a chain of one, as qemu-img sees it.
	dyn := filepath.Join(dir, "dyn.vhd")
	qemutest.Img(t, "create", "-q", "-f", "vpc", "-o", "subformat=dynamic,force_size=on", dyn, "30M")
	qemutest.Run(t, "qemu-io", "-f", "vpc", "-c", "write -P 1 2M 1M", dyn)
	sameChain(t, parseChain(t, "ours", mustRun(t, nil, "info", "--backing-chain", "--output=json", dyn)),
		parseChain(t, "qemu-img", qemutest.Img(t, "info", "--backing-chain", "-f", "vpc", "--output=json", dyn)))

	// A differencing chain base <- mid (in lib, found through --path) <-
	// top: qemu-img cannot read it; libvhdi judges each image's size,
	// identity, parent identity and parent name.
	const mib = 1 << 20
	lib := filepath.Join(dir, "lib")
	vdi := filepath.Join(dir, "vdi")
	base := vhdtest.New(16 * mib)
	base.Write(0, make([]byte, 4096))
	mid := vhdtest.Child(base, "base.vhd")
	mid.Write(5*mib, make([]byte, 512))
	top := vhdtest.Child(mid, "mid.vhd")
	top.Write(9*mib, make([]byte, 4096))
	paths := []string{filepath.Join(vdi, "top.vhd"), filepath.Join(lib, "mid.vhd"), filepath.Join(lib, "base.vhd")}
	for i, im := range []*vhdtest.Image{top, mid, base} {
		os.MkdirAll(filepath.Dir(paths[i]), 0o755)
		if err := im.Save(paths[i]); err != nil {
			t.Fatal(err)
		}
	}
	out := mustRun(t, nil, "info", "--backing-chain", "--output=json", "--path", lib, paths[0])
	var ours []struct {
		chainFields
		VHD struct {
			DiskType       string `json:"disk-type"`
			UniqueID       string `json:"unique-id"`
			ParentUniqueID string `json:"parent-unique-id"`
			ParentName     string `json:"parent-name"`
		} `json:"vhd"`
	}
	if err := json.Unmarshal(out, &ours); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	if len(ours) != 3 {
		t.Fatalf("%d images:\n%s", len(ours), out)
	}
	libvhdi := vhdtest.Describe(t, paths...)
	for i, o := range ours {
		l := libvhdi[i]
		want := chainFields{Filename: paths[i], Format: "vpc", VirtualSize: l.MediaSize}
		if i+1 < len(paths) {
			want.BackingFilename = "./" + l.ParentFilename
			want.FullBackingFilename = paths[i+1]
		}
		if o.chainFields != want || o.VHD.UniqueID != l.Identifier || o.VHD.ParentName != l.ParentFilename ||
			(i+1 < len(paths)) != (o.VHD.DiskType == "differencing") || i+1 < len(paths) && o.VHD.ParentUniqueID != l.ParentIdentifier {
			t.Errorf("image %d:\nours    %+v\nwant    %+v\nlibvhdi %+v", i, o, want, l)
		}
	}
	// Text: the three images, each differencing one with where its parent was found.
	text := string(mustRun(t, nil, "info", "--backing-chain", "--path", lib, paths[0]))
	for _, want := range []string{"parent found at:       " + paths[1], "parent found at:       " + paths[2], "image:                 " + paths[2]} {
		if !strings.Contains(text, want) {
			t.Errorf("text output lacks %q:\n%s", want, text)
		}
	}
	// Without lib in the path: every candidate named.
	r := runTool(t, nil, "info", "--backing-chain", paths[0])
	checkOneLineError(t, r, fmt.Sprintf("parent %q of %s not found", "./mid.vhd", paths[0]))
	if !strings.Contains(string(r.Stderr), filepath.Join(vdi, "mid.vhd")) {
		t.Errorf("the error does not name the child's directory: %s", r.Stderr)
	}
}

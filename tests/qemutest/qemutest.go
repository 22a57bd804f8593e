// Package qemutest runs qemu-img and qemu-io, the judges of our qcow2
// images, for the tests of every package (qcow/..., vhdcompat/..., tests).
// Where a tool is missing, the test skips with a visible "SKIP:" line: every
// function here checks for its tool first.
package qemutest

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// Need skips t, visibly, unless every tool is installed (qemu-img and
// qemu-io when none is named).
func Need(t testing.TB, tools ...string) {
	t.Helper()
	if len(tools) == 0 {
		tools = []string{"qemu-img", "qemu-io"}
	}
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("SKIP: %s not installed (Debian package qemu-utils)", tool)
		}
	}
}

// Run runs a qemu tool and returns its output; it fails the test when the
// tool fails.
func Run(t testing.TB, tool string, args ...string) []byte {
	t.Helper()
	Need(t, tool)
	out, err := exec.Command(tool, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", tool, strings.Join(args, " "), err, out)
	}
	return out
}

// Img runs qemu-img.
func Img(t testing.TB, args ...string) []byte {
	t.Helper()
	return Run(t, "qemu-img", args...)
}

// IO runs qemu-io commands (-c) on a qcow2 image. qemu-io exits 0 when a
// command fails, so its output is checked too.
func IO(t testing.TB, img string, cmds ...string) {
	t.Helper()
	args := []string{"-f", "qcow2"}
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	out := Run(t, "qemu-io", append(args, img)...)
	if bytes.Contains(out, []byte("error")) || bytes.Contains(out, []byte("failed")) {
		t.Fatalf("qemu-io %s:\n%s", strings.Join(args, " "), out)
	}
}

// Create makes a qcow2 image with qemu-img create (-o opts when not empty)
// and runs qemu-io commands on it; it returns img.
func Create(t testing.TB, img, opts, size string, cmds ...string) string {
	t.Helper()
	args := []string{"create", "-q", "-f", "qcow2"}
	if opts != "" {
		args = append(args, "-o", opts)
	}
	Img(t, append(args, img, size)...)
	if len(cmds) > 0 {
		IO(t, img, cmds...)
	}
	return img
}

// Overlay makes a qcow2 image over the qcow2 backing, named by its base
// name (both in one directory), of size ("": the backing's), and runs
// qemu-io commands on it; it returns overlay.
func Overlay(t testing.TB, backing, overlay, size string, cmds ...string) string {
	t.Helper()
	args := []string{"create", "-q", "-f", "qcow2", "-b", filepath.Base(backing), "-F", "qcow2", overlay}
	if size != "" {
		args = append(args, size)
	}
	Img(t, args...)
	if len(cmds) > 0 {
		IO(t, overlay, cmds...)
	}
	return overlay
}

// Raw converts img (with its backing chain) to a raw file next to it,
// named img + ".raw", and returns its path.
func Raw(t testing.TB, img string) string {
	t.Helper()
	raw := img + ".raw"
	Img(t, "convert", "-O", "raw", img, raw)
	return raw
}

// Check asserts qemu-img check finds no errors and no leaks.
func Check(t testing.TB, img string) {
	t.Helper()
	Img(t, "check", img)
}

// Compare asserts a qcow2 image reads as the raw file raw.
func Compare(t testing.TB, img, raw string) {
	t.Helper()
	Img(t, "compare", "-f", "qcow2", "-F", "raw", img, raw)
}

// MapEntry is one element of qemu-img map --output=json.
type MapEntry struct {
	Start   int64  `json:"start"`
	Length  int64  `json:"length"`
	Depth   int    `json:"depth"`
	Present bool   `json:"present"`
	Zero    bool   `json:"zero"`
	Data    bool   `json:"data"`
	Offset  *int64 `json:"offset"`
}

func (e MapEntry) String() string {
	off := "-"
	if e.Offset != nil {
		off = fmt.Sprint(*e.Offset)
	}
	return fmt.Sprintf("{%d+%d depth %d present %t zero %t data %t offset %s}", e.Start, e.Length, e.Depth, e.Present, e.Zero, e.Data, off)
}

// ParseMap decodes map JSON (qemu-img's or ours); what names it in errors.
func ParseMap(t testing.TB, what string, b []byte) []MapEntry {
	t.Helper()
	var m []MapEntry
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatalf("%s: %v\n%s", what, err, b)
	}
	return m
}

// Map is qemu-img map --output=json of spec (a path or a json: spec).
func Map(t testing.TB, spec string) []MapEntry {
	t.Helper()
	return ParseMap(t, "qemu-img map", Img(t, "map", "--output=json", spec))
}

// Info is what the tests use of qemu-img info --output=json.
type Info struct {
	VirtualSize int64  `json:"virtual-size"`
	ClusterSize int64  `json:"cluster-size"`
	Format      string `json:"format"`
}

// InfoOf is qemu-img info --output=json of img.
func InfoOf(t testing.TB, img string) Info {
	t.Helper()
	var i Info
	if err := json.Unmarshal(Img(t, "info", "--output=json", img), &i); err != nil {
		t.Fatal(err)
	}
	return i
}

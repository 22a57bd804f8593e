package vhdtest

import (
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"
)

// proveScript reads a VHD chain (argv: raw file, then the images top first,
// then offset:length regions to compare, none meaning the whole disk) with
// libvhdi and compares what it reads with the raw file.
const proveScript = `
import sys, pyvhdi
raw, rest = sys.argv[1], sys.argv[2:]
imgs = [a for a in rest if ':' not in a]
regions = [tuple(int(x) for x in a.split(':')) for a in rest if ':' in a]
files = []
for p in imgs:
    f = pyvhdi.file()
    f.open(p)
    files.append(f)
for child, parent in zip(files, files[1:]):
    child.set_parent(parent)
top = files[0]
size = top.get_media_size()
with open(raw, 'rb') as r:
    r.seek(0, 2)
    if r.tell() != size:
        sys.exit('libvhdi: the chain is %d bytes, the raw file %d' % (size, r.tell()))
    if not regions:
        regions = [(0, size)]
    for off, n in regions:
        pos = off
        while pos < off + n:
            k = min(1 << 20, off + n - pos)
            r.seek(pos)
            want = r.read(k)
            got = top.read_buffer_at_offset(k, pos)
            if got != want:
                i = next(i for i in range(k) if got[i:i+1] != want[i:i+1])
                sys.exit('libvhdi: the chain differs from the raw file at offset %d' % (pos + i))
            pos += k
`

// ProveWithLibvhdi asserts that libvhdi reads the chain (top first) as the
// raw file, in the given [offset, length] regions (none: all of it). A
// chain that fails here is a bad test image, not a finding about the code
// under test. It skips, visibly, where libvhdi is not installed.
func ProveWithLibvhdi(t testing.TB, raw string, chain []string, regions ...[2]int64) {
	t.Helper()
	py := needLibvhdi(t)
	args := append([]string{"-c", proveScript, raw}, chain...)
	for _, r := range regions {
		args = append(args, fmt.Sprintf("%d:%d", r[0], r[1]))
	}
	if out, err := exec.Command(py, args...).CombinedOutput(); err != nil {
		t.Fatalf("libvhdi does not read the test chain %v as %s: %v: %s", chain, raw, err, out)
	}
}

// readScript opens a chain (argv: the images, top first) with libvhdi and
// reads all of it, printing the disk's bytes' SHA-256. It reads 4 KiB at a
// time: libvhdi (20210425) drops the later blocks of one read that spans
// blocks of some sizes (8 KiB).
const readScript = `
import sys, hashlib, pyvhdi
files = []
for p in sys.argv[1:]:
    f = pyvhdi.file()
    f.open(p)
    files.append(f)
for child, parent in zip(files, files[1:]):
    child.set_parent(parent)
top = files[0]
size = top.get_media_size()
h = hashlib.sha256()
pos = 0
while pos < size:
    k = min(4096, size - pos)
    h.update(top.read_buffer_at_offset(k, pos))
    pos += k
print(h.hexdigest())
`

// ReadWithLibvhdi reads the whole chain (top first) with libvhdi and
// returns the SHA-256 of what it reads, or libvhdi's complaint as an
// error. It skips, visibly, where libvhdi is not installed.
func ReadWithLibvhdi(t testing.TB, chain ...string) (string, error) {
	t.Helper()
	py := needLibvhdi(t)
	out, err := exec.Command(py, append([]string{"-c", readScript}, chain...)...).CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("libvhdi cannot read %v: %v: %s", chain, err, strings.TrimSpace(string(out)))
	}
	return strings.TrimSpace(string(out)), nil
}

// needLibvhdi returns the Python that has libvhdi's binding, or skips.
func needLibvhdi(t testing.TB) string {
	t.Helper()
	py := "/usr/bin/python3"
	if _, err := os.Stat(py); err != nil {
		t.Skip("SKIP: /usr/bin/python3 not installed (libvhdi's Python binding needs the system Python)")
	}
	if out, err := exec.Command(py, "-c", "import pyvhdi").CombinedOutput(); err != nil {
		t.Skipf("SKIP: python3-libvhdi not installed (Debian packages libvhdi-utils python3-libvhdi): %s", strings.TrimSpace(string(out)))
	}
	return py
}

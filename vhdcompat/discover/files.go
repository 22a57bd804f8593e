package discover

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// maxSmallFile bounds /proc/devices and an NBD attachment record, both a
// few hundred bytes.
const maxSmallFile = 64 << 10

// readSmall reads at most maxSmallFile bytes of path; a longer file is
// refused.
func readSmall(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, unwrapPath(err))
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxSmallFile+1))
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, unwrapPath(err))
	}
	if len(b) > maxSmallFile {
		return nil, fmt.Errorf("%s is longer than %d bytes", path, maxSmallFile)
	}
	return b, nil
}

// readProcDevices returns the names of each major in /proc/devices.
func readProcDevices() (map[uint32][]string, error) {
	b, err := readSmall(ProcDevices)
	if err != nil {
		return nil, err
	}
	return parseProcDevices(b), nil
}

// parseProcDevices reads lines "MAJOR NAME" from both sections (character
// and block devices), as xapi does; headings and other lines are skipped.
func parseProcDevices(b []byte) map[uint32][]string {
	out := map[uint32][]string{}
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) != 2 {
			continue
		}
		major, err := strconv.ParseUint(f[0], 10, 32)
		if err != nil {
			continue
		}
		out[uint32(major)] = append(out[uint32(major)], f[1])
	}
	return out
}

// readNBDRecord reads xapi's record of an NBD attachment.
func readNBDRecord(path string) (*NBDExport, error) {
	b, err := readSmall(path)
	if err != nil {
		return nil, fmt.Errorf("NBD attachment record %w", err)
	}
	x, err := parseNBDRecord(b)
	if err != nil {
		return nil, fmt.Errorf("NBD attachment record %s: %w", path, err)
	}
	x.Record = path
	return x, nil
}

// parseNBDRecord parses {"path": SOCKET, "exportname": NAME}.
func parseNBDRecord(b []byte) (*NBDExport, error) {
	var rec struct {
		Path       *string `json:"path"`
		ExportName *string `json:"exportname"`
	}
	if err := json.Unmarshal(b, &rec); err != nil {
		return nil, fmt.Errorf("not JSON of the form {\"path\": SOCKET, \"exportname\": NAME}: %w", err)
	}
	switch {
	case rec.Path == nil || *rec.Path == "":
		return nil, fmt.Errorf("no \"path\" (the server's socket)")
	case !filepath.IsAbs(*rec.Path):
		return nil, fmt.Errorf("socket path %q is not absolute", *rec.Path)
	case rec.ExportName == nil:
		return nil, fmt.Errorf("no \"exportname\"")
	case len(*rec.ExportName) > 4096:
		return nil, fmt.Errorf("export name longer than 4096 bytes (the NBD limit)")
	}
	return &NBDExport{Socket: *rec.Path, ExportName: *rec.ExportName}, nil
}

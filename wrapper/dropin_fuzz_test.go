package wrapper

import (
	"bufio"
	"errors"
	"os"
	"reflect"
	"strconv"
	"strings"
	"testing"

	"github.com/xapi-project/xapi-qcow-tool/vhdcompat"
)

// dropinArgv renders parsed arguments back into one canonical command line.
// (The corpus keeps the input that showed "--diff VALUE" is not canonical:
// "--di=-A" is accepted, "--diff -A" is not, as with argparse.)
func dropinArgv(a *dropinArgs) []string {
	var argv []string
	for _, o := range []struct{ name, v string }{
		{"--diff", a.base}, {"--json-header-map", a.mapFD}, {"--json-header-info", a.infoFD},
		{"--json-header-diff-map", a.baseMapFD}, {"--json-header-diff-info", a.baseInfoFD},
		{"--json-header-diff", a.legacyBaseFD},
	} {
		// "--opt=value": argparse takes "--opt -x" for two options,
		// while "--opt=-x" gives the option the value "-x".
		if o.v != "" {
			argv = append(argv, o.name+"="+o.v)
		}
	}
	argv = append(argv, "-c", strconv.FormatUint(a.clusterSize, 10), "-r", strconv.FormatUint(a.refcountBits, 10))
	if a.legacyHeader {
		argv = append(argv, "--json-header")
	}
	return append(argv, "--", a.input)
}

// FuzzDropinArgs: qcow2-to-stdout.py's command line (the fuzzer's bytes,
// split at NUL into words). A refusal is a UsageError (exit 2, one line);
// what is accepted means the same when written out canonically.
func FuzzDropinArgs(f *testing.F) {
	file, err := os.Open("testdata/dropin-argv.txt")
	if err != nil {
		f.Fatal(err)
	}
	defer file.Close()
	for s := bufio.NewScanner(file); s.Scan(); {
		if line := s.Text(); line != "" && !strings.HasPrefix(line, "#") {
			f.Add([]byte(strings.Join(strings.Fields(line), "\x00")))
		}
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		args := strings.Split(string(b), "\x00")
		a, err := parseDropinArgs(args)
		if err != nil {
			var ue *vhdcompat.UsageError
			if !errors.As(err, &ue) {
				t.Fatalf("%q: %T %v, not a usage error", args, err, err)
			}
			return
		}
		if a.help {
			return
		}
		again, err := parseDropinArgs(dropinArgv(a))
		if err != nil {
			t.Fatalf("%q parsed as %+v, whose canonical form %q is refused: %v", args, a, dropinArgv(a), err)
		}
		if !reflect.DeepEqual(a, again) {
			t.Fatalf("%q parsed as %+v, its canonical form %q as %+v", args, a, dropinArgv(a), again)
		}
	})
}

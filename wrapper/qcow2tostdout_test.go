package wrapper

import (
	"errors"
	"reflect"
	"strings"
	"testing"

	"github.com/xapi-project/xapi-qcow-tool/vhdcompat"
)

// TestParseDropinArgs: the drop-in's command line is parsed as the
// reference script's argparse parses it. Each case says what argparse
// (Python 3.11, the script's add_argument calls) did with the same words;
// where we differ on purpose, the case says why.
func TestParseDropinArgs(t *testing.T) {
	def := func(f func(a *dropinArgs)) *dropinArgs {
		a := &dropinArgs{input: "d.img", clusterSize: 65536, refcountBits: 16}
		if f != nil {
			f(a)
		}
		return a
	}
	for _, c := range []struct {
		args     []string
		want     *dropinArgs // nil: an error mentioning err, exit status 2
		err      string
		argparse string
	}{
		{[]string{"d.img"}, def(nil), "", "input_file d.img"},
		// Options before and after the path, with values as separate words.
		{[]string{"-c", "4096", "--diff", "b", "d.img", "-r", "8"}, def(func(a *dropinArgs) { a.clusterSize, a.base, a.refcountBits = 4096, "b", 8 }), "", "cluster_size 4096, diff b, refcount_bits 8"},
		{[]string{"d.img", "--diff", "b", "--json-header-diff-map", "5", "--json-header-diff-info", "6", "--json-header-map", "7", "--json-header-info", "8"},
			def(func(a *dropinArgs) { a.base, a.baseMapFD, a.baseInfoFD, a.mapFD, a.infoFD = "b", "5", "6", "7", "8" }), "", "xapi's own command line"},
		// --opt=value, and unambiguous prefixes of long options.
		{[]string{"--dif", "b", "d.img"}, def(func(a *dropinArgs) { a.base = "b" }), "", "diff b"},
		{[]string{"d.img", "--dif=b"}, def(func(a *dropinArgs) { a.base = "b" }), "", "diff b"},
		{[]string{"d.img", "--json-header-m", "7"}, def(func(a *dropinArgs) { a.mapFD = "7" }), "", "json_header_map 7"},
		{[]string{"d.img", "--json-header"}, def(func(a *dropinArgs) { a.legacyHeader = true }), "", "json_header (an exact name beats longer ones)"},
		{[]string{"d.img", "--json", "3"}, nil, "ambiguous option --json", "exit 2: ambiguous option"},
		{[]string{"d.img", "--json-header-d", "3"}, nil, "ambiguous option", "exit 2: ambiguous option"},
		{[]string{"d.img", "--json-header=x"}, nil, "takes no value", "exit 2: ignored explicit argument"},
		{[]string{"--he"}, &dropinArgs{clusterSize: 65536, refcountBits: 16, help: true}, "", "help, exit 0"},
		// Short options with their value in the same word.
		{[]string{"-c4096", "d.img"}, def(func(a *dropinArgs) { a.clusterSize = 4096 }), "", "cluster_size 4096"},
		{[]string{"-c=4096", "d.img"}, def(func(a *dropinArgs) { a.clusterSize = 4096 }), "", "cluster_size 4096"},
		{[]string{"d.img", "-r8"}, def(func(a *dropinArgs) { a.refcountBits = 8 }), "", "refcount_bits 8"},
		// "--" ends the options.
		{[]string{"--", "d.img"}, def(nil), "", "input_file d.img"},
		{[]string{"-c", "4096", "--", "-x"}, &dropinArgs{input: "-x", clusterSize: 4096, refcountBits: 16}, "", "input_file -x"},
		{[]string{"d.img", "--diff", "b", "--", "x"}, nil, "unexpected argument x", "exit 2: unrecognized arguments"},
		// An empty --diff is no diff: the script tests the name for truth.
		{[]string{"--diff", "", "d.img"}, def(nil), "", `diff_file_name "" (a full export)`},
		{[]string{"--diff=", "d.img"}, def(nil), "", `diff_file_name "" (a full export)`},
		// A value may not look like an option; "-" and negative numbers may.
		{[]string{"d.img", "--diff", "-c"}, nil, "--diff needs a value", "exit 2: expected one argument"},
		{[]string{"d.img", "--diff", "-"}, def(func(a *dropinArgs) { a.base = "-" }), "", "diff -"},
		{[]string{"d.img", "-c", "-1"}, nil, "not a number", "exit 2: invalid choice"},
		{[]string{"d.img", "-c"}, nil, "-c needs a value", "exit 2: expected one argument"},
		{[]string{"d.img", "-c", ""}, nil, "-c needs a value", "exit 2: invalid int value"},
		// Our refusals.
		{[]string{"-dR", "d.img"}, nil, "-d (input as an external data file) is not supported", "data_file, data_file_raw: we write no external data files"},
		{[]string{"d.img", "-x"}, nil, "unknown option -x", "exit 2: unrecognized arguments"},
		{[]string{"d.img", "d2.img"}, nil, "unexpected argument d2.img", "exit 2: unrecognized arguments"},
		{[]string{}, nil, "missing the input path", "exit 2: the following arguments are required"},
		{[]string{"d.img", "--json-header-diff-map", "5"}, nil, "--json-header-diff-map needs --diff", "accepted, then fails without the base's headers"},
		// Ours, for the log: matched whole only, so --d still means --diff.
		{[]string{"--d", "b", "d.img", "--verbose"}, def(func(a *dropinArgs) { a.base = "b" }), "", "diff b (--verbose is ours)"},
		{[]string{"d.img", "--diff", "b", "--no-discovery"}, def(func(a *dropinArgs) { a.base, a.noDiscovery = "b", true }), "", "diff b (--no-discovery is ours)"},
		{[]string{"--no-discovery", "d.img"}, def(func(a *dropinArgs) { a.noDiscovery = true }), "", "input_file d.img (--no-discovery is ours)"},
		{[]string{"d.img", "--no-disc"}, nil, "unknown option --no-disc", "exit 2: unrecognized arguments (ours is matched whole)"},
		{[]string{"d.img", "--no-discovery=1"}, nil, "takes no value", "ours takes no value"},
		{[]string{"d.img", "--no-discovery", "--d", "b"}, def(func(a *dropinArgs) { a.base, a.noDiscovery = "b", true }), "", "--d still means --diff"},
	} {
		t.Run(strings.Join(c.args, " "), func(t *testing.T) {
			got, err := parseDropinArgs(c.args)
			if c.want == nil {
				var ue *vhdcompat.UsageError
				if err == nil || !errors.As(err, &ue) || !strings.Contains(err.Error(), c.err) {
					t.Fatalf("got %+v, %v; want a usage error mentioning %q (argparse: %s)", got, err, c.err, c.argparse)
				}
				return
			}
			if err != nil {
				t.Fatalf("%v (argparse: %s)", err, c.argparse)
			}
			if !reflect.DeepEqual(got, c.want) {
				t.Fatalf("got %+v, want %+v (argparse: %s)", got, c.want, c.argparse)
			}
		})
	}
}

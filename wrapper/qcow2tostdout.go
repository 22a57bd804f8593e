package wrapper

import (
	"fmt"
	"strconv"
	"strings"

	"github.com/xapi-project/xapi-qcow-tool/vhdcompat"
	"github.com/xapi-project/xapi-qcow-tool/vhdcompat/hints"
)

// Help is shown by --help (from kong before the input path, from our own
// parser anywhere else).
func (c *Qcow2ToStdoutCmd) Help() string { return qcow2ToStdoutHelp }

const qcow2ToStdoutHelp = `Exports a raw disk (a block device or a regular file) as a qcow2 image on
stdout, with the command line of qcow2-to-stdout.py (xapi's qcow_to_stdout).
The output is the same as 'xapi-qcow-tool stream' with the same options.

Options (before or after INPUT):
  --diff BASE                 store only the clusters that differ from BASE
  -c CLUSTER_SIZE             cluster size, 512 to 2097152 (default 65536)
  -r REFCOUNT_BITS            refcount width, 1 to 64 (default 16)
  --json-header-map FD        qemu-img map --output=json of the qcow2 behind INPUT:
                              only what it allocates is read, the rest is zero
  --json-header-info FD       qemu-img info --output=json of the same: its
                              cluster size replaces -c
  --json-header-diff-map FD   the same for BASE
  --json-header-diff-info FD  the same for BASE
  --json-header               older xapi: a JSON object on stdin with virtual_size,
                              cluster_bits and data_clusters
  --json-header-diff FD       older xapi: the same object for BASE
  -d, -R                      external data files: not supported
  --direct, --buffered        O_DIRECT or the page cache for INPUT and BASE (default:
                              O_DIRECT for block devices, the page cache for files)
  --no-discovery              without hints, do not look for the image behind a
                              blktap or NBD device (tap-ctl): read all of it
  -v                          log details to stderr
FD is a descriptor number (fd://N and paths work too).

Without hints, the image behind INPUT and BASE (a VHD or qcow2 chain, or a
raw file, served by a tapdisk) is found as xapi finds it, and only what it
allocates is read. The journal names where the allocation came from.

Examples:
  # as xapi runs it (the symlink name selects this command line):
  qcow2-to-stdout.py /dev/sm/backend/SR/VDI --diff /dev/sm/backend/SR/BASE \
      --json-header-diff-map 5 --json-header-diff-info 6 --json-header-map 7 --json-header-info 8
  xapi-qcow-tool qcow2-to-stdout disk.img > disk.qcow2`

// dropinArgs is the parsed command line of qcow2-to-stdout.py.
type dropinArgs struct {
	input, base           string
	clusterSize           uint64
	refcountBits          uint64
	mapFD, infoFD         string
	baseMapFD, baseInfoFD string
	legacyHeader          bool
	legacyBaseFD          string
	help                  bool
	direct, buffered      bool
	noDiscovery           bool
}

// dropinValueOptions take a value; dropinFlags do not.
var dropinValueOptions = map[string]bool{
	"--diff": true, "-c": true, "-r": true,
	"--json-header-map": true, "--json-header-info": true,
	"--json-header-diff-map": true, "--json-header-diff-info": true,
	"--json-header-diff": true,
}

var dropinFlags = map[string]bool{
	"--json-header": true, "-d": true, "-R": true, "-h": true, "--help": true,
	// Ours, for the log and the page cache; the reference has no such
	// options.
	"-v": true, "--verbose": true, "--debug": true,
	"--direct": true, "--unbuffered": true, "--buffered": true,
	"--no-discovery": true,
}

// referenceLongOptions are the reference script's long options, of which
// argparse accepts any unambiguous prefix (--dif for --diff). Ours
// (--verbose, --debug, --direct, --unbuffered, --buffered, --no-discovery)
// are matched whole, so that they make no prefix ambiguous that the
// reference accepts.
var referenceLongOptions = []string{
	"--diff", "--help", "--json-header", "--json-header-diff",
	"--json-header-map", "--json-header-info", "--json-header-diff-map", "--json-header-diff-info",
}

// parseDropinArgs parses the reference script's argv the way its argparse
// does: options before or after the input path, "--opt value",
// "--opt=value", unambiguous prefixes of long options, "-cVALUE",
// "-c=VALUE", short flags together ("-dR"), and "--" to end the options.
// An option's value may not look like an option, but may be empty
// (--diff "" is no diff, as the script's falsy test makes it).
func parseDropinArgs(args []string) (*dropinArgs, error) {
	a := &dropinArgs{clusterSize: 65536, refcountBits: 16}
	var positional []string
	for i := 0; i < len(args); i++ {
		arg := args[i]
		var err error
		switch {
		case arg == "--":
			positional = append(positional, args[i+1:]...)
			i = len(args)
		case !looksLikeOption(arg):
			positional = append(positional, arg)
		case strings.HasPrefix(arg, "--"):
			i, err = a.long(args, i)
		default:
			i, err = a.short(args, i)
		}
		if err != nil {
			return nil, err
		}
	}
	if a.help {
		return a, nil
	}
	switch {
	case len(positional) == 0:
		return nil, usage("missing the input path (a block device or a raw file)")
	case len(positional) > 1:
		return nil, usage("unexpected argument %s: only one input path", positional[1])
	}
	a.input = positional[0]
	if a.base == "" {
		for _, o := range []struct{ name, v string }{
			{"--json-header-diff-map", a.baseMapFD}, {"--json-header-diff-info", a.baseInfoFD}, {"--json-header-diff", a.legacyBaseFD},
		} {
			if o.v != "" {
				return nil, usage("%s needs --diff", o.name)
			}
		}
	}
	if a.legacyHeader && (a.mapFD != "" || a.infoFD != "") {
		return nil, usage("--json-header cannot be combined with --json-header-map or --json-header-info")
	}
	if a.legacyBaseFD != "" && (a.baseMapFD != "" || a.baseInfoFD != "") {
		return nil, usage("--json-header-diff cannot be combined with --json-header-diff-map or --json-header-diff-info")
	}
	return a, nil
}

// looksLikeOption is argparse's test: a word that starts with "-" is an
// option, unless it is "-" alone or a negative number.
func looksLikeOption(arg string) bool {
	if len(arg) < 2 || arg[0] != '-' {
		return false
	}
	return !isNegativeNumber(arg)
}

// isNegativeNumber is argparse's pattern of a negative number:
// -DIGITS, or -[DIGITS].DIGITS.
func isNegativeNumber(arg string) bool {
	whole, frac, dot := strings.Cut(arg[1:], ".")
	allDigits := func(s string) bool { return strings.Trim(s, "0123456789") == "" }
	if !dot {
		return whole != "" && allDigits(whole)
	}
	return frac != "" && allDigits(whole) && allDigits(frac)
}

// long parses the long option at args[i] and returns the index of the
// last word it used.
func (a *dropinArgs) long(args []string, i int) (int, error) {
	name, value, hasValue := args[i], "", false
	if k := strings.IndexByte(name, '='); k > 0 {
		name, value, hasValue = name[:k], name[k+1:], true
	}
	name, err := expandLong(name)
	if err != nil {
		return i, err
	}
	if !dropinValueOptions[name] {
		if hasValue {
			return i, usage("%s takes no value (given %q)", name, value)
		}
		return i, a.flag(name)
	}
	if !hasValue {
		if i, value, err = nextValue(args, i, name); err != nil {
			return i, err
		}
	}
	return i, a.set(name, value)
}

// expandLong returns the option name stands for: itself, or the one
// reference option it is a prefix of.
func expandLong(name string) (string, error) {
	if dropinValueOptions[name] || dropinFlags[name] {
		return name, nil
	}
	var matches []string
	for _, o := range referenceLongOptions {
		if strings.HasPrefix(o, name) {
			matches = append(matches, o)
		}
	}
	switch len(matches) {
	case 0:
		return "", usage("unknown option %s (see --help)", name)
	case 1:
		return matches[0], nil
	}
	return "", usage("ambiguous option %s: could be %s", name, strings.Join(matches, ", "))
}

// short parses the short options at args[i]: flags may be written
// together, and the option that takes a value takes the rest of the word
// ("-c4096", "-c=4096") or the next word.
func (a *dropinArgs) short(args []string, i int) (int, error) {
	arg := args[i]
	if len(arg) > 3 && arg[2] == '=' && dropinValueOptions[arg[:2]] {
		return i, a.set(arg[:2], arg[3:])
	}
	for rest := arg[1:]; rest != ""; {
		name := "-" + rest[:1]
		rest = rest[1:]
		switch {
		case dropinValueOptions[name]:
			value := rest
			if value == "" {
				var err error
				if i, value, err = nextValue(args, i, name); err != nil {
					return i, err
				}
			}
			return i, a.set(name, value)
		case dropinFlags[name]:
			if err := a.flag(name); err != nil {
				return i, err
			}
		default:
			return i, usage("unknown option %s (see --help)", arg)
		}
	}
	return i, nil
}

// nextValue returns the word after args[i] as the value of option name,
// and its index: argparse refuses a word that looks like an option.
func nextValue(args []string, i int, name string) (int, string, error) {
	if i+1 >= len(args) || looksLikeOption(args[i+1]) {
		return i, "", usage("%s needs a value", name)
	}
	return i + 1, args[i+1], nil
}

// flag applies a flag option.
func (a *dropinArgs) flag(name string) error {
	switch name {
	case "-d":
		return usage("-d (input as an external data file) is not supported: export without it")
	case "-R":
		return usage("-R (raw external data file) is not supported: export without it")
	case "-h", "--help":
		a.help = true
	case "--json-header":
		a.legacyHeader = true
	case "--direct", "--unbuffered":
		a.direct = true
	case "--buffered":
		a.buffered = true
	case "--no-discovery":
		a.noDiscovery = true
	}
	return nil
}

// usage is a bad command line: exit status 2.
func usage(format string, args ...any) error {
	return &vhdcompat.UsageError{Msg: fmt.Sprintf(format, args...)}
}

func (a *dropinArgs) set(name, value string) error {
	if name == "--diff" && value == "" {
		a.base = "" // the script tests the name for truth: an empty one is no diff
		return nil
	}
	if value == "" {
		return usage("%s needs a value", name)
	}
	number := func() (uint64, error) {
		v, err := strconv.ParseUint(value, 10, 64)
		if err != nil {
			return 0, usage("%s %s: not a number", name, value)
		}
		return v, nil
	}
	var err error
	switch name {
	case "--diff":
		a.base = value
	case "-c":
		a.clusterSize, err = number()
	case "-r":
		a.refcountBits, err = number()
	case "--json-header-map":
		a.mapFD = value
	case "--json-header-info":
		a.infoFD = value
	case "--json-header-diff-map":
		a.baseMapFD = value
	case "--json-header-diff-info":
		a.baseInfoFD = value
	case "--json-header-diff":
		a.legacyBaseFD = value
	}
	return err
}

// runQcow2ToStdout runs the drop-in export: it translates the command
// line into the same ExportRequest `stream` builds, so the bytes are the
// same.
func runQcow2ToStdout(env *vhdcompat.Env, args []string) error {
	a, err := parseDropinArgs(args)
	if err != nil {
		return err
	}
	if a.help {
		fmt.Fprintf(env.Stdout, "Usage: qcow2-to-stdout INPUT [options]\n\n%s\n", qcow2ToStdoutHelp)
		return nil
	}
	dio, err := vhdcompat.DiskIO(a.direct, a.buffered)
	if err != nil {
		return err
	}
	req := &vhdcompat.ExportRequest{
		Source: a.input, Base: a.base, IO: dio,
		ClusterSize: a.clusterSize, ClusterSizeFlag: "-c",
		RefcountBits: a.refcountBits, RefcountBitsFlag: "-r",
		Out: env.Stdout, OutName: "stdout", RefuseTerminal: true,
	}
	if !a.noDiscovery {
		req.Discover = &vhdcompat.DiscoverRequest{Search: vhdcompat.XapiSearchPath}
	}
	h := &req.Hints
	h.Source.Info = hints.Source{Flag: "--json-header-info", Spec: a.infoFD}
	h.Source.Map = hints.Source{Flag: "--json-header-map", Spec: a.mapFD}
	if a.legacyHeader {
		h.Source.Header = hints.Source{Flag: "--json-header", Reader: env.Stdin}
	}
	h.Base.Info = hints.Source{Flag: "--json-header-diff-info", Spec: a.baseInfoFD}
	h.Base.Map = hints.Source{Flag: "--json-header-diff-map", Spec: a.baseMapFD}
	h.Base.Header = hints.Source{Flag: "--json-header-diff", Spec: a.legacyBaseFD}
	return vhdcompat.Export(env, req)
}

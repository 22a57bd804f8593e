package wrapper

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"sort"
	"strconv"
	"strings"

	"github.com/alecthomas/kong"

	"github.com/xapi-project/xapi-qcow-tool/qcow/inspect"
	"github.com/xapi-project/xapi-qcow-tool/vhdcompat"
)

// Support commands: info, map, check, compare and completion. They read a
// qcow2 file (opened read-only) or, for the path "-", a stream on stdin;
// the format logic is in qcow/inspect.

// outputFlag is the --output choice shared by info, map and check.
type outputFlag struct {
	Output string `enum:"human,json" default:"human" help:"Output format: human or json (the field names of qemu-img's --output=json)."`
}

// writeJSON prints v indented, as qemu-img does.
func writeJSON(w io.Writer, v any) error {
	b, err := json.MarshalIndent(v, "", "    ")
	if err != nil {
		return err
	}
	_, err = w.Write(append(b, '\n'))
	return err
}

// discoveryFlag is --no-discovery of info and map.
type discoveryFlag struct {
	NoDiscovery bool `name:"no-discovery" help:"Describe a blktap or NBD device's own content, not the image behind it."`
}

// device describes what is behind path when it is a blktap or NBD device
// and discovery is on; nil otherwise.
func (f discoveryFlag) device(env *vhdcompat.Env, path string) *vhdcompat.DeviceInfo {
	if f.NoDiscovery {
		return nil
	}
	return vhdcompat.DescribeDevice(env, path, vhdcompat.XapiSearchPath)
}

// InfoCmd describes an image.
type InfoCmd struct {
	outputFlag
	vhdcompat.DiskIOFlags
	discoveryFlag
	BackingChain bool   `name:"backing-chain" help:"Describe the image and every image below it (qcow2 backing files, VHD parents), top first; in JSON an array, as qemu-img info --backing-chain."`
	Search       string `name:"path" help:"With --backing-chain: colon-separated directories where parents are searched after the child's own directory, as --source-format hybrid searches them (default: the current directory)." placeholder:"PATHS"`
	Path         string `arg:"" help:"qcow2 or VHD file, a blktap or NBD device (what is behind it), or - for a qcow2 stream on stdin."`
}

// Help is the long help with an example.
func (c *InfoCmd) Help() string {
	return `Prints the version, virtual size, cluster size, refcount width, feature
bits by name, header extensions, compression type, backing file and a
summary of the allocation (data, zero, unallocated). JSON keys are those of
qemu-img info --output=json where qemu has one. For a VHD file (format vpc):
its type, block size, unique id, parent name and locators, and the bytes
its sector bitmaps mark.

For a blktap or NBD device (a VDI attached to dom0), what an export of it
finds behind it (tap-ctl, as xapi does): the tapdisk, the driver, the
image and its chain, and the bytes an export will read; or why nothing
was found, in which case an export reads the whole device. --no-discovery
describes the device's own content instead.

With --backing-chain, the image and every image below it, top first (in
JSON an array, as qemu-img info --backing-chain): qcow2 backing files and
VHD parents, found as --source-format hybrid finds them (a relative name
in the child's directory, then in each --path directory), each with the
path its parent was found at. A parent found nowhere fails with one line
naming every path tried. The chain's metadata is read through the page
cache, as the hybrid source reads it.

Examples:

    xapi-qcow-tool info /var/tmp/disk.qcow2
    xapi-qcow-tool info --output=json /var/tmp/disk.qcow2
    xapi-qcow-tool info --backing-chain --path /dev/mapper:/var/run/sr-mount/SR /var/run/sr-mount/SR/VDI.vhd
    xapi-qcow-tool info /dev/sm/backend/SR-UUID/VDI-UUID
    curl -s ... | xapi-qcow-tool info -`
}

// Run executes info.
func (c *InfoCmd) Run(env *vhdcompat.Env) error {
	dio, err := c.IO()
	if err != nil {
		return err
	}
	if c.BackingChain {
		if c.Direct {
			// The chain is opened as the hybrid source opens it.
			return &vhdcompat.UsageError{Msg: "info: --backing-chain reads the chain's metadata through the page cache, as the hybrid source does: --direct does not apply"}
		}
		return c.runChain(env)
	}
	if c.Search != "" {
		return &vhdcompat.UsageError{Msg: "info: --path is where --backing-chain searches parents: give --backing-chain too"}
	}
	if di := c.device(env, c.Path); di != nil {
		if c.Output == "json" {
			return writeJSON(env.Stdout, di)
		}
		return di.WriteHuman(env.Stdout)
	}
	if vi, err := vhdcompat.InfoVHD(c.Path, dio); err != nil || vi != nil {
		if err != nil {
			return err
		}
		vi.Filename = c.Path
		if c.Output == "json" {
			return writeJSON(env.Stdout, vi)
		}
		return vi.WriteHuman(env.Stdout)
	}
	info, err := vhdcompat.Info(env, c.Path, dio)
	if err != nil {
		return err
	}
	info.Filename = c.Path
	if c.Output == "json" {
		return writeJSON(env.Stdout, info)
	}
	return info.WriteHuman(env.Stdout)
}

// runChain prints info --backing-chain: every image of the chain, top
// first; JSON is an array, as qemu-img's.
func (c *InfoCmd) runChain(env *vhdcompat.Env) error {
	infos, err := vhdcompat.InfoChain(c.Path, c.Search)
	if err != nil {
		return err
	}
	if c.Output == "json" {
		return writeJSON(env.Stdout, infos)
	}
	for i, in := range infos {
		if i > 0 {
			if _, err := io.WriteString(env.Stdout, "\n"); err != nil {
				return err
			}
		}
		if err := in.WriteHuman(env.Stdout); err != nil {
			return err
		}
	}
	return nil
}

// MapCmd lists the allocation of an image.
type MapCmd struct {
	outputFlag
	vhdcompat.DiskIOFlags
	discoveryFlag
	Path string `arg:"" help:"qcow2 or VHD file, a blktap or NBD device (what an export of it reads), or - for a qcow2 stream on stdin."`
}

// Help is the long help with an example.
func (c *MapCmd) Help() string {
	return `Lists the extents of the image as qemu-img map does, in its two
layouts, while the image is walked: memory does not grow with the number
of extents, and output starts at once.

--output=json lists every extent: start, length, depth, present, zero,
data and the host offset (none for compressed clusters), adjacent extents
merged as qemu-img merges them, byte for byte qemu-img's output. The
human layout lists, as qemu-img's does, the extents whose data the image
holds (Offset, Length, Mapped to, File); compressed ones, which qemu-img
refuses to list that way, show "compressed" as where they are mapped to.

Ranges left to a backing file are reported at depth 1 and not inspected
(the human layout leaves them out). For a stream (-) the data offsets are
those of the stream, as they would be in a file of it; zero ranges carry
no offset there, and a stream has no file holes, so data preallocated on
holes is not reported as reading zero. A stream that describes ranges far
out of guest order is refused (more than 524288 ranges held): map the
file. A VHD file is mapped as qemu-img maps format vpc: stored sectors as
data at their offset in the file, the rest as zeros, or at depth 1 for a
differencing disk.

For a blktap or NBD device, the ranges an export of it reads (data) and
leaves out, from the image chain found behind it, under a heading naming
the driver, the image and the chain's depth (the ranges read listed as
qemu-img map lists a raw disk's data, at their own offset; with
--output=json, an object with those fields and the entries as
"extents"). --no-discovery maps the device's own content instead.

Examples:

    xapi-qcow-tool map --output=json /var/tmp/disk.qcow2
    xapi-qcow-tool map /var/tmp/disk.vhd | head
    xapi-qcow-tool map /dev/sm/backend/SR-UUID/VDI-UUID
    cat /var/tmp/disk.qcow2 | xapi-qcow-tool map -`
}

// Run executes map.
func (c *MapCmd) Run(env *vhdcompat.Env) error {
	dio, err := c.IO()
	if err != nil {
		return err
	}
	if di := c.device(env, c.Path); di != nil {
		return writeDeviceMap(env.Stdout, di, c.Output == "json")
	}
	w := bufio.NewWriterSize(env.Stdout, 64<<10)
	p := &mapPrinter{w: w, json: c.Output == "json", file: c.Path}
	if err := vhdcompat.Map(env, c.Path, dio, p.entry); err != nil {
		if p.err != nil {
			return fmt.Errorf("map: writing the map to stdout: %w", p.err)
		}
		w.Flush() // what was found before the fault
		return err
	}
	p.end()
	if err := w.Flush(); err != nil {
		return fmt.Errorf("map: writing the map to stdout: %w", err)
	}
	return nil
}

// writeDeviceMap prints what an export of a device reads: a heading then
// the map, or one JSON object holding both. In the human layout the data
// an export reads is listed as qemu-img map lists a raw disk's: mapped to
// the same offset of the device.
func writeDeviceMap(out io.Writer, di *vhdcompat.DeviceInfo, asJSON bool) error {
	m := di.Map()
	if asJSON {
		return writeJSON(out, struct {
			*vhdcompat.DeviceInfo
			Extents []inspect.MapEntry `json:"extents"`
		}{di, m})
	}
	w := bufio.NewWriter(out)
	fmt.Fprintf(w, "# %s: allocation %s", di.Device, di.Allocation)
	if di.Image != "" {
		fmt.Fprintf(w, ", %s:%s, chain depth %d", di.Driver, di.Image, di.ChainDepth)
	}
	fmt.Fprintf(w, ", %d bytes read by an export\n", di.AllocatedBytes)
	if di.Error != "" {
		fmt.Fprintf(w, "# discovery failed: %s\n", di.Error)
	}
	p := &mapPrinter{w: w, file: di.Device}
	for _, e := range m {
		if e.Data {
			e.Offset = &e.Start
		}
		if p.entry(e) != nil {
			break
		}
	}
	p.end()
	return w.Flush()
}

// mapPrinter writes a map in qemu-img map's layouts, entry by entry as the
// image is walked.
type mapPrinter struct {
	w    *bufio.Writer
	json bool
	file string // the File column of the human layout
	n    int    // entries written (the header goes with the first: an image refused at once prints nothing)
	err  error  // the first write error
	buf  []byte
}

func (p *mapPrinter) header(b []byte) []byte {
	if p.json {
		return append(b, '[')
	}
	return fmt.Appendf(b, "%-16s%-16s%-16s%s\n", "Offset", "Length", "Mapped to", "File")
}

// entry writes one entry. JSON lists every entry, one a line. The human
// layout lists, as qemu-img does, the ranges whose data this image holds
// (data that does not read as zeros) with their offset in the file;
// compressed ranges, which qemu-img refuses to list this way, say
// "compressed" there. Ranges left to a backing file (depth 1) are not
// inspected, so not listed.
func (p *mapPrinter) entry(e inspect.MapEntry) error {
	b := p.buf[:0]
	if p.n == 0 {
		b = p.header(b)
	}
	if p.json {
		if p.n > 0 {
			b = append(b, ",\n"...)
		}
		b = appendMapJSON(b, e)
	} else if e.Data && !e.Zero && e.Depth == 0 {
		b = appendHex16(b, e.Start)
		b = appendHex16(b, e.Length)
		if e.Offset != nil {
			b = appendHex16(b, *e.Offset)
		} else {
			b = fmt.Appendf(b, "%-16s", "compressed")
		}
		b = append(append(b, p.file...), '\n')
	}
	p.n++
	p.buf = b
	if _, err := p.w.Write(b); err != nil {
		p.err = err
		return err
	}
	return nil
}

func (p *mapPrinter) end() {
	if p.n == 0 {
		p.w.Write(p.header(nil))
		if p.json {
			// qemu-img's map of an empty disk: one empty entry.
			p.w.Write(appendMapJSON(nil, inspect.MapEntry{}))
		}
	}
	if p.json {
		p.w.WriteString("]\n")
	}
}

// appendMapJSON appends e in qemu-img map --output=json's layout.
// (strconv, not fmt: a map may have millions of entries).
func appendMapJSON(b []byte, e inspect.MapEntry) []byte {
	b = strconv.AppendUint(append(b, `{ "start": `...), e.Start, 10)
	b = strconv.AppendUint(append(b, `, "length": `...), e.Length, 10)
	b = strconv.AppendInt(append(b, `, "depth": `...), int64(e.Depth), 10)
	b = strconv.AppendBool(append(b, `, "present": `...), e.Present)
	b = strconv.AppendBool(append(b, `, "zero": `...), e.Zero)
	b = strconv.AppendBool(append(b, `, "data": `...), e.Data)
	if e.Offset != nil {
		b = strconv.AppendUint(append(b, `, "offset": `...), *e.Offset, 10)
	}
	return append(b, '}')
}

// appendHex16 appends n as C's printf("%#-16x") does: 0x before
// non-zero values only, left-aligned in 16 columns.
func appendHex16(b []byte, n uint64) []byte {
	start := len(b)
	if n == 0 {
		b = append(b, '0')
	} else {
		b = strconv.AppendUint(append(b, "0x"...), n, 16)
	}
	for len(b)-start < 16 {
		b = append(b, ' ')
	}
	return b
}

// CheckCmd validates the structure of an image.
type CheckCmd struct {
	outputFlag
	vhdcompat.DiskIOFlags
	Search string `name:"path" placeholder:"DIR:DIR" help:"Where the parents of a VHD are searched after the child's own directory, as vhd-tool's --path (xapi passes /dev/mapper:.); default the current directory."`
	Path   string `arg:"" help:"qcow2 or VHD file (or block device), or - for a qcow2 stream on stdin."`
}

// Help is the long help with an example.
func (c *CheckCmd) Help() string {
	return `Checks that every reference (L1 to L2, L2 to data, refcount table to
blocks, snapshot tables) is in range and aligned, that no cluster is used
for two purposes, and that refcounts agree with the references. On a stream
(-) it checks what one pass can check. The file is never modified.

For a VHD (fixed, dynamic, differencing) it checks both footers (cookie,
checksum, the copy at offset 0 against the one at the end), the dynamic
header, that the BAT lies inside the file and that each block (bitmap and
data) lies inside the image, clear of the metadata and of every other
block, the parent locators, blktap's batmap against the BAT and the
bitmaps; then each parent, found as the hybrid source finds it (the
locators, then the parent name, next to the child then in --path): its
unique id, its time stamp, loops and the depth of the chain. Every finding
is a line naming its offset; corruptions are what the hybrid source
refuses, in the same words; warnings are quirks blktap's libvhd accepts
(early tapdisk's footers, a parent time stamp tapdisk does not compare).

Exit status as qemu-img check: 0 no errors (warnings allowed), 2
corruptions, 3 leaked clusters only (qcow2), 1 the check could not be
completed (for a VHD: a parent not found).

Examples:

    xapi-qcow-tool check /var/tmp/disk.qcow2
    xapi-qcow-tool check --output=json /var/tmp/disk.qcow2
    cat /var/tmp/disk.qcow2 | xapi-qcow-tool check -
    xapi-qcow-tool check --path /dev/mapper:. /var/run/sr-mount/SR/VDI.vhd`
}

// Run executes check.
func (c *CheckCmd) Run(env *vhdcompat.Env) error {
	dio, err := c.IO()
	if err != nil {
		return err
	}
	res, err := vhdcompat.Check(env, c.Path, dio, c.Search)
	if err != nil {
		return err
	}
	if c.Output == "json" {
		err = writeJSON(env.Stdout, res)
	} else {
		err = res.WriteHuman(env.Stdout)
	}
	if err != nil {
		return err
	}
	if code := res.ExitCode(); code != 0 {
		return &vhdcompat.ExitError{Code: code}
	}
	return nil
}

// CompareCmd compares the content of two disks.
type CompareCmd struct {
	A string `arg:"" help:"First disk: raw or qcow2 file."`
	B string `arg:"" help:"Second disk: raw or qcow2 file."`
	vhdcompat.DiskIOFlags
}

// Help is the long help with an example.
func (c *CompareCmd) Help() string {
	return `Compares what two disks read as, each a raw file (or block device) or a
qcow2 file, told apart by the qcow2 magic. Disks of different sizes are
identical when the longer one reads as zeros past the shorter one's end.

Exit status as qemu-img compare: 0 identical, 1 different (the first
differing offset is printed), 2 error.

Example:

    xapi-qcow-tool compare /var/tmp/export.qcow2 /dev/sm/backend/SR/VDI`
}

// Run executes compare.
func (c *CompareCmd) Run(env *vhdcompat.Env) error {
	dio, err := c.IO()
	if err != nil {
		return err
	}
	res, err := vhdcompat.Compare(env, c.A, c.B, dio)
	if err != nil {
		return &vhdcompat.ExitError{Code: 2, Err: fmt.Errorf("compare: %w", err)}
	}
	w := env.Stdout
	if res.SizeMismatch {
		fmt.Fprintf(w, "Warning: Image size mismatch! (%d and %d bytes)\n", res.SizeA, res.SizeB)
	}
	if !res.Identical {
		fmt.Fprintf(w, "Content mismatch at offset %d!\n", res.Offset)
		return &vhdcompat.ExitError{Code: 1}
	}
	fmt.Fprintln(w, "Images are identical.")
	return nil
}

// CompletionCmd prints a shell completion script.
type CompletionCmd struct {
	Shell string `arg:"" enum:"bash" help:"Shell to complete for (bash)."`
}

// Help is the long help with an example.
func (c *CompletionCmd) Help() string {
	return `Prints a completion script covering every command and its flags.

Example:

    xapi-qcow-tool completion bash > /etc/bash_completion.d/xapi-qcow-tool`
}

// Run executes completion.
func (c *CompletionCmd) Run(env *vhdcompat.Env) error {
	// The model is built from the CLI struct itself, so the script can
	// never miss a command.
	k, err := kong.New(&CLI{}, kong.Name(Name), kong.Vars{"version": Version}, kong.Exit(func(int) {}))
	if err != nil {
		return fmt.Errorf("completion: %w", err)
	}
	_, err = io.WriteString(env.Stdout, bashCompletion(k.Model.Node))
	return err
}

// flagWords lists the flags of a node as completion words, and the enum
// values of those that take a fixed set.
func flagWords(n *kong.Node, enums map[string][]string) []string {
	var words []string
	for _, f := range n.Flags {
		if f.Hidden {
			continue
		}
		words = append(words, "--"+f.Name)
		if f.Short != 0 {
			words = append(words, "-"+string(f.Short))
		}
		if f.Enum != "" {
			enums["--"+f.Name] = strings.Split(f.Enum, ",")
		}
	}
	return words
}

// bashCompletion writes the bash script for the command tree under app.
func bashCompletion(app *kong.Node) string {
	fn := "_" + strings.ReplaceAll(Name, "-", "_")
	var b strings.Builder
	globalEnums := map[string][]string{}
	global := dedupe(append(flagWords(app, globalEnums), "--help", "-h"))
	var cmds []string
	for _, c := range app.Children {
		if !c.Hidden {
			cmds = append(cmds, c.Name)
		}
	}
	fmt.Fprintf(&b, "# bash completion for %s (generated by %s completion bash)\n", Name, Name)
	fmt.Fprintf(&b, "%s() {\n", fn)
	b.WriteString(`    local cur="${COMP_WORDS[COMP_CWORD]}" prev="${COMP_WORDS[COMP_CWORD-1]}"
    local cmd="" i words="" flag=""
    for ((i = 1; i < COMP_CWORD; i++)); do
        case "${COMP_WORDS[i]}" in
            -*|=) ;;
            *) cmd="${COMP_WORDS[i]}"; break ;;
        esac
    done
    # "--flag=value" arrives as "--flag" "=" "value".
    if [[ "$prev" == "=" ]]; then flag="${COMP_WORDS[COMP_CWORD-2]}"
    elif [[ "$cur" == "=" ]]; then flag="$prev"; cur=""
    elif [[ "$prev" == --* ]]; then flag="$prev"
    fi
    case "$cmd" in
`)
	fmt.Fprintf(&b, "        \"\")\n            words=%q ;;\n", strings.Join(append(append([]string{}, cmds...), global...), " "))
	for _, c := range app.Children {
		if c.Hidden {
			continue
		}
		enums := map[string][]string{}
		words := dedupe(append(flagWords(c, enums), global...))
		for _, sub := range c.Children {
			words = append(words, sub.Name)
		}
		for _, p := range c.Positional {
			if p.Enum != "" {
				words = append(words, strings.Split(p.Enum, ",")...)
			}
		}
		fmt.Fprintf(&b, "        %s)\n", c.Name)
		if len(enums) > 0 {
			b.WriteString("            case \"$flag\" in\n")
			keys := make([]string, 0, len(enums))
			for k := range enums {
				keys = append(keys, k)
			}
			sort.Strings(keys)
			for _, k := range keys {
				fmt.Fprintf(&b, "                %s) COMPREPLY=($(compgen -W %q -- \"$cur\")); return ;;\n", k, strings.Join(enums[k], " "))
			}
			b.WriteString("            esac\n")
		}
		fmt.Fprintf(&b, "            words=%q ;;\n", strings.Join(words, " "))
	}
	b.WriteString(`    esac
    if [[ "$cur" == -* || -z "$cmd" ]]; then
        COMPREPLY=($(compgen -W "$words" -- "$cur"))
    else
        COMPREPLY=($(compgen -W "$words" -- "$cur") $(compgen -f -- "$cur"))
    fi
}
`)
	fmt.Fprintf(&b, "complete -o default -F %s %s qcow2-to-stdout qcow-stream-tool\n", fn, Name)
	return b.String()
}

// dedupe drops repeated words, keeping the first of each.
func dedupe(words []string) []string {
	seen := map[string]bool{}
	out := words[:0:0]
	for _, w := range words {
		if !seen[w] {
			seen[w] = true
			out = append(out, w)
		}
	}
	return out
}

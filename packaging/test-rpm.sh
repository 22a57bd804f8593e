#!/bin/bash
# `make rpm-check`: builds the RPM with build-rpm.sh, unpacks it, and checks
# what a XenServer / XCP-ng host would get: the paths, the drop-in symlinks,
# the %config(noreplace) xapi fragment and that it names installed files,
# the man page, the licences, a static binary that runs (--version, an
# export under the qcow2-to-stdout name, an import under the
# qcow-stream-tool name), and that removing the package leaves xapi's
# configuration directory as it was. Prints "rpm-check: N passed, M failed"
# and exits non-zero on any failure.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD
name=xapi-qcow-tool
libexec=/opt/xensource/libexec
fragment=/etc/xapi.conf.d/$name.conf

passed=0
failed=0
pass() { passed=$((passed + 1)); echo "ok   $*"; }
fail() { failed=$((failed + 1)); echo "FAIL $*"; }
check() { # description command...
	local what=$1
	shift
	if "$@"; then pass "$what"; else fail "$what"; fi
}
finish() {
	echo "rpm-check: $passed passed, $failed failed"
	[ "$failed" -eq 0 ]
	exit
}
skip() { echo "SKIP $*"; }

for tool in rpmbuild rpm rpm2cpio cpio go; do
	if ! command -v $tool >/dev/null; then
		fail "$tool is installed (Debian: apt-get install rpm cpio; or run .ci/deps as root)"
		finish
	fi
done

tmp=$(mktemp -d "${TMPDIR:-/tmp}/xqt-rpm-check.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

# --- build --------------------------------------------------------------
if ! rpmfile=$(RPM_OUTDIR=$tmp/out bash packaging/build-rpm.sh 2>"$tmp/build.err" | tail -n 1) || [ ! -f "$rpmfile" ]; then
	cat "$tmp/build.err"
	fail "build-rpm.sh builds an RPM"
	finish
fi
pass "build-rpm.sh builds $(basename "$rpmfile")"

version=$(tr -d ' \t\n' <VERSION)
rpmversion=$(echo "${version#v}" | tr -- '-' '.')
q() { rpm -qp "$@" "$rpmfile" 2>/dev/null; }
check "package name and version are $name $rpmversion (from VERSION)" \
	test "$(q --qf '%{NAME} %{VERSION}')" = "$name $rpmversion"
check "payload is gzip (readable by the rpm of XenServer 8 / XCP-ng 8 dom0)" \
	test "$(q --qf '%{PAYLOADCOMPRESSOR}')" = gzip
check "the package requires no shared libraries" \
	bash -c '! rpm -qpR "$1" | grep -q "\.so"' _ "$rpmfile"

# --- unpack and paths -----------------------------------------------------
u=$tmp/unpacked
mkdir -p "$u"
if ! (cd "$u" && rpm2cpio "$rpmfile" | cpio -idm --quiet 2>"$tmp/cpio.err"); then
	cat "$tmp/cpio.err"
	fail "rpm2cpio | cpio unpacks the RPM"
	finish
fi
pass "rpm2cpio | cpio unpacks the RPM"
listing=$(q -l)
bin=$u$libexec/$name

check "$libexec/$name is a regular executable file (mode 0755)" \
	bash -c '[ -f "$1" ] && [ ! -L "$1" ] && [ "$(stat -c %a "$1")" = 755 ]' _ "$bin"
for link in qcow2-to-stdout qcow-stream-tool; do
	check "$libexec/$link is a symlink to $name in the same directory" \
		test "$(readlink "$u$libexec/$link" 2>/dev/null)" = "$name"
	check "$libexec/$link is in the package's file list" \
		grep -qx "$libexec/$link" <<<"$listing"
done
check "$fragment is installed" test -f "$u$fragment"
check "rpm --configfiles lists $fragment" \
	grep -qx "$fragment" <<<"$(q --configfiles)"
check "$fragment is %config(noreplace)" \
	grep -qxE "$fragment [a-z]*c[a-z]*n[a-z]*|$fragment [a-z]*n[a-z]*c[a-z]*" \
	<<<"$(q --qf '[%{FILENAMES} %{FILEFLAGS:fflags}\n]')"

# --- the fragment, read the way xapi reads config files ---------------------
# xapi (xcp_service): drop everything from '#', trailing blanks; a line is
# KEY = VALUE with KEY free of '=' and blanks; matching quotes are stripped.
declare -A conf=()
kv='^[[:blank:]]*([^=[:blank:]]+)[[:blank:]]*=[[:blank:]]*(.*)$'
while IFS= read -r line || [ -n "$line" ]; do
	line=${line%%#*}
	line=$(sed -E 's/[[:blank:]]+$//' <<<"$line")
	if [[ $line =~ $kv ]]; then
		k=${BASH_REMATCH[1]} v=${BASH_REMATCH[2]}
		if [[ ${#v} -ge 2 && ( $v == \"*\" || $v == \'*\' ) ]]; then v=${v:1:${#v}-2}; fi
		conf[$k]=$v
	elif [ -n "$line" ]; then
		fail "fragment line '$line' is KEY=VALUE"
	fi
done <"$u$fragment"
check "the fragment sets exactly qcow_to_stdout and qcow_stream_tool" \
	test "$(printf '%s\n' "${!conf[@]}" | sort | tr '\n' ' ')" = "qcow_stream_tool qcow_to_stdout "
declare -A wantbase=([qcow_to_stdout]=qcow2-to-stdout [qcow_stream_tool]=qcow-stream-tool)
for k in qcow_to_stdout qcow_stream_tool; do
	v=${conf[$k]:-}
	check "$k=$v is an absolute path the RPM installs" \
		bash -c '[[ $1 == /* ]] && grep -qxF "$1" <<<"$2"' _ "$v" "$listing"
	check "$k=$v resolves to the packaged binary" \
		test "$(readlink -f "$u$v" 2>/dev/null)" = "$(readlink -f "$bin")"
	check "$k=$v has the name that selects its command line (${wantbase[$k]})" \
		test "$(basename "$v")" = "${wantbase[$k]}"
done

# --- man page ---------------------------------------------------------------
man=$u/usr/share/man/man8/$name.8.gz
check "man page at /usr/share/man/man8/$name.8.gz, gzipped" gzip -t "$man"
if command -v groff >/dev/null; then
	check "man page renders without groff warnings" \
		bash -c 'out=$(zcat "$1" | groff -man -Tutf8 -ww -z 2>&1) && [ -z "$out" ] || { echo "$out"; false; }' _ "$man"
else
	skip "groff not installed: man page rendering not checked"
fi
# Every command of the CLI has its own section.
commands=$("$bin" --help 2>/dev/null | awk '/^Commands:/ { on = 1; next } on && /^  [a-z]/ { print $1 } on && /^$/ && n++ { exit }')
check "the CLI lists its commands" test -n "$commands"
mansrc=$(zcat "$man" | sed 's/\\-/-/g')
for c in $commands; do
	check "man page has a section for '$c'" grep -qx ".SS $c" <<<"$mansrc"
done
for topic in "EXIT STATUS" DIAGNOSTICS JOURNAL FILES "DROP-IN NAMES" XAPI; do
	check "man page has $topic" grep -qx ".SH $topic" <<<"$mansrc"
done
check "man page tells where the journal entries are" grep -q "journalctl -t $name" <<<"$mansrc"

# --- licences ---------------------------------------------------------------
licences=$(q -L)
lic=$(grep '/LICENSE$' <<<"$licences" | head -n 1)
check "rpm -qL lists the licence" test -n "$lic"
check "the licence is BSD-2-Clause, by xapi-qcow-tool authors" \
	bash -c 'grep -q "BSD 2-Clause" "$1" && grep -q "xapi-qcow-tool authors" "$1"' _ "$u$lic"
for mod in golang.org/go $(go version -m "$bin" 2>/dev/null | awk '$1 == "dep" { print $2 }'); do
	check "licence of linked module $mod is shipped" \
		grep -q "/licenses/$mod/" <<<"$licences"
done

# --- the binary -------------------------------------------------------------
if command -v readelf >/dev/null; then
	check "binary is static (no PT_INTERP)" bash -c '! readelf -lW "$1" | grep -q INTERP' _ "$bin"
else
	check "binary is static (ldd)" bash -c 'ldd "$1" 2>&1 | grep -qE "not a dynamic executable|statically linked"' _ "$bin"
fi
check "--version prints $version" test "$("$bin" --version 2>&1)" = "$version"

img=$tmp/disk.img
truncate -s 4M "$img"
head -c 65536 /dev/urandom | dd of="$img" bs=64k seek=16 conv=notrunc status=none
printf 'tail' | dd of="$img" bs=1 seek=$((4 * 1024 * 1024 - 4)) conv=notrunc status=none
exp=$tmp/disk.qcow2
if timeout 20 "$u$libexec/qcow2-to-stdout" "$img" >"$exp" 2>"$tmp/export.err"; then
	pass "qcow2-to-stdout (symlink) exports a sparse disk"
else
	fail "qcow2-to-stdout (symlink) exports a sparse disk: $(head -c 300 "$tmp/export.err")"
fi
check "the export starts with the qcow2 magic" \
	test "$(head -c 4 "$exp" | od -An -tx1 | tr -d ' \n')" = "514649fb"
if command -v qemu-img >/dev/null; then
	check "qemu-img compare: the export holds the disk" \
		bash -c 'qemu-img compare -q -f raw -F qcow2 "$1" "$2" 2>/dev/null' _ "$img" "$exp"
else
	skip "qemu-img not installed: export content judged by the import below only"
fi
# The import's input comes from `stream`, so that it is judged on its own
# even when the drop-in export above fails.
src=$tmp/stream.qcow2
check "xapi-qcow-tool stream exports the disk" \
	timeout 20 "$bin" stream --source "$img" --destination "file://$src"
dst=$tmp/imported.raw
if timeout 20 "$u$libexec/qcow-stream-tool" stream_decode "$dst" <"$src" >"$tmp/import.out" 2>"$tmp/import.err"; then
	pass "qcow-stream-tool stream_decode (symlink) imports the export"
	check "the imported disk equals the original" cmp -s "$img" "$dst"
	check "stream_decode prints nothing on stdout" test ! -s "$tmp/import.out"
else
	fail "qcow-stream-tool stream_decode (symlink) imports the export: $(head -c 300 "$tmp/import.err")"
fi

# --- install and remove, in a scratch root ------------------------------------
# --noscripts: the scratch root has no shell; the scriptlets are run below.
r=$tmp/root
if [ "$(id -u)" = 0 ] && rpm --root "$r" --initdb 2>/dev/null; then
	check "rpm -i installs into a scratch root" \
		bash -c 'rpm --root "$1" -i --nodeps --noscripts --quiet "$2" 2>/dev/null' _ "$r" "$rpmfile"
	check "installed: binary, fragment and symlinks in place" \
		bash -c '[ -x "$1'$libexec'/'$name'" ] && [ -f "$1'$fragment'" ] && [ -L "$1'$libexec'/qcow2-to-stdout" ]' _ "$r"
	echo "# edited by the administrator" >>"$r$fragment"
	# rpm says it saves the edited fragment as .rpmsave: expected, not shown.
	check "rpm -e removes the package" \
		bash -c 'rpm --root "$1" -e --nodeps --noscripts "$2" 2>/dev/null' _ "$r" "$name"
	check "removed: the binary and symlinks are gone" \
		bash -c '[ ! -e "$1'$libexec'/'$name'" ] && [ ! -L "$1'$libexec'/qcow2-to-stdout" ] && [ ! -L "$1'$libexec'/qcow-stream-tool" ]' _ "$r"
	check "removed: the fragment is gone" test ! -e "$r$fragment"
	# The %postun scriptlet, with its paths moved into the scratch root.
	q --qf '%{POSTUN}' | sed "s#/etc/#$r/etc/#g" >"$tmp/postun.sh"
	check "%postun on removal runs" bash -c 'sh "$1" 0 >"$2" 2>&1' _ "$tmp/postun.sh" "$tmp/postun.out"
	check "%postun moves the edited fragment's .rpmsave out of /etc/xapi.conf.d" \
		bash -c '[ -z "$(ls -A "$1/etc/xapi.conf.d")" ] && grep -q "edited by the administrator" "$1/etc/'$name'.conf.rpmsave"' _ "$r"
	check "%postun says a toolstack restart is needed, and restarts nothing" \
		bash -c 'grep -q xe-toolstack-restart "$1" && ! grep -qE "^[^#]*(systemctl|service|xe-toolstack-restart)[^\"]*$" "$2"' _ "$tmp/postun.out" "$tmp/postun.sh"
else
	skip "not root or rpm --initdb refused: install and removal not checked"
fi

check "no scriptlet restarts xapi" \
	bash -c '! rpm -qp --scripts "$1" | grep -vE "^[[:space:]]*(#|echo)" | grep -qE "systemctl|service |xe-toolstack-restart"' _ "$rpmfile"

finish

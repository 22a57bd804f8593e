#!/bin/bash
# Builds the binary RPM from this checkout: `make rpm`.
#
# 1. builds the static binary (CGO_ENABLED=0) with the version from VERSION
#    (or `git describe` when there is no VERSION file) stamped in;
# 2. makes the source tarball from the checkout's files (tracked and
#    untracked-but-not-ignored, as they are in the working tree), plus that
#    binary and the licences of what it links;
# 3. runs rpmbuild on xapi-qcow-tool.spec in a private _topdir.
#
# Nothing is downloaded: the Go module cache is the one `go build` uses.
# The RPM lands in $RPM_OUTDIR (default dist/); its path is the last line of
# output. GOARCH picks the target (default: this machine's).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
name=xapi-qcow-tool

die() { echo "build-rpm.sh: $*" >&2; exit 1; }

command -v rpmbuild >/dev/null || die "rpmbuild not found (Debian: apt-get install rpm; RHEL/CentOS: dnf install rpm-build)"
command -v go >/dev/null || die "go not found"

if [ -s VERSION ]; then
	version=$(tr -d ' \t\n' <VERSION)
else
	version=$(git describe --tags --always 2>/dev/null || echo 0)
fi
# RPM versions may not contain '-': v1.2.3-4-gabcdef becomes 1.2.3.4.gabcdef.
rpmversion=$(echo "${version#v}" | tr -- '-' '.')
[[ $rpmversion =~ ^[A-Za-z0-9._+~^]+$ ]] || die "VERSION '$version' is not usable as an RPM version"

goarch=${GOARCH:-$(go env GOARCH)}
case $goarch in
amd64) rpmarch=x86_64 ;;
arm64) rpmarch=aarch64 ;;
*) die "GOARCH $goarch: no RPM architecture known for it" ;;
esac

outdir=${RPM_OUTDIR:-$root/dist}
work=$(mktemp -d "${TMPDIR:-/tmp}/xqt-rpm.XXXXXX")
trap 'rm -rf "$work"' EXIT
top=$work/rpmbuild
src=$work/$name-$rpmversion
mkdir -p "$top"/{SOURCES,SPECS,BUILD,RPMS,SRPMS} "$src" "$outdir"

# The sources, from the working tree of the checkout.
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
	git ls-files -z --cached --others --exclude-standard |
		while IFS= read -r -d '' f; do [ -f "$f" ] && printf '%s\0' "$f"; done |
		tar --null -T - -cf - | tar -xf - -C "$src"
else
	tar --exclude=./.git --exclude=./bin --exclude=./dist -cf - . | tar -xf - -C "$src"
fi

# The binary, built from those sources.
(
	cd "$src"
	# Static, without heap base randomisation: see GOFLAGS_STATIC in the Makefile.
	CGO_ENABLED=0 GOEXPERIMENT=norandomizedheapbase64 GOOS=linux GOARCH=$goarch go build -trimpath -buildvcs=false \
		-ldflags "-s -w -X github.com/xapi-project/xapi-qcow-tool/wrapper.Version=$version" \
		-o bin/$name ./cmd/$name
)
bash packaging/collect-licenses.sh "$src/bin/$name" "$src/licenses"

tar -C "$work" --owner=0 --group=0 --sort=name -czf "$top/SOURCES/$name-$rpmversion.tar.gz" "$name-$rpmversion"
cp "$name.spec" "$top/SPECS/"
echo "$version" >"$top/SOURCES/VERSION"

# gzip payload: dom0 of XenServer 8 / XCP-ng 8 has an rpm that cannot read
# the zstd payloads newer rpmbuilds default to.
# --nodeps: the build host need not be an RPM system (BuildRequires would
# name Debian's packages otherwise); the binary is already built.
rpmbuild -bb --nodeps --target "$rpmarch" \
	--define "_topdir $top" \
	--define "pkg_version $rpmversion" \
	--define "_binary_payload w9.gzdio" \
	"$top/SPECS/$name.spec" >"$work/rpmbuild.log" 2>&1 || {
	cat "$work/rpmbuild.log" >&2
	die "rpmbuild failed (log above)"
}

rpm=$(find "$top/RPMS" -name "$name-$rpmversion-*.rpm" | head -n 1)
[ -n "$rpm" ] || die "rpmbuild made no RPM"
cp "$rpm" "$outdir/"
echo "$outdir/$(basename "$rpm")"

#!/bin/bash
# Usage: collect-licenses.sh BINARY DIR
# Copies the licence files of everything statically linked into BINARY (the
# Go standard library and each module `go version -m` lists) into
# DIR/<module path>/, so that the package ships every licence it must.
# Reads the module cache filled by the build; downloads nothing.
set -euo pipefail
bin=${1:?usage: collect-licenses.sh BINARY DIR}
out=${2:?usage: collect-licenses.sh BINARY DIR}
export GOFLAGS=-mod=mod GOPROXY=off

copy_licences() { # module-path source-dir
	local dst="$out/$1" found=0 f
	mkdir -p "$dst"
	for f in "$2"/LICENSE* "$2"/LICENCE* "$2"/COPYING* "$2"/NOTICE* "$2"/PATENTS; do
		[ -f "$f" ] || continue
		install -m 0644 "$f" "$dst/"
		found=1
	done
	if [ "$found" = 0 ]; then
		echo "collect-licenses.sh: $1: no licence file in $2" >&2
		return 1
	fi
}

copy_licences golang.org/go "$(go env GOROOT)"
go version -m "$bin" | awk '$1 == "dep" { print $2, $3 }' | while read -r mod ver; do
	dir=$(go list -m -f '{{.Dir}}' "$mod@$ver" 2>/dev/null || true)
	if [ -z "$dir" ] || [ ! -d "$dir" ]; then
		echo "collect-licenses.sh: $mod $ver: not in the module cache (run go build first)" >&2
		exit 1
	fi
	copy_licences "$mod" "$dir"
done

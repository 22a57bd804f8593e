# Sourced by bench.sh: xapi's own command lines on block devices (issue 11).
#
# xapi runs `qcow2-to-stdout DEVICE` for every qcow2 export (stdout is the
# HTTP socket) and `qcow-stream-tool stream_decode DEVICE` for every import
# (stdin is the socket): no --direct on either. These cases run exactly
# that argv, through the symlink names the package installs, on loop
# devices with direct I/O (1 GiB, over fully allocated files: a block device
# has no holes), with the page cache dropped before every timed run of ours
# and of the limit. Besides time, they report the export's time to its
# first byte (the allocation pass must read the whole device before the
# header) and how much the page cache grew (Cached + Dirty of
# /proc/meminfo) over one transfer each way.
#
# Uses from bench.sh: ROOT BIN DIR QUICK RUNS MIB1G RAND DEV1 DEVQ V1
# loop_ok LOOPS TIMEV, and its functions (bench record skip run timed now
# elapsed median say mem_limit loopdev have die).

XAPI_ROWS=(
	"xapi export ${MIB1G} MiB full device|0.8"
	"xapi export ${MIB1G} MiB, 25 % data|0.6"
	"xapi export 25 %: time to first byte / dd of the device|1.3"
	"xapi import ${MIB1G} MiB full, stream_decode from a pipe|1.2"
	"xapi page cache growth, export (MiB per GiB)|1.0"
	"xapi page cache growth, import (MiB per GiB)|1.0"
)

xapi_skip_all() {
	local r
	for r in "${XAPI_ROWS[@]}"; do skip "${r%|*}" "${r##*|}" "$1"; done
}

# Buffers + Cached + Dirty of /proc/meminfo, in KiB: a block device's own
# page cache is counted under Buffers, not Cached.
cache_kib() { awk '/^(Buffers|Cached|Dirty):/ {s += $2} END {print s}' /proc/meminfo; }

# cache_growth DEV CMD: MiB per GiB of transfer by which DEV's page cache
# grew over one run of CMD, after the caches were dropped. Linux drops a
# block device's page cache when its last opener closes it, so the device
# is held open (descriptor 9) for the measure; the figure is the device's
# resident pages (mincore, tests/bench/devcache.py), exact whatever else
# runs on the machine. The growth of the system-wide counters, which other
# processes move too, is printed beside it.
cache_growth() {
	local dev=$1 before after dbefore=0 dafter=0 g
	exec 9<"$dev"
	run "$DROP"
	before=$(cache_kib)
	if ((HAVE_PY)); then dbefore=$(python3 "$ROOT/tests/bench/devcache.py" "$dev"); fi
	run "$2"
	after=$(cache_kib)
	if ((HAVE_PY)); then dafter=$(python3 "$ROOT/tests/bench/devcache.py" "$dev"); fi
	exec 9<&-
	g=$(awk -v a="$before" -v b="$after" -v m="$MIB1G" 'BEGIN {g = (b - a) / m; printf "%.1f", (g > 0) ? g : 0}')
	if ((HAVE_PY)); then
		awk -v a="$dbefore" -v b="$dafter" -v m="$MIB1G" -v s="$g" 'BEGIN {g = (b - a) / m; printf "%.1f %s", (g > 0) ? g : 0, s}'
	else
		echo "$g $g"
	fi
}

# ttfb CMD: seconds from the start of CMD to the first byte on its stdout
# (the rest is drained by cat, as the HTTP client would).
ttfb() {
	local t0
	t0=$(now)
	if ! eval "$1" 2>"$DIR/stderr" | { head -c 1 >/dev/null; now >"$DIR/ttfb"; cat >/dev/null; }; then
		die "failed: $1: $(tail -n 3 "$DIR/stderr")"
	fi
	elapsed "$t0" "$(cat "$DIR/ttfb")"
}

xapi_argv() {
	if [[ -n $loop_ok || -z $DEV1 || -z $DEVQ ]]; then
		xapi_skip_all "${loop_ok:-no loop device}"
		return
	fi
	# Quick mode times nothing worth a cold cache, and CI runs it beside
	# other tests: no drop there (sync alone can take seconds on a busy
	# machine). The page cache growth is still measured: the device's own
	# pages, before and after.
	DROP="sync; echo 3 > /proc/sys/vm/drop_caches"
	if [[ $QUICK == 1 ]]; then
		DROP=":"
	elif ! { sync && echo 3 >/proc/sys/vm/drop_caches; } 2>/dev/null; then
		xapi_skip_all "cannot drop the page cache (/proc/sys/vm/drop_caches)"
		return
	fi
	if [[ $QUICK == 1 ]]; then
		say "xapi's command lines on block devices (quick: caches not dropped)"
	else
		say "xapi's command lines on block devices (caches dropped before every run)"
	fi
	# The drop-in names point at a copy of the binary on the images' tmpfs,
	# which dropping the caches does not evict: on a host the installed
	# binary stays cached between transfers, and reading its 8 MiB back
	# from this machine's disk after every drop (0.08-0.15 s, against
	# 0.02 s for dd) would be timed as ours. dd and cat are read back cold.
	local links=$DIR/links
	mkdir -p "$links"
	cp "$BIN" "$links/xapi-qcow-tool"
	ln -sf xapi-qcow-tool "$links/qcow2-to-stdout"
	ln -sf xapi-qcow-tool "$links/qcow-stream-tool"
	local X2S=$links/qcow2-to-stdout QST=$links/qcow-stream-tool
	# Peak RSS of the runs under the drop-in names, too.
	ours_rss() { local c=${1/"$BIN"/$TIMEV $BIN}; echo "${c/"$links/"/$TIMEV $links/}"; }

	bench "xapi export ${MIB1G} MiB full device" 0.8 \
		"$X2S $DEV1 | cat >/dev/null" \
		"dd if=$DEV1 iflag=direct bs=4M status=none | cat >/dev/null" "$DROP" "$(mem_limit $V1)"
	bench "xapi export ${MIB1G} MiB, 25 % data" 0.6 \
		"$X2S $DEVQ | cat >/dev/null" \
		"dd if=$DEVQ iflag=direct bs=4M status=none | cat >/dev/null" "$DROP" "$(mem_limit $V1)"

	# Time to first byte, against one direct read of the whole device (no
	# allocation pass can be shorter without hints).
	local o=() l=() i t
	for ((i = 0; i < RUNS; i++)); do
		run "$DROP"; t=$(ttfb "$X2S $DEVQ") || exit 1; o+=("$t")
		run "$DROP"; t=$(timed "dd if=$DEVQ iflag=direct bs=4M of=/dev/null status=none") || exit 1; l+=("$t")
	done
	say "  time to first byte, 25 % device: ${o[*]} (dd: ${l[*]})"
	record "xapi export 25 %: time to first byte / dd of the device" "$(median "${o[@]}")" "$(median "${l[@]}")" 1.3 "-"

	# Import: the destination is a loop device over a fully allocated
	# file, so that neither side grows tmpfs while it runs.
	local dst=$DIR/xapi-dst.img devw
	dd if=/dev/zero of="$dst" bs=1M count="$MIB1G" status=none
	if ! devw=$(loopdev "$dst"); then
		skip "xapi import ${MIB1G} MiB full, stream_decode from a pipe" 1.2 "losetup refused"
	else
		LOOPS+=("$devw")
		[[ -s $DIR/rand.qcow2 ]] || run "$BIN stream --source $RAND --destination file://$DIR/rand.qcow2"
		bench "xapi import ${MIB1G} MiB full, stream_decode from a pipe" 1.2 \
			"cat $DIR/rand.qcow2 | $QST stream_decode $devw" \
			"cat $RAND | dd of=$devw oflag=direct iflag=fullblock bs=4M status=none" "$DROP" "$(mem_limit $V1)"
		run "cmp $RAND $devw"
	fi

	# Page cache growth over one transfer each way, per GiB; the target is
	# 64 MiB. --buffered shows what the measure sees when the page cache
	# is used.
	HAVE_PY=0
	have python3 && HAVE_PY=1
	local ge gb
	ge=($(cache_growth "$DEV1" "$X2S $DEV1 | cat >/dev/null"))
	gb=($(cache_growth "$DEV1" "$X2S --buffered $DEV1 | cat >/dev/null"))
	say "  page cache growth, export: device ${ge[0]} MiB per GiB, Buffers+Cached+Dirty ${ge[1]} (--buffered: ${gb[0]}, ${gb[1]})"
	record "xapi page cache growth, export (MiB per GiB)" "${ge[0]}" 64 1.0 "-"
	if [[ -n ${devw:-} ]]; then
		ge=($(cache_growth "$devw" "cat $DIR/rand.qcow2 | $QST stream_decode $devw"))
		gb=($(cache_growth "$devw" "cat $DIR/rand.qcow2 | $QST stream_decode --buffered $devw"))
		say "  page cache growth, import: device ${ge[0]} MiB per GiB, Buffers+Cached+Dirty ${ge[1]} (--buffered: ${gb[0]}, ${gb[1]})"
		record "xapi page cache growth, import (MiB per GiB)" "${ge[0]}" 64 1.0 "-"
		losetup -d "$devw" 2>/dev/null || true
	fi
	rm -f "$dst"
	unset -f ours_rss
	ours_rss() { echo "${1/"$BIN"/$TIMEV $BIN}"; }
}

xapi_argv

#!/usr/bin/env bash
# Benchmark of xapi-qcow-tool against the machine's limits (issue 7).
#
# Each case times our command and a "limit" command that does the least
# work the case can be done with (cat, dd, qemu-img), interleaved and in
# alternating order, and takes the median of several runs: the machine is
# noisy, so only ratios measured in the same run mean anything. Images live
# on /dev/shm (no disk noise) and exports go through a pipe read by
# `cat > /dev/null`, as the HTTP socket would take them.
#
#   make bench                       full run (GiB images, a few minutes),
#                                    rewrites the table in docs/PERFORMANCE.md
#   BENCH_QUICK=1 bash tests/bench/bench.sh
#                                    smoke run with tiny images (seconds)
#
# Environment: BIN (binary, default bin/xapi-qcow-tool), BENCH_RUNS (runs
# per case, default 5; quick: 1), BENCH_DIR (where images go), BENCH_DOC
# (document whose table to rewrite; empty: none), BENCH_STRICT=1 (exit 1
# when a case misses its target), BENCH_ONLY=hybrid, discovery, nbd or map
# (only that part's cases; the table is then printed, not written).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
QUICK=${BENCH_QUICK:-0}
ONLY=${BENCH_ONLY:-}
[[ -z $ONLY || $ONLY == hybrid || $ONLY == discovery || $ONLY == nbd || $ONLY == map ]] || { echo "bench: BENCH_ONLY=$ONLY: only hybrid, discovery, nbd and map are parts of their own" >&2; exit 2; }
BIN=${BIN:-$ROOT/bin/xapi-qcow-tool}
if [[ $QUICK == 1 ]]; then
	RUNS=${BENCH_RUNS:-1}
	DOC=${BENCH_DOC-}
	MIB1G=16 MIB4G=64 SCALE=$((1 << 40)) # 1 TiB: ext4 caps files at 16 TiB
else
	RUNS=${BENCH_RUNS:-5}
	DOC=${BENCH_DOC-$ROOT/docs/PERFORMANCE.md}
	[[ -z $ONLY ]] || DOC="" # a part alone must not rewrite the whole table
	MIB1G=1024 MIB4G=4096 SCALE=$((16 << 40))
fi
SCALE_LIMIT=10 # seconds

die() { echo "bench: $*" >&2; exit 1; }
have() { command -v "$1" >/dev/null 2>&1; }

[[ -x $BIN ]] || die "$BIN not found: run make build (or set BIN)"
for t in awk dd cat truncate sort; do have "$t" || die "$t is not installed"; done

# Images go to /dev/shm when it has room for them, else to TMPDIR.
need_mib=$((MIB1G * 4 + MIB4G * 2 + 512)) # peak of the images alive at once
parent=${BENCH_DIR:-}
if [[ -z $parent ]]; then
	parent=${TMPDIR:-/tmp}
	if [[ -d /dev/shm && -w /dev/shm ]]; then
		free=$(df -Pm /dev/shm | awk 'NR==2 {print $4}')
		((free > need_mib)) && parent=/dev/shm
	fi
fi
DIR=$(mktemp -d "$parent/xqt-bench.XXXXXX")
# The thin disks behind the device cases (hybrid, discovery, nbd) live on a
# disk, not in /dev/shm: reading a device then costs what it costs on a
# host, and the limit's dd pays it as the export does. From a memory-backed
# loop device a read is a memory copy, and an export pays two (into the
# pipe, and its reader's out of it) where dd to /dev/null pays one.
# BENCH_DEVDIR chooses the disk; with only BENCH_DIR given, it is used.
DEVDIR=$(mktemp -d "${BENCH_DEVDIR:-${BENCH_DIR:-/var/tmp}}/xqt-bench-dev.XXXXXX")
LOOPS=()
# cleanup detaches the loop devices still over our files, and only those: a
# device a case detached itself may since serve another program.
cleanup() {
	local l back
	for l in "${LOOPS[@]}"; do
		back=$(losetup -n -O BACK-FILE "$l" 2>/dev/null) || continue
		case $back in
		"$DIR"/* | "$DEVDIR"/*) losetup -d "$l" 2>/dev/null || true ;;
		esac
	done
	rm -rf "$DIR" "$DEVDIR"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Peak RSS of our process, through GNU time when it is there.
RSSFILE=$DIR/rss
if [[ -x /usr/bin/time ]]; then
	TIMEV="/usr/bin/time -f %M -o $RSSFILE"
else
	TIMEV=""
fi
# Our commands are timed bare, like the limits: GNU time would add its own
# fork and exec (a few ms: 3 % of the shortest case) to our side only. The
# peak RSS comes from one more run of each case under GNU time (ours_rss).
OURS=$BIN
ours_rss() { echo "${1/"$BIN"/$TIMEV $BIN}"; }

now() { echo "$EPOCHREALTIME"; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.3f", b - a}'; }
median() { printf '%s\n' "$@" | sort -g | awk '{v[NR] = $1} END {print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }

# run CMD: runs a shell command line, failing the benchmark if it fails.
run() {
	if ! eval "$1" 2>"$DIR/stderr"; then
		die "failed: $1: $(tail -n 3 "$DIR/stderr")"
	fi
}

# timed CMD: prints the seconds CMD took.
timed() {
	local t0 t1
	t0=$(now)
	run "$1"
	t1=$(now)
	elapsed "$t0" "$t1"
}

ROWS=()
MISSES=0
MEM_WORST=0 MEM_WORST_CASE=""

# record NAME OURS LIMIT TARGET RSS_KIB: adds a row; TARGET is the highest
# acceptable ours/limit ratio.
record() {
	local name=$1 ours=$2 limit=$3 target=$4 rss=$5 ratio verdict
	ratio=$(awk -v o="$ours" -v l="$limit" 'BEGIN {printf "%.2f", (l > 0) ? o / l : 0}')
	if awk -v r="$ratio" -v t="$target" 'BEGIN {exit !(r <= t)}'; then verdict=PASS; else verdict=MISS; MISSES=$((MISSES + 1)); fi
	ROWS+=("$name|$ours|$limit|$ratio|$target|$rss|$verdict")
	printf '  %-44s ours %7ss  limit %7ss  ratio %5s (target <= %s)  %s\n' "$name" "$ours" "$limit" "$ratio" "$target" "$verdict" >&2
}

skip() {
	ROWS+=("$1|-|-|-|$2|-|SKIP: $3")
	printf '  %-44s SKIP: %s\n' "$1" "$3" >&2
}

# interleave TIMER OURS_CMD LIMIT_CMD PREP_CMD: RUNS runs of each in
# alternating order, PREP_CMD before each (untimed), ours timed by TIMER
# (timed, or first_byte); the times go to the caller's arrays o and l.
interleave() {
	local timer=$1 ours_cmd=$2 limit_cmd=$3 prep=$4 i t
	o=() l=()
	for ((i = 0; i < RUNS; i++)); do
		if ((i % 2 == 1)); then
			run "$prep"; t=$(timed "$limit_cmd") || exit 1; l+=("$t")
		fi
		run "$prep"; t=$("$timer" "$ours_cmd") || exit 1; o+=("$t")
		if ((i % 2 == 0)); then
			run "$prep"; t=$(timed "$limit_cmd") || exit 1; l+=("$t")
		fi
	done
}

# bench NAME TARGET OURS_CMD LIMIT_CMD [PREP_CMD] [MEM_LIMIT_KIB]: RUNS
# interleaved runs in alternating order, PREP_CMD before each (untimed).
bench() {
	local name=$1 target=$2 ours_cmd=$3 limit_cmd=$4 prep=${5:-:} memlim=${6:-0}
	local o=() l=() rss=0
	interleave timed "$ours_cmd" "$limit_cmd" "$prep"
	: >"$RSSFILE"
	run "$prep"; run "$(ours_rss "$ours_cmd")"; rss=$(peak_rss)
	run "$prep"
	record "$name" "$(median "${o[@]}")" "$(median "${l[@]}")" "$target" "$(rss_text "$rss")"
	mem_check "$name" "$rss" "$memlim"
}

# first_byte CMD: seconds until CMD's first byte of output reaches the
# reader (CMD's output is then drained to its end).
first_byte() {
	local t0
	t0=$(now)
	run "$1 | { head -c 1 >/dev/null; echo \$EPOCHREALTIME >$DIR/ttfb; cat >/dev/null; }"
	elapsed "$t0" "$(cat "$DIR/ttfb")"
}

# bench_first_byte NAME TARGET OURS_CMD LIMIT_CMD PREP_CMD: as bench, timing
# ours to its first byte of output (hybrid.sh, discovery.sh).
bench_first_byte() {
	local name=$1 target=$2 ours_cmd=$3 limit_cmd=$4 prep=$5 o=() l=()
	interleave first_byte "$ours_cmd" "$limit_cmd" "$prep"
	record "$name" "$(median "${o[@]}")" "$(median "${l[@]}")" "$target" "-"
}

peak_rss() { if [[ -s $RSSFILE ]]; then tail -n 1 "$RSSFILE"; else echo 0; fi; }
rss_text() { if (($1 > 0)); then awk -v k="$1" 'BEGIN {printf "%.1f MiB", k / 1024}'; else echo "n/a"; fi; }

# mem_check NAME RSS_KIB LIMIT_KIB: the memory target is 64 MiB plus one
# bit per cluster (LIMIT_KIB, computed by the caller) — tracked as a whole.
mem_check() {
	local name=$1 rss=$2 lim=$3
	((lim > 0 && rss > 0)) || return 0
	local frac
	frac=$(awk -v r="$rss" -v l="$lim" 'BEGIN {printf "%.4f", r / l}')
	if awk -v f="$frac" -v w="$MEM_WORST" 'BEGIN {exit !(f > w)}'; then
		MEM_WORST=$frac MEM_WORST_CASE="$name ($(rss_text "$rss") of $(rss_text "$lim"))"
	fi
}

# mem_limit VIRTUAL_BYTES [CLUSTER_BYTES]: 64 MiB + 1 bit per cluster, in KiB.
mem_limit() { awk -v v="$1" -v c="${2:-65536}" 'BEGIN {printf "%d", 65536 + v / c / 8 / 1024}'; }

# report: the memory row, the table (printed, and written into DOC), and
# the exit status; it ends the run.
report() {
	if [[ -n $MEM_WORST_CASE ]]; then
		record "memory: worst peak RSS / allowed" "$MEM_WORST" 1 1.0 "$MEM_WORST_CASE"
	fi
	DATE=$(date -u +%Y-%m-%d)
	table() {
		echo "| case | ours (s) | limit (s) | ratio | target | peak RSS | result | date |"
		echo "|---|---:|---:|---:|---:|---:|---|---|"
		local r
		for r in "${ROWS[@]}"; do
			IFS='|' read -r name ours limit ratio target rss verdict <<<"$r"
			echo "| $name | $ours | $limit | $ratio | ≤ $target | $rss | $verdict | $DATE |"
		done
	}
	echo
	table
	echo
	echo "$(nproc) cores, $(uname -r), images in $parent, median of $RUNS interleaved runs, $MISSES case(s) missed"
	if [[ $QUICK == 1 ]]; then
		echo "quick mode: the images are tiny, so process start-up dominates and the ratios say nothing about speed"
	fi

	if [[ -n $DOC && -f $DOC ]] && grep -q '<!-- bench:begin -->' "$DOC"; then
		tmp=$DOC.tmp.$$
		{
			sed '/<!-- bench:begin -->/q' "$DOC"
			table
			echo
			echo "Measured $DATE: $(nproc) cores, kernel $(uname -r), images in $parent, median of $RUNS interleaved runs."
			sed -n '/<!-- bench:end -->/,$p' "$DOC"
		} >"$tmp" && mv "$tmp" "$DOC"
		say "table written to $DOC"
	fi

	if [[ ${BENCH_STRICT:-0} == 1 && $MISSES -gt 0 ]]; then
		exit 1
	fi
	exit 0
}

# Images ---------------------------------------------------------------

say() { echo "bench: $*" >&2; }
mib() { echo $(($1 << 20)); }

say "images in $DIR (${RUNS} runs per case)"
RAND=$DIR/rand.img
dd if=/dev/urandom of="$RAND" bs=1M count="$MIB1G" status=none

# quarter FILE SIZE_MIB: a sparse file of SIZE_MIB with 25 % data in runs:
# each 1/64 of the disk holds a quarter of data, at a varying offset.
quarter() {
	local file=$1 size=$2 slot run i off src
	truncate -s "${size}M" "$file"
	slot=$(((size << 20) / 64)) run=$((slot / 4))
	for ((i = 0; i < 64; i++)); do
		off=$((i * slot + (i % 4) * run))
		src=$(((i * run) % ((MIB1G << 20) - run)))
		dd if="$RAND" of="$file" bs=64K iflag=skip_bytes,count_bytes oflag=seek_bytes \
			skip=$src seek=$off count=$run conv=notrunc status=none
	done
}

# change FILE PERCENT: overwrites PERCENT % of the 64 KiB clusters of FILE,
# scattered (deterministic), with random data.
change() {
	local file=$1 pct=$2 clusters n i c seed=12345
	clusters=$(($(stat -c %s "$file") >> 16))
	n=$((clusters * pct / 100))
	((n > 0)) || n=1
	for ((i = 0; i < n; i++)); do
		seed=$(((seed * 1103515245 + 12345) % 2147483648))
		c=$((seed % clusters))
		dd if="$RAND" of="$file" bs=64K skip=$((i % (MIB1G * 16))) seek=$c count=1 conv=notrunc status=none
	done
}

# Loop devices (the block device cases) need root and losetup.
loop_ok=""
if [[ $(id -u) != 0 ]]; then
	loop_ok="loop devices need root"
elif ! have losetup; then
	loop_ok="losetup is not installed"
fi

# thin_disk FILE SIZE RUNS RUN_MIB: a sparse FILE of SIZE bytes holding RUNS
# runs of RUN_MIB MiB of $RAND spread over it at 2 MiB-aligned offsets (a
# VHD's 2 MiB blocks then allocate exactly the data); the runs' offsets, in
# MiB, go to THIN_OFFS.
thin_disk() {
	local file=$1 size=$2 runs=$3 run_mib=$4 slot off i
	THIN_OFFS=()
	truncate -s "$size" "$file"
	slot=$((size / runs / (2 << 20)))
	for ((i = 0; i < runs; i++)); do
		off=$(((i * slot + (i % 3)) * 2))
		THIN_OFFS+=("$off")
		dd if="$RAND" of="$file" bs=1M count="$run_mib" skip=$(((i * run_mib) % (MIB1G - run_mib))) \
			seek="$off" conv=notrunc status=none
	done
}

# dd_runs [--buffered] DEV RUN_MIB OFFSETS...: the limit of the thin-disk
# cases, dd reading runs of RUN_MIB MiB at those offsets (MiB) from DEV,
# with O_DIRECT unless --buffered.
dd_runs() {
	local flags=direct,skip_bytes
	if [[ $1 == --buffered ]]; then flags=skip_bytes; shift; fi
	local dev=$1 run_mib=$2
	shift 2
	echo "for o in $*; do dd if=$dev of=/dev/null bs=4M iflag=$flags skip=\$((o << 20)) count=$((run_mib / 4)) status=none; done"
}

# skip_rows TARGET WHY ROW...: every row of a case that cannot run here.
skip_rows() {
	local target=$1 why=$2 r
	shift 2
	for r; do skip "$r" "$target" "$why"; done
}

# thin_loop FILE: a loop device over FILE that reads it with O_DIRECT (as a
# device on a host: no page cache of the backing file between runs).
thin_loop() { losetup --show -f --direct-io=on "$1" 2>/dev/null || losetup --show -f "$1"; }

# dev_prep DEV...: the command that empties the caches of the devices (and,
# as root, the page cache) before a run.
dev_prep() {
	local c="sync" d
	for d; do c+=" && blockdev --flushbufs $d"; done
	[[ -w /proc/sys/vm/drop_caches ]] && c+=" && echo 3 >/proc/sys/vm/drop_caches"
	echo "$c"
}

# device_reads NAME DEV CMD ALLOCATED: one run of CMD after emptying DEV's
# cache, and the bytes DEV's counter says it read against the allocated
# bytes: 1.00 is each allocated byte read once (the O_DIRECT open's two
# 4 KiB alignment probes are below the rounding).
device_reads() {
	local name=$1 dev=$2 cmd=$3 alloc=$4 before after
	run "$(dev_prep "$dev")"
	before=$(awk '{print $3}' "/sys/block/${dev#/dev/}/stat")
	run "$cmd | cat >/dev/null"
	after=$(awk '{print $3}' "/sys/block/${dev#/dev/}/stat")
	record "$name" "$(((after - before) * 512))" "$alloc" 1.0 "-"
}

if [[ -n $ONLY ]]; then
	# shellcheck source=/dev/null
	source "$ROOT/tests/bench/$ONLY.sh"
	report
fi

Q4=$DIR/q25-4g.img
quarter "$Q4" "$MIB4G"
BASE=$DIR/base-4g.img
SRC=$DIR/src-4g.img
cp --sparse=always "$Q4" "$BASE"
cp --sparse=always "$Q4" "$SRC"
change "$SRC" 2

say "export"
V1=$((MIB1G << 20)) V4=$((MIB4G << 20))
bench "export ${MIB1G} MiB random" 0.35 \
	"$OURS stream --source $RAND | cat >/dev/null" \
	"cat $RAND | cat >/dev/null" : "$(mem_limit $V1)"

run "$BIN stream --source $Q4 --destination file://$DIR/q25-4g.qcow2"
bench "export ${MIB4G} MiB, 25 % data in runs" 0.5 \
	"$OURS stream --source $Q4 | cat >/dev/null" \
	"cat $DIR/q25-4g.qcow2 | cat >/dev/null" : "$(mem_limit $V4)"

bench "export diff of ${MIB4G} MiB, 2 % changed" 0.6 \
	"$OURS stream --source $SRC --relative-to $BASE | cat >/dev/null" \
	"cat $SRC $BASE >/dev/null" : "$(mem_limit $V4)"

# Block device: a loop device with direct I/O over a file on /dev/shm.
loopdev() {
	local dev
	dev=$(losetup --show -f --direct-io=on "$1" 2>"$DIR/stderr") || return 1
	echo "$dev"
}
Q1=$DIR/q25-1g.img Q1A=$DIR/q25-1g-allocated.img
quarter "$Q1" "$MIB1G"
# The device behind the loop is fully allocated, its empty three quarters
# stored zeros: a block device has no holes, every byte of it reads at the
# device's speed. Holes of a tmpfs file read at twice the speed of data,
# which made dd of the device (the limit) cheap where our first pass reads
# the same cheap holes but our second pass re-reads only the dear data; the
# target's model (one pass at the device's speed plus a quarter) assumes
# every byte costs the same. The allocation map still comes from the sparse
# file: it names the data runs.
cp --sparse=never "$Q1" "$Q1A"
# loopdev runs in a command substitution (a subshell): the devices are
# recorded for cleanup here, in the shell that runs the EXIT trap.
DEV1="" DEVQ=""
if [[ -z $loop_ok ]] && DEV1=$(loopdev "$RAND"); then LOOPS+=("$DEV1"); fi
if [[ -n $DEV1 ]] && DEVQ=$(loopdev "$Q1A"); then LOOPS+=("$DEVQ"); fi
if [[ -n $DEV1 && -n $DEVQ ]]; then
	say "block device"
	bench "loop --direct ${MIB1G} MiB full" 2.1 \
		"$OURS stream --direct --source $DEV1 | cat >/dev/null" \
		"dd if=$DEV1 iflag=direct bs=4M of=/dev/null status=none" : "$(mem_limit $V1)"
	bench "loop --direct ${MIB1G} MiB, 25 % data" 1.3 \
		"$OURS stream --direct --source $DEVQ | cat >/dev/null" \
		"dd if=$DEVQ iflag=direct bs=4M of=/dev/null status=none" : "$(mem_limit $V1)"
	if have qemu-img; then
		qemu-img map --output=json -f raw "$Q1" >"$DIR/q1.map"
		alloc=$(awk 'BEGIN {RS = "},"} /"data": true/ {match($0, /"length": [0-9]+/); s += substr($0, RSTART + 10, RLENGTH - 10)} END {print s}' "$DIR/q1.map")
		# The limit reads as many bytes of data as the map allocates, at
		# the device's speed: from $DEV1, the same kind of device, full of
		# data (the first bytes of $DEVQ are three quarters zeros).
		bench "loop --direct ${MIB1G} MiB, 25 %, allocation map" 1.1 \
			"$OURS stream --direct --source $DEVQ --allocation-map $DIR/q1.map | cat >/dev/null" \
			"dd if=$DEV1 iflag=direct bs=4M count=$((alloc >> 22)) of=/dev/null status=none" : "$(mem_limit $V1)"
	else
		skip "loop --direct ${MIB1G} MiB, 25 %, allocation map" 1.1 "qemu-img not installed"
	fi
else
	why=${loop_ok:-"losetup refused: $(head -n 1 "$DIR/stderr" 2>/dev/null)"}
	skip "loop --direct ${MIB1G} MiB full" 2.1 "$why"
	skip "loop --direct ${MIB1G} MiB, 25 % data" 1.3 "$why"
	skip "loop --direct ${MIB1G} MiB, 25 %, allocation map" 1.1 "$why"
fi

# xapi's own command lines on the loop devices (tests/bench/xapi-argv.sh).
# shellcheck source=tests/bench/xapi-argv.sh
source "$ROOT/tests/bench/xapi-argv.sh"

# Import: only once serve imports qcow2 (probe with a tiny image).
run "$BIN stream --source $RAND --destination file://$DIR/rand.qcow2"
OUT=$DIR/out.raw
# import_cmd OUT: our import of stdin into OUT.
import_cmd() { echo "$OURS serve --source-format qcow2 --source-protocol none --source stdin: --destination file://$1 --destination-format raw"; }
truncate -s 1M "$DIR/probe.img"
run "$BIN stream --source $DIR/probe.img --destination file://$DIR/probe.qcow2"
if eval "$(import_cmd "$DIR/probe.out") <$DIR/probe.qcow2" 2>"$DIR/stderr" && cmp -s "$DIR/probe.img" "$DIR/probe.out"; then
	say "import"
	bench "import ${MIB1G} MiB full from a pipe" 1.0 \
		"cat $DIR/rand.qcow2 | $(import_cmd "$OUT")" \
		"cat $DIR/rand.qcow2 | cat >$OUT" "rm -f $OUT" "$(mem_limit $V1)"
	run "cat $DIR/rand.qcow2 | $(import_cmd "$OUT") && cmp $RAND $OUT && rm -f $OUT"
	if have qemu-img; then
		bench "import ${MIB4G} MiB, 25 % data, from a pipe" 1.0 \
			"cat $DIR/q25-4g.qcow2 | $(import_cmd "$OUT")" \
			"qemu-img convert -f qcow2 -O raw $DIR/q25-4g.qcow2 $OUT" "rm -f $OUT" "$(mem_limit $V4)"
		run "cat $DIR/q25-4g.qcow2 | $(import_cmd "$OUT") && cmp $Q4 $OUT && rm -f $OUT"
	else
		skip "import ${MIB4G} MiB, 25 % data, from a pipe" 1.0 "qemu-img not installed"
	fi
	IMPORT=1
else
	why="serve does not import qcow2 yet: $(head -n 1 "$DIR/stderr")"
	skip "import ${MIB1G} MiB full from a pipe" 1.0 "$why"
	skip "import ${MIB4G} MiB, 25 % data, from a pipe" 1.0 "$why"
	IMPORT=0
fi
rm -f "$OUT" "$DIR"/probe.*

# Scale: a huge sparse disk with a few MiB of data, some past 4 TiB. The
# limit is the time bound itself; RSS and allocation are checked too.
say "scale"
rm -f "$BASE" "$SRC" "$Q1" "$Q1A"
BIG=$DIR/big.img
if truncate -s "$SCALE" "$BIG" 2>"$DIR/stderr"; then
	data=0
	past4t=$((4 << 40)) # the L1 table spans several clusters past 4 TiB
	((past4t < SCALE / 2)) || past4t=$((SCALE / 4 + (5 << 20)))
	OFFS="0 $past4t $((SCALE / 2 + (3 << 20))) $((SCALE - (1 << 20)))"
	for off in $OFFS; do
		dd if="$RAND" of="$BIG" bs=1M count=1 oflag=seek_bytes seek=$off conv=notrunc status=none
		data=$((data + (1 << 20)))
	done
	scale_name=$(awk -v s="$SCALE" 'BEGIN {printf "%d TiB", s / 2^40}')
	t=$(timed "$(ours_rss "$OURS stream --source $BIG | cat >$DIR/big.qcow2")") || exit 1
	rss=$(peak_rss)
	record "scale: export $scale_name sparse, 4 MiB data" "$t" "$SCALE_LIMIT" 1.0 "$(rss_text "$rss")"
	mem_check "scale export" "$rss" $((128 << 10))
	if ((IMPORT)); then
		t=$(timed "$(ours_rss "cat $DIR/big.qcow2 | $(import_cmd "$DIR/big.out")")") || exit 1
		rss=$(peak_rss)
		record "scale: import $scale_name sparse, 4 MiB data" "$t" "$SCALE_LIMIT" 1.0 "$(rss_text "$rss")"
		mem_check "scale import" "$rss" $((128 << 10))
		used=$(($(stat -c %b "$DIR/big.out") * $(stat -c %B "$DIR/big.out")))
		record "scale: imported allocation / data bytes" "$used" "$data" 1.0 "-"
		# Judge only where the data is (reading terabytes of holes would
		# take minutes): same size, same bytes at each data run.
		[[ $(stat -c %s "$DIR/big.out") == "$SCALE" ]] || die "scale import: $DIR/big.out has the wrong size"
		for off in $OFFS; do
			run "cmp -n $((1 << 20)) -i $off:$off $BIG $DIR/big.out"
		done
	else
		skip "scale: import $scale_name sparse, 4 MiB data" 1.0 "serve does not import qcow2 yet"
	fi
else
	skip "scale: export sparse" 1.0 "cannot create a $SCALE-byte sparse file here"
fi

# The hybrid source: allocation read from the VHD or qcow2 behind the VDI.
source "$ROOT/tests/bench/hybrid.sh"
source "$ROOT/tests/bench/discovery.sh" # xapi's argv, the image found behind the device
source "$ROOT/tests/bench/map.sh" # map of a fragmented image, against qemu-img map
source "$ROOT/tests/bench/nbd.sh" # nbdhybrid: allocation from an NBD server

report

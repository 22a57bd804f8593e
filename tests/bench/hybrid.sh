# The hybrid source (issues 15 and 18), sourced by bench.sh after its other
# cases (alone with BENCH_ONLY=hybrid): a thin VDI — a loop device over a
# sparse file — with a VHD and a qcow2 image behind it that each allocate
# the same data runs (1 GiB of 64 GiB; quick: 16 MiB of 1 GiB). The export
# takes its allocation from the image, trusts it and reads only those runs
# from the device, once; the limit is dd reading the same runs from the
# same device. The device is a loop device over a file on a disk
# (bench.sh: thin_loop), its caches emptied before every run (dev_prep).
# The device's read counter (/sys/block/loopN/stat, field 3) shows the
# bytes one export reads. Uses bench.sh's helpers and
# images ($RAND, $DIR, bench, record, skip, LOOPS).

hybrid_cases() {
	local thin runs run_mib dev raw=$DEVDIR/thin.raw img offs=()
	# Few long runs: the limit starts one dd per run, and on a loaded
	# machine 64 starts of dd cost more than the reads.
	if [[ $QUICK == 1 ]]; then
		thin=$((1 << 30)) runs=4 run_mib=4
	else
		thin=$((64 << 30)) runs=8 run_mib=128
	fi
	local name="$((thin >> 30)) GiB thin, $((runs * run_mib)) MiB allocated"
	local rows=("hybrid VHD $name: first byte" "hybrid VHD $name: total"
		"hybrid VHD: device bytes read / allocated"
		"hybrid qcow2 $name: first byte" "hybrid qcow2 $name: total"
		"hybrid qcow2: device bytes read / allocated"
		"hybrid VHD $name, --buffered: total"
		"hybrid VHD vs full scan of the device" "hybrid qcow2 vs qemu-img map+info+hinted export")
	local why=""
	if ! have qemu-img; then
		why="qemu-img not installed"
	elif [[ -n $loop_ok ]]; then
		why=$loop_ok
	elif ! have blockdev; then
		why="blockdev not installed"
	fi
	if [[ -n $why ]]; then
		skip_rows 1.2 "$why" "${rows[@]}"
		return 0
	fi
	say "hybrid source"
	thin_disk "$raw" "$thin" "$runs" "$run_mib"
	offs=("${THIN_OFFS[@]}")
	run "qemu-img convert -f raw -O vpc -o subformat=dynamic,force_size=on $raw $DIR/thin.vhd"
	run "qemu-img convert -f raw -O qcow2 $raw $DIR/thin.qcow2"
	if ! dev=$(thin_loop "$raw" 2>"$DIR/stderr"); then
		skip_rows 1.2 "losetup refused: $(head -n 1 "$DIR/stderr")" "${rows[@]}"
		rm -f "$raw" "$DIR"/thin.*
		return 0
	fi
	LOOPS+=("$dev")
	local prep
	prep=$(dev_prep "$dev")
	# Block devices are read with O_DIRECT by default (issue 11), as xapi's
	# --direct asks anyway: the limit reads the runs with dd iflag=direct.
	# The export has no allocation pass: the tables, then each allocated
	# cluster read once and sent (issue 18), two reads in flight where dd
	# has one.
	local dd_direct dd_alloc
	dd_direct=$(dd_runs "$dev" "$run_mib" "${offs[@]}")
	dd_alloc=$(dd_runs --buffered "$dev" "$run_mib" "${offs[@]}")
	local mem
	mem=$(mem_limit "$thin")
	for fmt in VHD qcow2; do
		img=$DIR/thin.${fmt,,}
		local cmd="$OURS stream --source-format hybrid --source $dev:$img"
		bench_first_byte "hybrid $fmt $name: first byte" 1.2 "$cmd" "$dd_direct" "$prep"
		bench "hybrid $fmt $name: total" 1.1 "$cmd | cat >/dev/null" "$dd_direct" "$prep" "$mem"
		device_reads "hybrid $fmt: device bytes read / allocated" "$dev" "$cmd" "$((runs * run_mib << 20))"
	done
	# Through the page cache: the runs are sent by sendfile, as they are
	# read; the limit is a buffered dd.
	bench "hybrid VHD $name, --buffered: total" 1.2 \
		"$OURS stream --buffered --source-format hybrid --source $dev:$DIR/thin.vhd | cat >/dev/null" "$dd_alloc" "$prep" "$mem"
	# What an export of this VDI costs without the hybrid source: a scan
	# of the whole device, or (xapi today, qcow2-backed VDIs only) two runs
	# of qemu-img for a map and an info, then the hinted export. The ratio
	# is hybrid / that, so below 1 is better.
	# A full scan reads the whole thin disk: once is enough to see it.
	RUNS=1 bench "hybrid VHD vs full scan of the device" 1.0 \
		"$OURS stream --source-format hybrid --source $dev:$DIR/thin.vhd | cat >/dev/null" \
		"$OURS stream --source $dev | cat >/dev/null" "$prep"
	bench "hybrid qcow2 vs qemu-img map+info+hinted export" 1.0 \
		"$OURS stream --source-format hybrid --source $dev:$DIR/thin.qcow2 | cat >/dev/null" \
		"qemu-img map --output=json $DIR/thin.qcow2 >$DIR/thin.map && qemu-img info --output=json $DIR/thin.qcow2 >$DIR/thin.info && $OURS stream --source $dev --allocation-map $DIR/thin.map --allocation-info $DIR/thin.info | cat >/dev/null" \
		"$prep"
	run "$OURS stream --source-format hybrid --source $dev:$DIR/thin.vhd --destination file://$DIR/thin.out.qcow2"
	run "qemu-img compare -f qcow2 -F raw $DIR/thin.out.qcow2 $raw"
	losetup -d "$dev"
	rm -f "$raw" "$DIR"/thin.*
}

hybrid_cases

# The nbdhybrid source (issue 20), sourced by bench.sh after the hybrid
# cases (alone with BENCH_ONLY=nbd): a thin VDI — a loop device over a
# sparse file, 1 GiB of data in 8 runs of 64 GiB (quick: 16 MiB of 1 GiB)
# — served as qcow2 by qemu-nbd on a unix socket, as xapi's nbdhybrid form
# names it. The export asks the server for base:allocation block status
# (1 GiB windows) and reads only the data runs from the device, once; the
# limit is dd reading the same runs from the same device with O_DIRECT.
# The device is a loop device over a file on a disk (bench.sh: thin_loop),
# its caches emptied before every run (dev_prep). Compared too: a
# full scan of the device, and nbdinfo --map (libnbd) turned into a
# qemu-img map hint for a hinted export. Uses bench.sh's helpers ($RAND,
# $DIR, bench, bench_first_byte, device_reads, record, skip, LOOPS).

nbd_cases() {
	local thin runs run_mib dev raw=$DEVDIR/nbd-thin.raw img=$DIR/nbd-thin.qcow2 sock=$DIR/nbd.sock offs=() i
	if [[ $QUICK == 1 ]]; then
		thin=$((1 << 30)) runs=4 run_mib=4
	else
		thin=$((64 << 30)) runs=8 run_mib=128
	fi
	local name="$((thin >> 30)) GiB thin, $((runs * run_mib)) MiB allocated"
	local rows=("nbdhybrid qemu-nbd $name: first byte" "nbdhybrid qemu-nbd $name: total"
		"nbdhybrid: device bytes read / allocated"
		"nbdhybrid vs full scan of the device" "nbdhybrid vs nbdinfo --map + hinted export")
	local why=""
	if ! have qemu-img || ! have qemu-nbd; then
		why="qemu-img or qemu-nbd not installed (qemu-utils)"
	elif ! have nbdinfo; then
		why="nbdinfo not installed (libnbd-bin)"
	elif [[ -n $loop_ok ]]; then
		why=$loop_ok
	elif ! have blockdev; then
		why="blockdev not installed"
	fi
	if [[ -n $why ]]; then
		skip_rows 1.2 "$why" "${rows[@]}"
		return 0
	fi
	say "nbdhybrid source"
	thin_disk "$raw" "$thin" "$runs" "$run_mib"
	offs=("${THIN_OFFS[@]}")
	run "qemu-img convert -f raw -O qcow2 $raw $img"
	if ! dev=$(thin_loop "$raw" 2>"$DIR/stderr"); then
		skip_rows 1.2 "losetup refused: $(head -n 1 "$DIR/stderr")" "${rows[@]}"
		rm -f "$raw" "$img"
		return 0
	fi
	LOOPS+=("$dev")
	qemu-nbd -r -k "$sock" --persistent -f qcow2 -x vdi "$img" 2>"$DIR/qemu-nbd.log" &
	local server=$!
	trap 'kill '"$server"' 2>/dev/null; cleanup' EXIT
	for ((i = 0; i < 100; i++)); do [[ -S $sock ]] && break; sleep 0.05; done
	local prep
	prep=$(dev_prep "$dev")
	local dd_direct
	dd_direct=$(dd_runs "$dev" "$run_mib" "${offs[@]}")
	local src="$dev:$sock:vdi:$thin" mem
	mem=$(mem_limit "$thin")
	local cmd="$OURS stream --source-format nbdhybrid --source $src"
	bench_first_byte "nbdhybrid qemu-nbd $name: first byte" 1.2 "$cmd" "$dd_direct" "$prep"
	bench "nbdhybrid qemu-nbd $name: total" 1.2 "$cmd | cat >/dev/null" "$dd_direct" "$prep" "$mem"
	device_reads "nbdhybrid: device bytes read / allocated" "$dev" "$cmd" "$((runs * run_mib << 20))"
	# Without the server's allocation: a scan of the whole device; or the
	# map from nbdinfo --map (base:allocation, the same question) written
	# as qemu-img map JSON, then a hinted export. Ratios below 1 are better.
	RUNS=1 bench "nbdhybrid vs full scan of the device" 1.0 "$cmd | cat >/dev/null" \
		"$OURS stream --source $dev | cat >/dev/null" "$prep"
	local to_map="sed -E 's/\"offset\"/\"start\"/; s/\"type\": 0,/\"depth\": 0, \"present\": true, \"zero\": false, \"data\": true,/; s/\"type\": [0-9]+,/\"depth\": 0, \"present\": false, \"zero\": true, \"data\": false,/'"
	bench "nbdhybrid vs nbdinfo --map + hinted export" 1.0 "$cmd | cat >/dev/null" \
		"nbdinfo --map --json 'nbd+unix:///vdi?socket=$sock' | $to_map >$DIR/nbd.map && $OURS stream --source $dev --allocation-map $DIR/nbd.map | cat >/dev/null" \
		"$prep"
	run "$cmd --destination file://$DIR/nbd-out.qcow2"
	run "qemu-img compare -f qcow2 -F raw $DIR/nbd-out.qcow2 $raw"
	kill "$server" 2>/dev/null || true
	wait "$server" 2>/dev/null || true
	trap cleanup EXIT
	losetup -d "$dev"
	rm -f "$raw" "$img" "$DIR"/nbd-out.qcow2 "$DIR"/nbd.map
}

nbd_cases

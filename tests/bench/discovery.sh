# Sourced by bench.sh: discovery (issue 19). xapi's exact argv —
# `qcow2-to-stdout.py DEVICE` and `... DEVICE --diff BASE_DEVICE`, no hint —
# on thin loop devices (sparse files) with an image behind them that the
# binary finds itself, as on a host: each command runs in a private mount
# namespace where /proc/devices names the loop major "tapdev", a stand-in
# /usr/sbin/tap-ctl prints tap-ctl's line for the device's minor, and /dev
# is a tmpfs holding /dev/sm/backend/SR/VDI → the tapdev node (the tests'
# xapiHost, in shell). The limit, dd reading the allocated runs from the
# same device with O_DIRECT, runs in the same namespace, so that both pay
# for building it.
#
# Cases: 64 GiB thin (quick: 1 GiB) with 1 GiB allocated (quick: 16 MiB)
# behind a dynamic VHD, then behind a qcow2 chain of two images (the base
# holds the first half of the runs, the top the second, written by
# qemu-io); the --diff of the
# chain's top against a device showing its base; against today's full scan
# (--no-discovery). Then the largest disk a dynamic VHD can describe —
# 2040 GiB (qemu's VHD limit, 0xff000000 sectors, just under the 2 TiB of
# the specification) — with 1 GiB allocated (quick: 16 MiB): its first byte
# within 1 s, its total within 1.2 x dd of the allocated runs. The full scan
# of that device is not run: it would read 2040 GiB (the 64 GiB scan's
# rate gives the time it would take).
#
# The thin disks are files on a disk ($DEVDIR) behind direct-io loop
# devices (thin_disk, thin_loop), their caches emptied before every run
# (dev_prep); the device's read counter gives the bytes one export reads
# (device_reads). Uses from bench.sh: BIN DIR DEVDIR QUICK RAND MIB1G
# loop_ok LOOPS THIN_OFFS and its functions (bench bench_first_byte
# device_reads thin_disk thin_loop dev_prep record skip run say have
# mem_limit).

DISC_NS_SCRIPT='set -e
mount --bind "$DISC/devices" /proc/devices
mount -t overlay overlay -o lowerdir="$DISC/standins":/usr/sbin /usr/sbin
mount --bind /dev/shm "$DISC_SHM"
mount -t tmpfs -o size=1m,mode=755 tmpfs /dev
mkdir /dev/shm
mount --move "$DISC_SHM" /dev/shm
mknod -m 666 /dev/null c 1 3
. "$DISC/dev.sh"
exec sh -c "$1"'

# disc_ns CMD: runs the shell command CMD on the simulated host. The
# images may be on /dev/shm: it is carried over into the new /dev.
disc_ns() { DISC=$DISC DISC_SHM=$DISC_SHM unshare -m --propagation private sh -c "$DISC_NS_SCRIPT" sh "$1"; }

# disc_host: the namespace's files, with no device yet.
disc_host() {
	DISC=$DIR/disc
	# Where /dev/shm waits while /dev is replaced: any directory outside
	# /dev, covered in the private namespace only.
	DISC_SHM=$DISC/shm-mountpoint
	[[ $DISC != /dev/* ]] || DISC_SHM=/mnt
	mkdir -p "$DISC/standins" "$DISC_SHM"
	awk '/^Block devices/ {b = 1} b && $2 == "loop" {sub(/loop/, "tapdev")} {print}' /proc/devices >"$DISC/devices"
	: >"$DISC/tapdisks" && : >"$DISC/dev.sh"
	cat >"$DISC/standins/tap-ctl" <<EOF
#!/bin/sh
[ "\$1" = list ] || exit 1
shift; minor=
while [ \$# -gt 0 ]; do case "\$1" in -m) minor=\$2; shift 2 ;; *) shift ;; esac; done
exec awk -v minor="\$minor" '{ m = \$2; sub(/^minor=/, "", m) } minor == "" || m == minor' "$DISC/tapdisks"
EOF
	chmod +x "$DISC/standins/tap-ctl"
	ln -sf "$BIN" "$DISC/qcow2-to-stdout.py"
	Q2S=$DISC/qcow2-to-stdout.py
}

# disc_vdi DEV NAME DRIVER:IMAGE: attaches DEV as blktap does, served by
# a tapdisk with those args; prints the /dev/sm/backend path.
disc_vdi() {
	local maj min
	maj=$((0x$(stat -c %t "$1"))) min=$((0x$(stat -c %T "$1")))
	echo "mkdir -p /dev/xen/blktap-2 /dev/sm/backend/sr && mknod /dev/xen/blktap-2/tapdev$min b $maj $min && ln -s /dev/xen/blktap-2/tapdev$min /dev/sm/backend/sr/$2" >>"$DISC/dev.sh"
	echo "pid=$((1000 + min)) minor=$min state=0 args=$3" >>"$DISC/tapdisks"
	echo "/dev/sm/backend/sr/$2"
}

# disc_check OUT RAW: the last export equals the device's content.
disc_check() { run "qemu-img compare -q -f qcow2 -F raw $1 $2"; }

discovery_cases() {
	local thin runs run_mib big_runs big_mib
	if [[ $QUICK == 1 ]]; then
		thin=$((1 << 30)) runs=4 run_mib=4 big_runs=4 big_mib=4
	else
		thin=$((64 << 30)) runs=8 run_mib=128 big_runs=8 big_mib=128
	fi
	local big=$((2040 << 30))
	local name="$((thin >> 30)) GiB thin, $((runs * run_mib)) MiB allocated"
	local bname="2040 GiB thin VHD, $((big_runs * big_mib)) MiB allocated"
	local rows=("discovery VHD $name: first byte|1.2" "discovery VHD $name: total|1.2"
		"discovery VHD: device bytes read / allocated|1.0"
		"discovery qcow2 chain $name: first byte|1.2" "discovery qcow2 chain $name: total|1.2"
		"discovery qcow2 chain: device bytes read / allocated|1.0"
		"discovery qcow2 chain --diff (top $((runs / 2 * run_mib)) MiB): total|1.2"
		"discovery VHD vs today's full scan of the device|1.0"
		"discovery $bname: first byte (s)|1.0" "discovery $bname: total|1.2")
	local why="" r
	if ! have qemu-img; then
		why="qemu-img not installed"
	elif [[ -n $loop_ok ]]; then
		why=$loop_ok
	elif ! have unshare || ! have blockdev || ! have qemu-io; then
		why="unshare, blockdev or qemu-io not installed"
	elif ! unshare -m --propagation private true 2>/dev/null; then
		why="unshare -m refused here"
	fi
	if [[ -n $why ]]; then
		for r in "${rows[@]}"; do skip "${r%|*}" "${r##*|}" "$why"; done
		return 0
	fi
	say "discovery (xapi's argv, no hint, image found behind the device)"
	disc_host
	local raw=$DEVDIR/disc.raw half=$DEVDIR/disc-half.raw offs=() i
	thin_disk "$raw" "$thin" "$runs" "$run_mib"
	offs=("${THIN_OFFS[@]}")
	run "qemu-img convert -f raw -O vpc -o subformat=dynamic,force_size=on $raw $DIR/disc.vhd"
	# The chain: the base holds the first half of the runs, the top what
	# differs from it (the second half).
	cp --sparse=always "$raw" "$half"
	for ((i = runs / 2; i < runs; i++)); do
		run "fallocate -p -o $((offs[i] << 20)) -l $((run_mib << 20)) $half"
	done
	run "qemu-img convert -f raw -O qcow2 $half $DIR/disc-base.qcow2"
	# (qemu-img convert -B would store every run in the top again: it
	# leaves out only what the source does not allocate.)
	run "qemu-img create -q -f qcow2 -b disc-base.qcow2 -F qcow2 $DIR/disc-top.qcow2 $thin"
	for ((i = runs / 2; i < runs; i++)); do
		run "dd if=$raw of=$DIR/disc-run bs=1M skip=${offs[i]} count=$run_mib status=none"
		run "qemu-io -f qcow2 -c 'write -q -s $DIR/disc-run ${offs[i]}M ${run_mib}M' $DIR/disc-top.qcow2"
	done
	rm -f "$DIR/disc-run"
	run "qemu-img compare -q -f qcow2 -F raw $DIR/disc-top.qcow2 $raw"
	local dv dq db
	dv=$(thin_loop "$raw") && LOOPS+=("$dv")
	dq=$(thin_loop "$raw") && LOOPS+=("$dq")
	db=$(thin_loop "$half") && LOOPS+=("$db")
	local vdi_v vdi_q vdi_b
	vdi_v=$(disc_vdi "$dv" vhd-vdi "vhd:$DIR/disc.vhd")
	vdi_q=$(disc_vdi "$dq" qcow2-vdi "qcow2:$DIR/disc-top.qcow2")
	vdi_b=$(disc_vdi "$db" qcow2-base "qcow2:$DIR/disc-base.qcow2")
	local prep
	prep=$(dev_prep "$dv" "$dq" "$db")
	local mem
	mem=$(mem_limit "$thin")
	local vdi dev label
	for label in VHD "qcow2 chain"; do
		if [[ $label == VHD ]]; then vdi=$vdi_v dev=$dv; else vdi=$vdi_q dev=$dq; fi
		local limit
		limit="disc_ns '$(dd_runs "$vdi" "$run_mib" "${offs[@]}")'"
		bench_first_byte "discovery $label $name: first byte" 1.2 "disc_ns '$Q2S $vdi'" "$limit" "$prep"
		bench "discovery $label $name: total" 1.2 "disc_ns '$Q2S $vdi | cat >/dev/null'" "$limit" "$prep" "$mem"
		device_reads "discovery $label: device bytes read / allocated" "$dev" "disc_ns '$Q2S $vdi'" "$((runs * run_mib << 20))"
		run "disc_ns '$Q2S $vdi' >$DIR/disc.out.qcow2"
		disc_check "$DIR/disc.out.qcow2" "$raw"
	done
	# The diff of the chain's top against its base's device: what the top
	# allocates (the second half of the runs) is the limit.
	bench "discovery qcow2 chain --diff (top $((runs / 2 * run_mib)) MiB): total" 1.2 \
		"disc_ns '$Q2S $vdi_q --diff $vdi_b | cat >/dev/null'" \
		"disc_ns '$(dd_runs "$vdi_q" "$run_mib" "${offs[@]:runs/2}")'" "$prep"
	run "disc_ns '$Q2S $vdi_q --diff $vdi_b -v' >$DIR/disc.diff.qcow2 2>$DIR/disc.log"
	grep -q 'allocation=qcow2' "$DIR/disc.log" || die "the diff did not use the chains: $(cat "$DIR/disc.log")"
	[[ -n ${BENCH_VERBOSE:-} ]] && cat "$DIR/disc.log" >&2
	run "qemu-img rebase -u -b $half -F raw $DIR/disc.diff.qcow2"
	disc_check "$DIR/disc.diff.qcow2" "$raw"
	# Today: no hint, so the whole device is read. Once is enough.
	RUNS=1 bench "discovery VHD vs today's full scan of the device" 1.0 \
		"disc_ns '$Q2S $vdi_v | cat >/dev/null'" "disc_ns '$Q2S $vdi_v --no-discovery | cat >/dev/null'" "$prep"
	losetup -d "$dv" "$dq" "$db"
	rm -f "$raw" "$half" "$DIR"/disc.vhd "$DIR"/disc-base.qcow2 "$DIR"/disc-top.qcow2 "$DIR"/disc.out.qcow2 "$DIR"/disc.diff.qcow2

	# The size of the disk stops mattering.
	: >"$DISC/tapdisks" && : >"$DISC/dev.sh"
	local bigraw=$DEVDIR/disc-big.raw boffs=()
	thin_disk "$bigraw" "$big" "$big_runs" "$big_mib"
	boffs=("${THIN_OFFS[@]}")
	run "qemu-img convert -f raw -O vpc -o subformat=dynamic,force_size=on $bigraw $DIR/disc-big.vhd"
	local dbig vdi_big
	dbig=$(thin_loop "$bigraw") && LOOPS+=("$dbig")
	vdi_big=$(disc_vdi "$dbig" big-vdi "vhd:$DIR/disc-big.vhd")
	local blimit
	blimit="disc_ns '$(dd_runs "$vdi_big" "$big_mib" "${boffs[@]}")'"
	# First byte against 1 s: the "limit" is sleep 1 in the namespace.
	local bprep
	bprep=$(dev_prep "$dbig")
	bench_first_byte "discovery $bname: first byte (s)" 1.0 "disc_ns '$Q2S $vdi_big'" "disc_ns 'sleep 1'" "$bprep"
	bench "discovery $bname: total" 1.2 "disc_ns '$Q2S $vdi_big | cat >/dev/null'" "$blimit" "$bprep" "$(mem_limit "$big")"
	run "disc_ns '$Q2S $vdi_big' >$DIR/disc.big.qcow2"
	disc_check "$DIR/disc.big.qcow2" "$bigraw"
	losetup -d "$dbig"
	rm -f "$bigraw" "$DIR"/disc-big.vhd "$DIR"/disc.big.qcow2 "$DIR"/disc.log
	rm -rf "$DISC"
}

discovery_cases

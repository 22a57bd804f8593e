# map on a fragmented image (issue 21), sourced by bench.sh after its other
# cases: a qcow2 of 512-byte clusters with every other one written, one run
# per cluster (600 MiB: 1.2 M runs; quick: 16 MiB), made by qemu-img
# convert from a raw file of alternating data and zero sectors. Ours
# streams the map as it walks the image; the limit is qemu-img map of the
# same file in the same layout. The outputs are compared once, byte for
# byte. (No VHD row: qemu's VHDs allocate whole 2 MiB blocks, so qemu-img
# cannot make a fragmented one, and it maps a VHD by its blocks alone.)
# Uses bench.sh's helpers ($RAND, $DIR, bench, run, skip, mem_limit).

map_cases() {
	local mib rows why raw=$DIR/frag.raw q=$DIR/frag.qcow2 mem
	if [[ $QUICK == 1 ]]; then mib=16; else mib=600; fi
	local name="$mib MiB, $((mib * 2048 / 1000)) k runs"
	rows=("map qcow2 $name, json" "map qcow2 $name, human" "map qcow2 $name, json from a pipe")
	why=""
	have qemu-img || why="qemu-img not installed"
	if [[ -n $why ]]; then
		skip_rows 1.0 "$why" "${rows[@]}"
		return 0
	fi
	say "map of a fragmented image"
	# One sector of data, one of zeros, doubled up to the size.
	run "head -c 512 $RAND >$raw && head -c 512 /dev/zero >>$raw"
	while (($(stat -c %s "$raw") < (mib << 20))); do
		run "cat $raw $raw >$raw.2 && mv $raw.2 $raw"
	done
	run "truncate -s ${mib}M $raw"
	run "qemu-img convert -S 512 -f raw -O qcow2 -o cluster_size=512 $raw $q"
	rm -f "$raw"
	run "$OURS map --output=json $q >$DIR/ours.map && qemu-img map --output=json $q >$DIR/qemu.map && cmp $DIR/ours.map $DIR/qemu.map"
	run "$OURS map $q >$DIR/ours.map && qemu-img map $q >$DIR/qemu.map && cmp $DIR/ours.map $DIR/qemu.map"
	rm -f "$DIR"/ours.map "$DIR"/qemu.map
	mem=$(mem_limit $((mib << 20)) 512)
	bench "${rows[0]}" 1.0 "$OURS map --output=json $q >/dev/null" "qemu-img map --output=json $q >/dev/null" : "$mem"
	bench "${rows[1]}" 1.0 "$OURS map $q >/dev/null" "qemu-img map $q >/dev/null" : "$mem"
	# A stream: the whole image goes through the pipe, qemu-img reads only
	# the tables of the file.
	bench "${rows[2]}" 1.0 "cat $q | $OURS map --output=json - >/dev/null" "qemu-img map --output=json $q >/dev/null" : "$mem"
	rm -f "$q"
}

map_cases

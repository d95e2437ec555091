#!/usr/bin/env bash
# bench/run.sh - compare vma with zstd and qemu-img on a realistic ext4 disk image.
#
# Usage:
#   bench/run.sh                      # builds <repo>/target/release/vma first
#   VMA=/path/to/vma bench/run.sh     # use an existing binary, no build
#
# Environment:
#   BENCH_DIR        work directory                      (default /tmp/vma-bench)
#   BENCH_DISK_SIZE  logical disk size, for truncate     (default 8G)
#   BENCH_SOURCE     directory copied into the ext4 disk (default /usr/lib)
#   BENCH_RUNS       runs per command, fastest reported  (default 1)
#   BENCH_INSTALL=1  as root: apt-get install missing tools instead of exiting 2
#   BENCH_ONLY       groups to run, e.g. "mount capture serve" (default: all; the later
#                    groups reuse disk.vma2 and disk.qcow2 from create)
#   VMA              vma binary (default: cargo build, then target/release/vma)
#
# The markdown report goes to stdout and to $BENCH_DIR/results.md; progress goes
# to stderr. Exit 2: a needed tool is missing. Exit 1: a command failed, or the
# vma round trip did not reproduce the disk.
#
# Adding a benchmark: write a bench_NAME function that calls `measure` (see
# below) once per row, then call it from main. Groups appear in the table in
# the order their first row was measured.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
W=${BENCH_DIR:-/tmp/vma-bench}
DISK_SIZE=${BENCH_DISK_SIZE:-8G}
SOURCE=${BENCH_SOURCE:-/usr/lib}
RUNS=${BENCH_RUNS:-1}
export PATH="$PATH:/usr/sbin:/sbin" # mkfs.ext4 lives in sbin

log() { printf '[bench] %s\n' "$*" >&2; }
die() { printf '[bench] ERROR: %s\n' "$*" >&2; exit 1; }

[[ $RUNS =~ ^[1-9][0-9]*$ ]] || die "BENCH_RUNS must be a positive integer, got '$RUNS'"

# --- prerequisites -----------------------------------------------------------

check_tools() {
	local missing=() spec
	# tool:debian-package
	for spec in zstd:zstd lzop:lzop mkfs.ext4:e2fsprogs qemu-img:qemu-utils /usr/bin/time:time \
		cmp:diffutils truncate:coreutils python3:python3 openssl:openssl \
		qemu-storage-daemon:qemu-system-common; do
		command -v "${spec%%:*}" >/dev/null 2>&1 || missing+=("${spec#*:}")
	done
	((${#missing[@]} == 0)) && return
	if [[ ${BENCH_INSTALL:-0} == 1 && $EUID == 0 ]]; then
		log "installing: ${missing[*]}"
		apt-get update -qq && apt-get install -y -qq "${missing[@]}" >&2
	else
		printf '[bench] missing tools; install the Debian packages with:\n  apt-get install -y %s\n' \
			"${missing[*]}" >&2
		printf '[bench] (or rerun as root with BENCH_INSTALL=1)\n' >&2
		exit 2
	fi
}

find_vma() {
	if [[ -z ${VMA:-} ]]; then
		log "building vma (cargo build --release -p vma-cli)"
		(cd "$ROOT" && cargo build --release -p vma-cli >&2)
		VMA=${CARGO_TARGET_DIR:-$ROOT/target}/release/vma
		[[ $VMA == /* ]] || VMA=$ROOT/$VMA
	fi
	[[ -x $VMA ]] || die "vma binary '$VMA' is not executable"
}

# Build the test disk once. The marker records the parameters, so changing
# BENCH_DISK_SIZE or BENCH_SOURCE rebuilds it; an interrupted build leaves only
# disk.raw.tmp (or no marker) behind and is never reused.
build_disk() {
	local marker=$W/disk.raw.done want="size=$DISK_SIZE source=$SOURCE"
	if [[ -f $W/disk.raw && -f $marker && $(<"$marker") == "$want" ]]; then
		log "reusing $W/disk.raw ($want)"
		return
	fi
	[[ -d $SOURCE ]] || die "BENCH_SOURCE '$SOURCE' is not a directory"
	log "building $DISK_SIZE ext4 disk from $SOURCE (one-off, may take minutes)"
	rm -f "$W/disk.raw" "$W/disk.raw.tmp" "$marker"
	truncate -s "$DISK_SIZE" "$W/disk.raw.tmp"
	mkfs.ext4 -q -F -d "$SOURCE" "$W/disk.raw.tmp"
	mv "$W/disk.raw.tmp" "$W/disk.raw"
	printf '%s\n' "$want" >"$marker"
}

# --- measuring ---------------------------------------------------------------

# Rows in measuring order; per-row data in associative arrays keyed by row id.
ROWS=()
declare -A R_GROUP R_LABEL R_WALL R_RSS R_SIZE R_REF R_SIZEREF

# measure [options] ID GROUP LABEL CMD...
#   Runs CMD $RUNS times under GNU time (after `sync`) and records the fastest
#   run's wall seconds and that run's peak RSS as row ID.
#   -b FN    function run untimed before every run (e.g. to remove old outputs)
#   -o FILE  the command's stdout goes to FILE (default /dev/null);
#            its stderr always goes to $W/logs/ID.err
#   -s FILE  output size column = apparent size of FILE (stat -c %s)
#   -a PATH  output size column = allocated size of PATH (du -B1)
#   -r ID    ratio column: this row's wall time / row ID's (ID may come later)
#   -z ID    ratio column also shows this row's output size / row ID's
measure() {
	local OPTIND opt before="" out=/dev/null size_stat="" size_du="" ref="" sizeref=""
	while getopts 'b:o:s:a:r:z:' opt; do
		case $opt in
		b) before=$OPTARG ;;
		o) out=$OPTARG ;;
		s) size_stat=$OPTARG ;;
		a) size_du=$OPTARG ;;
		r) ref=$OPTARG ;;
		z) sizeref=$OPTARG ;;
		*) die "measure: bad option" ;;
		esac
	done
	shift $((OPTIND - 1))
	local id=$1 group=$2 label=$3
	shift 3
	local tf=$W/logs/$id.time err=$W/logs/$id.err
	local i wall rss best_wall="" best_rss=""

	log "$group: $label"
	for ((i = 1; i <= RUNS; i++)); do
		[[ -z $before ]] || "$before"
		sync
		if ! /usr/bin/time -o "$tf" -f '%e %M' "$@" >"$out" 2>"$err"; then
			tail -n 20 "$err" >&2 || true
			tail -n 2 "$tf" >&2 || true
			die "$id failed: $*"
		fi
		read -r wall rss < <(tail -n 1 "$tf")
		log "  run $i/$RUNS: ${wall}s, peak RSS ${rss} KiB"
		if [[ -z $best_wall ]] || awk -v a="$wall" -v b="$best_wall" 'BEGIN { exit !(a < b) }'; then
			best_wall=$wall best_rss=$rss
		fi
	done

	ROWS+=("$id")
	R_GROUP[$id]=$group R_LABEL[$id]=$label R_WALL[$id]=$best_wall R_RSS[$id]=$best_rss
	R_REF[$id]=$ref R_SIZEREF[$id]=$sizeref R_SIZE[$id]=""
	if [[ -n $size_stat ]]; then
		[[ -e $size_stat ]] || die "$id: expected output $size_stat is missing"
		R_SIZE[$id]=$(stat -c %s "$size_stat")
	elif [[ -n $size_du ]]; then
		[[ -e $size_du ]] || die "$id: expected output $size_du is missing"
		R_SIZE[$id]=$(du -sB1 "$size_du" | cut -f1)
	fi
}

# --- benchmarks --------------------------------------------------------------

rm_vma2() { rm -f "$W/disk.vma2"; }
rm_qcow2() { rm -f "$W/disk.qcow2"; }
rm_out_vma() { rm -rf "$W/out-vma"; }
rm_out_zstd() { rm -f "$W/out-zstd.raw"; }
rm_out_qemu() { rm -f "$W/out-qemu.raw"; }

bench_create() {
	measure -b rm_vma2 -s "$W/disk.vma2" -r zstd-create -z zstd-create \
		vma-create create "vma create (defaults)" \
		"$VMA" create --quiet "$W/disk.vma2" "disk=$W/disk.raw"
	measure -o "$W/disk.raw.zst" -s "$W/disk.raw.zst" \
		zstd-create create "zstd -1 -T0" \
		zstd -1 -T0 -q -c "$W/disk.raw"
	measure -b rm_qcow2 -s "$W/disk.qcow2" \
		qemu-create create "qemu-img convert -O qcow2 -c (zstd)" \
		qemu-img convert -O qcow2 -c -o compression_type=zstd "$W/disk.raw" "$W/disk.qcow2"
}

bench_extract() {
	# vma extract fsyncs its output: the peer it is compared with (the
	# issue's target) is qemu-img convert from the zstd qcow2 followed by sync.
	measure -b rm_out_vma -a "$W/out-vma/disk.raw" -r qemu-extract-sync \
		vma-extract extract "vma extract" \
		"$VMA" extract --quiet --force "$W/disk.vma2" "$W/out-vma"
	log "checking round trip: out-vma/disk.raw vs disk.raw"
	if ! cmp "$W/disk.raw" "$W/out-vma/disk.raw" >&2; then
		printf '\n[bench] !!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n' >&2
		die "vma extract did NOT reproduce disk.raw: the archive round trip is broken"
	fi
	log "round trip OK"
	rm_out_vma # free disk and page cache for the following rows

	measure -b rm_out_zstd -o "$W/out-zstd.raw" -a "$W/out-zstd.raw" \
		zstd-extract extract "zstd -d" \
		zstd -d -q -c "$W/disk.raw.zst"
	rm_out_zstd
	measure -b rm_out_qemu -a "$W/out-qemu.raw" \
		qemu-extract extract "qemu-img convert -O raw" \
		qemu-img convert -O raw "$W/disk.qcow2" "$W/out-qemu.raw"
	rm_out_qemu
	# vma extract fsyncs what it wrote before renaming it into place; this
	# row makes the peer's data durable too, for a like-for-like figure.
	measure -b rm_out_qemu -a "$W/out-qemu.raw" \
		qemu-extract-sync extract "qemu-img convert -O raw, then sync of it" \
		sh -c 'qemu-img convert -O raw "$0" "$1" && sync "$1"' "$W/disk.qcow2" "$W/out-qemu.raw"
	rm_out_qemu
}

bench_verify() {
	measure -r zstd-verify vma-verify verify "vma verify" \
		"$VMA" verify --quiet "$W/disk.vma2"
	measure zstd-verify verify "zstd -t" \
		zstd -q -t "$W/disk.raw.zst"
}

# The drive digest of the raw disk (what `vma list` shows for the archive)
# against the plain SHA-256 of the same file by openssl (SHA instructions)
# and by vma (--sha256, one sequential stream).
bench_checksum() {
	measure -r openssl-sha256 vma-checksum checksum "vma checksum disk.raw" \
		"$VMA" checksum --quiet "$W/disk.raw"
	if [[ -f $W/disk.vma2 ]]; then
		log "checking: vma checksum of disk.raw is the drive digest the archive records"
		[[ $("$VMA" checksum --quiet "$W/disk.raw" | cut -d' ' -f1) == \
			$("$VMA" list --json "$W/disk.vma2" | grep -o '"digest": *"[0-9a-f]*"' | grep -o '[0-9a-f]\{64\}') ]] ||
			die "vma checksum of disk.raw differs from the drive digest of disk.vma2"
	fi
	measure -r openssl-sha256 vma-checksum-sha256 checksum "vma checksum --sha256 disk.raw" \
		"$VMA" checksum --quiet --sha256 "$W/disk.raw"
	measure openssl-sha256 checksum "openssl dgst -sha256 disk.raw" \
		openssl dgst -sha256 "$W/disk.raw"
}

rm_out_v1() { rm -rf "$W/out-vma1"; }
rm_out_v1zstd() { rm -f "$W/out-v1.vma"; }

# Proxmox VMA v1: vzdump's .vma.zst read through a pipe, and opening a large
# uncompressed v1 file for random access (one read per extent header).
bench_vma1() {
	log "vma1: preparing disk.vma (vma create --format vma1) and disk.vma.zst (zstd -1 -T0)"
	"$VMA" create --quiet --force --format vma1 "$W/disk.vma" "disk=$W/disk.raw"
	zstd -1 -T0 -q -f -o "$W/disk.vma.zst" "$W/disk.vma"
	measure -b rm_out_v1 -a "$W/out-vma1/disk.raw" -r zstd-v1-extract \
		vma1-extract vma1 "vma extract - < disk.vma.zst" \
		sh -c '"$0" extract --quiet --force - "$1" < "$2"' "$VMA" "$W/out-vma1" "$W/disk.vma.zst"
	log "checking round trip: out-vma1/disk.raw vs disk.raw"
	cmp "$W/disk.raw" "$W/out-vma1/disk.raw" >&2 || die "vma extract of the .vma.zst did NOT reproduce disk.raw"
	rm_out_v1
	measure -b rm_out_v1zstd -o "$W/out-v1.vma" -a "$W/out-v1.vma" \
		zstd-v1-extract vma1 "zstd -d -c disk.vma.zst > file" \
		zstd -d -q -c "$W/disk.vma.zst"
	rm_out_v1zstd
	log "vma1: preparing disk.vma.lzo (lzop -1, what vzdump --compress lzo writes)"
	lzop -1 -q -f -o "$W/disk.vma.lzo" "$W/disk.vma"
	measure -b rm_out_v1 -a "$W/out-vma1/disk.raw" -r lzop-v1-extract \
		vma1-extract-lzo vma1 "vma extract - < disk.vma.lzo" \
		sh -c '"$0" extract --quiet --force - "$1" < "$2"' "$VMA" "$W/out-vma1" "$W/disk.vma.lzo"
	cmp "$W/disk.raw" "$W/out-vma1/disk.raw" >&2 || die "vma extract of the .vma.lzo did NOT reproduce disk.raw"
	rm_out_v1
	measure -b rm_out_v1zstd -o "$W/out-v1.vma" -a "$W/out-v1.vma" \
		lzop-v1-extract vma1 "lzop -d -c disk.vma.lzo > file" \
		lzop -d -q -c "$W/disk.vma.lzo"
	rm_out_v1zstd
	rm -f "$W/disk.vma.lzo"
	measure -s "$W/disk.vma" vma1-list vma1 "vma list disk.vma (uncompressed v1)" \
		"$VMA" list "$W/disk.vma"
}

rm_q_vma2() { rm -f "$W/disk-q.vma2"; }
rm_out_q() { rm -rf "$W/out-q"; }
rm_out_qc() { rm -rf "$W/out-qc"; }
rm_out_chain() { rm -rf "$W/out-chain" "$W/out-chain.qcow2"; }

# qcow2 in and out: create from an uncompressed qcow2 of the same disk, and
# extract straight to qcow2 against extract to raw followed by qemu-img convert.
bench_qcow2() {
	log "qcow2: preparing disk-plain.qcow2 (qemu-img convert -O qcow2 disk.raw)"
	rm -f "$W/disk-plain.qcow2"
	qemu-img convert -O qcow2 "$W/disk.raw" "$W/disk-plain.qcow2"
	cat "$W/disk-plain.qcow2" >/dev/null
	measure -b rm_q_vma2 -s "$W/disk-q.vma2" -r vma-create -z vma-create \
		vma-create-qcow2 qcow2 "vma create from qcow2" \
		"$VMA" create --quiet "$W/disk-q.vma2" "disk=$W/disk-plain.qcow2"
	log "checking: the archive from qcow2 holds the same drive digest as the one from raw"
	[[ $("$VMA" list --json "$W/disk-q.vma2" | grep -o '"digest": *"[0-9a-f]*"') == \
		$("$VMA" list --json "$W/disk.vma2" | grep -o '"digest": *"[0-9a-f]*"') ]] ||
		die "create from qcow2 recorded a different drive digest than create from raw"
	rm_q_vma2
	measure -b rm_out_q -a "$W/out-q/disk.qcow2" -r vma-extract \
		vma-extract-qcow2 qcow2 "vma extract --format qcow2" \
		"$VMA" extract --quiet --format qcow2 "$W/disk.vma2" "$W/out-q"
	log "checking: qemu-img check and compare of out-q/disk.qcow2"
	qemu-img check "$W/out-q/disk.qcow2" >&2 || die "qemu-img check found errors in vma's qcow2"
	qemu-img compare "$W/out-q/disk.qcow2" "$W/disk.raw" >&2 || die "vma's qcow2 differs from disk.raw"
	rm_out_q
	measure -b rm_out_chain -a "$W/out-chain.qcow2" \
		chain-extract-qcow2 qcow2 "vma extract, then qemu-img convert -O qcow2" \
		sh -c '"$0" extract --quiet "$1" "$2" && qemu-img convert -O qcow2 "$2/disk.raw" "$3"' \
		"$VMA" "$W/disk.vma2" "$W/out-chain" "$W/out-chain.qcow2"
	rm_out_chain
	measure -b rm_out_qc -a "$W/out-qc/disk.qcow2" -r qemu-create \
		vma-extract-qcow2c qcow2 "vma extract --format qcow2 --compress" \
		"$VMA" extract --quiet --format qcow2 --compress "$W/disk.vma2" "$W/out-qc"
	qemu-img check "$W/out-qc/disk.qcow2" >&2 || die "qemu-img check found errors in vma's compressed qcow2"
	rm_out_qc
	rm -f "$W/disk-plain.qcow2"
}

MNT=$W/mnt
QSD_FILE=$W/qsd-export
QSD_PID=$W/qsd.pid

# A fresh `vma mount` of disk.vma2 (cold caches).
vma_mount() {
	vma_umount
	mkdir -p "$MNT"
	"$VMA" mount "$W/disk.vma2" "$MNT"
}
vma_umount() { ! grep -qs " $MNT fuse" /proc/mounts || "$VMA" umount "$MNT"; }

# A fresh qemu-storage-daemon FUSE export of disk.qcow2 (zstd clusters): the
# way to read a compressed disk image as a file without restoring it today.
qsd_mount() {
	qsd_umount
	: >"$QSD_FILE"
	qemu-storage-daemon \
		--blockdev "driver=file,node-name=file0,filename=$W/disk.qcow2,read-only=on" \
		--blockdev driver=qcow2,node-name=disk0,file=file0,read-only=on \
		--export "type=fuse,id=exp0,node-name=disk0,mountpoint=$QSD_FILE,writable=off" \
		--pidfile "$QSD_PID" --daemonize
}
qsd_umount() {
	local pid
	if [[ -f $QSD_PID ]]; then
		pid=$(<"$QSD_PID")
		kill "$pid" 2>/dev/null || true
		while kill -0 "$pid" 2>/dev/null; do sleep 0.05; done
		rm -f "$QSD_PID"
	fi
	! grep -qs " $QSD_FILE fuse" /proc/mounts || umount "$QSD_FILE"
}

# Random 4 KiB read latency: "reads=N p50_us=X p99_us=Y mean_us=Z" per reader.
declare -A RAND
RAND_ROWS=()

# vma mount vs qemu-storage-daemon's FUSE export: sequential dd (each run on a
# fresh mount) and random 4 KiB reads of data (readahead off).
bench_mount() {
	trap 'vma_umount; qsd_umount' EXIT
	vma_mount
	log "mount: checking the mounted drive against disk.raw"
	cmp "$W/disk.raw" "$MNT/disk.raw" >&2 || die "the mounted drive differs from disk.raw"
	measure -b vma_mount -r vma-extract mount-dd mount "dd bs=1M of the drive file on vma mount" \
		dd if="$MNT/disk.raw" of=/dev/null bs=1M
	measure -b qsd_mount -r mount-dd qsd-dd mount \
		"dd bs=1M of qemu-storage-daemon's FUSE export of disk.qcow2 (zstd)" \
		dd if="$QSD_FILE" of=/dev/null bs=1M
	local reads=${BENCH_RANDOM_READS:-2000}
	log "mount: $reads random 4 KiB reads, vma mount"
	vma_mount
	RAND[vma]=$(python3 "$ROOT/bench/randread.py" "$MNT/disk.raw" "$W/disk.raw" "$reads" 1)
	RAND_ROWS+=(vma)
	log "mount: $reads random 4 KiB reads, qemu-storage-daemon"
	qsd_mount
	RAND[qsd]=$(python3 "$ROOT/bench/randread.py" "$QSD_FILE" "$W/disk.raw" "$reads" 1)
	RAND_ROWS+=(qsd)
	vma_umount
	qsd_umount
	trap - EXIT
}

UMNT=$W/mnt-user
# setpriv: run as nobody (65534), who mounts through fusermount3.
as_nobody() { setpriv --reuid=65534 --regid=65534 --clear-groups -- "$@"; }
# A fresh `vma mount` of disk.vma2 by nobody, through fusermount3.
user_mount() {
	user_umount
	mkdir -p "$UMNT"
	chown 65534:65534 "$UMNT"
	as_nobody "$VMA" mount "$W/disk.vma2" "$UMNT"
}
user_umount() { ! grep -qs " $UMNT fuse" /proc/mounts || as_nobody "$VMA" umount "$UMNT"; }

# vma mount by a user who is not root (through fusermount3) vs by root:
# sequential dd of the drive, each run on a fresh mount.
bench_usermount() {
	command -v setpriv >/dev/null || die "usermount needs setpriv (util-linux)"
	command -v fusermount3 >/dev/null || die "usermount needs fusermount3 (apt-get install fuse3)"
	[[ $(stat -c %a /dev/fuse) == 666 ]] ||
		die "usermount needs /dev/fuse open to users (mode 0666; scripts/setup.sh sets it)"
	as_nobody test -r "$W/disk.vma2" || die "usermount: $W/disk.vma2 is not readable by user 65534"
	trap 'user_umount; vma_umount' EXIT
	user_mount
	log "usermount: checking the drive mounted by user 65534 against disk.raw"
	as_nobody cmp "$W/disk.raw" "$UMNT/disk.raw" >&2 || die "the mounted drive differs from disk.raw"
	[[ -n ${R_WALL[mount-dd]:-} ]] ||
		measure -b vma_mount -r vma-extract mount-dd mount "dd bs=1M of the drive file on vma mount" \
			dd if="$MNT/disk.raw" of=/dev/null bs=1M
	measure -b user_mount -r mount-dd usermount-dd mount \
		"dd bs=1M of the drive file on vma mount by a user (fusermount3)" \
		setpriv --reuid=65534 --regid=65534 --clear-groups -- dd if="$UMNT/disk.raw" of=/dev/null bs=1M
	user_umount
	vma_umount
	trap - EXIT
}

CAP_DIR=$W/capture
CAP_PID=$CAP_DIR/qsd.pid

# qemu-storage-daemon serving disk4.qcow2 as node disk0, with a QMP socket
# and a writable NBD export for "guest" writes.
cap_daemon_start() {
	cap_daemon_stop
	qemu-storage-daemon \
		--chardev "socket,id=qmp0,path=$CAP_DIR/qmp.sock,server=on,wait=off" --monitor chardev=qmp0 \
		--blockdev "driver=file,node-name=file0,filename=$CAP_DIR/disk4.qcow2" \
		--blockdev driver=qcow2,node-name=disk0,file=file0 \
		--nbd-server "addr.type=unix,addr.path=$CAP_DIR/guest.sock" \
		--export type=nbd,id=exp0,node-name=disk0,name=disk0,writable=on \
		--pidfile "$CAP_PID" --daemonize
}
cap_daemon_stop() {
	local pid
	if [[ -f $CAP_PID ]]; then
		pid=$(<"$CAP_PID")
		kill "$pid" 2>/dev/null || true
		while kill -0 "$pid" 2>/dev/null; do sleep 0.05; done
		rm -f "$CAP_PID"
	fi
}
rm_cap_out() { rm -f "$CAP_DIR/out.vma" "$CAP_DIR/out.raw"; }
rm_cap_fleece_out() { rm -f "$CAP_DIR/out-fleece.vma"; }

# COUNT random 4 KiB guest writes (qemu-io through the NBD export, no flush
# per write) within the first 4 GiB; prints "writes=N p50_us=X p99_us=Y".
# qemu-io reports each write's rate; its latency is 1 / (ops/sec).
guest_write_latency() {
	local count=$1 i cmds=()
	RANDOM=42
	for ((i = 0; i < count; i++)); do
		cmds+=(-c "write -P $((i % 250 + 1)) $(((RANDOM * 32768 + RANDOM) % 1048576 * 4096)) 4k")
	done
	qemu-io -f raw -t writeback "nbd+unix:///disk0?socket=$CAP_DIR/guest.sock" "${cmds[@]}" |
		awk '/ops\/sec/ { for (i = 1; i < NF; i++) if ($(i + 1) ~ /^ops\/sec/) printf "%.1f\n", 1e6 / $i }' |
		sort -n |
		awk '{ a[NR] = $1 } END { printf "writes=%d p50_us=%.0f p99_us=%.0f\n", NR, a[int(NR * 0.5) + 1], a[int(NR * 0.99) + 1] }'
}
declare -A WLAT

# Live capture: vma capture of a 4 GiB qcow2 node served by
# qemu-storage-daemon (without and with --fleecing) vs qemu-img convert of
# the same image to raw, and guest write latency with and without a
# capture running, to a fast and to a slow archive, with and without
# --fleecing.
bench_capture() {
	mkdir -p "$CAP_DIR"
	trap 'cap_daemon_stop' EXIT
	log "capture: preparing disk4.qcow2 (first 4 GiB of disk.raw)"
	rm -f "$CAP_DIR/disk4.qcow2"
	qemu-img convert -O qcow2 --image-opts \
		"driver=raw,size=4294967296,file.driver=file,file.filename=$W/disk.raw" "$CAP_DIR/disk4.qcow2"
	cap_daemon_start
	measure -b rm_cap_out -s "$CAP_DIR/out.vma" -r qemu-convert-4g \
		vma-capture capture "vma capture of a 4 GiB qcow2 node (qemu-storage-daemon)" \
		"$VMA" capture --quiet --qmp "$CAP_DIR/qmp.sock" --drive disk0 "$CAP_DIR/out.vma"
	log "capture: checking the archive against the image"
	"$VMA" extract --quiet --force "$CAP_DIR/out.vma" "$CAP_DIR/x" >&2
	qemu-img compare -U -f raw -F qcow2 "$CAP_DIR/x/disk0.raw" "$CAP_DIR/disk4.qcow2" >&2 ||
		die "the captured disk differs from the image"
	rm -rf "$CAP_DIR/x"
	mkdir -p "$CAP_DIR/scratch"
	measure -b rm_cap_fleece_out -s "$CAP_DIR/out-fleece.vma" -r vma-capture \
		vma-capture-fleece capture "vma capture --fleecing of the same node (scratch on the same disk)" \
		"$VMA" capture --quiet --qmp "$CAP_DIR/qmp.sock" --drive disk0 --fleecing "$CAP_DIR/scratch" \
		"$CAP_DIR/out-fleece.vma"
	rm_cap_fleece_out
	cap_daemon_stop
	# vma fsyncs its archive; the peer's output is synced too, so both
	# times end with the data on disk.
	measure -b rm_cap_out -a "$CAP_DIR/out.raw" \
		qemu-convert-4g capture "qemu-img convert -O raw of the same image, then sync of it" \
		sh -c 'qemu-img convert -O raw "$0" "$1" && sync "$1"' "$CAP_DIR/disk4.qcow2" "$CAP_DIR/out.raw"
	rm_cap_out
	local writes=${BENCH_GUEST_WRITES:-1000}
	cap_daemon_start
	log "capture: $writes guest writes, idle"
	WLAT[idle]=$(guest_write_latency "$writes")
	log "capture: $writes guest writes during a capture (--speed 128 MiB/s)"
	"$VMA" capture --quiet --qmp "$CAP_DIR/qmp.sock" --drive disk0 --speed 134217728 \
		"$CAP_DIR/out.vma" &
	local cap=$!
	sleep 1
	WLAT[capture]=$(guest_write_latency "$writes")
	wait "$cap" || die "the capture during guest writes failed"
	rm_cap_out
	log "capture: $writes guest writes during a capture --fleecing (--speed 128 MiB/s)"
	"$VMA" capture --qmp "$CAP_DIR/qmp.sock" --drive disk0 --speed 134217728 \
		--fleecing "$CAP_DIR/scratch" "$CAP_DIR/out.vma" 2>"$W/logs/capture-fleece-writes.err" &
	cap=$!
	sleep 1
	WLAT[fleecing]=$(guest_write_latency "$writes")
	wait "$cap" || die "the capture --fleecing during guest writes failed"
	SCRATCH_PEAK=$(sed -n 's/^vma: scratch images took at most //p' "$W/logs/capture-fleece-writes.err")
	rm_cap_out
	# A slow archive: zstd level 19 stores a few MB/s, so the writer's queue
	# fills and copy-before-write waits for it (tens of seconds per write:
	# fewer writes); the captures are cancelled once the writes are measured.
	local how extra slow_writes=${BENCH_SLOW_WRITES:-8}
	for how in slow slow-fleecing; do
		extra=()
		[[ $how == slow-fleecing ]] && extra=(--fleecing "$CAP_DIR/scratch")
		log "capture: $slow_writes guest writes during a capture to a slow archive (--compress zstd:19 ${extra[*]})"
		"$VMA" capture --quiet --qmp "$CAP_DIR/qmp.sock" --drive disk0 --compress zstd:19 \
			"${extra[@]}" "$CAP_DIR/out.vma" &
		cap=$!
		sleep 3
		WLAT[$how]=$(guest_write_latency "$slow_writes")
		kill -INT "$cap"
		wait "$cap" || true
		rm_cap_out
	done
	cap_daemon_stop
	trap - EXIT
}

CH_DIR=$W/chain

# COUNT random 64 KiB writes (a fixed seed per overlay) into a qcow2 image.
scatter_writes() {
	local image=$1 count=$2 seed=$3 i cmds=()
	RANDOM=$seed
	for ((i = 0; i < count; i++)); do
		cmds+=(-c "write -P $((i % 250 + 1)) $(((RANDOM * 32768 + RANDOM) % 131072 * 65536)) 64k")
	done
	qemu-io -f qcow2 "$image" "${cmds[@]}" >/dev/null
}
rm_chain_out() { rm -rf "$CH_DIR/merged.vma" "$CH_DIR/x" "$CH_DIR/full2.vma" "$CH_DIR/d1.vma" "$CH_DIR/full-ov1.vma"; }

# Chains: five incrementals made by `vma diff` against qcow2 overlays of the
# disk, each changing 1% of its clusters; merge of the full + 5 against
# extracting the newest point and creating a new full from it; a diff
# against a new full create of the same image.
bench_chain() {
	mkdir -p "$CH_DIR"
	rm -f "$CH_DIR"/*.qcow2 "$CH_DIR"/*.vma
	if [[ ! -f $W/disk.vma2 ]]; then
		log "chain: creating disk.vma2 (the full at the root of the chain)"
		"$VMA" create --quiet "$W/disk.vma2" "disk=$W/disk.raw"
	fi
	local i prev=$W/disk.raw prev_fmt=raw parent=$W/disk.vma2
	for i in 1 2 3 4 5; do
		log "chain: overlay $i with 1% of the clusters rewritten, then vma diff"
		qemu-img create -q -f qcow2 -b "$prev" -F "$prev_fmt" "$CH_DIR/ov$i.qcow2"
		scatter_writes "$CH_DIR/ov$i.qcow2" 1311 "$i"
		if ((i == 1)); then
			measure -b rm_chain_out -s "$CH_DIR/d1.vma" -r vma-create-ov1 \
				vma-diff chain "vma diff of the disk with 1% of clusters changed" \
				"$VMA" diff --quiet --allow-backing "$W" --against "$parent" "disk=$CH_DIR/ov1.qcow2" -o "$CH_DIR/d1.vma"
			measure -b rm_chain_out -s "$CH_DIR/full-ov1.vma" \
				vma-create-ov1 chain "vma create of the same image (a new full)" \
				"$VMA" create --quiet --allow-backing "$W" "$CH_DIR/full-ov1.vma" "disk=$CH_DIR/ov1.qcow2"
		fi
		"$VMA" diff --quiet --allow-backing "$W" --parent "$W/disk.vma2" --against "$parent" "disk=$CH_DIR/ov$i.qcow2" \
			-o "$CH_DIR/inc$i.vma"
		prev=$CH_DIR/ov$i.qcow2 prev_fmt=qcow2 parent=$CH_DIR/inc$i.vma
	done
	measure -b rm_chain_out -s "$CH_DIR/merged.vma" -r chain-extract-create \
		vma-merge chain "vma merge of the full + 5 incrementals" \
		"$VMA" merge --quiet --parent "$W/disk.vma2" "$CH_DIR/inc5.vma" -o "$CH_DIR/merged.vma"
	log "chain: checking the merged archive against the newest overlay"
	"$VMA" verify --quiet "$CH_DIR/merged.vma" >&2 || die "the merged archive does not verify"
	"$VMA" extract --quiet --force "$CH_DIR/merged.vma" "$CH_DIR/x" >&2
	qemu-img compare -q -f raw -F qcow2 "$CH_DIR/x/disk.raw" "$CH_DIR/ov5.qcow2" >&2 ||
		die "the merged archive differs from the newest point"
	measure -b rm_chain_out -s "$CH_DIR/full2.vma" \
		chain-extract-create chain "vma extract of the newest point, then vma create" \
		sh -c '"$0" extract --quiet --parent "$1" "$2" "$3" && "$0" create --quiet "$4" "disk=$3/disk.raw"' \
		"$VMA" "$W/disk.vma2" "$CH_DIR/inc5.vma" "$CH_DIR/x" "$CH_DIR/full2.vma"
	rm_chain_out
	rm -f "$CH_DIR"/*.qcow2 "$CH_DIR"/*.vma
}

rm_restore() {
	rm -rf "$W/restore-tmp" "$W/restore.fifo" "$W/restore-target.raw" "$W/restore-target.qcow2"
	truncate -s "$(stat -c %s "$W/disk.raw")" "$W/restore-target.raw"
}
rm_restore_qcow2() {
	rm -f "$W/restore-target.qcow2"
	qemu-img create -q -f qcow2 "$W/restore-target.qcow2" "$(stat -c %s "$W/disk.raw")"
}

# Restores into existing targets: qmrestore's pipeline (zstd -d | vma
# extract -v -r FIFO, map line `format=raw:0:`) and `extract --to` onto a
# sparse raw file and into a qcow2 image, against zstd -d | dd onto the
# same raw file.
bench_restore() {
	[[ -f $W/disk.vma2 ]] || "$VMA" create --quiet "$W/disk.vma2" "disk=$W/disk.raw"
	if [[ ! -f $W/disk.vma.zst ]]; then
		log "restore: preparing disk.vma.zst (vma create --format vma1 | zstd -1 -T0)"
		"$VMA" create --quiet --force --format vma1 "$W/disk.vma" "disk=$W/disk.raw"
		zstd -1 -T0 -q -f -o "$W/disk.vma.zst" "$W/disk.vma"
	fi
	[[ -f $W/disk.raw.zst ]] || zstd -1 -T0 -q -f -o "$W/disk.raw.zst" "$W/disk.raw"
	measure -b rm_restore -a "$W/restore-target.raw" -r zstd-dd-restore \
		vma-restore-pve restore "qmrestore pipeline: zstd -d piped to vma extract -v -r FIFO (raw, 0:)" \
		bash -c 'set -o pipefail; mkfifo "$1/restore.fifo"
			{ printf "format=raw:0:disk=%s\ndone\n" "$1/restore-target.raw" > "$1/restore.fifo"; } &
			zstd -q -d -c "$1/disk.vma.zst" | "$0" extract -v -r "$1/restore.fifo" - "$1/restore-tmp" >/dev/null' \
		"$VMA" "$W"
	cmp "$W/disk.raw" "$W/restore-target.raw" >&2 || die "the qmrestore pipeline did NOT reproduce disk.raw"
	measure -b rm_restore -a "$W/restore-target.raw" -r zstd-dd-restore \
		vma-restore-raw restore "vma extract --to existing.raw" \
		"$VMA" extract --quiet "$W/disk.vma2" --drive disk --to "$W/restore-target.raw"
	cmp "$W/disk.raw" "$W/restore-target.raw" >&2 || die "extract --to did NOT reproduce disk.raw"
	measure -b rm_restore_qcow2 -a "$W/restore-target.qcow2" \
		vma-restore-qcow2 restore "vma extract --to existing.qcow2" \
		"$VMA" extract --quiet "$W/disk.vma2" --drive disk --to "$W/restore-target.qcow2"
	qemu-img compare -q -f qcow2 -F raw "$W/restore-target.qcow2" "$W/disk.raw" >&2 ||
		die "extract --to qcow2 did NOT reproduce disk.raw"
	measure -b rm_restore -a "$W/restore-target.raw" \
		zstd-dd-restore restore "zstd -d piped to dd conv=sparse,notrunc,fsync" \
		sh -c 'zstd -q -d -c "$0" | dd of="$1" bs=1M conv=sparse,notrunc,fsync status=none' \
		"$W/disk.raw.zst" "$W/restore-target.raw"
	rm_restore
	rm -f "$W/restore-target.raw" "$W/restore-target.qcow2"
}

SRV_DIR=$W/serve
declare -A SRAND
SRAND_ROWS=()

# vma serve of disk.vma2 on SRV_DIR/serve.sock, detached.
serve_start() {
	serve_stop
	"$VMA" serve "$W/disk.vma2" --socket "$SRV_DIR/serve.sock" --detach \
		--pid-file "$SRV_DIR/serve.pid" 2>/dev/null
}
serve_stop() { kill_pidfile "$SRV_DIR/serve.pid"; }
# qemu-storage-daemon's NBD export of disk.qcow2 (zstd clusters), read-only.
qsd_nbd_start() {
	qsd_nbd_stop
	qemu-storage-daemon \
		--blockdev "driver=file,node-name=file0,filename=$W/disk.qcow2,read-only=on" \
		--blockdev driver=qcow2,node-name=disk0,file=file0,read-only=on \
		--nbd-server "addr.type=unix,addr.path=$SRV_DIR/qsd.sock" \
		--export type=nbd,id=exp0,node-name=disk0,name=disk,writable=off \
		--pidfile "$SRV_DIR/qsd.pid" --daemonize
}
qsd_nbd_stop() { kill_pidfile "$SRV_DIR/qsd.pid"; }
kill_pidfile() {
	local pid
	[[ -f $1 ]] || return 0
	pid=$(<"$1")
	kill "$pid" 2>/dev/null || true
	while kill -0 "$pid" 2>/dev/null; do sleep 0.05; done
	rm -f "$1"
}
rm_srv_out() { rm -rf "$SRV_DIR/out"; }
srv_vm_start() {
	bash "$ROOT/bench/serve.sh" stop-vm "$SRV_DIR/vm"
	rm -f "$SRV_DIR/restored.raw"
	VMA=$VMA bash "$ROOT/bench/serve.sh" start-vm "$W/disk.vma2" "$SRV_DIR/vm"
}

# vma serve: sequential read of the drive over NBD (nbdcopy to null:)
# against vma extract and against qemu-storage-daemon's NBD export of the
# zstd qcow2; random 4 KiB reads over 4 connections against the same
# peer; time from starting vma serve to a booted guest (root mounted)
# against vma extract + the same boot; vma live-restore of the running
# guest's drive against vma extract to the same directory.
bench_serve() {
	command -v nbdcopy >/dev/null || die "nbdcopy is missing: apt-get install libnbd-bin"
	command -v qemu-system-x86_64 >/dev/null ||
		die "qemu-system-x86_64 is missing: scripts/setup.sh installs it"
	mkdir -p "$SRV_DIR"
	trap 'serve_stop; qsd_nbd_stop; bash "$ROOT/bench/serve.sh" stop-vm "$SRV_DIR/vm"' EXIT
	measure -b rm_srv_out -a "$SRV_DIR/out/disk.raw" serve-extract serve "vma extract (reference)" \
		"$VMA" extract --quiet --force "$W/disk.vma2" "$SRV_DIR/out"
	rm_srv_out
	serve_start
	qsd_nbd_start
	local url="nbd+unix:///disk?socket=$SRV_DIR/serve.sock" qurl="nbd+unix:///disk?socket=$SRV_DIR/qsd.sock"
	log "serve: checking the export against disk.raw"
	qemu-img compare -q -f raw "$W/disk.raw" "$url" >&2 || die "vma serve's export differs from disk.raw"
	measure -r serve-extract serve-nbdcopy serve "nbdcopy of vma serve's export to null:" \
		nbdcopy "$url" null:
	measure -r serve-nbdcopy qsd-nbdcopy serve \
		"nbdcopy of qemu-storage-daemon's NBD export of disk.qcow2 (zstd) to null:" \
		nbdcopy "$qurl" null:
	local reads=${BENCH_RANDOM_READS:-2000} conns=4
	log "serve: $reads random 4 KiB reads over $conns connections, vma serve"
	SRAND[vma]=$(python3 "$ROOT/bench/nbdrand.py" "$SRV_DIR/serve.sock" disk "$W/disk.raw" "$reads" "$conns" 1)
	log "  serve random (vma): ${SRAND[vma]}"
	SRAND_ROWS+=(vma)
	log "serve: $reads random 4 KiB reads over $conns connections, qemu-storage-daemon"
	SRAND[qsd]=$(python3 "$ROOT/bench/nbdrand.py" "$SRV_DIR/qsd.sock" disk "$W/disk.raw" "$reads" "$conns" 1)
	log "  serve random (qsd): ${SRAND[qsd]}"
	SRAND_ROWS+=(qsd)
	serve_stop
	qsd_nbd_stop
	# The same reads of an archive written with 64 KiB extents (each read
	# decodes one cluster, as qcow2's do); deleted right after.
	log "serve: vma create --extent-size 64, then the same random reads through vma serve"
	"$VMA" create --quiet --force --extent-size 64 "$SRV_DIR/disk-x64.vma2" "disk=$W/disk.raw"
	log "serve: disk-x64.vma2 is $(stat -c %s "$SRV_DIR/disk-x64.vma2") bytes, disk.vma2 $(stat -c %s "$W/disk.vma2")"
	"$VMA" serve "$SRV_DIR/disk-x64.vma2" --socket "$SRV_DIR/serve.sock" --detach \
		--pid-file "$SRV_DIR/serve.pid" 2>/dev/null
	SRAND[vma64]=$(python3 "$ROOT/bench/nbdrand.py" "$SRV_DIR/serve.sock" disk "$W/disk.raw" "$reads" "$conns" 1)
	log "  serve random (vma64): ${SRAND[vma64]}"
	SRAND_ROWS+=(vma64)
	serve_stop
	rm -f "$SRV_DIR/disk-x64.vma2"
	measure -r extract-boot serve-boot serve "vma serve + qcow2 overlay + boot until the root is mounted" \
		env VMA="$VMA" bash "$ROOT/bench/serve.sh" boot-serve "$W/disk.vma2" "$SRV_DIR/vm"
	measure extract-boot serve "vma extract + boot until the root is mounted" \
		env VMA="$VMA" bash "$ROOT/bench/serve.sh" boot-extract "$W/disk.vma2" "$SRV_DIR/vm"
	rm -rf "$SRV_DIR/vm/extracted"
	measure -b srv_vm_start -a "$SRV_DIR/restored.raw" -r serve-extract serve-live-restore serve \
		"vma live-restore while the guest runs, then sync of the target" \
		sh -c '"$0" live-restore --quiet --qmp "$1" --drive "vd0=$2" && sync "$2"' \
		"$VMA" "$SRV_DIR/vm/qmp.sock" "$SRV_DIR/restored.raw"
	bash "$ROOT/bench/serve.sh" stop-vm "$SRV_DIR/vm"
	rm -f "$SRV_DIR/restored.raw"
	trap - EXIT
}

# --- report ------------------------------------------------------------------

# ratio A B: A/B with two decimals, or "-" if either is unknown or B is 0.
ratio() {
	awk -v a="$1" -v b="$2" 'BEGIN { if (a == "" || b == "" || b + 0 == 0) print "-"; else printf "%.2f", a / b }'
}
# mib BYTES_OR_KIB DIVISOR: one decimal, or "-" if empty.
mib() { awk -v x="$1" -v d="$2" 'BEGIN { if (x == "") print "-"; else printf "%.1f", x / d }'; }

# kv KEY "k1=v1 k2=v2 ...": the value of KEY, or empty.
kv() { tr ' ' '\n' <<<"$2" | sed -n "s/^$1=//p"; }

# target DESCRIPTION VALUE LIMIT UNIT: PASS if VALUE <= LIMIT.
PASSED=0 TOTAL=0
target() {
	local verdict
	if [[ $2 == "-" || -z $2 ]]; then
		printf -- '- %s: not measured in this run\n' "$1"
		return
	fi
	verdict=$(awk -v v="$2" -v l="$3" 'BEGIN { print (v != "-" && v != "" && v + 0 <= l + 0) ? "PASS" : "MISS" }')
	TOTAL=$((TOTAL + 1))
	[[ $verdict == MISS ]] || PASSED=$((PASSED + 1))
	printf -- '- %s: %s%s (target <= %s%s) **%s**\n' "$1" "${2:--}" "$4" "$3" "$4" "$verdict"
}

report() {
	local logical alloc cpu mem zstd_v qemu_v vma_v
	logical=$(stat -c %s "$W/disk.raw")
	alloc=$(du -B1 "$W/disk.raw" | cut -f1)
	cpu=$(awk -F': *' '/^model name/ { print $2; exit }' /proc/cpuinfo)
	mem=$(awk '/^MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)
	zstd_v=$(zstd --version | sed 's/^\** *//; s/ *\**$//')
	qemu_v=$(qemu-img --version | head -n 1)
	vma_v=$("$VMA" --version 2>&1 | head -n 1 || true)

	echo "## vma benchmark"
	echo
	echo "$(date -u '+%Y-%m-%d %H:%M UTC'); nproc $(nproc); memory $mem; CPU ${cpu:-unknown};" \
		"$zstd_v; $qemu_v; ${vma_v:-vma (no version)}"
	echo
	echo "Disk: ext4 image of $SOURCE, $(mib "$logical" 1073741824) GiB logical," \
		"$(mib "$alloc" 1073741824) GiB allocated. Fastest of $RUNS run(s), page cache warm." \
		"MB/s = logical size / wall / 1e6 for every row. Output = archive size (create)," \
		"allocated size of the restored disk (extract)."
	echo
	echo "| group | tool/command | wall s | MB/s | output MiB | peak RSS MiB | vs peer |"
	echo "|---|---|--:|--:|--:|--:|---|"
	local id prev="" group vs r zr
	for id in "${ROWS[@]}"; do
		group=""
		[[ ${R_GROUP[$id]} == "$prev" ]] || group="**${R_GROUP[$id]}**"
		prev=${R_GROUP[$id]}
		vs="-"
		if [[ -n ${R_REF[$id]} ]]; then
			r=$(ratio "${R_WALL[$id]}" "${R_WALL[${R_REF[$id]}]:-}")
			vs="${r}x time vs ${R_LABEL[${R_REF[$id]}]:-?}"
		fi
		if [[ -n ${R_SIZEREF[$id]} ]]; then
			zr=$(ratio "${R_SIZE[$id]}" "${R_SIZE[${R_SIZEREF[$id]}]:-}")
			vs="$vs; ${zr}x size vs ${R_LABEL[${R_SIZEREF[$id]}]:-?}"
		fi
		printf '| %s | %s | %s | %s | %s | %s | %s |\n' "$group" "${R_LABEL[$id]}" \
			"${R_WALL[$id]}" "$(awk -v s="$logical" -v w="${R_WALL[$id]}" \
				'BEGIN { if (w + 0 == 0) print "-"; else printf "%.0f", s / w / 1e6 }')" \
			"$(mib "${R_SIZE[$id]}" 1048576)" "$(mib "${R_RSS[$id]}" 1024)" "$vs"
	done

	echo
	echo "### targets"
	echo
	target "create wall vs zstd -1 -T0" "$(ratio "${R_WALL[vma-create]:-}" "${R_WALL[zstd-create]:-}")" 0.60 x
	target "create size vs zstd -1 -T0" "$(ratio "${R_SIZE[vma-create]:-}" "${R_SIZE[zstd-create]:-}")" 1.05 x
	target "extract wall vs qemu-img convert -O raw of the zstd qcow2, then sync (both durable)" \
		"$(ratio "${R_WALL[vma-extract]:-}" "${R_WALL[qemu-extract-sync]:-}")" 0.50 x
	target "verify wall vs zstd -t" "$(ratio "${R_WALL[vma-verify]:-}" "${R_WALL[zstd-verify]:-}")" 0.60 x
	target "extract of .vma.zst from a pipe vs zstd -d -c > file" \
		"$(ratio "${R_WALL[vma1-extract]:-}" "${R_WALL[zstd-v1-extract]:-}")" 1.30 x
	target "create from qcow2 vs create from raw" \
		"$(ratio "${R_WALL[vma-create-qcow2]:-}" "${R_WALL[vma-create]:-}")" 1.20 x
	target "extract to qcow2 vs extract to raw" \
		"$(ratio "${R_WALL[vma-extract-qcow2]:-}" "${R_WALL[vma-extract]:-}")" 1.20 x
	target "extract to qcow2 vs extract + qemu-img convert -O qcow2" \
		"$(ratio "${R_WALL[vma-extract-qcow2]:-}" "${R_WALL[chain-extract-qcow2]:-}")" 1.00 x
	target "dd of a vma mount's drive vs vma extract (wall; 1.25 = 0.8x throughput)" \
		"$(ratio "${R_WALL[mount-dd]:-}" "${R_WALL[vma-extract]:-}")" 1.25 x
	target "dd of a vma mount's drive vs dd of qemu-storage-daemon's FUSE export" \
		"$(ratio "${R_WALL[mount-dd]:-}" "${R_WALL[qsd-dd]:-}")" 1.00 x
	target "dd of a user's vma mount (fusermount3) vs root's" \
		"$(ratio "${R_WALL[usermount-dd]:-}" "${R_WALL[mount-dd]:-}")" 1.10 x
	target "capture of a 4 GiB qcow2 node vs qemu-img convert -O raw of it, then sync" \
		"$(ratio "${R_WALL[vma-capture]:-}" "${R_WALL[qemu-convert-4g]:-}")" 1.20 x
	target "merge of a full + 5 incrementals vs extract + create" \
		"$(ratio "${R_WALL[vma-merge]:-}" "${R_WALL[chain-extract-create]:-}")" 0.50 x
	target "vma checksum of the raw disk vs openssl dgst -sha256" \
		"$(ratio "${R_WALL[vma-checksum]:-}" "${R_WALL[openssl-sha256]:-}")" 0.30 x
	target "create to s3:// vs create to a local file" \
		"$(ratio "${R_WALL[vma-s3-create]:-}" "${R_WALL[s3-local-create]:-}")" 1.20 x
	target "extract from s3:// vs extract from a local file (wall; 1.25 = 0.8x throughput)" \
		"$(ratio "${R_WALL[vma-s3-extract]:-}" "${R_WALL[s3-local-extract]:-}")" 1.25 x
	local p50_s3="" p50_local=""
	[[ -z ${RAND[s3]:-} ]] || p50_s3=$(sed -n 's/.*p50_us=\([0-9.]*\).*/\1/p' <<<"${RAND[s3]}")
	[[ -z ${RAND[s3-local]:-} ]] || p50_local=$(sed -n 's/.*p50_us=\([0-9.]*\).*/\1/p' <<<"${RAND[s3-local]}")
	target "random 4 KiB reads through mount, p50, s3:// vs local file" "$(ratio "$p50_s3" "$p50_local")" 3.00 x
	target "sequential read through vma serve (nbdcopy to null:) vs vma extract (wall)" \
		"$(ratio "${R_WALL[serve-nbdcopy]:-}" "${R_WALL[serve-extract]:-}")" 1.00 x
	local sv_p50 sv_p99 sq_p50 sq_p99
	sv_p50=$(kv p50_us "${SRAND[vma]:-}") sv_p99=$(kv p99_us "${SRAND[vma]:-}")
	sq_p50=$(kv p50_us "${SRAND[qsd]:-}") sq_p99=$(kv p99_us "${SRAND[qsd]:-}")
	target "random 4 KiB reads, 4 connections, p50: vma serve vs qemu-storage-daemon NBD (zstd qcow2)" \
		"$(ratio "$sv_p50" "$sq_p50")" 1.50 x
	target "random 4 KiB reads, 4 connections, p99: vma serve vs qemu-storage-daemon NBD (zstd qcow2)" \
		"$(ratio "$sv_p99" "$sq_p99")" 1.50 x
	local sx_p50 sx_p99
	sx_p50=$(kv p50_us "${SRAND[vma64]:-}") sx_p99=$(kv p99_us "${SRAND[vma64]:-}")
	target "random 4 KiB reads, 4 connections, p50: vma serve (--extent-size 64) vs qemu-storage-daemon NBD" \
		"$(ratio "$sx_p50" "$sq_p50")" 1.50 x
	target "random 4 KiB reads, 4 connections, p99: vma serve (--extent-size 64) vs qemu-storage-daemon NBD" \
		"$(ratio "$sx_p99" "$sq_p99")" 1.50 x
	target "vma serve start to booted guest vs vma extract + the same boot" \
		"$(ratio "${R_WALL[serve-boot]:-}" "${R_WALL[extract-boot]:-}")" 0.20 x
	target "live restore while the guest runs vs vma extract" \
		"$(ratio "${R_WALL[serve-live-restore]:-}" "${R_WALL[serve-extract]:-}")" 1.50 x
	for id in "${ROWS[@]}"; do
		[[ $id == vma-* ]] || continue
		target "${R_LABEL[$id]} peak RSS" "$(mib "${R_RSS[$id]}" 1024)" 256 " MiB"
	done
	echo
	echo "$PASSED of $TOTAL targets met."
	if ((${#RAND_ROWS[@]})); then
		echo
		echo "### random 4 KiB reads of data through FUSE (fresh mount, readahead off)"
		echo
		echo "| reader | reads | p50 µs | p99 µs | mean µs |"
		echo "|---|--:|--:|--:|--:|"
		local r
		for r in "${RAND_ROWS[@]}"; do
			# shellcheck disable=SC2086 # word splitting of key=value pairs is intended
			set -- ${RAND[$r]}
			printf '| %s | %s | %s | %s | %s |\n' \
				"$(case $r in vma) echo "vma mount" ;; s3) echo "vma mount of s3:// (Garage)" ;;
					s3-local) echo "vma mount of the same archive, local file" ;;
					*) echo "qemu-storage-daemon FUSE export (qcow2, zstd)" ;; esac)" \
				"${1#*=}" "${2#*=}" "${3#*=}" "${4#*=}"
		done
	fi
	if ((${#SRAND_ROWS[@]})); then
		echo
		echo "### random 4 KiB reads of data over NBD (4 connections, one read in flight each)"
		echo
		echo "| server | reads | p50 µs | p99 µs | mean µs |"
		echo "|---|--:|--:|--:|--:|"
		local r
		for r in "${SRAND_ROWS[@]}"; do
			printf '| %s | %s | %s | %s | %s |\n' \
				"$(case $r in vma) echo "vma serve" ;; vma64) echo "vma serve, archive made with --extent-size 64" ;;
					*) echo "qemu-storage-daemon NBD export (qcow2, zstd)" ;; esac)" \
				"$(kv reads "${SRAND[$r]}")" "$(kv p50_us "${SRAND[$r]}")" \
				"$(kv p99_us "${SRAND[$r]}")" "$(kv mean_us "${SRAND[$r]}")"
		done
	fi
	if [[ -n ${WLAT[idle]:-} ]]; then
		echo
		echo "### guest write latency (random 4 KiB writes through qemu-storage-daemon's NBD export)"
		echo
		echo "| while | writes | p50 µs | p99 µs |"
		echo "|---|--:|--:|--:|"
		local w
		local -A what=([idle]="no capture" [capture]="vma capture running"
			[fleecing]="vma capture --fleecing running"
			[slow]="vma capture to a slow archive (zstd:19) running"
			[slow-fleecing]="vma capture --fleecing to a slow archive (zstd:19) running")
		for w in idle capture fleecing slow slow-fleecing; do
			[[ -n ${WLAT[$w]:-} ]] || continue
			# shellcheck disable=SC2086 # word splitting of key=value pairs is intended
			set -- ${WLAT[$w]}
			printf '| %s | %s | %s | %s |\n' "${what[$w]}" "${1#*=}" "${2#*=}" "${3#*=}"
		done
		if [[ -n ${SCRATCH_PEAK:-} ]]; then
			echo
			echo "The scratch image took at most $SCRATCH_PEAK during the writes with --fleecing."
		fi
	fi
}

# --- s3: archives on a three-node Garage cluster on loopback -------------------

GARAGE_STATE=$W/garage
s3_start() {
	rm -rf "$GARAGE_STATE"
	mkdir -p "$GARAGE_STATE"
	"$ROOT/scripts/garage.sh" build >&2
	VMA_SERVICE_OWNER=$$ "$ROOT/scripts/garage.sh" start "$GARAGE_STATE" >"$W/garage.env"
	set -a
	# shellcheck disable=SC1091 # written just above
	. "$W/garage.env"
	set +a
	S3_ARCHIVE="s3://$VMA_TEST_BUCKET/bench/disk.vma"
}
s3_stop() { [[ ! -d $GARAGE_STATE ]] || "$ROOT/scripts/garage.sh" stop "$GARAGE_STATE" >&2 || true; }
rm_s3_ref() { rm -f "$W/disk-s3ref.vma"; }
rm_out_s3() { rm -rf "$W/out-s3"; }
S3_MOUNT_PID=""
s3_umount() {
	! grep -qs " $MNT fuse" /proc/mounts || "$VMA" umount "$MNT" || true
	if [[ -n $S3_MOUNT_PID ]]; then
		wait "$S3_MOUNT_PID" 2>/dev/null || true
		S3_MOUNT_PID=""
	fi
}
# mount_random ARCHIVE KEY: a foreground mount of ARCHIVE, random 4 KiB reads
# into RAND[KEY], the serving process's peak RSS (KiB) into MOUNT_RSS.
mount_random() {
	local i
	s3_umount
	mkdir -p "$MNT"
	"$VMA" mount --foreground "$1" "$MNT" 2>"$W/logs/mount-$2.err" &
	S3_MOUNT_PID=$!
	for ((i = 0; i < 600; i++)); do
		grep -qs " $MNT fuse" /proc/mounts && break
		sleep 0.05
	done
	grep -qs " $MNT fuse" /proc/mounts || die "mount of $1 did not come up"
	# The index is read once before the timed reads.
	head -c 4096 "$MNT/disk.raw" >/dev/null
	RAND[$2]=$(python3 "$ROOT/bench/randread.py" "$MNT/disk.raw" "$W/disk.raw" "${BENCH_RANDOM_READS:-2000}" 1)
	RAND_ROWS+=("$2")
	MOUNT_RSS=$(awk '/^VmHWM/ { print $2 }' "/proc/$S3_MOUNT_PID/status")
	log "  mount ($2): peak RSS $MOUNT_RSS KiB, ${RAND[$2]}"
	s3_umount
}

bench_s3() {
	trap 's3_umount; s3_stop' EXIT
	s3_start
	measure -b rm_s3_ref -s "$W/disk-s3ref.vma" \
		s3-local-create s3 "vma create to a local file (reference for s3)" \
		"$VMA" create --quiet "$W/disk-s3ref.vma" "disk=$W/disk.raw"
	measure -r s3-local-create \
		vma-s3-create s3 "vma create to s3:// (Garage, 3 nodes, loopback)" \
		"$VMA" create --quiet --force "$S3_ARCHIVE" "disk=$W/disk.raw"
	measure -b rm_out_s3 -a "$W/out-s3/disk.raw" \
		s3-local-extract s3 "vma extract from the local file (reference for s3)" \
		"$VMA" extract --quiet "$W/disk-s3ref.vma" "$W/out-s3"
	measure -b rm_out_s3 -a "$W/out-s3/disk.raw" -r s3-local-extract \
		vma-s3-extract s3 "vma extract from s3://" \
		"$VMA" extract --quiet "$S3_ARCHIVE" "$W/out-s3"
	log "s3: checking round trip: out-s3/disk.raw vs disk.raw"
	cmp "$W/disk.raw" "$W/out-s3/disk.raw" >&2 || die "vma extract from s3:// did NOT reproduce disk.raw"
	rm_out_s3
	log "s3: random 4 KiB reads through mount, local file then s3://"
	mount_random "$W/disk-s3ref.vma" s3-local
	mount_random "$S3_ARCHIVE" s3
	ROWS+=(vma-s3-mount)
	R_GROUP[vma-s3-mount]=s3 R_LABEL[vma-s3-mount]="vma mount of s3:// (random reads; peak RSS of the serving process)"
	R_WALL[vma-s3-mount]="" R_RSS[vma-s3-mount]=$MOUNT_RSS R_REF[vma-s3-mount]="" R_SIZEREF[vma-s3-mount]="" R_SIZE[vma-s3-mount]=""
	rm_s3_ref
	s3_umount
	s3_stop
	trap - EXIT
}

# --- main --------------------------------------------------------------------

main() {
	check_tools
	find_vma
	mkdir -p "$W/logs"
	W=$(cd "$W" && pwd) # absolute, since paths are passed to vma
	build_disk

	log "warming the page cache with disk.raw"
	cat "$W/disk.raw" >/dev/null

	local b
	for b in create extract verify checksum vma1 qcow2 mount usermount capture chain restore serve s3; do
		[[ -z ${BENCH_ONLY:-} || " $BENCH_ONLY " == *" $b "* ]] || continue
		"bench_$b"
	done

	report | tee "$W/results.md.tmp"
	mv "$W/results.md.tmp" "$W/results.md"
	log "report written to $W/results.md"
}

main "$@"

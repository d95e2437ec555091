#!/usr/bin/env bash
# bench/scale.sh - peak memory and time of vma on an archive with many index runs.
#
# Builds, with the Writer API (tests/examples/scale_archive.rs), an archive of
# one drive of SCALE_CLUSTERS 64 KiB clusters in which every other cluster holds
# one non-zero 4 KiB block (so every cluster is an index run of its own, and
# every data cluster still needs its 64 KiB leaf hash), then runs list, verify,
# extract (raw, and qcow2), mount while reading, convert and merge on it,
# and verifies a tiny archive declaring 255 drives of 128 TiB.
# Prints a markdown table of peak RSS and wall time per command.
#
# Usage:
#   bench/scale.sh
# Environment:
#   SCALE_DIR        work directory                        (default /tmp/vma-scale)
#   SCALE_CLUSTERS   clusters (= runs) of the drive         (default 16777216: 1 TiB, 16 M runs)
#   SCALE_RAW=0      skip extract raw (it allocates 4 KiB per data cluster: 32 GiB at 16 M runs)
#   SCALE_REUSE=1    keep an archive of the same size left in SCALE_DIR by an earlier run
#   SCALE_ONLY       commands to run, e.g. "merge mount" (default: all)
#   VMA              vma binary (default: cargo build --release, target/release/vma)
#
# extract --format qcow2 runs with --compress: uncompressed, every data
# cluster takes a whole 64 KiB qcow2 cluster (512 GiB at 16 M runs); the
# writer's metadata (L1, L2 cache, refcounts) is the same either way.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
W=${SCALE_DIR:-/tmp/vma-scale}
CLUSTERS=${SCALE_CLUSTERS:-16777216}
log() { printf '[scale] %s\n' "$*" >&2; }

command -v /usr/bin/time >/dev/null || { log "needs /usr/bin/time: apt-get install -y time"; exit 2; }
if [[ -z ${VMA:-} ]]; then
	log "building vma and the archive generator (release)"
	(cd "$ROOT" && cargo build --release -q -p vma-cli -p vma-tests --example scale_archive)
	VMA=$ROOT/target/release/vma
fi
GEN=$ROOT/target/release/examples/scale_archive
[[ -x $GEN ]] || (cd "$ROOT" && cargo build --release -q -p vma-tests --example scale_archive)
export VMA

A=$W/scale.vma
if [[ ${SCALE_REUSE:-0} == 1 && -f $W/scale.vma && $(cat "$W/clusters" 2>/dev/null) == "$CLUSTERS" ]]; then
	find "$W" -mindepth 1 -maxdepth 1 ! -name scale.vma ! -name clusters -exec rm -rf {} +
else
	rm -rf "$W" && mkdir -p "$W"
fi
trap 'umount "$W/mnt" 2>/dev/null || true' EXIT
rows=()

# wanted NAME: whether SCALE_ONLY selects the command NAME (its first word).
wanted() { [[ -z ${SCALE_ONLY:-} || ${1%% *} == write || " $SCALE_ONLY " == *" ${1%% *} "* ]]; }

# measure NAME CMD...: peak RSS and wall time of one command.
measure() {
	local name=$1
	shift
	wanted "$name" || return 0
	log "$name"
	local start end out
	start=$(date +%s.%N)
	out=$(/usr/bin/time -f 'maxrss %M' "$@" 2>&1 >/dev/null) || { printf '%s\n' "$out" >&2; exit 1; }
	end=$(date +%s.%N)
	local rss
	rss=$(printf '%s\n' "$out" | sed -n 's/^maxrss //p' | tail -1)
	rows+=("| $name | $((rss / 1024)) | $(printf '%.1f' "$(echo "$end - $start" | bc)") |")
	log "${rows[-1]}"
}

if [[ ! -f $A ]]; then
	measure "write (Writer API, $CLUSTERS runs)" "$GEN" alternating "$A" "$CLUSTERS"
	echo "$CLUSTERS" >"$W/clusters"
fi
log "archive: $(du -h "$A" | cut -f1)"
measure "list" "$VMA" list "$A"
measure "verify" "$VMA" verify -q "$A"
measure "verify (pipe)" sh -c '"$VMA" verify -q - < "$0"' "$A"
if [[ ${SCALE_RAW:-1} == 1 ]]; then
	measure "extract raw" "$VMA" extract -q "$A" "$W/raw"
	rm -rf "$W/raw"
fi
measure "extract qcow2 (--compress)" "$VMA" extract -q --format qcow2 --compress "$A" "$W/qcow2"
rm -rf "$W/qcow2"
measure "convert" "$VMA" convert -q "$A" "$W/converted.vma"
rm -f "$W/converted.vma"
measure "merge" "$VMA" merge -q "$A" -o "$W/merged.vma"
rm -f "$W/merged.vma"
measure "checksum" "$VMA" checksum -q "$A"

# Mount, read 4096 MiB spread over the drive, report the serving process's peak.
if wanted mount; then
mkdir -p "$W/mnt"
log "mount (reading)"
start=$(date +%s.%N)
"$VMA" mount --foreground "$A" "$W/mnt" &
pid=$!
for _ in $(seq 600); do mountpoint -q "$W/mnt" && break; sleep 0.1; done
file=$W/mnt/disk.raw
size=$(stat -c %s "$file")
step=$((size / 4096 / 1048576))
for i in $(seq 0 4095); do
	dd if="$file" of=/dev/null bs=1M count=1 skip=$((i * step)) status=none
done
hwm=$(sed -n 's/^VmHWM:[[:space:]]*\([0-9]*\) kB/\1/p' "/proc/$pid/status")
end=$(date +%s.%N)
"$VMA" umount "$W/mnt"
wait "$pid" || true
rows+=("| mount (reading 4 GiB spread) | $((hwm / 1024)) | $(printf '%.1f' "$(echo "$end - $start" | bc)") |")
log "${rows[-1]}"
fi

# A tiny archive declaring 255 drives of 128 TiB, all zero, digests recorded.
if wanted verify; then
log "255 drives of 128 TiB"
"$GEN" huge "$W/huge.vma"
measure "verify (255 drives of 128 TiB, $(stat -c %s "$W/huge.vma") bytes)" "$VMA" verify -q "$W/huge.vma"

fi

printf '\n| command (%s runs) | peak RSS (MiB) | wall (s) |\n|---|---:|---:|\n' "$CLUSTERS"
printf '%s\n' "${rows[@]}"

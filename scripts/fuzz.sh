#!/usr/bin/env bash
# Coverage-guided fuzzing with cargo-fuzz (libFuzzer), on the stable toolchain.
#
#   scripts/fuzz.sh list                  the targets
#   scripts/fuzz.sh run TARGET [SECONDS]  fuzz TARGET (default 600 s); extra
#                                         libFuzzer flags may follow SECONDS
#   scripts/fuzz.sh cmin TARGET [MAX_LEN] fold what runs found into
#                                         fuzz/corpus/TARGET (named inputs kept,
#                                         only inputs adding coverage added,
#                                         read cut to MAX_LEN bytes)
#   scripts/fuzz.sh replay TARGET FILE... run inputs once (e.g. a crash)
#
# Inputs a run finds go to fuzz/target/work-corpus/TARGET (not committed);
# crashes, timeouts and out-of-memory inputs to fuzz/artifacts/TARGET/.
# A crash input belongs, minimized, in fuzz/regressions/TARGET/ with a unit
# test next to the fixed code; `cargo test` replays both directories.
#
# cargo-fuzz needs nightly flags (-Zsanitizer, -Cpasses=sancov); stable
# rustc accepts them with RUSTC_BOOTSTRAP=1. AddressSanitizer works so.
set -euo pipefail
self=$(realpath "$0")
cd "$(dirname "$self")/../fuzz"

CARGO_FUZZ_VERSION=0.13.2
if ! cargo fuzz --version 2>/dev/null | grep -q "$CARGO_FUZZ_VERSION"; then
  cargo install cargo-fuzz --locked --version "$CARGO_FUZZ_VERSION"
fi
export RUSTC_BOOTSTRAP=1
build_flags=(-O -s address)
# Hangs and memory blow-ups count as findings.
limits=(-rss_limit_mb=2048 -timeout=10 -max_len=65536)

# The archive targets open whole-stream compressed inputs, whose read-ahead
# thread (see vma-core/src/read/detect.rs) is detached and ends by itself soon
# after its reader is dropped: LeakSanitizer, looking while it still runs,
# reports its allocations. Leak checks stay on for the other targets.
leak_check() {
  case "$1" in
    v3|v2|vma1|stream) echo -detect_leaks=0 ;;
    *) echo -detect_leaks=1 ;;
  esac
}

usage() { sed -n '3,11p' "$self" >&2; exit 2; }
targets() { sed -n 's/^name = "\(.*\)"$/\1/p' Cargo.toml | grep -v '^vma-fuzz$'; }
check_target() {
  targets | grep -qx "$1" || { echo "unknown target $1; targets: $(targets | tr '\n' ' ')" >&2; exit 2; }
}

cmd=${1:-}
case "$cmd" in
  list)
    targets
    ;;
  run)
    target=${2:-}; [ -n "$target" ] || usage
    check_target "$target"
    seconds=${3:-600}
    shift $(($# < 3 ? $# : 3))
    work=target/work-corpus/$target
    mkdir -p "$work" "artifacts/$target" "corpus/$target" "regressions/$target"
    cargo fuzz run "${build_flags[@]}" "$target" "$work" "corpus/$target" "regressions/$target" -- \
      "${limits[@]}" "$(leak_check "$target")" -max_total_time="$seconds" -print_final_stats=1 \
      -artifact_prefix="artifacts/$target/" "$@"
    ;;
  cmin)
    target=${2:-}; [ -n "$target" ] || usage
    check_target "$target"
    work=target/work-corpus/$target
    merged=$(mktemp -d)
    trap 'rm -rf "$merged"' EXIT
    # Named inputs (seeds, hand-made ones) stay; found ones are named by hash.
    for f in corpus/"$target"/*; do
      [[ $(basename "$f") =~ ^[0-9a-f]{40}$ ]] || cp "$f" "$merged"/
    done
    max_len=${3:-65536}
    cargo fuzz run "${build_flags[@]}" "$target" "$merged" "corpus/$target" "$work" -- \
      "${limits[@]}" "$(leak_check "$target")" -max_len="$max_len" -merge=1
    rm -f corpus/"$target"/*
    cp "$merged"/* corpus/"$target"/
    echo "corpus/$target: $(ls corpus/"$target" | wc -l) files, $(du -sh corpus/"$target" | cut -f1)"
    ;;
  replay)
    target=${2:-}; [ -n "$target" ] && [ $# -ge 3 ] || usage
    check_target "$target"
    shift 2
    cargo fuzz run "${build_flags[@]}" "$target" "$@" -- "${limits[@]}" "$(leak_check "$target")"
    ;;
  *)
    usage
    ;;
esac

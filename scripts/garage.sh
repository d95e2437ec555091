#!/usr/bin/env bash
# Garage (https://garagehq.deuxfleurs.fr), an S3-compatible distributed
# object store, as a three-node cluster on loopback for the tests.
#
#   scripts/garage.sh build        build the binary if missing (cached outside
#                                  the clone); print its path
#   scripts/garage.sh bin          print the binary's path (fails if not built)
#   scripts/garage.sh start DIR    start three nodes under DIR, lay out the
#                                  cluster (replication factor 3, one zone per
#                                  node), create an access key and the bucket
#                                  "vma-test"; print the S3 settings (also in
#                                  DIR/env, sourceable)
#   scripts/garage.sh stop DIR     stop every node
#   scripts/garage.sh kill DIR N   SIGKILL node N (1-3)
#   scripts/garage.sh restart DIR N  start node N again and wait for it
#
# Optional settings of the nodes (the tests keep Garage's defaults; the
# benchmarks may trade safety for read latency, and say so):
#   GARAGE_CONSISTENCY_MODE  consistent (default), degraded (read quorum 1)
#   GARAGE_BLOCK_SIZE        Garage's data block size (default 1M)
#   GARAGE_COMPRESSION       zstd level of data blocks, or none (default 1)
#
# The nodes stop by themselves when the process that ran `start` exits
# ($VMA_SERVICE_OWNER overrides which PID is watched; 0 watches none).
# The binary lives in $VMA_TEST_CACHE (default ~/.cache/vma-test)/garage-<version>/.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=scripts/service.sh
. "$here/service.sh"

GARAGE_VERSION=2.5.0
prefix=$(cache_root)/garage-$GARAGE_VERSION
bin=$prefix/bin/garage
bucket=vma-test

die() {
  echo "garage.sh: $*" >&2
  exit 2
}

build() {
  if [ -x "$bin" ]; then
    echo "$bin"
    return
  fi
  command -v cargo >/dev/null 2>&1 || die "cargo is missing: install the Rust toolchain"
  mkdir -p "$(cache_root)"
  exec 9>"$(cache_root)/garage.lock"
  flock 9
  if [ -x "$bin" ]; then
    echo "$bin"
    return
  fi
  local tmp start
  tmp=$(mktemp -d "$(cache_root)/.build-garage.XXXXXX")
  # shellcheck disable=SC2064
  trap "rm -rf '$tmp'" EXIT
  echo "building Garage $GARAGE_VERSION (about 10 minutes on 2 cores) ..." >&2
  start=$SECONDS
  # Thin LTO and debug info off: the build takes minutes instead of most of
  # an hour, and the tests do not need the last percent of speed.
  CARGO_PROFILE_RELEASE_LTO=false CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 \
    CARGO_PROFILE_RELEASE_DEBUG=0 CARGO_TARGET_DIR="$tmp/target" \
    cargo install garage --version "$GARAGE_VERSION" --locked --quiet \
    --no-default-features --features bundled-libs,lmdb --root "$tmp/root" >&2
  rm -rf "$tmp/target"
  "$tmp/root/bin/garage" --version >/dev/null || die "the built garage does not run"
  mv -T "$tmp/root" "$prefix"
  rm -rf "$tmp"
  trap - EXIT
  echo "built Garage $GARAGE_VERSION in $((SECONDS - start)) s: $bin" >&2
  echo "$bin"
}

need_bin() {
  [ -x "$bin" ] || die "Garage is not built: run scripts/garage.sh build (scripts/setup.sh does)"
}

# g N ARGS...: the garage CLI against node N.
g() {
  local n=$1
  shift
  "$bin" -c "$dir/node$n/garage.toml" "$@"
}

# retry SECONDS CMD...: run CMD until it succeeds (its output on stdout).
retry() {
  local limit=$1 start=$SECONDS out
  shift
  until out=$("$@" 2>&1); do
    # What each failed try said, for a slow start's post-mortem.
    echo "$(date +%T.%3N) $*: ${out:0:1200}" >>"$dir/retries.log"
    if [ $((SECONDS - start)) -ge "$limit" ]; then
      echo "garage.sh: gave up after ${limit}s: $*: $out" >&2
      return 1
    fi
    sleep 0.2
  done
  printf '%s\n' "$out"
}

# Every node sees all three healthy.
all_healthy() {
  local n out
  for n in 1 2 3; do
    out=$(g "$n" status 2>&1) || return 1
    if grep -q 'FAILED NODES' <<<"$out" || [ "$(grep -c '127\.0\.0\.1:' <<<"$out")" -lt 3 ]; then
      echo "node $n: $out"
      return 1
    fi
  done
}

start_node() {
  local n=$1 owner
  owner=$(cat "$dir/owner")
  supervise "$owner" "$dir/node$n/pid" "$dir/node$n/log" \
    "$bin" -c "$dir/node$n/garage.toml" server
}

start() {
  need_bin
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  [ ! -e "$dir/env" ] || die "$dir already holds a cluster (scripts/garage.sh stop $dir first)"
  local t0 ports secret token n compression=${GARAGE_COMPRESSION:-1}
  [[ $compression =~ ^-?[0-9]+$ ]] || compression="\"$compression\""
  t0=$(date +%s%N)
  mapfile -t ports < <(free_ports 9)
  secret=$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')
  token=$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')
  echo "${VMA_SERVICE_OWNER:-$PPID}" >"$dir/owner"
  for n in 1 2 3; do
    local rpc=${ports[$((3 * n - 3))]} s3=${ports[$((3 * n - 2))]} admin=${ports[$((3 * n - 1))]}
    mkdir -p "$dir/node$n/meta" "$dir/node$n/data"
    echo "$s3" >"$dir/node$n/s3_port"
    cat >"$dir/node$n/garage.toml" <<EOF
metadata_dir = "$dir/node$n/meta"
data_dir = "$dir/node$n/data"
db_engine = "lmdb"
replication_factor = 3
consistency_mode = "${GARAGE_CONSISTENCY_MODE:-consistent}"
block_size = "${GARAGE_BLOCK_SIZE:-1M}"
compression_level = $compression
rpc_bind_addr = "127.0.0.1:$rpc"
rpc_public_addr = "127.0.0.1:$rpc"
rpc_secret = "$secret"

[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:$s3"
root_domain = ".s3.garage.localhost"

[admin]
api_bind_addr = "127.0.0.1:$admin"
admin_token = "$token"
EOF
    chmod 600 "$dir/node$n/garage.toml"
    start_node "$n"
  done
  local -a ids
  for n in 1 2 3; do
    ids[n]=$(retry 30 g "$n" node id -q | tail -n1)
    echo "${ids[n]}" >"$dir/node$n/id"
  done
  local m
  for n in 1 2 3; do
    for m in 1 2 3; do
      [ "$n" = "$m" ] || retry 30 g "$n" node connect "${ids[m]}" >/dev/null
    done
  done
  for n in 1 2 3; do
    retry 30 g 1 layout assign -z "dc$n" -c 1G "${ids[n]%%@*}" >/dev/null
  done
  retry 30 g 1 layout apply --version 1 >/dev/null
  local key_id key_secret
  key_id=GK$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')
  key_secret=$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')
  retry 30 g 1 key import --yes -n vma-test "$key_id" "$key_secret" >/dev/null
  retry 30 g 1 bucket create "$bucket" >/dev/null
  retry 30 g 1 bucket allow --read --write --owner "$bucket" --key "$key_id" >/dev/null
  retry 30 all_healthy >/dev/null
  local endpoints=()
  for n in 1 2 3; do
    wait_port "$(cat "$dir/node$n/s3_port")" 30 || die "node $n's S3 port does not answer"
    endpoints+=("http://127.0.0.1:$(cat "$dir/node$n/s3_port")")
  done
  local ms=$((($(date +%s%N) - t0) / 1000000))
  {
    echo "GARAGE_DIR=$dir"
    echo "GARAGE_BIN=$bin"
    echo "AWS_ENDPOINT_URL=${endpoints[0]}"
    echo "GARAGE_S3_ENDPOINTS=$(
      IFS=,
      echo "${endpoints[*]}"
    )"
    echo "AWS_REGION=garage"
    echo "AWS_ACCESS_KEY_ID=$key_id"
    echo "AWS_SECRET_ACCESS_KEY=$key_secret"
    echo "VMA_TEST_BUCKET=$bucket"
    echo "GARAGE_START_MS=$ms"
  } >"$dir/env.tmp"
  mv "$dir/env.tmp" "$dir/env"
  cat "$dir/env"
}

stop() {
  local n
  for n in 1 2 3; do
    stop_pidfile "$dir/node$n/pid"
  done
  rm -f "$dir/env"
}

node_arg() {
  [[ ${1:-} =~ ^[123]$ ]] || die "node number 1, 2 or 3 expected"
}

case "${1:-}" in
  build) build ;;
  bin)
    need_bin
    echo "$bin"
    ;;
  start | stop | kill | restart)
    [ -n "${2:-}" ] || die "usage: $0 $1 DIR"
    dir=$2
    case "$1" in
      start) start ;;
      stop) stop ;;
      kill)
        node_arg "${3:-}"
        pid=$(cat "$dir/node$3/pid" 2>/dev/null) || die "node $3 is not running"
        kill -KILL "$pid"
        for _ in $(seq 250); do
          alive "$pid" || break
          sleep 0.02
        done
        rm -f "$dir/node$3/pid"
        ;;
      restart)
        node_arg "${3:-}"
        need_bin
        if [ -s "$dir/node$3/pid" ] && alive "$(cat "$dir/node$3/pid")"; then
          die "node $3 is running"
        fi
        start_node "$3"
        retry 30 g "$3" node id -q >/dev/null
        # Reconnect now rather than at the next peering round.
        for m in 1 2 3; do
          if [ "$m" != "$3" ]; then
            retry 30 g "$3" node connect "$(cat "$dir/node$m/id")" >/dev/null
            retry 30 g "$m" node connect "$(cat "$dir/node$3/id")" >/dev/null
          fi
        done
        retry 60 all_healthy >/dev/null
        wait_port "$(cat "$dir/node$3/s3_port")" 30 || die "node $3's S3 port does not answer"
        ;;
    esac
    ;;
  *)
    sed -n '2,/^set -e/p' "$0" | sed '$d' >&2
    exit 2
    ;;
esac

#!/usr/bin/env bash
# moto's S3 server (PyPI moto[server]) on loopback, for the S3 protocol paths
# Garage lacks: Object Lock (retention, locked versions) and conditional
# PUT (If-None-Match: *). Only for those paths: moto is a mock, not a store.
#
#   scripts/moto.sh install      install it if missing (a venv cached outside
#                                the clone); print the venv
#   scripts/moto.sh start DIR    start the server; print its settings (also in
#                                DIR/env, sourceable)
#   scripts/moto.sh stop DIR     stop it
#
# The server stops by itself when the process that ran `start` exits
# ($VMA_SERVICE_OWNER overrides which PID is watched; 0 watches none).
# The venv lives in $VMA_TEST_CACHE (default ~/.cache/vma-test)/moto-<version>/.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=scripts/service.sh
. "$here/service.sh"

MOTO_VERSION=5.2.5
venv=$(cache_root)/moto-$MOTO_VERSION

die() {
  echo "moto.sh: $*" >&2
  exit 2
}

installed() {
  [ -f "$venv/.complete" ] && [ -x "$venv/bin/python" ]
}

install() {
  if installed; then
    echo "$venv"
    return
  fi
  mkdir -p "$(cache_root)"
  exec 9>"$(cache_root)/moto.lock"
  flock 9
  if installed; then
    echo "$venv"
    return
  fi
  command -v python3 >/dev/null 2>&1 || die "python3 is missing (scripts/setup.sh installs it)"
  local start=$SECONDS
  # Built at its final path (a venv is not relocatable) and marked complete
  # last; a half-built one is removed first.
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "moto[server]==$MOTO_VERSION" >&2 ||
    {
      rm -rf "$venv"
      die "pip install moto[server]==$MOTO_VERSION failed"
    }
  "$venv/bin/python" -c 'import moto.server' || die "moto does not import"
  touch "$venv/.complete"
  echo "installed moto $MOTO_VERSION in $((SECONDS - start)) s: $venv" >&2
  echo "$venv"
}

start() {
  installed || die "moto is not installed: run scripts/moto.sh install (scripts/setup.sh does)"
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  [ ! -e "$dir/env" ] || die "$dir already holds a server (scripts/moto.sh stop $dir first)"
  local port t0
  t0=$(date +%s%N)
  port=$(free_ports 1)
  supervise "${VMA_SERVICE_OWNER:-$PPID}" "$dir/pid" "$dir/log" \
    "$venv/bin/python" -m moto.server -H 127.0.0.1 -p "$port"
  wait_port "$port" 60 || die "moto did not listen on port $port: $(tail -n 5 "$dir/log")"
  {
    echo "MOTO_DIR=$dir"
    echo "AWS_ENDPOINT_URL=http://127.0.0.1:$port"
    echo "AWS_REGION=us-east-1"
    echo "AWS_ACCESS_KEY_ID=testing"
    echo "AWS_SECRET_ACCESS_KEY=testing"
    echo "MOTO_START_MS=$((($(date +%s%N) - t0) / 1000000))"
  } >"$dir/env.tmp"
  mv "$dir/env.tmp" "$dir/env"
  cat "$dir/env"
}

case "${1:-}" in
  install) install ;;
  start | stop)
    [ -n "${2:-}" ] || die "usage: $0 $1 DIR"
    dir=$2
    if [ "$1" = start ]; then
      start
    else
      stop_pidfile "$dir/pid"
      rm -f "$dir/env"
    fi
    ;;
  *)
    sed -n '2,/^set -e/p' "$0" | sed '$d' >&2
    exit 2
    ;;
esac

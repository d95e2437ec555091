#!/usr/bin/env bash
# Install what the project needs on a fresh Debian machine (idempotent).
# Needs root for apt-get; skips packages that are already present.
set -euo pipefail

need=()
command -v zstd >/dev/null 2>&1 || need+=(zstd)
command -v mkfs.ext4 >/dev/null 2>&1 || [ -x /usr/sbin/mkfs.ext4 ] || [ -x /sbin/mkfs.ext4 ] || need+=(e2fsprogs)
command -v qemu-img >/dev/null 2>&1 || need+=(qemu-utils)
[ -x /usr/bin/time ] || need+=(time)
command -v cmp >/dev/null 2>&1 || need+=(diffutils)
command -v gzip >/dev/null 2>&1 || need+=(gzip)
command -v lzop >/dev/null 2>&1 || need+=(lzop)

if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "missing packages: ${need[*]}; run as root or: sudo apt-get install -y ${need[*]}" >&2
    exit 2
  fi
  echo "installing: ${need[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi

command -v python3 >/dev/null 2>&1 || { echo "python3 is missing" >&2; exit 2; }
python3 -c 'import venv, ensurepip' 2>/dev/null || need_venv=1
if [ "${need_venv:-0}" = 1 ]; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv
fi

# An independent VMA v1 reader for the interoperability tests.
venv=$(dirname "$0")/../target/interop-venv
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import dissect.hypervisor.backup.vma' 2>/dev/null; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check dissect.hypervisor==3.13
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo is missing: install the Rust toolchain (https://rustup.rs)" >&2
  exit 2
fi

#!/usr/bin/env bash
# Install what the project needs on a fresh Debian machine (idempotent).
# Needs root for apt-get; skips packages that are already present.
set -euo pipefail

need=()
command -v zstd >/dev/null 2>&1 || need+=(zstd)
command -v mkfs.ext4 >/dev/null 2>&1 || [ -x /usr/sbin/mkfs.ext4 ] || [ -x /sbin/mkfs.ext4 ] || need+=(e2fsprogs)
[ -x /usr/bin/time ] || need+=(time)
command -v cmp >/dev/null 2>&1 || need+=(diffutils)
command -v gzip >/dev/null 2>&1 || need+=(gzip)
command -v lzop >/dev/null 2>&1 || need+=(lzop)
command -v xz >/dev/null 2>&1 || need+=(xz-utils)
command -v cpio >/dev/null 2>&1 || need+=(cpio)
command -v fusermount3 >/dev/null 2>&1 || need+=(fuse3)
{ command -v nbdinfo && command -v nbdcopy; } >/dev/null 2>&1 || need+=(libnbd-bin)
# The test guest's initramfs needs a static busybox.
{ [ -x /bin/busybox ] && ! ldd /bin/busybox >/dev/null 2>&1; } || need+=(busybox-static)
{ command -v flock && command -v setpriv; } >/dev/null 2>&1 || need+=(util-linux)

# QEMU 10 (the test guest's system emulator, qemu-img, qemu-nbd,
# qemu-storage-daemon): from bookworm-backports on Debian 12.
qemu_major() {
  "$1" --version 2>/dev/null | sed -n 's/.*version \([0-9]*\)\..*/\1/p' | head -n1
}
need_qemu=()
for tool in qemu-img:qemu-utils qemu-system-x86_64:qemu-system-x86; do
  major=$(qemu_major "${tool%%:*}") || major=0
  [ "${major:-0}" -ge 10 ] || need_qemu+=("${tool#*:}")
done
codename=$(. /etc/os-release 2>/dev/null && echo "${VERSION_CODENAME:-}")
backports=
[ "$codename" = bookworm ] && backports=bookworm-backports

if [ ${#need[@]} -gt 0 ] || [ ${#need_qemu[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "missing packages: ${need[*]} ${need_qemu[*]}; run as root or: sudo apt-get install -y ${need[*]} ${need_qemu[*]}${backports:+ (QEMU from $backports)}" >&2
    exit 2
  fi
  if [ ${#need_qemu[@]} -gt 0 ] && [ -n "$backports" ] &&
    ! grep -rqsE "^Suites:.*\b$backports\b|^deb .* $backports " /etc/apt/sources.list /etc/apt/sources.list.d/; then
    # The same mirror as the main suite's entry.
    mirror=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | grep -v security | head -n1)
    mirror=${mirror:-http://deb.debian.org/debian}
    echo "adding the $backports apt source ($mirror)" >&2
    cat >/etc/apt/sources.list.d/backports.sources <<EOF
Types: deb
URIs: $mirror
Suites: $backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  fi
  echo "installing: ${need[*]} ${need_qemu[*]}" >&2
  apt-get update -qq
  if [ ${#need[@]} -gt 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
  fi
  if [ ${#need_qemu[@]} -gt 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      ${backports:+-t "$backports"} "${need_qemu[@]}"
  fi
fi

# Users other than root mount through fusermount3, which opens /dev/fuse as
# the user: give it the mode distributions give it (some containers make it
# 0600).
if [ "$(id -u)" -eq 0 ] && [ -c /dev/fuse ] && [ "$(stat -c %a /dev/fuse)" != 666 ]; then
  chmod 0666 /dev/fuse
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

# Test fixtures cached outside the clone (~/.cache/vma-test): the tiny
# guest (seconds), Garage (about 10 minutes the first time) and moto.
here=$(dirname "$0")
"$here/guest.sh" build >/dev/null
"$here/garage.sh" build >/dev/null
"$here/moto.sh" install >/dev/null

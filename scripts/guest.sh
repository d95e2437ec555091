#!/usr/bin/env bash
# The tiny test guest: a Debian kernel and a busybox initramfs, built when
# missing and cached outside the clone.
#
#   scripts/guest.sh build   build it if missing; print the cache directory
#   scripts/guest.sh key     print the cache key (kernel package and version)
#
# The cache directory ($VMA_TEST_CACHE, default ~/.cache/vma-test) holds
# guest-<kernel>-<version>-s<script version>/ with vmlinuz (bzImage),
# vmlinux (the same kernel uncompressed, booted directly), initrd.img and info. Builds are atomic (a temporary directory renamed into place) and
# serialized by a lock, so concurrent callers all get the same finished guest.
#
# The guest's /init mounts proc, sys and dev, loads the virtio and ext4
# modules, mounts the root disk and runs a script, printing "VMATEST ..."
# lines on the console (ttyS0), then powers off. Kernel command line:
#   vmatest.root=DEV     disk to mount on /mnt (default /dev/vda; "none": no mount)
#   vmatest.ro           mount it read-only (ext4 journal not replayed)
#   vmatest.script=PATH  script on the disk, relative to its root (default /vmatest.sh)
#   vmatest.cmd=BASE64   a script on the command line instead (base64 of its text)
# It runs in /mnt with $VMATEST_ROOT=/mnt and prints "VMATEST script-exit N".
set -euo pipefail

# Bump when the guest's contents change: the cache key includes it.
SCRIPT_VERSION=1
# Kernel modules the guest loads (with their dependencies), in this order.
WANTED_MODULES=(crc32c_generic virtio_pci virtio_blk scsi_mod virtio_scsi sd_mod ext4)

cache_root=${VMA_TEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vma-test}

die() {
  echo "guest.sh: $*" >&2
  exit 2
}

# The kernel image package that linux-image-amd64 points at, and its version.
kernel_package() {
  local meta deps
  meta=$(apt-cache show --no-all-versions linux-image-amd64 2>/dev/null) || meta=
  if [ -z "$meta" ] && [ "$(id -u)" -eq 0 ]; then
    apt-get update -qq >/dev/null
    meta=$(apt-cache show --no-all-versions linux-image-amd64 2>/dev/null) || meta=
  fi
  deps=$(printf '%s\n' "$meta" | sed -n 's/^Depends: *//p' | head -n1)
  # "linux-image-6.1.0-57-amd64 (= 6.1.192-3)"
  [[ $deps =~ ^(linux-image-[^ ,]+)\ \(=\ ([^\)]+)\) ]] || return 1
  echo "${BASH_REMATCH[1]} ${BASH_REMATCH[2]}"
}

key() {
  local pkg ver
  if read -r pkg ver < <(kernel_package); then
    echo "guest-${pkg#linux-image-}-${ver}-s${SCRIPT_VERSION}"
    return
  fi
  # No package lists (offline, not root): the newest guest built by this
  # version of the script, if any.
  local found
  found=$(ls -1d "$cache_root"/guest-*-s"${SCRIPT_VERSION}" 2>/dev/null | sort -V | tail -n1) || true
  [ -n "$found" ] || die "cannot resolve linux-image-amd64 (run apt-get update as root) and no cached guest in $cache_root"
  basename "$found"
}

# Module names (without .ko) in load order: dependencies first.
resolve_modules() {
  local root=$1
  shift
  local -A seen=()
  local order=()
  visit() {
    local name=${1//-/_} file deps d
    [ -n "${seen[$name]:-}" ] && return
    seen[$name]=1
    file=$(find "$root" -name "${name}.ko" -o -name "${name//_/-}.ko" | head -n1)
    [ -n "$file" ] || die "kernel module $name not found in the kernel package"
    deps=$(tr '\0' '\n' <"$file" | sed -n 's/^depends=//p' | head -n1)
    for d in ${deps//,/ }; do visit "$d"; done
    order+=("$file")
  }
  for m in "$@"; do visit "$m"; done
  printf '%s\n' "${order[@]}"
}

# The uncompressed kernel (ELF with a PVH entry point) inside a bzImage:
# QEMU boots it directly, skipping the BIOS and the decompressor, which is
# seconds faster without KVM.
extract_vmlinux() {
  local in=$1 out=$2 off
  off=$(LC_ALL=C grep -obUaP '\xfd7zXZ\x00' "$in" | head -n1 | cut -d: -f1) || true
  if [ -n "$off" ]; then
    tail -c +$((off + 1)) "$in" | xz -dc --single-stream >"$out" 2>/dev/null || true
  else
    off=$(LC_ALL=C grep -obUaP '\x28\xb5\x2f\xfd' "$in" | head -n1 | cut -d: -f1) || true
    [ -n "$off" ] && { tail -c +$((off + 1)) "$in" | zstd -dcq >"$out" 2>/dev/null || true; }
  fi
  if [ "$(head -c 4 "$out" 2>/dev/null | od -An -tx1 | tr -d ' ')" != 7f454c46 ]; then
    rm -f "$out"
    echo "guest.sh: no uncompressed kernel found in $in; booting the bzImage (slower)" >&2
  fi
}

write_init() {
  cat >"$1" <<'INIT'
#!/bin/busybox sh
/bin/busybox mkdir -p /dev /proc /sys /mnt /tmp
/bin/busybox mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
echo "VMATEST init uptime=$(cut -d' ' -f1 /proc/uptime)"

finish() {
  sync
  echo "VMATEST poweroff"
  poweroff -f
  sleep 10
}
fail() {
  echo "VMATEST fail $*"
  finish
}

for m in $(cat /lib/modules/order); do
  insmod "/lib/modules/$m" || fail "insmod $m"
done

root=/dev/vda
ro=
script=/vmatest.sh
cmd=
for w in $(cat /proc/cmdline); do
  case "$w" in
    vmatest.root=*) root=${w#*=} ;;
    vmatest.ro) ro=1 ;;
    vmatest.script=*) script=${w#*=} ;;
    vmatest.cmd=*) cmd=${w#*=} ;;
  esac
done

if [ "$root" != none ]; then
  i=0
  while [ ! -b "$root" ]; do
    i=$((i + 1))
    [ $i -gt 500 ] && fail "no block device $root"
    sleep 0.02
  done
  opts=rw
  [ -n "$ro" ] && opts=ro,noload
  mount -t ext4 -o "$opts" "$root" /mnt || fail "mount $root"
  echo "VMATEST mounted $root $opts"
fi

cd /mnt
export VMATEST_ROOT=/mnt
if [ -n "$cmd" ]; then
  echo "$cmd" | base64 -d >/tmp/cmd.sh || fail "vmatest.cmd is not base64"
  sh /tmp/cmd.sh
  rc=$?
elif [ -f "/mnt$script" ]; then
  sh "/mnt$script"
  rc=$?
else
  echo "VMATEST no-script $script"
  rc=127
fi
echo "VMATEST script-exit $rc"
cd /
sync
if [ "$root" != none ]; then
  umount /mnt || mount -o remount,ro /mnt || fail "umount $root"
fi
finish
INIT
  chmod 755 "$1"
}

build() {
  local key dir tmp pkg ver start
  key=$(key)
  dir=$cache_root/$key
  if [ -f "$dir/info" ]; then
    echo "$dir"
    return
  fi
  mkdir -p "$cache_root"
  exec 9>"$cache_root/guest.lock"
  flock 9
  if [ -f "$dir/info" ]; then
    echo "$dir"
    return
  fi
  read -r pkg ver < <(kernel_package) || die "cannot resolve linux-image-amd64"
  for t in busybox cpio gzip xz dpkg-deb apt-get; do
    command -v "$t" >/dev/null 2>&1 || die "$t is missing (scripts/setup.sh installs it)"
  done
  ldd /bin/busybox >/dev/null 2>&1 && die "/bin/busybox is not static: install busybox-static"
  start=$(date +%s%N)
  tmp=$(mktemp -d "$cache_root/.build-guest.XXXXXX")
  # shellcheck disable=SC2064
  trap "rm -rf '$tmp'" EXIT
  (
    cd "$tmp"
    local sandbox=()
    [ "$(id -u)" -eq 0 ] && sandbox=(-o APT::Sandbox::User=root)
    apt-get download -qq "${sandbox[@]}" "$pkg=$ver" >/dev/null
    dpkg-deb --fsys-tarfile ./*.deb | tar -x --wildcards \
      './boot/vmlinuz-*' \
      './lib/modules/*/kernel/drivers/virtio/*' \
      './lib/modules/*/kernel/drivers/block/virtio_blk.ko' \
      './lib/modules/*/kernel/drivers/scsi/scsi_*.ko' \
      './lib/modules/*/kernel/drivers/scsi/sd_mod.ko' \
      './lib/modules/*/kernel/drivers/scsi/virtio_scsi.ko' \
      './lib/modules/*/kernel/fs/ext4/*' \
      './lib/modules/*/kernel/fs/jbd2/*' \
      './lib/modules/*/kernel/fs/mbcache.ko' \
      './lib/modules/*/kernel/block/*' \
      './lib/modules/*/kernel/lib/*' \
      './lib/modules/*/kernel/crypto/*'
    rm -f ./*.deb
  )
  local out=$tmp/out initramfs=$tmp/initramfs
  mkdir -p "$out" "$initramfs"/{bin,dev,proc,sys,mnt,tmp,lib/modules}
  cp "$tmp"/boot/vmlinuz-* "$out/vmlinuz"
  extract_vmlinux "$out/vmlinuz" "$out/vmlinux"
  cp /bin/busybox "$initramfs/bin/busybox"
  write_init "$initramfs/init"
  local modules f
  modules=$(resolve_modules "$tmp/lib/modules" "${WANTED_MODULES[@]}")
  for f in $modules; do
    cp "$f" "$initramfs/lib/modules/"
    basename "$f" >>"$initramfs/lib/modules/order"
  done
  (cd "$initramfs" && find . | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0 | gzip -9) >"$out/initrd.img"
  {
    echo "kernel_package=$pkg"
    echo "kernel_version=$ver"
    echo "script_version=$SCRIPT_VERSION"
    echo "modules=$(tr '\n' ' ' <"$initramfs/lib/modules/order")"
    echo "built=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "build_ms=$((($(date +%s%N) - start) / 1000000))"
  } >"$out/info"
  mv -T "$out" "$dir"
  rm -rf "$tmp"
  trap - EXIT
  echo "guest built in $(sed -n 's/^build_ms=//p' "$dir/info") ms: $dir" >&2
  echo "$dir"
}

case "${1:-}" in
  build) build ;;
  key) key ;;
  *)
    echo "usage: $0 build|key" >&2
    exit 2
    ;;
esac

#!/usr/bin/env bash
# Build vma and run the main job on a small generated disk:
# create -> list -> verify -> extract (raw and qcow2) -> compare.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
cargo build --release --locked -p vma-cli
VMA=$PWD/target/release/vma
# A temporary directory of its own is removed at the end, also on failure
# or Ctrl-C; DEMO_DIR=DIR works in DIR and keeps it.
if [ -n "${DEMO_DIR:-}" ]; then
  work=$DEMO_DIR
  mkdir -p "$work"
else
  work=$(mktemp -d "${TMPDIR:-/tmp}/vma-demo.XXXXXX")
  trap 'rm -rf "$work"' EXIT
fi
echo "working in $work"

# A 256 MiB sparse disk with an ext4 file system holding some files, plus
# a config blob as Proxmox VE would store it.
disk=$work/vm-100-disk-0.raw
rm -f "$disk"
truncate -s 256M "$disk"
src=$work/src
mkdir -p "$src"
cp -r /usr/share/doc/bash /usr/share/doc/coreutils "$src/" 2>/dev/null || true
head -c 20M /dev/urandom > "$src/random.bin"
PATH=$PATH:/usr/sbin:/sbin mkfs.ext4 -q -F -d "$src" "$disk"
printf 'boot: order=scsi0\ncores: 2\nmemory: 2048\nscsi0: local:vm-100-disk-0,size=256M\n' > "$work/qemu-server.conf"

set -x
"$VMA" create --force "$work/backup.vma" --config "$work/qemu-server.conf" drive-scsi0="$disk"
"$VMA" list "$work/backup.vma"
"$VMA" config "$work/backup.vma" qemu-server.conf
"$VMA" verify "$work/backup.vma"
"$VMA" extract --force "$work/backup.vma" "$work/restore"
cmp "$disk" "$work/restore/drive-scsi0.raw"
"$VMA" extract --force --format qcow2 "$work/backup.vma" "$work/restore-qcow2"
qemu-img check "$work/restore-qcow2/drive-scsi0.qcow2"
qemu-img compare "$work/restore-qcow2/drive-scsi0.qcow2" "$disk"
{ set +x; } 2>/dev/null
echo "drive digest recorded: $("$VMA" list --json "$work/backup.vma" | sed -n 's/.*"digest": "\([0-9a-f]*\)".*/\1/p')"
echo "drive digest restored: $("$VMA" checksum "$work/restore/drive-scsi0.raw" | cut -d' ' -f1)"
du -h --apparent-size "$disk" | sed 's/^/logical  /'
du -h "$disk" | sed 's/^/allocated /'
du -h "$work/backup.vma" | sed 's/^/archive  /'
du -h "$work/restore/drive-scsi0.raw" | sed 's/^/restored (sparse) /'
echo "demo OK: the restored disks (raw and qcow2) are identical to the original"

#!/usr/bin/env bash
# bench/serve.sh - the guest steps of bench/run.sh's serve group.
#
#   serve.sh boot-serve ARCHIVE DIR     vma serve + qcow2 overlay + boot until the root is mounted
#   serve.sh boot-extract ARCHIVE DIR   vma extract + boot of the raw drive until the root is mounted
#   serve.sh start-vm ARCHIVE DIR       vma serve + overlay + boot, left running (for live-restore)
#   serve.sh stop-vm DIR                stop what start-vm started
#
# The guest is the tests' tiny guest (scripts/guest.sh build): its init
# prints "VMATEST init", then "VMATEST mounted" once /dev/vda is mounted.
# KVM when /dev/kvm can boot a stock kernel (not PVM), else TCG, as the
# tests choose (VMA_TEST_ACCEL=kvm|tcg overrides). The drive is the
# archive's only drive; its export name is read from `vma list --json`.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VMA=${VMA:-$ROOT/target/release/vma}

accel() {
	case ${VMA_TEST_ACCEL:-} in
	kvm) echo "-accel kvm -cpu host" ;;
	tcg) echo "-accel tcg -cpu max" ;;
	*) if [[ -r /dev/kvm && -w /dev/kvm && ! -e /sys/module/kvm_pvm ]]; then
		echo "-accel kvm -cpu host"
	else
		echo "-accel tcg -cpu max"
	fi ;;
	esac
}

# qemu DIR DRIVE-ARGS...: start the guest in the background; pid in DIR/qemu.pid.
qemu() {
	local dir=$1 guest
	shift
	guest=$(bash "$ROOT/scripts/guest.sh" build)
	local kernel=$guest/vmlinux
	[[ -f $kernel ]] || kernel=$guest/vmlinuz
	rm -f "$dir/serial.log"
	# shellcheck disable=SC2046 # accel's words are separate arguments
	qemu-system-x86_64 -nodefaults -no-reboot -display none -m 256 $(accel) \
		-kernel "$kernel" -initrd "$guest/initrd.img" \
		-append "console=ttyS0 panic=-1 reboot=t quiet vmatest.root=/dev/vda vmatest.cmd=$(printf 'read x </dev/ttyS1' | base64 -w0)" \
		-chardev "file,id=console,path=$dir/serial.log" -serial chardev:console \
		-chardev "socket,id=ctl,path=$dir/ctl.sock,server=on,wait=off" -serial chardev:ctl \
		-qmp "unix:$dir/qmp.sock,server=on,wait=off" \
		"$@" >"$dir/qemu.out" 2>"$dir/qemu.err" &
	echo $! >"$dir/qemu.pid"
}

wait_mounted() {
	local dir=$1 i
	for ((i = 0; i < 6000; i++)); do
		grep -qs "VMATEST mounted" "$dir/serial.log" && return 0
		grep -qs "VMATEST fail" "$dir/serial.log" && break
		kill -0 "$(<"$dir/qemu.pid")" 2>/dev/null || break
		sleep 0.02
	done
	cat "$dir/serial.log" "$dir/qemu.err" >&2 || true
	echo "serve.sh: the guest did not mount its root" >&2
	exit 1
}

kill_pidfile() {
	local f=$1 pid
	[[ -f $f ]] || return 0
	pid=$(<"$f")
	kill "$pid" 2>/dev/null || true
	while kill -0 "$pid" 2>/dev/null; do sleep 0.02; done
	rm -f "$f"
}

drive_name() {
	"$VMA" list --json "$1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["drives"][0]["name"])'
}

start_vm() {
	local archive=$1 dir=$2 name
	mkdir -p "$dir"
	name=$(drive_name "$archive")
	"$VMA" serve "$archive" --socket "$dir/serve.sock" --detach --pid-file "$dir/serve.pid" 2>/dev/null
	rm -f "$dir/overlay.qcow2"
	qemu-img create -q -f qcow2 -b "nbd+unix:///$name?socket=$dir/serve.sock" -F raw "$dir/overlay.qcow2"
	qemu "$dir" \
		-blockdev "{\"driver\":\"nbd\",\"node-name\":\"archive-vd0\",\"server\":{\"type\":\"unix\",\"path\":\"$dir/serve.sock\"},\"export\":\"$name\",\"read-only\":true,\"reconnect-delay\":30}" \
		-blockdev "{\"driver\":\"qcow2\",\"node-name\":\"overlay-vd0\",\"file\":{\"driver\":\"file\",\"filename\":\"$dir/overlay.qcow2\"},\"backing\":\"archive-vd0\"}" \
		-device virtio-blk-pci,drive=overlay-vd0,id=vd0
	wait_mounted "$dir"
}

stop_vm() {
	local dir=$1
	kill_pidfile "$dir/qemu.pid"
	kill_pidfile "$dir/serve.pid"
	rm -f "$dir/overlay.qcow2"
}

case ${1:-} in
boot-serve)
	start_vm "$2" "$3"
	stop_vm "$3"
	;;
boot-extract)
	mkdir -p "$3"
	name=$(drive_name "$2")
	"$VMA" extract --quiet --force --drive "$name" "$2" "$3/extracted"
	qemu "$3" -drive "if=none,id=d0,format=raw,file=$3/extracted/$name.raw" -device virtio-blk-pci,drive=d0,id=vd0
	wait_mounted "$3"
	kill_pidfile "$3/qemu.pid"
	;;
start-vm) start_vm "$2" "$3" ;;
stop-vm) stop_vm "$2" ;;
*)
	sed -n '2,13p' "$0" >&2
	exit 2
	;;
esac

#!/usr/bin/env bash
# Write the seed corpora into fuzz/corpus/<target>/ (seed-* files): small
# valid inputs of every format, made by the project's own writers (the
# `vma` binary), by qemu-img/qemu-io (qcow2), and by hand for the NBD and
# QMP protocols. Run it from anywhere; it builds `vma` first.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
cargo build -q -p vma-cli --locked
vma=$root/target/debug/vma
for t in qemu-img qemu-io zstd gzip lzop python3; do
  command -v "$t" >/dev/null || { echo "seeds.sh needs $t (apt-get install qemu-utils zstd gzip lzop python3)" >&2; exit 2; }
done
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"

# Small images: a few 4 KiB blocks of patterned data, odd sizes, holes.
python3 - <<'EOF'
def image(name, size, blocks):
    b = bytearray(size)
    for at, seed in blocks:
        for i in range(min(4096, size - at)):
            b[at + i] = (seed * 31 + i // 97) & 0xFF
    open(name, "wb").write(b)
image("a.raw", 70001, [(0, 1), (65536, 2)])          # two clusters, odd tail
image("b.raw", 4096 * 3, [(4096, 3)])                 # one block in the middle
image("c.raw", 1, [(0, 4)])                           # one byte
image("z.raw", 200000, [])                            # all zero
image("a2.raw", 70001, [(0, 1), (65536, 5)])          # a.raw with its tail changed
open("vm.conf", "w").write("name: fuzz\nmemory: 512\nscsi0: local:vm-100-disk-0,size=70001\n")
EOF

# The v2 corpus holds archives of version 2.0, which no writer makes any
# more: its seeds are kept as they are.
mkdir -p "$root/fuzz/corpus"/{v3,vma1,stream,qcow2,nbd,qmp}
for t in v3 vma1 stream qcow2 nbd qmp; do
  find "$root/fuzz/corpus/$t" -name 'seed-*' ! -name 'seed-v2-*' -delete
done
v3=$root/fuzz/corpus/v3
v1=$root/fuzz/corpus/vma1
st=$root/fuzz/corpus/stream
q=$root/fuzz/corpus/qcow2

"$vma" -q create --compress none "$v3/seed-one-drive-plain" c.raw
"$vma" -q create --compress zstd "$v3/seed-one-drive-zstd" a.raw
"$vma" -q create --compress zstd:3 --config vm.conf "$v3/seed-three-drives-config" a.raw b.raw z.raw
"$vma" -q create --compress none "$v3/seed-two-drives-plain" b.raw c.raw
"$vma" -q diff --compress zstd --against "$v3/seed-one-drive-zstd" a=a2.raw -o "$v3/seed-incremental"
"$vma" -q merge "$v3/seed-incremental" -o "$v3/seed-synthetic-full"

"$vma" -q create --format vma1 "$v1/seed-one-drive" c.raw
"$vma" -q create --format vma1 --config vm.conf "$v1/seed-three-drives-config" a.raw b.raw z.raw
"$vma" -q create --format vma1 "$v1/seed-two-drives" b.raw c.raw

zstd -q -19 -c "$v1/seed-three-drives-config" >"$st/seed-vma1-zst"
gzip -9 -c "$v1/seed-two-drives" >"$st/seed-vma1-gz"
zstd -q -19 -c "$v3/seed-one-drive-plain" >"$st/seed-v3-zst"
lzop -9 -c "$v1/seed-two-drives" >"$st/seed-vma1-lzo"

# qcow2: small clusters keep the images small; plain, zlib and zstd
# compressed clusters, zero clusters, version 2, and a backing file name.
qimg() { qemu-img create -q -f qcow2 "$@"; }
qio() { qemu-io -f qcow2 "$@" >/dev/null; }
qimg -o cluster_size=512 p.qcow2 64k
qio -c 'write -P 0x5a 0 1k' -c 'write -z 4k 1k' -c 'write -P 7 63k 1k' p.qcow2
qemu-img convert -q -c -O qcow2 -o cluster_size=512,compression_type=zlib p.qcow2 zlib.qcow2
qemu-img convert -q -c -O qcow2 -o cluster_size=512,compression_type=zstd p.qcow2 zstd.qcow2
qimg -o cluster_size=512,compat=0.10 v2.qcow2 8k
qio -c 'write -P 1 512 512' v2.qcow2
qimg -o cluster_size=512 -b p.qcow2 -F qcow2 overlay.qcow2 64k
qio -c 'write -P 9 1k 512' overlay.qcow2
qimg -o cluster_size=512 -b b.raw -F raw raw-backing.qcow2 12k
cp p.qcow2 "$q/seed-plain"
cp zlib.qcow2 "$q/seed-zlib"
cp zstd.qcow2 "$q/seed-zstd"
cp v2.qcow2 "$q/seed-v2"
cp overlay.qcow2 "$q/seed-backing-qcow2"
cp raw-backing.qcow2 "$q/seed-backing-raw"

# NBD: what QEMU's client sends (fixed newstyle), and the other options.
python3 - "$root/fuzz/corpus/nbd" <<'EOF'
import struct, sys
out = sys.argv[1]
IHAVEOPT = 0x49484156454F5054
def opt(code, data=b""):
    return struct.pack(">QII", IHAVEOPT, code, len(data)) + data
def info(name, kinds=()):
    return struct.pack(">I", len(name)) + name + struct.pack(">H", len(kinds)) + b"".join(struct.pack(">H", k) for k in kinds)
def meta(name, *queries):
    return struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries)) + b"".join(struct.pack(">I", len(q)) + q for q in queries)
def req(kind, offset, length, flags=0, cookie=1, payload=b""):
    return struct.pack(">IHHQQI", 0x25609513, flags, kind, cookie, offset, length) + payload
flags = struct.pack(">I", 3)  # fixed newstyle, no zeroes
transmission = (req(1, 0, 4096, payload=b"\x5a" * 4096, cookie=1)
                + req(1, 70000, 1, payload=b"\x01", cookie=2)
                + req(6, 4096, 65536, cookie=3)
                + req(4, 0, 512, cookie=4)
                + req(3, 0, 0, cookie=5)
                + req(0, 0, 512, cookie=6)
                + req(1, 70001, 511, payload=b"\0" * 511, cookie=7)
                + req(2, 0, 0, cookie=8))
seeds = {
    "go-default": flags + opt(8) + opt(7, info(b"", (3,))) + transmission,
    "go-named": flags + opt(7, info(b"drive-scsi0", (0, 3))) + transmission,
    "export-name": struct.pack(">I", 1) + opt(1, b"drive-scsi0") + transmission,
    "list-info-abort": flags + opt(3) + opt(6, info(b"nope")) + opt(6, info(b"")) + opt(2),
    # What a reader of a view sends: structured replies, metadata contexts,
    # reads and block status.
    "views": flags + opt(8) + opt(9, meta(b"drive-scsi0", b"base:", b"qemu:"))
             + opt(10, meta(b"drive-scsi0", b"base:allocation", b"qemu:dirty-bitmap:b0", b"nope"))
             + opt(7, info(b"drive-scsi0", (3,)))
             + req(0, 0, 4096, flags=4, cookie=1) + req(0, 3, 100, cookie=2) + req(0, 70000, 2, cookie=3)
             + req(7, 0, 20000, cookie=4) + req(7, 4096, 100, flags=8, cookie=5)
             + req(1, 0, 512, payload=b"\x01" * 512, cookie=6) + req(2, 0, 0, cookie=7),
}
for name, data in seeds.items():
    open(f"{out}/seed-{name}", "wb").write(data)
EOF

# QMP: greeting, replies to the client's commands in order, events; steps
# are separated by NUL bytes (see vma_capture::fuzzing::qmp).
python3 - "$root/fuzz/corpus/qmp" <<'EOF'
import json, sys
out = sys.argv[1]
greeting = {"QMP": {"version": {"qemu": {"micro": 0, "minor": 0, "major": 10}, "package": "Debian 1:10.0"}, "capabilities": ["oob"]}}
def line(v):
    return (json.dumps(v) + "\n").encode()
ev = {"event": "JOB_STATUS_CHANGE", "data": {"status": "concluded", "id": "vma-drive0"}, "timestamp": {"seconds": 1700000000, "microseconds": 5}}
bj = {"event": "BLOCK_JOB_COMPLETED", "data": {"device": "vma-drive0", "len": 1048576, "offset": 1048576, "speed": 0, "type": "backup"}, "timestamp": {"seconds": 1, "microseconds": 2}}
block = [{"device": "drive0", "qdev": "/machine/peripheral/scsi0", "locked": False, "removable": False, "type": "unknown",
          "inserted": {"node-name": "disk0", "drv": "qcow2", "file": "/tmp/d.qcow2", "ro": False, "encrypted": False, "image": {"filename": "/tmp/d.qcow2", "format": "qcow2", "virtual-size": 1048576},
                       "dirty-bitmaps": [{"name": "vma-1", "count": 65536, "granularity": 65536, "recording": True, "busy": False, "persistent": True}]}}]
nodes = [{"node-name": "disk0", "drv": "qcow2", "file": "/tmp/d.qcow2", "ro": False, "image": {"filename": "/tmp/d.qcow2", "format": "qcow2", "virtual-size": 1048576},
          "dirty-bitmaps": [{"name": "vma-1", "count": 0, "granularity": 65536, "recording": True, "busy": False, "persistent": True}]}]
jobs = [{"id": "vma-drive0", "type": "backup", "status": "running", "current-progress": 5, "total-progress": 10}]
steps = [line(ev) + line(greeting),
         line({"return": {}, "id": 1}),
         line(bj) + line({"return": block, "id": 2}),
         line({"return": nodes, "id": 3}),
         line({"return": jobs, "id": 4}),
         line({"error": {"class": "CommandNotFound", "desc": "no such command"}, "id": 5})]
open(f"{out}/seed-session", "wb").write(b"\0".join(steps))
open(f"{out}/seed-greeting-only", "wb").write(b"\0".join([line(greeting), line({"return": {}, "id": 1})]))
open(f"{out}/seed-error-replies", "wb").write(b"\0".join([line(greeting), line({"return": {}, "id": 1}),
    line({"error": {"class": "GenericError", "desc": "x"}, "id": 2}), b"not json\n" + line({"return": [], "id": 3}),
    line({"return": 5, "id": 4})]))
EOF

du -sh "$root/fuzz/corpus"/* | sed "s|$root/||"

#!/usr/bin/env python3
"""Random 4 KiB read latency of an NBD export, over several connections.

Usage: nbdrand.py SOCKET EXPORT LAYOUT COUNT CONNECTIONS SEED

A minimal NBD client (fixed newstyle, NBD_OPT_GO, simple replies; the
protocol: https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md)
on each of CONNECTIONS unix-socket connections, each in its own thread with
one read in flight; COUNT reads in all. Offsets are 4 KiB aligned, drawn with
a fixed seed from the data ranges of LAYOUT (a sparse file with the export's
content), as randread.py draws them. Prints one line:
"reads=N conns=C p50_us=X p99_us=Y mean_us=Z".
"""
import os
import random
import socket
import struct
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from randread import data_ranges  # noqa: E402

BLOCK = 4096
OPT_MAGIC = 0x49484156454F5054
REP_MAGIC = 0x3E889045565A9
REQ_MAGIC = 0x25609513
SIMPLE_MAGIC = 0x67446698


def recv_exact(s, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise EOFError("server closed the connection")
        buf += chunk
    return bytes(buf)


def connect(path, export):
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    magic, opt, _flags = struct.unpack(">QQH", recv_exact(s, 18))
    if magic != 0x4E42444D41474943 or opt != OPT_MAGIC:
        raise ValueError("not a fixed-newstyle NBD server")
    s.sendall(struct.pack(">I", 1 | 2))  # FIXED_NEWSTYLE | NO_ZEROES
    name = export.encode()
    data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
    s.sendall(struct.pack(">QII", OPT_MAGIC, 7, len(data)) + data)  # NBD_OPT_GO
    while True:
        magic, _opt, kind, length = struct.unpack(">QIII", recv_exact(s, 20))
        payload = recv_exact(s, length)
        if magic != REP_MAGIC:
            raise ValueError("bad option reply")
        if kind == 1:  # NBD_REP_ACK
            return s
        if kind & 0x80000000:
            raise ValueError(f"NBD_OPT_GO refused ({kind:#x}): {payload!r}")


def reader(path, export, offsets, out):
    s = connect(path, export)
    lat = []
    for i, off in enumerate(offsets):
        req = struct.pack(">IHHQQI", REQ_MAGIC, 0, 0, i, off, BLOCK)
        t = time.perf_counter()
        s.sendall(req)
        magic, err, _handle = struct.unpack(">IIQ", recv_exact(s, 16))
        if magic != SIMPLE_MAGIC or err:
            raise ValueError(f"read at {off} failed: error {err}")
        recv_exact(s, BLOCK)
        lat.append(time.perf_counter() - t)
    s.sendall(struct.pack(">IHHQQI", REQ_MAGIC, 0, 2, 0, 0, 0))  # NBD_CMD_DISC
    s.close()
    out.extend(lat)


def main():
    path, export, layout = sys.argv[1], sys.argv[2], sys.argv[3]
    count, conns, seed = int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
    ranges = [(a, b) for a, b in data_ranges(layout) if b - a >= BLOCK]
    weights = [b - a for a, b in ranges]
    rng = random.Random(seed)
    offsets = []
    for a, b in rng.choices(ranges, weights, k=count):
        offsets.append(a + rng.randrange((b - a) // BLOCK) * BLOCK)
    lats, threads = [], []
    per = [offsets[i::conns] for i in range(conns)]
    for chunk in per:
        t = threading.Thread(target=reader, args=(path, export, chunk, lats))
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
    if len(lats) != count:
        sys.exit("some reader failed")
    lats.sort()
    us = [x * 1e6 for x in lats]
    print(f"reads={count} conns={conns} p50_us={us[len(us) // 2]:.0f} "
          f"p99_us={us[int(len(us) * 0.99)]:.0f} mean_us={sum(us) / len(us):.0f}")


if __name__ == "__main__":
    main()

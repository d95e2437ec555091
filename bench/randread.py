#!/usr/bin/env python3
"""Random 4 KiB read latency of a file (for example a drive file on a mount).

Usage: randread.py TARGET LAYOUT COUNT SEED

Offsets are 4 KiB aligned and drawn, with a fixed seed, from the data (not
hole) ranges of LAYOUT, a sparse file with the same content as TARGET (the
benchmark's raw disk): that is what reading files inside the guest's
filesystem touches. Kernel readahead is switched off (POSIX_FADV_RANDOM), so
every read asks the filesystem under TARGET for exactly 4 KiB. Prints one line:
"reads=N p50_us=X p99_us=Y mean_us=Z".
"""
import os
import random
import sys
import time

BLOCK = 4096


def data_ranges(path):
    """(start, end) byte ranges of data in a sparse file, via SEEK_DATA/SEEK_HOLE."""
    ranges = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break  # ENXIO: no data after pos
            end = os.lseek(fd, start, os.SEEK_HOLE)
            ranges.append((start, end))
            pos = end
    finally:
        os.close(fd)
    return ranges


def pick_offsets(ranges, count, seed):
    """count distinct aligned offsets, uniform over the data bytes."""
    blocks = [(s // BLOCK, (e - s) // BLOCK) for s, e in ranges if e - s >= BLOCK]
    total = sum(n for _, n in blocks)
    if total == 0:
        sys.exit("randread: the layout file has no data")
    rng = random.Random(seed)
    picks = sorted(rng.sample(range(total), min(count, total)))
    offsets, i, seen = [], 0, 0
    for p in picks:
        while p >= seen + blocks[i][1]:
            seen += blocks[i][1]
            i += 1
        offsets.append((blocks[i][0] + p - seen) * BLOCK)
    rng.shuffle(offsets)
    return offsets


def main():
    if len(sys.argv) != 5:
        sys.exit(__doc__)
    target, layout, count, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    offsets = pick_offsets(data_ranges(layout), count, seed)
    fd = os.open(target, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
    lat = []
    for off in offsets:
        t0 = time.perf_counter_ns()
        n = len(os.pread(fd, BLOCK, off))
        lat.append(time.perf_counter_ns() - t0)
        if n != BLOCK:
            sys.exit(f"randread: short read of {n} bytes at {off}")
    os.close(fd)
    lat.sort()
    pct = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] / 1000
    print(f"reads={len(lat)} p50_us={pct(0.50):.0f} p99_us={pct(0.99):.0f} "
          f"mean_us={sum(lat) / len(lat) / 1000:.0f}")


if __name__ == "__main__":
    main()

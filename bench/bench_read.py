"""A positional read from the page cache on one thread against the same read split across the compute's OpenMP
threads (native/read_range.c), by size, in isolation: the lower bound for native.read_range.PARALLEL_READ_BYTES
(inside a decode the split costs more: the threshold's comment says where it sits and why).

Each read follows a small torch matmul, so the OpenMP pool is as warm as after a decode layer. The file is a
scratch file in the page cache (written here, so nothing needs to be downloaded or converted). Writes
bench/results/NAME.json and NAME.md.

    python bench/bench_read.py [--threads 2] [--reads 200] [--name read_split]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch
from common import write_report

from prism_load import native
from prism_load.native import read_range

SIZES_KIB = (64, 96, 128, 192, 256, 512, 1024, 4096)
FILE_BYTES = 64 << 20


def timed_reads(fd: int, buf: np.ndarray, threads: int, reads: int) -> float:
    """Mean microseconds of one read of len(buf) bytes at successive offsets, each after a small matmul."""
    a = torch.randn(256, 256)
    total = 0.0
    for i in range(reads):
        a @ a
        start = time.perf_counter()
        got = read_range.pread_into(fd, buf, (i * len(buf)) % (FILE_BYTES - len(buf)), threads)
        total += time.perf_counter() - start
        assert got == len(buf)
    return 1e6 * total / reads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reads", type=int, default=200)
    ap.add_argument("--name", default="read_split")
    args = ap.parse_args()
    if not native.available():
        raise SystemExit(f"the native library is needed: {native.unavailable_reason()}")
    torch.set_num_threads(args.threads)
    threshold = read_range.PARALLEL_READ_BYTES
    read_range.PARALLEL_READ_BYTES = 1  # every size through the native split, for the comparison
    rows = []
    with tempfile.NamedTemporaryFile() as f:
        f.write(np.random.default_rng(0).integers(0, 256, FILE_BYTES, dtype=np.uint8).tobytes())
        f.flush()
        fd = f.fileno()
        for kib in SIZES_KIB:
            buf = np.empty(kib << 10, np.uint8)
            one, split = [], []
            for _ in range(2):  # interleaved, twice
                one.append(timed_reads(fd, buf, 1, args.reads))
                split.append(timed_reads(fd, buf, args.threads, args.reads))
            rows.append({"kib": kib, "one_thread_us": min(one), "split_us": min(split)})
            print(f"{kib:5d} KiB: one thread {min(one):.1f} us, {args.threads} threads {min(split):.1f} us")
    data = {"threads": args.threads, "reads": args.reads, "threshold_bytes": threshold, "rows": rows}
    lines = [f"# A read from the page cache: one thread against {args.threads} (native/read_range.c)", "",
             f"Each size read {args.reads} times at successive offsets after a small matmul, twice, interleaved; the "
             f"faster mean of the two. The runtime splits reads of {threshold >> 10} KiB and more.", "",
             f"| KiB | one thread, us | {args.threads} threads, us | split / one |", "|---|---|---|---|"]
    lines += [f"| {r['kib']} | {r['one_thread_us']:.1f} | {r['split_us']:.1f} | {r['split_us'] / r['one_thread_us']:.2f} |"
              for r in rows]
    path = write_report(args.name, data, "\n".join(lines) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

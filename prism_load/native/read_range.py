"""Positional reads of a file range split across OpenMP threads (read_range.c): the expert cache's misses and
a resident load's experts. Why: a read from the page cache is a copy on the calling core, and the decode's other
threads wait for it; two cores copy about twice as fast as one (read_range.c says by how much). Small ranges
stay one os.preadv: a parallel region costs more than it saves there (PARALLEL_READ_BYTES)."""

from __future__ import annotations

import ctypes
import os

from .build import load

# below this one thread reads. Alone, two threads read from the page cache faster than one from about 96 KiB on
# the Xeon (python bench/bench_read.py --name read_split_xeon), but inside the decode the reference model's 60-230
# KB misses split from 128 KiB decoded 3-4% slower on 2 threads, twice each way (bench_runtime.py --threads 2
# --no-memory: runtime_2t_split*_xeon against runtime_2t_before_split*_xeon), while the 583 M model's 4.6 MB
# ones gained (peer_split_read_xeon)
PARALLEL_READ_BYTES = 1 << 20


def pread_into(fd: int, buf, offset: int, threads: int = 1) -> int:
    """Reads len(buf) bytes of fd from offset into buf (a writable contiguous buffer: a numpy array, a
    bytearray); returns the bytes read, fewer only where the file ends first; OSError where a read fails.
    Split across `threads` OpenMP threads where the range is at least PARALLEL_READ_BYTES and the native library
    loads; one os.preadv otherwise. Call it from outside any parallel region (a decode callback, a load)."""
    view = memoryview(buf).cast("B")
    if threads > 1 and len(view) >= PARALLEL_READ_BYTES:
        fn = load()[0]
        if fn is not None:
            got = fn.pread(fd, offset, len(view), ctypes.addressof(ctypes.c_char.from_buffer(view)), threads)
            if got < 0:
                raise OSError(-got, os.strerror(-got))
            return got
    return os.preadv(fd, [view], offset)

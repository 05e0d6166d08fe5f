"""Memory for packed experts (the resident loader's arenas, the expert cache's slabs), asked of the kernel in
transparent huge pages.

Why: decode streams every chosen expert's bytes once a token. On 4 KiB pages that is one TLB refill per 4 KiB
(tens of thousands a token on a few-hundred-MB model), and the hardware prefetchers stop at each page edge;
on 2 MiB pages both mostly go away. Linux gives huge pages to a mapping marked MADV_HUGEPAGE before it is
touched when THP is "always" or "madvise" (the common default); elsewhere the advice does nothing and the
memory is ordinary. PRISM_HUGEPAGES=0 turns the advice off (to measure what it buys, or on a machine where
huge pages hurt).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys

import torch

HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14


@functools.cache
def _madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    fn = libc.madvise
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def huge_buffer(nbytes: int, enabled: bool | None = None) -> torch.Tensor:
    """An untouched uint8 CPU tensor of nbytes whose whole 2 MiB pages are marked MADV_HUGEPAGE (where the
    platform has it and `enabled`); a plain torch.empty otherwise. The tensor starts on a huge-page boundary
    (it views a larger allocation, at most one huge page more, of which only the touched pages are resident).
    enabled None: unless PRISM_HUGEPAGES=0."""
    if enabled is None:
        enabled = os.environ.get("PRISM_HUGEPAGES", "1") != "0"
    advise = _madvise() if enabled else None
    if advise is None or nbytes < HUGE_PAGE:
        return torch.empty(nbytes, dtype=torch.uint8)
    base = torch.empty(nbytes + HUGE_PAGE, dtype=torch.uint8)
    start = -base.data_ptr() % HUGE_PAGE
    buf = base[start : start + nbytes]
    whole = nbytes // HUGE_PAGE * HUGE_PAGE
    advise(buf.data_ptr(), whole, MADV_HUGEPAGE)  # advice only: a failure leaves ordinary pages
    return buf

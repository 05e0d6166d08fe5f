"""Linear layers that pick the faster arithmetic for bf16 on CPUs.

Why: a bf16 model streams half the bytes of an fp32 one, which is what decode (one row at a time, memory-bound)
needs. But torch's bf16 product of a few rows is compute-bound on CPUs and reads bf16 weights no faster than
fp32 ones, so decode rows (up to native.GEMV_MAX_ROWS) go to prism's native bf16 kernel where it runs (same
products, fp32 sums, the result rounded to bf16 as torch rounds it). And on x86 CPUs without AVX512-BF16 or
AMX, torch's bf16 product of many rows is several times slower than the fp32 one (bench/results/kernels_*.md),
so from UPCAST_ROWS rows on (prefill), a bf16 product on such a CPU runs in fp32 and rounds its result to
bf16: the weight is converted per call, which costs far less than it saves there.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

UPCAST_ROWS = 8  # rows from which an fp32 product beats bf16 on CPUs without bf16 matmul (kernels_*.md)


@functools.cache
def cpu_has_bf16_matmul() -> bool:
    cpu = torch.cpu
    return bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
                or getattr(cpu, "_is_amx_tile_supported", lambda: False)())


@functools.cache
def _native():
    """prism_load.native where its kernels run, else None (imported late: native imports torch only)."""
    from .. import native

    return native if native.available() else None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear; bf16 decode rows on the CPU through the native kernel, and a bf16 product of at least
    UPCAST_ROWS rows on a CPU without bf16 matmul in fp32."""
    if x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16 and x.device.type == "cpu":
        rows = x.numel() // max(x.shape[-1], 1)
        native = _native()
        if native is not None and rows <= native.GEMV_MAX_ROWS:
            y = native.bf16_linear(x, weight, bias)
            if y is not None:
                return y
        if rows >= UPCAST_ROWS and not cpu_has_bf16_matmul():
            return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(torch.bfloat16)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear whose product goes through `linear` (same parameters, same state_dict)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)

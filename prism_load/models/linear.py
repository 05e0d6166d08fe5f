"""Linear layers that pick the faster arithmetic for bf16 weights on CPUs, with bf16 or fp32 activations.

Why: a bf16 model streams half the bytes of an fp32 one, which is what decode (one row at a time, memory-bound)
needs. But torch's bf16 product of a few rows is compute-bound on CPUs and reads bf16 weights no faster than
fp32 ones, so decode rows (up to native.GEMV_MAX_ROWS) go to prism's native bf16 kernel where it runs (same
products, fp32 sums, the result rounded to bf16 as torch rounds it). And on x86 CPUs without AVX512-BF16 or
AMX, torch's bf16 product of many rows is several times slower than the fp32 one (bench/results/kernels_*.md),
so from UPCAST_ROWS rows on (prefill), a bf16 product on such a CPU runs in fp32 and rounds its result to
bf16: the weight is converted per call, which costs far less than it saves there.

A CPU model computes in fp32 with its dense weights held in bf16 (models/precision.py): the native kernel
takes an fp32 x for decode rows, and prefill rows multiply the weight widened to fp32 a block of rows at a
time (so a big LM head never needs an fp32 copy of itself).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

# rows from which an fp32 product (the weight widened per call) beats torch's bf16 one on CPUs without bf16
# matmul: on an Ice Lake-class CPU, 8 rows lost (4.4 ms vs 3.1 at 5632x1024), 16 tied, 32 and 64 won
# (`python bench/bench_kernels.py --shapes 5632x1024,1024x2816 --m 8,16,32,64`)
UPCAST_ROWS = 16


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


UPCAST_CHUNK_BYTES = 32 << 20  # fp32 weight rows widened at once by an fp32 x's product with a bf16 weight


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, also for an fp32 x against a bf16 weight (a model holding bf16 weights and computing in fp32:
    the product of the widened weight, in x's dtype). On the CPU, bf16-weight decode rows go through the native
    kernel, and a bf16 product of at least UPCAST_ROWS rows on a CPU without bf16 matmul runs in fp32."""
    if weight.dtype == torch.bfloat16 and x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float32):
        rows = x.numel() // max(x.shape[-1], 1)
        native = _native()
        if native is not None and rows <= native.GEMV_MAX_ROWS:
            y = native.bf16_linear(x, weight, bias)
            if y is not None:
                return y
        if x.dtype == torch.float32:
            return widened_linear(x, weight, bias)
        if rows >= UPCAST_ROWS and not cpu_has_bf16_matmul():
            return widened_linear(x.float(), weight, bias).to(torch.bfloat16)  # the bias widened there too
    if weight.dtype != x.dtype:
        return widened_linear(x, weight, bias)
    return F.linear(x, weight, bias)


def widened_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear with the weight converted to x's dtype a block of rows at a time, so the converted copy never
    exceeds UPCAST_CHUNK_BYTES (an LM head of 150k rows would otherwise need gigabytes of fp32 per call)."""
    n, k = weight.shape
    bias = None if bias is None else bias.to(x.dtype)
    step = max(1, UPCAST_CHUNK_BYTES // max(1, k * x.element_size()))
    if step >= n:
        return F.linear(x, weight.to(x.dtype), bias)
    out = x.new_empty(*x.shape[:-1], n)
    for n0 in range(0, n, step):
        n1 = min(n, n0 + step)
        out[..., n0:n1] = F.linear(x, weight[n0:n1].to(x.dtype), None if bias is None else bias[n0:n1])
    return out


class Linear(nn.Linear):
    """nn.Linear whose product goes through `linear` (same parameters, same state_dict)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)

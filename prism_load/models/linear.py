"""Linear layers that pick the faster arithmetic for bf16 on CPUs without bf16 matrix instructions.

Why: a bf16 model streams half the bytes of an fp32 one, which is what decode (one row at a time, memory-bound)
needs. But on x86 CPUs without AVX512-BF16 or AMX, torch's bf16 matrix product of many rows is several times
slower than the fp32 one (bench/results/kernels_1thread.md: 64 rows of a 5632x1024 weight take about four
times as long in bf16). So from UPCAST_ROWS rows on (prefill), a bf16 product on such a CPU runs in fp32 and
rounds its result to bf16: the weight is converted per call, which costs far less than it saves there.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

UPCAST_ROWS = 8  # rows from which an fp32 product beats bf16 here (measured: 1 row loses, 64 win ~4x)


@functools.cache
def cpu_has_bf16_matmul() -> bool:
    cpu = torch.cpu
    return bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
                or getattr(cpu, "_is_amx_tile_supported", lambda: False)())


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, with a bf16 product of at least UPCAST_ROWS rows on a CPU without bf16 matmul run in fp32."""
    if (x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16 and x.device.type == "cpu"
            and x.numel() >= UPCAST_ROWS * x.shape[-1] and not cpu_has_bf16_matmul()):
        return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(torch.bfloat16)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear whose product goes through `linear` (same parameters, same state_dict)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)

"""Shared numeric helpers of the tests: error measures, LLM-like input statistics, and the FP8/FP4 formats
decoded from their bit definitions (references the decoders under test are held to)."""

from __future__ import annotations

import numpy as np
import torch


def rel_max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def statistics(inp: int, seed: int = 0, dead: tuple[int, ...] = (7,)):
    """LLM-like inputs: log-normal channel scales, an outlier channel, shared directions; H = xᵀx / N."""
    gen = torch.Generator().manual_seed(seed)
    scale = torch.exp(torch.randn(inp, generator=gen) * 0.7)
    scale[3] *= 12
    x = (torch.randn(1024, inp, generator=gen) + torch.randn(1024, 8, generator=gen) @ torch.randn(8, inp, generator=gen) * 0.5) * scale
    x[:, list(dead)] = 0.0
    return (x.T @ x / len(x)).double()


def e4m3_reference(bits: np.ndarray) -> np.ndarray:
    """float8_e4m3fn from its bits: sign, 4 exponent bits (bias 7), 3 mantissa bits, subnormals at exponent 0."""
    bits = bits.astype(np.int64)
    sign = np.where(bits & 0x80, -1.0, 1.0)
    exp, man = (bits >> 3) & 0xF, bits & 0x7
    normal = (1.0 + man / 8.0) * np.power(2.0, exp - 7.0)
    subnormal = (man / 8.0) * 2.0**-6
    return sign * np.where(exp == 0, subnormal, normal)


def e2m1_reference(nibble: int) -> float:
    """FP4 e2m1 from its bits: sign, 2 exponent bits (bias 1), 1 mantissa bit, subnormal at exponent 0."""
    sign = -1.0 if nibble & 0x8 else 1.0
    exp, man = (nibble >> 1) & 0x3, nibble & 0x1
    return sign * (man * 0.5 if exp == 0 else 2.0 ** (exp - 1) * (1 + man / 2))

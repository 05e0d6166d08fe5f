"""Group-wise asymmetric integer quantization (w ≈ (q − zero) · scale per group of input channels).

Scales and zeros are stored in fp16, so every rounding decision here is made against the fp16-rounded
values the decoder will use: decode(encode(W)) is exactly what was optimised.

- `rtn`: round-to-nearest from each group's min/max (the plain baseline, as llama.cpp's Q4_1 / GPTQ's
  "RTN" rows). Also the uniform baseline of prism's quality benchmark.
- `clipped`: importance-aware range search: per group, shrink the range and keep the shrink that minimises
  Σ_j m_j (w_j − ŵ_j)², with m_j the per-channel second moments of the inputs (AWQ/imatrix-style
  weighting; plain MSE without them).

Shape key: O output rows, I input channels, G groups per row, g group size.
"""

from __future__ import annotations

import math

import torch

from prism_load.codecs import Encoding, pack_bits

SHRINK_GRID = torch.linspace(1.0, 0.55, 19)  # range shrink factors tried by the clipping search


def grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """[O, I] -> [O, G, g], zero-padding the last group (padding never affects the stored values)."""
    out, inp = w.shape
    groups = math.ceil(inp / group_size)
    pad = groups * group_size - inp
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    return w.reshape(out, groups, group_size)


def group_mask(inp: int, group_size: int) -> torch.Tensor:
    """[G, g] True on real channels, False on the last group's padding."""
    groups = math.ceil(inp / group_size)
    return (torch.arange(groups * group_size) < inp).reshape(groups, group_size)


def scale_zero(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16-representable scale and zero mapping [lo, hi] onto [0, 2^bits − 1]."""
    qmax = 2**bits - 1
    scale = (hi - lo) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scale16 = scale.to(torch.float16)
    scale16 = torch.where(scale16 > 0, scale16, torch.full_like(scale16, 2.0**-24))  # underflow guard
    zero16 = (-lo / scale16.float()).to(torch.float16)
    return scale16.float(), zero16.float()


def quantize_with(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes for w given (broadcastable) scale and zero."""
    return torch.clamp(torch.round(w / scale + zero), 0, 2**bits - 1)


def dequantize_with(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return (q - zero) * scale


def search_scales(wg: torch.Tensor, bits: int, weights: torch.Tensor | None, mask: torch.Tensor,
                  grid: torch.Tensor = SHRINK_GRID) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (row, group) scale/zero [O, G, 1] minimising the (weighted) squared error over a shrink grid."""
    lo = torch.where(mask, wg, torch.full_like(wg, math.inf)).amin(-1, keepdim=True)
    hi = torch.where(mask, wg, torch.full_like(wg, -math.inf)).amax(-1, keepdim=True)
    cw = mask.float() if weights is None else weights * mask
    best_err = best_scale = best_zero = None
    for shrink in grid:
        scale, zero = scale_zero(lo * shrink, hi * shrink, bits)
        err = ((dequantize_with(quantize_with(wg, scale, zero, bits), scale, zero) - wg) ** 2 * cw).sum(-1, keepdim=True)
        if best_err is None:
            best_err, best_scale, best_zero = err, scale, zero
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, scale, best_scale)
            best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def store(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, enc: Encoding) -> dict[str, torch.Tensor]:
    """q [O, G, g] codes, scale/zero [O, G, 1] -> the stored tensors of an `int` encoding."""
    out, inp = enc.shape
    codes = q.reshape(out, -1)[:, :inp].to(torch.uint8)
    return {
        "qweight": pack_bits(codes, enc.bits),
        "scales": scale[..., 0].to(torch.float16).contiguous(),
        "zeros": zero[..., 0].to(torch.float16).contiguous(),
    }


def rtn(w: torch.Tensor, enc: Encoding) -> dict[str, torch.Tensor]:
    """Plain round-to-nearest from each group's min/max."""
    return clipped(w, enc, None, grid=torch.ones(1))


def clipped(w: torch.Tensor, enc: Encoding, channel_weights: torch.Tensor | None,
            grid: torch.Tensor = SHRINK_GRID) -> dict[str, torch.Tensor]:
    """Round-to-nearest with a per-group range chosen by (importance-weighted) error search."""
    g = enc.group_size
    wg = grouped(w.float(), g)
    mask = group_mask(w.shape[1], g)
    weights = None if channel_weights is None else grouped(channel_weights.float()[None], g)[0].clamp_min(0)
    scale, zero = search_scales(wg, enc.bits, weights, mask, grid)
    return store(quantize_with(wg, scale, zero, enc.bits), scale, zero, enc)

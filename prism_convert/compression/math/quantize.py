"""Group-wise asymmetric integer quantization: w ≈ (q − zero) · scale per group of `group_size` inputs.

Scales and zeros are stored in fp16 and decoded in fp32 (prism_load.container.codecs.dequantize_int), so every
choice here is made with the fp16 values the decoder will use and scored with the decoder's own
formula: what decode(encode(W)) returns is exactly what was optimised.

- `rtn`: round-to-nearest from each group's min/max — the plain baseline (GPTQ's "RTN" rows; prism's
  uniform benchmark baseline at group 128).
- `clipped`: importance-aware range search. Per group, shrink the range towards zero over a grid (as
  GPTQ's `Quantizer(mse=True)` and AWQ's clipping do), then refit scale and zero by weighted least
  squares on the chosen codes (as llama.cpp's `make_qkx2_quants`), keeping whatever minimises
  Σ_j m_j (w_j − ŵ_j)², where m_j is the second moment of input channel j (AWQ / llama.cpp imatrix
  weighting; plain MSE when no statistics). The min/max candidate is always among those scored, so the
  search never does worse than `rtn` on that error.

Shape key: O output rows, I input channels, G groups per row, g group size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from prism_load.container.codecs import pack_bits
from prism_load.container.format import Encoding
from prism_load.errors import EncodingError

SHRINK_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55)  # range shrink factors; 1.0 first
FP16_MAX = 65504.0
FP16_TINY = 2.0**-24  # smallest positive fp16 (subnormal)
ZERO_RANGE = 2.0**14  # |zero| stays below this: finer steps than fp16 can place the zero buy nothing
CHUNK_ELEMENTS = 1 << 18  # rows per pass sized so the search's work buffers stay in cache


def grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """[O, I] -> [O, G, g], zero-padding the last group (the mask keeps padding out of every choice)."""
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


def fp16_params(scale: torch.Tensor, zero_point: torch.Tensor, bound: torch.Tensor,
                bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16-representable (scale, zero) as fp32 for a wanted scale and real-valued lower end
    `zero_point` (the value that code 0 decodes to); `bound` [.., 1] = max |w| of the group.

    The scale is rounded up, never down, so the group's range still fits in 2^bits codes; it is kept
    at least max|w| / 2^14 so the zero (≈ −lo / scale) stays well inside fp16 and its rounding error
    (≤ 2^-11 |lo|) is no larger than fp16's own precision of the weights."""
    scale = torch.maximum(scale, bound / ZERO_RANGE).clamp_min(FP16_TINY)
    s16 = scale.to(torch.float16)
    s16 = torch.where(s16.float() < scale, torch.nextafter(s16, torch.full_like(s16, math.inf)), s16)
    if not bool(torch.isfinite(s16).all()):
        worst = float(scale.max()) * (2**bits - 1)
        raise EncodingError(f"a group's range {worst:.4g} is too wide for fp16 scales at {bits} bits (max {FP16_MAX * (2**bits - 1):.4g})")
    s = s16.float()
    z = (-zero_point / s).clamp(-FP16_MAX, FP16_MAX).to(torch.float16).float()
    return s, z


def range_params(lo: torch.Tensor, hi: torch.Tensor, bits: int, bound: torch.Tensor):
    """(scale, zero) mapping [lo, hi] onto codes [0, 2^bits − 1]."""
    return fp16_params((hi - lo) / (2**bits - 1), lo, bound, bits)


def quantize_with(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes (as float) for w given broadcastable scale and zero: nearest code, clamped."""
    return torch.clamp(torch.round(w / scale + zero), 0, 2**bits - 1)


def dequantize_with(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """The decoder's formula, in the decoder's order of operations (bit-exact with codecs)."""
    return (q - zero) * scale


def _score(w, cw, plain, scale, zero, bits):
    """Σ cw (ŵ − w)² and (when `plain` is a mask) Σ (ŵ − w)² per group [.., 1], with ŵ computed
    exactly as the decoder does."""
    sq = dequantize_with(quantize_with(w, scale, zero, bits), scale, zero).sub_(w).square_()
    err = (sq * cw).sum(-1, keepdim=True)
    return err, (err if plain is None else (sq * plain).sum(-1, keepdim=True))


def _refit(w, cw, q, bound, bits):
    """Weighted least-squares (scale, zero) for fixed codes q: min Σ cw (s q + b − w)², zero = −b/s.
    `ok` is False where the fit is degenerate (one distinct code, or a non-positive slope)."""
    m = cw.sum(-1, keepdim=True)
    sq, sw = (cw * q).sum(-1, keepdim=True), (cw * w).sum(-1, keepdim=True)
    sqq, sqw = (cw * q * q).sum(-1, keepdim=True), (cw * q * w).sum(-1, keepdim=True)
    det = m * sqq - sq * sq
    ok = det > 1e-6 * m * m.clamp_min(1e-30)
    slope = torch.where(ok, (m * sqw - sq * sw) / torch.where(ok, det, torch.ones_like(det)), torch.zeros_like(det))
    ok &= slope > 0
    slope = torch.where(ok, slope, torch.ones_like(slope))
    offset = (sw - slope * sq) / m.clamp_min(1e-30)
    return ok, fp16_params(slope, offset, bound, bits)


@dataclass
class GroupFit:
    """Per (row, group) parameters [O, G, 1] and codes [O, G, g] (codes as float, padding included)."""

    scale: torch.Tensor
    zero: torch.Tensor
    codes: torch.Tensor


def _fit_chunk(w, cw, mask, weighted, bits, grid, refit):
    """(scale, zero, codes) of one chunk of rows: grid of shrunk ranges, then a refit of the best."""
    lo = torch.where(mask, w, math.inf).amin(-1, keepdim=True)
    hi = torch.where(mask, w, -math.inf).amax(-1, keepdim=True)
    bound = torch.maximum(lo.abs(), hi.abs())
    # ties in the weighted error (a group whose channels all weigh zero) go to the plain error
    plain = mask.float() if weighted else None
    best = None
    for alpha in grid:
        scale, zero = range_params(lo * alpha, hi * alpha, bits, bound)
        best = _keep(best, (*_score(w, cw, plain, scale, zero, bits), scale, zero))
    if refit:
        ok, (scale, zero) = _refit(w, cw, quantize_with(w, best[2], best[3], bits), bound, bits)
        err, tie = _score(w, cw, plain, scale, zero, bits)
        best = _keep(best, (torch.where(ok, err, math.inf), tie, scale, zero))
    return best[2], best[3], quantize_with(w, best[2], best[3], bits)


def _keep(best, cand):
    """Per group choice between two (err, tie_err, scale, zero) candidates: strictly better weighted
    error wins; an exact tie goes to the lower plain error; otherwise the incumbent stays."""
    if best is None:
        return cand
    err, tie = cand[0], cand[1]
    better = (err < best[0]) | ((err == best[0]) & (tie < best[1]))
    return tuple(torch.where(better, c, b) for c, b in zip(cand, best))


def fit_groups(wg: torch.Tensor, bits: int, weights: torch.Tensor | None, mask: torch.Tensor,
               grid=SHRINK_GRID, refit: bool = True) -> GroupFit:
    """Scale/zero/codes for grouped weights wg [O, G, g] minimising Σ weights·(ŵ − w)² per group
    (weights [G, g] or [O, G, g], None for plain MSE); mask [G, g] marks real channels."""
    out, groups, g = wg.shape
    cw = mask.float() if weights is None else weights * mask
    cw = cw.expand(out, groups, g)
    rows = max(1, CHUNK_ELEMENTS // (groups * g))
    parts = [_fit_chunk(wg[r : r + rows], cw[r : r + rows], mask, weights is not None, bits, grid, refit)
             for r in range(0, out, rows)]
    scale, zero, codes = (torch.cat(p) for p in zip(*parts))
    return GroupFit(scale, zero, codes)


def store(fit: GroupFit, enc: Encoding) -> dict[str, torch.Tensor]:
    """Codes and parameters -> the stored tensors of an `int` encoding (enc.tensor_specs())."""
    out, inp = enc.shape
    codes = fit.codes.reshape(out, -1)[:, :inp].to(torch.uint8)
    return {
        "qweight": pack_bits(codes, enc.bits),
        "scales": fit.scale[..., 0].to(torch.float16).contiguous(),
        "zeros": fit.zero[..., 0].to(torch.float16).contiguous(),
    }


def channel_weights_grouped(channel_weights: torch.Tensor | None, group_size: int) -> torch.Tensor | None:
    """[I] -> [G, g] non-negative importance weights (padding gets weight 0)."""
    if channel_weights is None:
        return None
    return grouped(channel_weights.float().clamp_min(0)[None], group_size)[0]


def rtn(weight: torch.Tensor, enc: Encoding) -> dict[str, torch.Tensor]:
    """Plain round-to-nearest from each group's min/max: the stored tensors of `enc` (kind `int`)."""
    g = enc.group_size
    fit = fit_groups(grouped(weight.float(), g), enc.bits, None, group_mask(weight.shape[1], g), grid=(1.0,), refit=False)
    return store(fit, enc)


def clipped(weight: torch.Tensor, enc: Encoding, channel_weights: torch.Tensor | None = None,
            grid=SHRINK_GRID) -> dict[str, torch.Tensor]:
    """Round-to-nearest with each group's range chosen to minimise Σ_j m_j (w_j − ŵ_j)² (m =
    `channel_weights` [I], the inputs' per-channel second moments; plain MSE when None)."""
    g = enc.group_size
    weights = channel_weights_grouped(channel_weights, g)
    fit = fit_groups(grouped(weight.float(), g), enc.bits, weights, group_mask(weight.shape[1], g), grid)
    return store(fit, enc)

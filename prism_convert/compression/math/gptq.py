"""GPTQ: error-compensating rounding from the input Hessian (Frantar et al. 2022, "GPTQ: Accurate
Post-Training Quantization for Generative Pre-trained Transformers"), with groups.

Columns are quantized in order; each column's residual w − ŵ is fed forward onto the columns not yet
quantized, so rounding minimises tr(ΔW H ΔWᵀ), the expected squared output error, not ‖ΔW‖². This is the
reference algorithm in its LDL form (QuIP, Chee et al. 2023): the value rounded at column c is

    x_c = w_c + Σ_{k<c} (w_k − ŵ_k) T_kc,    T = R · diag(R)⁻¹,  R Rᵀ = H + λI  (prism_convert.compression.math.hessian)

which equals the reference's update through the Cholesky factor of H⁻¹, without inverting anything.
Lazy blocks as in the reference: inside a block the feedback is rank-1 per column; the earlier blocks'
feedback arrives in one matrix product when a block starts.

Groups: by default (as the reference with `groupsize`) a group's scale/zero is fixed when its first
column is reached, by the clipping search on the group's current, not-yet-quantized weights (already
updated by the earlier columns' feedback), weighted by E[x_j²]. With act-order (columns by descending
E[x_j²]) a group's columns are scattered in the processing order, so its parameters are fixed up front
from the original weights ("static groups" in the reference), since the format stores contiguous groups.

Several bit-widths of one matrix run in one pass (leading candidate dimension C): they share the factor
and the per-column loop.

Shape key: C candidates, O output rows, I input channels, B block columns, G groups, g group size.
"""

from __future__ import annotations

import math

import torch

from prism_convert.compression.math.hessian import HessianFactors, hessian_factors
from prism_convert.compression.math.quantize import (
    GroupFit,
    channel_weights_grouped,
    fit_groups,
    group_mask,
    grouped,
    store,
)
from prism_load.container.format import Encoding
from prism_load.errors import EncodingError

GPTQ_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.7)  # feedback already repairs most clipping: a shorter search
SEGMENT = 32  # columns per rank-1 segment inside a lazy block (two-level blocking)


def _group_params(w: torch.Tensor, bits: list[int], diag: torch.Tensor, g: int, grid):
    """Static parameters of every group from w [O, I]: scale, zero [C, O, G]."""
    weights, mask = channel_weights_grouped(diag, g), group_mask(w.shape[1], g)
    fits = [fit_groups(grouped(w, g), b, weights, mask, grid) for b in bits]
    return torch.stack([f.scale[..., 0] for f in fits]), torch.stack([f.zero[..., 0] for f in fits])


def _fit_group(x: torch.Tensor, bits: list[int], diag: torch.Tensor, scales, zeros, gi: int, grid) -> None:
    """Parameters of group gi [C, O] from its current columns x [C, width, O] (weighted by E[x_j²])."""
    width = x.shape[1]
    for k, b in enumerate(bits):
        fit = fit_groups(x[k].T[:, None, :], b, diag[:width][None], torch.ones(1, width, dtype=torch.bool), grid)
        scales[k, :, gi], zeros[k, :, gi] = fit.scale[:, 0, 0], fit.zero[:, 0, 0]


def _check_menu(w: torch.Tensor, encs: list[Encoding], factors: HessianFactors) -> int:
    if not encs:
        raise EncodingError("gptq needs at least one int encoding")
    g = encs[0].group_size
    for e in encs:
        if e.kind != "int" or e.group_size != g or e.shape != tuple(w.shape):
            raise EncodingError(f"gptq runs int encodings of shape {list(w.shape)} with one group size; got {e.to_dict()}")
    if factors.size != w.shape[1]:
        raise EncodingError(f"Hessian of size {factors.size} does not match {w.shape[1]} input channels")
    return g


def gptq_many(w: torch.Tensor, encs: list[Encoding], hessian: torch.Tensor | HessianFactors, damp: float = 0.01,
              *, act_order: bool = False, static_groups: bool = False, block: int = 128,
              grid=GPTQ_GRID) -> list[dict[str, torch.Tensor]]:
    """GPTQ of w [O, I] under Hessian [I, I] (or its factors) at every `int` encoding in encs (one
    group size): the stored tensors of each, in order."""
    f = hessian_factors(hessian, damp, act_order)
    g = _check_menu(w, encs, f)
    out, inp = w.shape
    bits = [e.bits for e in encs]
    qmax = torch.tensor([2.0**b - 1 for b in bits])[:, None]  # [C, 1]
    groups = math.ceil(inp / g)
    order = f.order
    static = static_groups or order is not None
    w = w.float()
    if static:
        scales, zeros = _group_params(w, bits, f.diag, g, grid)  # [C, O, G]
        block = max(1, block)
    else:
        scales, zeros = torch.empty(len(bits), out, groups), torch.empty(len(bits), out, groups)
        block = g * max(1, block // g)  # whole groups per block: a group's search sees all feedback so far
    cols = torch.arange(inp) if order is None else order  # natural column of each processed column
    col_group = (cols // g).tolist()
    wt = w[:, cols].T.contiguous()  # [I, O] processed columns as rows: each column slice is contiguous
    t = f.r / f.r.diagonal()[None, :]  # [I, I] unit upper feedback matrix
    codes = torch.empty(len(bits), inp, out)  # [C, I, O]
    resid = torch.empty(len(bits), inp, out)  # [C, I, O] w − ŵ of quantized columns
    for b0 in range(0, inp, block):
        b1 = min(b0 + block, inp)
        x = wt[b0:b1].expand(len(bits), -1, -1).clone()  # [C, B, O]
        if b0:
            x += torch.matmul(t[:b0, b0:b1].T, resid[:, :b0])  # [B, b0] @ [C, b0, O]: earlier blocks' feedback
        cuts = sorted({*range(b0, b1, SEGMENT), *range(-(-b0 // g) * g, b1, g), b1})
        for s0, s1 in zip(cuts[:-1], cuts[1:]):  # segments: rank-1 feedback inside, one product after
            for col in range(s0, s1):
                c, gi = col - b0, col_group[col]
                if not static and col % g == 0:
                    _fit_group(x[:, c : c + min(g, inp - col)], bits, f.diag[col : col + g], scales, zeros, gi, grid)
                sc, z = scales[:, :, gi], zeros[:, :, gi]  # [C, O]
                q = torch.clamp(torch.round(x[:, c] / sc + z), torch.zeros_like(qmax), qmax)  # [C, O]
                codes[:, col] = q
                r = wt[col] - (q - z) * sc  # [C, O], ŵ as the decoder computes it
                resid[:, col] = r
                if col + 1 < s1:
                    x[:, c + 1 : s1 - b0] += t[col, col + 1 : s1][None, :, None] * r[:, None, :]
            if s1 < b1:
                x[:, s1 - b0 :] += torch.matmul(t[s0:s1, s1:b1].T, resid[:, s0:s1])  # [B', S] @ [C, S, O]
    natural = torch.empty_like(codes)
    natural[:, cols] = codes
    natural = natural.transpose(1, 2)  # [C, O, I]
    return [
        store(GroupFit(scales[k][..., None], zeros[k][..., None], grouped(natural[k], g)), e)
        for k, e in enumerate(encs)
    ]


def gptq(w: torch.Tensor, enc: Encoding, hessian: torch.Tensor | HessianFactors, damp: float = 0.01,
         **options) -> dict[str, torch.Tensor]:
    """Quantize w [O, I] to one `int` encoding with GPTQ rounding under Hessian [I, I]."""
    return gptq_many(w, [enc], hessian, damp, **options)[0]

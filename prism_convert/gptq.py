"""GPTQ: error-compensating rounding from the input Hessian (Frantar et al., 2022, "GPTQ: Accurate
Post-Training Quantization for Generative Pre-trained Transformers"), with static groups.

Columns are quantized left to right; each column's rounding error is spread onto the not-yet-quantized
columns through the inverse Hessian's Cholesky factor, so tr(ΔW H ΔWᵀ) — the expected squared output
error — is what rounding minimises, not ‖ΔW‖². Each group's scale/zero is chosen (with the clipping
search) on the weights as updated when the group starts, as the reference implementation does.

Several bit-widths of one matrix run in one pass (a leading candidate dimension C): the per-column loop
is the cost, and the candidates share the Hessian factor.
"""

from __future__ import annotations

import math

import torch

from prism_load.codecs import Encoding

from .quantize import SHRINK_GRID, dequantize_with, quantize_with, search_scales, store


def inverse_hessian_factor(hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor of (H + λI)⁻¹, and the mask of dead input channels (zero second moment)."""
    h = hessian.double().clone()
    dead = h.diagonal() <= 0
    h[dead, dead] = 1.0
    lam = damp * h.diagonal().mean()
    h.diagonal().add_(lam)
    for attempt in range(6):  # grow damping until the factorisation succeeds (ill-conditioned H)
        chol, info = torch.linalg.cholesky_ex(h)
        if info == 0:
            break
        h.diagonal().add_(lam * 10**attempt)
    inv = torch.cholesky_inverse(chol)
    return torch.linalg.cholesky(inv, upper=True), dead


def gptq_many(w: torch.Tensor, encs: list[Encoding], hessian: torch.Tensor, damp: float = 0.01, block: int = 128,
              grid: torch.Tensor = SHRINK_GRID) -> list[dict[str, torch.Tensor]]:
    """GPTQ of w [O, I] at every `int` encoding in encs (one group size), sharing one column pass."""
    out, inp = w.shape
    g = encs[0].group_size
    if any(e.group_size != g or e.kind != "int" for e in encs):
        raise ValueError("gptq_many needs int encodings with one group size")
    bits = torch.tensor([e.bits for e in encs], dtype=torch.float32)[:, None, None]  # [C, 1, 1]
    hinv, dead = inverse_hessian_factor(hessian, damp)
    hinv = hinv.float()
    block = g * max(1, block // g)  # whole groups per block: a group's parameters see all its updates
    weights = w.float().clone()
    weights[:, dead] = 0.0
    weights = weights.expand(len(encs), out, inp).clone()  # [C, O, I]
    diag = hessian.float().diagonal().clamp_min(0)
    groups = math.ceil(inp / g)
    scales = torch.empty(len(encs), out, groups)
    zeros = torch.empty(len(encs), out, groups)
    codes = torch.zeros(len(encs), out, groups * g)
    for b0 in range(0, inp, block):
        b1 = min(b0 + block, inp)
        wb = weights[:, :, b0:b1].clone()
        errs = torch.zeros_like(wb)
        hb = hinv[b0:b1, b0:b1]
        for c in range(b1 - b0):
            col = b0 + c
            gi = col // g
            if col % g == 0:  # group parameters from the current (error-updated) weights of the group
                width = min(g, inp - col)
                current = wb[:, :, c : c + width].reshape(-1, 1, width)  # [C*O, 1, w]
                mask = torch.ones(1, width, dtype=torch.bool)
                s, z = search_scales(current, bits.repeat_interleave(out, 0), diag[col : col + width][None, None], mask, grid)
                scales[:, :, gi], zeros[:, :, gi] = s.reshape(len(encs), out), z.reshape(len(encs), out)
            s, z = scales[:, :, gi : gi + 1], zeros[:, :, gi : gi + 1]  # [C, O, 1]
            x = wb[:, :, c : c + 1]
            q = quantize_with(x, s, z, bits)
            codes[:, :, col] = q[:, :, 0]
            err = (x - dequantize_with(q, s, z)) / hb[c, c]
            wb[:, :, c + 1 :] -= err * hb[c, c + 1 :]
            errs[:, :, c : c + 1] = err
        weights[:, :, b1:] -= errs @ hinv[b0:b1, b1:]
    return [
        store(codes[k].reshape(out, groups, g), scales[k][..., None], zeros[k][..., None], enc)
        for k, enc in enumerate(encs)
    ]


def gptq(w: torch.Tensor, enc: Encoding, hessian: torch.Tensor, damp: float = 0.01, block: int = 128,
         grid: torch.Tensor = SHRINK_GRID) -> dict[str, torch.Tensor]:
    """Quantize w [O, I] to one `int` encoding with GPTQ rounding under Hessian [I, I]."""
    return gptq_many(w, [enc], hessian, damp, block, grid)[0]

"""encode(): the one entry point from a weight matrix and an Encoding to the exact stored tensors.

Which algorithm runs:
- `int`: GPTQ rounding (act-order, static groups) when the input Hessian is given (prism_convert.compression.math.gptq),
  else the importance-weighted clipping search on the per-channel second moments (plain MSE without
  them; prism_convert.compression.math.quantize);
- `lowrank`: whitened truncated SVD (full Hessian, else its diagonal, else plain), factors stored per
  `factor_bits` (prism_convert.compression.math.lowrank);
- `int+lowrank`: the `int` base as above, then a whitened low-rank fit of the residual W − deq(base), so
  decode = base + A @ B;
- `bf16` / `fp16` / `fp32`: the tensor itself.

`encode_many` encodes one matrix under a whole candidate menu and shares the work: one Hessian
factorisation (GPTQ's and the whitening's), one GPTQ pass for all bit-widths of a group size, int+lowrank
bases reused from the int candidates. Its output is bit-identical to calling `encode` once per encoding.
"""

from __future__ import annotations

import torch

from prism_convert.compression.math.gptq import gptq_many
from prism_convert.compression.math.hessian import check_hessian, hessian_factors
from prism_convert.compression.math.lowrank import factor_tensors, whitening
from prism_convert.compression.math.quantize import FP16_MAX, clipped
from prism_load.container.codecs import decode
from prism_load.container.format import PASSTHROUGH_DTYPES, Encoding
from prism_load.errors import EncodingError


def check_statistics(w: torch.Tensor, hessian: torch.Tensor | None, channel_weights: torch.Tensor | None) -> None:
    """Values a caller can get wrong, named in the error (checked once per matrix, not per candidate)."""
    if not bool(torch.isfinite(w).all()):
        bad = int((~torch.isfinite(w)).sum())
        raise EncodingError(f"weight {list(w.shape)} has {bad} non-finite values (NaN or inf); refusing to encode it")
    inp = w.shape[-1] if w.dim() else 1
    if hessian is not None:
        check_hessian(hessian, inp)
    if channel_weights is not None:
        if tuple(channel_weights.shape) != (inp,):
            raise EncodingError(f"channel weights of shape {list(channel_weights.shape)} do not match {inp} input channels (expected [{inp}])")
        if not bool(torch.isfinite(channel_weights).all()) or bool((channel_weights < 0).any()):
            raise EncodingError(f"channel weights [{inp}] must be finite and non-negative (second moments)")


def check_encoding(w: torch.Tensor, enc: Encoding) -> None:
    """The weight fits the encoding: an Encoding, 2-D for the matrix kinds, the same shape."""
    if not isinstance(enc, Encoding):
        raise EncodingError(f"expected an Encoding, got {type(enc).__name__}")
    if enc.kind not in PASSTHROUGH_DTYPES and w.dim() != 2:
        raise EncodingError(f"{enc.kind} encoding needs a 2-D weight [out, in], got shape {list(w.shape)}")
    if tuple(w.shape) != enc.shape:
        raise EncodingError(f"weight of shape {list(w.shape)} does not match encoding shape {list(enc.shape)}")
    if enc.kind == "fp16" and float(w.abs().max()) > FP16_MAX:
        raise EncodingError(f"weight {list(w.shape)} has |w| up to {float(w.abs().max()):.4g}, beyond fp16's {FP16_MAX}")


def _ints(w, encs: list[Encoding], factors, channel_weights) -> list[dict[str, torch.Tensor]]:
    if factors is None:
        return [clipped(w, e, channel_weights) for e in encs]
    by_group: dict[int, list[int]] = {}
    for k, e in enumerate(encs):
        by_group.setdefault(e.group_size, []).append(k)
    out: list = [None] * len(encs)
    for ks in by_group.values():
        stored = gptq_many(w, [encs[k] for k in ks], factors)
        for k, s in zip(ks, stored):
            out[k] = s
    return out


def encode(weight: torch.Tensor, enc: Encoding, *, hessian: torch.Tensor | None = None,
           channel_weights: torch.Tensor | None = None, damp: float = 0.01,
           act_order: bool = True) -> dict[str, torch.Tensor]:
    """Stored tensors of `weight` under `enc`: exactly enc.tensor_specs() (names, dtypes, shapes).

    `hessian`: H = E[x xᵀ] [in, in] of the tensor's routed inputs; `channel_weights`: E[x_j²] [in], its
    diagonal, used when H is unknown. `damp`: GPTQ/whitening damping as a share of mean(diag H).
    `act_order`: GPTQ columns by descending E[x_j²] with static groups — lower held-out error than the
    natural order on the reference model and on synthetic statistics (bench/results/codecs*.json).
    Deterministic: the same inputs give the same bits."""
    return encode_many(weight, [enc], hessian=hessian, channel_weights=channel_weights, damp=damp, act_order=act_order)[0]


def encode_many(weight: torch.Tensor, encs: list[Encoding], *, hessian: torch.Tensor | None = None,
                channel_weights: torch.Tensor | None = None, damp: float = 0.01,
                act_order: bool = True) -> list[dict[str, torch.Tensor]]:
    """encode() for several encodings of one matrix, sharing work; the same stored bits as one at a time."""
    w = weight.detach().float()
    for enc in encs:
        check_encoding(w, enc)
    matrix = any(enc.kind not in PASSTHROUGH_DTYPES for enc in encs)  # passthrough ignores the statistics
    check_statistics(w, hessian if matrix else None, channel_weights if matrix else None)
    if channel_weights is None and hessian is not None:
        channel_weights = hessian.diagonal().float().clamp_min(0)
    bases = {e.parts()["base"] for e in encs if e.kind == "int+lowrank"}
    ints = list(dict.fromkeys([e for e in encs if e.kind == "int"] + sorted(bases, key=lambda e: e.bits)))
    needs_hessian = hessian is not None and any(e.kind not in PASSTHROUGH_DTYPES for e in encs)
    factors = hessian_factors(hessian, damp, act_order) if needs_hessian else None  # one factor for GPTQ and SVD
    int_stored = dict(zip(ints, _ints(w, ints, factors, channel_weights)))
    needs_factors = any(e.kind in ("lowrank", "int+lowrank") for e in encs)
    white = whitening(w.shape[1], factors, channel_weights, damp) if needs_factors else None
    out = []
    for enc in encs:
        if enc.kind in PASSTHROUGH_DTYPES:
            out.append({"weight": w.to(PASSTHROUGH_DTYPES[enc.kind]).contiguous()})
        elif enc.kind == "int":
            out.append(int_stored[enc])
        elif enc.kind == "lowrank":
            out.append(factor_tensors(w, enc, white, channel_weights, damp))
        else:
            base_enc = enc.parts()["base"]
            base = int_stored[base_enc]
            stored = {f"base.{k}": v for k, v in base.items()}
            stored.update(factor_tensors(w - decode(base_enc, base), enc, white, channel_weights, damp))
            out.append(stored)
    return out

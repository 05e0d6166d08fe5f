"""encode(): the one entry point from a weight matrix and an Encoding to the exact stored tensors.

Which algorithm runs: `int` uses GPTQ when a Hessian is given, else the importance-weighted clipping search
(plain MSE without channel weights); low-rank factors come from whitened SVD and are stored per
`factor_bits` (int factors with the clipping search); `int+lowrank` quantizes the base, then fits the
low-rank pair to the activation-weighted residual W − deq(base).
"""

from __future__ import annotations

import torch

from prism_load.codecs import PASSTHROUGH_DTYPES, Encoding, decode
from prism_load.errors import EncodingError

from .gptq import gptq_many
from .lowrank import whitened_svd
from .quantize import clipped


def _check(w: torch.Tensor, enc: Encoding, hessian, channel_weights) -> None:
    if tuple(w.shape) != enc.shape:
        raise EncodingError(f"weight of shape {list(w.shape)} does not match encoding shape {list(enc.shape)}")
    if not torch.isfinite(w).all():
        raise EncodingError(f"weight {list(w.shape)} has non-finite values (NaN or inf); refusing to encode it")
    if enc.kind in PASSTHROUGH_DTYPES:
        return
    inp = w.shape[1]
    if hessian is not None and tuple(hessian.shape) != (inp, inp):
        raise EncodingError(f"Hessian of shape {list(hessian.shape)} does not match {inp} input channels")
    if channel_weights is not None and tuple(channel_weights.shape) != (inp,):
        raise EncodingError(f"channel weights of shape {list(channel_weights.shape)} do not match {inp} input channels")


def _ints(w, encs: list[Encoding], hessian, channel_weights, damp) -> list[dict[str, torch.Tensor]]:
    if not encs:
        return []
    if hessian is not None:
        by_group: dict[int, list[int]] = {}
        for k, e in enumerate(encs):
            by_group.setdefault(e.group_size, []).append(k)
        out: list = [None] * len(encs)
        for ks in by_group.values():
            for k, stored in zip(ks, gptq_many(w, [encs[k] for k in ks], hessian, damp=damp)):
                out[k] = stored
        return out
    return [clipped(w, e, channel_weights) for e in encs]


def _factors(w, enc: Encoding, hessian, channel_weights) -> dict[str, torch.Tensor]:
    a, b = whitened_svd(w, enc.rank, hessian, channel_weights)
    parts = enc.parts()
    out = {}
    for prefix, factor, weights in (("lr_a", a, None), ("lr_b", b, channel_weights)):
        sub = parts[prefix]
        tensors = factor.to(torch.bfloat16) if sub.kind == "bf16" else None
        stored = {"weight": tensors} if tensors is not None else clipped(factor, sub, weights)
        out.update({f"{prefix}.{k}": v for k, v in stored.items()})
    return out


def encode(weight: torch.Tensor, enc: Encoding, *, hessian: torch.Tensor | None = None,
           channel_weights: torch.Tensor | None = None, damp: float = 0.01) -> dict[str, torch.Tensor]:
    """Stored tensors of `weight` under `enc` (exactly enc.tensor_specs()). `hessian` is E[x xᵀ] [in, in]
    of the tensor's inputs; `channel_weights` its diagonal when the full matrix is unknown."""
    return encode_many(weight, [enc], hessian=hessian, channel_weights=channel_weights, damp=damp)[0]


def encode_many(weight: torch.Tensor, encs: list[Encoding], *, hessian: torch.Tensor | None = None,
                channel_weights: torch.Tensor | None = None, damp: float = 0.01) -> list[dict[str, torch.Tensor]]:
    """encode() for several encodings of one matrix, sharing work: all int bit-widths run in one GPTQ
    pass, and an int+lowrank base reuses the plain int result of the same bits."""
    w = weight.detach().float()
    for enc in encs:
        _check(w, enc, hessian, channel_weights)
    if channel_weights is None and hessian is not None:
        channel_weights = hessian.diagonal().float()
    bases = {e.parts()["base"] for e in encs if e.kind == "int+lowrank"}
    ints = list(dict.fromkeys([e for e in encs if e.kind == "int"] + sorted(bases, key=lambda e: e.bits)))
    int_stored = dict(zip(ints, _ints(w, ints, hessian, channel_weights, damp)))
    out = []
    for enc in encs:
        if enc.kind in PASSTHROUGH_DTYPES:
            out.append({"weight": w.to(PASSTHROUGH_DTYPES[enc.kind]).contiguous()})
        elif enc.kind == "int":
            out.append(int_stored[enc])
        elif enc.kind == "lowrank":
            out.append(_factors(w, enc, hessian, channel_weights))
        else:
            base_enc = enc.parts()["base"]
            base = int_stored[base_enc]
            stored = {f"base.{k}": v for k, v in base.items()}
            stored.update(_factors(w - decode(base_enc, base), enc, hessian, channel_weights))
            out.append(stored)
    return out

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

from .gptq import gptq
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


def _int(w, enc, hessian, channel_weights, damp):
    if hessian is not None:
        return gptq(w, enc, hessian, damp=damp)
    return clipped(w, enc, channel_weights)


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
    w = weight.detach().float()
    _check(w, enc, hessian, channel_weights)
    if enc.kind in PASSTHROUGH_DTYPES:
        return {"weight": w.to(PASSTHROUGH_DTYPES[enc.kind]).contiguous()}
    if channel_weights is None and hessian is not None:
        channel_weights = hessian.diagonal().float()
    if enc.kind == "int":
        return _int(w, enc, hessian, channel_weights, damp)
    if enc.kind == "lowrank":
        return _factors(w, enc, hessian, channel_weights)
    base_enc = enc.parts()["base"]
    base = _int(w, base_enc, hessian, channel_weights, damp)
    residual = w - decode(base_enc, base)
    out = {f"base.{k}": v for k, v in base.items()}
    out.update(_factors(residual, enc, hessian, channel_weights))
    return out

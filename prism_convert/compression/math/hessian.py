"""The factor of an input Hessian H = E[x xᵀ] that GPTQ and whitened SVD share, computed once per matrix.

One upper-triangular R with R Rᵀ = H + λI serves both algorithms:
- whitening (SVD-LLM, Wang et al. 2024): ‖ΔW R‖²_F = tr(ΔW (H + λI) ΔWᵀ), the damped output error;
- GPTQ (Frantar et al. 2022) in its LDL form (QuIP, Chee et al. 2023, Thm. 6): the reference's upper
  Cholesky factor of H⁻¹ is R⁻¹, and its row-normalised error feedback equals T = R · diag(R)⁻¹ applied
  to the residual W − Ŵ of the columns already quantized, so no inverse is ever formed.
R is the reversed lower Cholesky factor of the reversed H (flip(chol(flip(H)))), computed in fp32 on the
diagonally equilibrated matrix so outlier channels do not cost precision.

Damping follows the GPTQ reference: λ = damp · mean(diag H). Dead channels (zero second moment) are
left in place with weight λ: they decouple, so GPTQ rounds them to nearest and whitening ignores them.

Factors are cached by tensor identity (gate_proj and up_proj share one Hessian, and a dozen candidates
are encoded against it), so the cubic cost is paid once per Hessian, not once per candidate.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import torch

from prism_load.errors import EncodingError

CACHE_ENTRIES = 4  # two layers in flight x (gate/up Hessian, down Hessian)


@dataclass(frozen=True)
class HessianFactors:
    """R [I, I] fp32 upper, R Rᵀ = H + λI (rows/columns in `order` when act-order permuted them);
    diag [I] the undamped E[x_j²] in natural order (the clipping search's channel weights)."""

    r: torch.Tensor
    diag: torch.Tensor
    lam: float
    order: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return self.r.shape[0]


def check_hessian(hessian: torch.Tensor, inp: int) -> None:
    if hessian.dim() != 2 or tuple(hessian.shape) != (inp, inp):
        raise EncodingError(f"Hessian of shape {list(hessian.shape)} does not match {inp} input channels (expected [{inp}, {inp}])")
    if not bool(torch.isfinite(hessian).all()):
        raise EncodingError(f"Hessian [{inp}, {inp}] has non-finite entries (NaN or inf)")


def _reverse_cholesky(h: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """(R upper with R Rᵀ = h + λI, λ) for symmetric PSD h [I, I] fp32."""
    diag = h.diagonal().clamp_min(0)
    mean = float(diag.mean())
    lam = damp * mean if mean > 0 else 1.0
    s = (diag + lam).sqrt()  # [I] equilibration: work on C = S⁻¹ (H + λI) S⁻¹, unit diagonal
    c = h / s[:, None] / s[None, :]
    c.diagonal().copy_((diag + lam) / (s * s))
    jitter = 0.0
    for attempt in range(8):  # not PSD to fp32 precision (few tokens, rounding): damp more until it is
        chol, info = torch.linalg.cholesky_ex(c.flip(0, 1))
        if int(info) == 0:
            break
        jitter = 10.0 ** (attempt - 6)
        c.diagonal().add_(jitter)
    else:
        raise EncodingError(f"Hessian [{h.shape[0]}, {h.shape[0]}] is not positive semi-definite even with damping {jitter}")
    rc = chol.flip(0, 1)  # upper, rc rcᵀ = C
    return s[:, None] * rc, lam + jitter * mean


def compute_factors(hessian: torch.Tensor, damp: float = 0.01, act_order: bool = False) -> HessianFactors:
    """Factors of H [I, I] (any float dtype), uncached. act_order: columns by descending E[x_j²]."""
    if damp < 0:
        raise EncodingError(f"damp must be >= 0, got {damp}")
    h = hessian.detach().float()
    h = (h + h.T) * 0.5  # [I, I] symmetric to the last bit
    diag = h.diagonal().clamp_min(0).clone()
    order = None
    if act_order:
        order = torch.argsort(diag, descending=True, stable=True)
        h = h[order][:, order]
    r, lam = _reverse_cholesky(h, damp)
    return HessianFactors(r.contiguous(), diag, lam, order)


_cache: OrderedDict[tuple, tuple[weakref.ref, HessianFactors]] = OrderedDict()
_lock = threading.RLock()  # re-entrant: a weakref callback may fire during a locked section


def _forget(key: tuple) -> None:
    with _lock:
        _cache.pop(key, None)


def hessian_factors(hessian: torch.Tensor | HessianFactors, damp: float = 0.01,
                    act_order: bool = False) -> HessianFactors:
    """compute_factors, remembered for the few Hessian tensors most recently used (by identity and
    in-place version, so a Hessian modified in place is refactored)."""
    if isinstance(hessian, HessianFactors):
        return hessian
    key = (id(hessian), hessian._version, float(damp), bool(act_order))
    with _lock:
        hit = _cache.get(key)
        if hit is not None and hit[0]() is hessian:
            _cache.move_to_end(key)
            return hit[1]
    factors = compute_factors(hessian, damp, act_order)
    with _lock:
        _cache[key] = (weakref.ref(hessian, lambda _ref, key=key: _forget(key)), factors)
        while len(_cache) > CACHE_ENTRIES:
            _cache.popitem(last=False)
    return factors


def clear_cache() -> None:
    with _lock:
        _cache.clear()

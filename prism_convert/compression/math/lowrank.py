"""Low-rank factors from activation-whitened truncated SVD (SVD-LLM, Wang et al. 2024), stored per
`factor_bits`.

With H + λI = S Sᵀ the damped output error of W ≈ A B is ‖(W − A B) S‖²_F, so the best rank-r pair is
the truncated SVD of W S, un-whitened (Eckart–Young in the whitened space): A = U_r Σ_r^½,
B = Σ_r^½ V_rᵀ S⁻¹. S is the Hessian's triangular factor R (prism_convert.compression.math.hessian); with only the diagonal
known (per-channel second moments m), S = diag(√(m + λ)); with neither, S = I (plain SVD).

Large matrices use a seeded randomized subspace iteration (Halko, Martinsson & Tropp 2011) applied
through S without forming W S; small ones an exact SVD. Quantized factors: B is rounded first (GPTQ
under H, or the importance-weighted search), then A is refit by least squares to the rounded B and
rounded with GPTQ under its own input Hessian B̂ (H + λI) B̂ᵀ, so each rounding sees the other's error.

Shape key: O output rows, I input channels, r rank, k = r + oversampling.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prism_convert.compression.math.gptq import gptq
from prism_convert.compression.math.hessian import HessianFactors, compute_factors, hessian_factors
from prism_convert.compression.math.quantize import clipped
from prism_load.container.codecs import decode
from prism_load.container.format import Encoding
from prism_load.errors import EncodingError

OVERSAMPLE = 10
POWER_ITERATIONS = 4
EXACT_MAX_ELEMENTS = 1 << 21  # O·I up to which the exact SVD (in float64) is cheap enough
SEED = 0


@dataclass
class Whitening:
    """S with S Sᵀ = H + λI: Pᵀ R for the Hessian's upper factor R [I, I] of the columns in `order`
    (P the permutation; identity when the factor is in natural order), or a diagonal `d` [I], or I."""

    r: torch.Tensor | None = None
    order: torch.Tensor | None = None
    d: torch.Tensor | None = None
    factors: HessianFactors | None = None

    def _scatter(self, y: torch.Tensor) -> torch.Tensor:
        """y P: column i of y goes to column order[i]."""
        if self.order is None:
            return y
        out = torch.empty_like(y)
        out[:, self.order] = y
        return out

    def right(self, x: torch.Tensor) -> torch.Tensor:
        """x S for x [n, I]."""
        if self.r is not None:
            return (x if self.order is None else x[:, self.order]) @ self.r.to(x.dtype)
        return x if self.d is None else x * self.d.to(x.dtype)

    def right_t(self, x: torch.Tensor) -> torch.Tensor:
        """x Sᵀ for x [n, I]."""
        if self.r is not None:
            return self._scatter(x @ self.r.T.to(x.dtype))
        return x if self.d is None else x * self.d.to(x.dtype)

    def unwhiten(self, x: torch.Tensor) -> torch.Tensor:
        """x S⁻¹ for x [n, I]."""
        if self.r is not None:
            return self._scatter(torch.linalg.solve_triangular(self.r.to(x.dtype), x, upper=True, left=False))
        return x if self.d is None else x / self.d

    def hessian_times(self, x: torch.Tensor) -> torch.Tensor:
        """x (H + λI) = x S Sᵀ for x [n, I]."""
        return self.right_t(self.right(x))


def whitening(inp: int, hessian: torch.Tensor | HessianFactors | None, channel_weights: torch.Tensor | None,
              damp: float = 0.01) -> Whitening:
    """S from the Hessian (or its factors, in any column order), else from the diagonal, else I."""
    if hessian is not None:
        f = hessian_factors(hessian, damp)
        return Whitening(r=f.r, order=f.order, factors=f)
    if channel_weights is not None:
        m = channel_weights.float().clamp_min(0)
        mean = float(m.mean())
        return Whitening(d=(m + (damp * mean if mean > 0 else 1.0)).sqrt())
    return Whitening()


def _randomized_svd(w: torch.Tensor, white: Whitening, k: int):
    """Top-k singular triplets of M = W S [O, I], touching M only through products with thin matrices."""
    gen = torch.Generator().manual_seed(SEED)
    mul = lambda x: w @ white.right_t(x.T).T  # M x = W (S x) for x [I, k]
    mul_t = lambda y: white.right(y.T @ w).T  # Mᵀ y = Sᵀ (Wᵀ y) for y [O, k]
    q = torch.linalg.qr(mul(torch.randn(w.shape[1], k, generator=gen))).Q  # [O, k]
    for _ in range(POWER_ITERATIONS):
        q = torch.linalg.qr(mul(torch.linalg.qr(mul_t(q)).Q)).Q
    u, s, vh = torch.linalg.svd(mul_t(q).T, full_matrices=False)  # qᵀ M [k, I]
    return q @ u, s, vh


def whitened_pair(w: torch.Tensor, rank: int, white: Whitening) -> tuple[torch.Tensor, torch.Tensor]:
    """A [O, r], B [r, I] fp32 minimising ‖(W − A B) S‖_F (balanced: Σ^½ on each side)."""
    out, inp = w.shape
    if not 0 < rank <= min(out, inp):
        raise EncodingError(f"rank {rank} is outside 1..{min(out, inp)} for a {out}x{inp} matrix")
    k = rank + OVERSAMPLE
    if out * inp <= EXACT_MAX_ELEMENTS or 2 * k >= min(out, inp):
        m = white.right(w.double() if out * inp <= EXACT_MAX_ELEMENTS else w)  # [O, I]
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
    else:
        u, s, vh = _randomized_svd(w, white, k)
    root = s[:rank].sqrt()
    a = (u[:, :rank] * root).float()
    b = white.unwhiten((root[:, None] * vh[:rank]).float())  # un-whitened in fp32, as decode multiplies
    return a, b


def whitened_svd(w: torch.Tensor, rank: int, hessian: torch.Tensor | None = None,
                 channel_weights: torch.Tensor | None = None, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """A [O, r], B [r, I] minimising the (damped) output error of W ≈ A B under H, diag(m) or I."""
    return whitened_pair(w.float(), rank, whitening(w.shape[1], hessian, channel_weights, damp))


def _refit_a(w: torch.Tensor, b_hat: torch.Tensor, white: Whitening) -> tuple[torch.Tensor, torch.Tensor]:
    """A [O, r] = argmin ‖(W − A B̂) S‖² = W (H+λI) B̂ᵀ G⁻¹, and G = B̂ (H+λI) B̂ᵀ [r, r] (A's input Hessian)."""
    hb = white.hessian_times(b_hat)  # [r, I]
    gram = hb @ b_hat.T  # [r, r]
    ridge = 1e-6 * float(gram.diagonal().mean().clamp_min(1e-30))
    eye = torch.eye(gram.shape[0])
    a = torch.linalg.solve(gram.double() + ridge * eye.double(), (hb @ w.T).double()).T.float()
    return a, (gram + gram.T) * 0.5


def factor_tensors(w: torch.Tensor, enc: Encoding, white: Whitening, channel_weights: torch.Tensor | None,
                   damp: float = 0.01) -> dict[str, torch.Tensor]:
    """The `lr_a.*` / `lr_b.*` tensors of `enc` (kind lowrank or int+lowrank) approximating w [O, I]."""
    a, b = whitened_pair(w, enc.rank, white)
    parts = enc.parts()
    b_enc, a_enc = parts["lr_b"], parts["lr_a"]
    if b_enc.kind == "bf16":
        b_stored = {"weight": b.to(torch.bfloat16)}
    elif white.factors is not None:
        b_stored = gptq(b, b_enc, white.factors)
    else:
        b_stored = clipped(b, b_enc, channel_weights)
    a, gram = _refit_a(w, decode(b_enc, b_stored), white)
    if a_enc.kind == "bf16":
        a_stored = {"weight": a.to(torch.bfloat16)}
    else:
        a_stored = gptq(a, a_enc, compute_factors(gram, damp))
    out = {f"lr_a.{k}": v for k, v in a_stored.items()}
    out.update({f"lr_b.{k}": v for k, v in b_stored.items()})
    return out

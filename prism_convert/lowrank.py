"""Low-rank factors from activation-whitened truncated SVD (SVD-LLM, Wang et al. 2024).

With H = E[x xᵀ] = S Sᵀ (Cholesky), the output error of W ≈ A B is ‖(W − A B) S‖_F², so the best rank-r
pair is the truncated SVD of W S, un-whitened: A = U_r Σ_r^½, B = Σ_r^½ V_rᵀ S⁻¹ (Eckart–Young in the
whitened space). With only the diagonal of H, S = diag(√m). Factors are balanced (Σ^½ on each side) so
both quantize well.
"""

from __future__ import annotations

import torch

from prism_load.errors import EncodingError


def whitening(inp: int, hessian: torch.Tensor | None, channel_weights: torch.Tensor | None,
              damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, S⁻¹) with S Sᵀ = H (damped); identity when no statistics are known."""
    if hessian is not None:
        h = hessian.double().clone()
        h.diagonal().add_(damp * h.diagonal().mean().clamp_min(1e-12) + 1e-12)
        s = torch.linalg.cholesky(h)
        return s, torch.linalg.solve_triangular(s, torch.eye(inp, dtype=torch.float64), upper=False)
    if channel_weights is not None:
        d = channel_weights.double().clamp_min(0)
        d = (d + damp * d.mean().clamp_min(1e-12) + 1e-12).sqrt()
        return torch.diag(d), torch.diag(1 / d)
    eye = torch.eye(inp, dtype=torch.float64)
    return eye, eye


def whitened_svd(w: torch.Tensor, rank: int, hessian: torch.Tensor | None = None,
                 channel_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A [O, r], B [r, I] minimising the (whitened) output error of W ≈ A B."""
    out, inp = w.shape
    if not 0 < rank <= min(out, inp):
        raise EncodingError(f"rank {rank} is outside 1..{min(out, inp)} for a {out}x{inp} matrix")
    s, s_inv = whitening(inp, hessian, channel_weights)
    u, sigma, vh = torch.linalg.svd(w.double() @ s, full_matrices=False)
    root = sigma[:rank].sqrt()
    a = u[:, :rank] * root
    b = (root[:, None] * vh[:rank]) @ s_inv
    return a.float(), b.float()

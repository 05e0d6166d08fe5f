"""Candidate encodings of one tensor and their measured, activation-weighted output error.

The error of a candidate Ŵ for a tensor with inputs x (second moments H = E[x xᵀ]) is the expected
squared error of its output channels, each weighted by how much that channel moves the expert's output:

    error = Σ_j s_j · E[((W − Ŵ)_j · x)²] = Σ_j s_j · (ΔW H ΔWᵀ)_jj

For down_proj s = 1 (its output is the expert's output). For gate_proj / up_proj, s_j is a first-order
sensitivity: s_j = ‖W_down[:, j]‖² · E[(∂h_j/∂gate_j)²] (resp. ∂h_j/∂up_j), with h the activation
output — so errors of the three tensors are in the same units and can share one budget.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from prism_convert.allocation.knapsack import Option, pareto
from prism_convert.compression.math.measure import output_error
from prism_load.container.codecs import decode
from prism_load.container.format import Encoding


@dataclass
class TensorStats:
    hessian: torch.Tensor | None = None  # [in, in] E[x xᵀ] of the tensor's routed inputs
    channel_weights: torch.Tensor | None = None  # [in] its diagonal, when the full matrix is unknown
    output_weights: torch.Tensor | None = None  # [out] sensitivities s_j (None: all 1)


def weighted_error(weight: torch.Tensor, decoded: torch.Tensor, stats: TensorStats) -> float:
    """Σ_j s_j · (ΔW H ΔWᵀ)_jj: prism_convert.compression.math.measure.output_error on rows scaled by √s_j."""
    if stats.output_weights is not None:
        root = stats.output_weights.float().clamp_min(0).sqrt()[:, None]
        weight, decoded = weight.float() * root, decoded.float() * root
    if stats.hessian is not None:
        return output_error(weight, decoded, hessian=stats.hessian)
    return output_error(weight, decoded, channel_weights=stats.channel_weights)


@dataclass
class Candidate:
    encoding: Encoding
    tensors: dict[str, torch.Tensor]
    error: float

    @property
    def nbytes(self) -> int:
        return self.encoding.nbytes()


Encoder = Callable[..., dict[str, torch.Tensor]]


def measure_candidates(weight: torch.Tensor, menu: list[Encoding], stats: TensorStats, encoder: Encoder,
                       use_hessian_for_rounding: bool = True) -> list[Candidate]:
    """Encode `weight` with every menu entry (`encoder` is prism_convert.compression.encode.encode_many), measure each, keep only the Pareto-optimal ones
    (a candidate with more bytes and more error than another is never chosen by an optimal allocation)."""
    stored = encoder(
        weight,
        menu,
        hessian=stats.hessian if use_hessian_for_rounding else None,
        channel_weights=stats.channel_weights,
    )
    candidates = [Candidate(enc, t, weighted_error(weight, decode(enc, t), stats)) for enc, t in zip(menu, stored)]
    front = pareto([Option(c.nbytes, c.error) for c in candidates])
    return [candidates[i] for i in front]

"""Expected output error of a decoded weight: what every candidate encoding is scored by.

For a linear map y = W x with inputs of second moment H = E[x xᵀ], replacing W by Ŵ changes the output by
ΔW x, and E‖ΔW x‖² = tr(ΔW H ΔWᵀ) — the quantity GPTQ and whitened SVD minimise (Frantar et al. 2022;
Wang et al. 2024). Without H, its diagonal estimate Σ_j m_j ‖ΔW[:, j]‖² (m_j = E[x_j²], the imatrix /
AWQ-style weighting) drops the cross-channel terms; without either, ‖ΔW‖²_F (x white with unit variance).

Units: squared output units per input vector, summed over output channels — the same units as
E‖W x‖² under the same statistics, so `relative_output_error` is a unit-free fraction.
"""

from __future__ import annotations

import torch

from prism_load.errors import EncodingError

ROW_CHUNK_ELEMENTS = 1 << 22  # rows of ΔW per product, bounding the [rows, in] temporary


def _delta(weight: torch.Tensor, decoded: torch.Tensor) -> torch.Tensor:
    if weight.shape != decoded.shape:
        raise EncodingError(f"decoded shape {list(decoded.shape)} differs from the weight's {list(weight.shape)}")
    d = weight.float() - decoded.float()
    return d.reshape(-1, d.shape[-1]) if d.dim() != 1 else d[None]  # [O, I]


def output_error(weight: torch.Tensor, decoded: torch.Tensor, *, hessian: torch.Tensor | None = None,
                 channel_weights: torch.Tensor | None = None, inputs: torch.Tensor | None = None) -> float:
    """E‖(W − Ŵ) x‖² over the inputs: tr(ΔW H ΔWᵀ) with `hessian` H [I, I]; Σ_j m_j ‖ΔW[:, j]‖² with
    `channel_weights` m [I]; mean_n ‖ΔW x_n‖² with `inputs` x [N, I] (cheaper than H when N < I: the
    same number as H = xᵀx / N); ‖ΔW‖²_F with none. fp32 products, float64 sums."""
    d = _delta(weight, decoded)  # [O, I]
    inp = d.shape[1]
    given = [k for k, v in (("hessian", hessian), ("channel_weights", channel_weights), ("inputs", inputs)) if v is not None]
    if len(given) > 1:
        raise EncodingError(f"output_error takes one of hessian, channel_weights, inputs; got {', '.join(given)}")
    if hessian is not None:
        if tuple(hessian.shape) != (inp, inp):
            raise EncodingError(f"Hessian of shape {list(hessian.shape)} does not match {inp} input channels")
        h = hessian.float()
        rows = max(1, ROW_CHUNK_ELEMENTS // inp)
        total = sum(float(((d[r : r + rows] @ h) * d[r : r + rows]).sum(dtype=torch.float64)) for r in range(0, d.shape[0], rows))
        return max(total, 0.0)  # a PSD H gives >= 0; clamp fp32 cancellation when ΔW ≈ 0
    if inputs is not None:
        if inputs.dim() != 2 or inputs.shape[1] != inp:
            raise EncodingError(f"inputs of shape {list(inputs.shape)} do not match {inp} input channels (expected [N, {inp}])")
        y = inputs.float() @ d.T  # [N, O]
        return float(y.square().sum(dtype=torch.float64)) / max(inputs.shape[0], 1)
    sq = d.square()  # [O, I]
    if channel_weights is not None:
        if tuple(channel_weights.shape) != (inp,):
            raise EncodingError(f"channel weights of shape {list(channel_weights.shape)} do not match {inp} input channels")
        return float((sq.sum(0, dtype=torch.float64) * channel_weights.double()).sum())
    return float(sq.sum(dtype=torch.float64))


def relative_output_error(weight: torch.Tensor, decoded: torch.Tensor, **stats) -> float:
    """output_error / E‖W x‖²: the share of the output's energy that the encoding loses."""
    scale = output_error(weight, torch.zeros_like(weight), **stats)
    return output_error(weight, decoded, **stats) / scale if scale > 0 else 0.0

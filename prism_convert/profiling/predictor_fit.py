"""The fitted prefetch predictor: a linear map from the hidden state leaving MoE layer i to layer j's router
logits (j the next MoE layer, or the one after it), fitted by ridge regression on the calibration tokens.

Why: the shadow router applies layer j's router to layer j's norm of the hidden state leaving layer i; it
misses whatever layer j's attention adds to the residual stream before its router reads it. The fitted map
takes the same input and costs the same one matmul, but is trained to predict the router's actual logits, so
it absorbs the average effect of that attention update. On the reference model it recovers more next-layer
experts than the shadow router on held-back tokens, and two MoE layers ahead (where the runtime's lookahead 2
uses it) about what the shadow router gets one layer ahead (`prism profile` records both per layer; the
reference model's figures: bench/results/profile.json, written by bench/bench_profile.py).

It is used only where it beats the shadow router: both are scored on the last fifth of the calibration
sequences by a fit on the first four fifths; the stored map is then refitted on every token. The prediction
picks experts with the router's own rule (`router.select`: bias correction and group limits included).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

VALIDATION_SHARE = 0.2  # the last fifth of the calibration sequences scores the two predictors
RIDGE = 1e-3  # ridge strength, relative to the mean diagonal of X^T X (the fit is insensitive to it)


@dataclass
class PredictorFit:
    """The fitted map of one layer pair and its validation score against the shadow router."""

    weight: torch.Tensor  # [E, H] fp32
    bias: torch.Tensor  # [E] fp32
    recall: float  # fitted predictor, validation tokens
    shadow_recall: float  # shadow router, the same tokens
    validation_tokens: int

    @property
    def beats_shadow(self) -> bool:
        return self.recall > self.shadow_recall


def set_overlap(pred: torch.Tensor, actual: torch.Tensor) -> torch.Tensor:
    """Per token, how many of `actual` [n, K] appear in `pred` [n, P]."""
    return (pred[:, :, None] == actual[:, None, :]).any(1).sum(-1)


def recall(predicted: torch.Tensor, actual: torch.Tensor) -> float:
    """Share of the actual choices [N, K] found among the predicted ones [N, P]."""
    return float(set_overlap(predicted, actual).sum()) / actual.numel() if actual.numel() else 0.0


def _normal_equations(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """([x 1]^T [x 1], [x 1]^T y) in fp64, accumulated in fp32 blocks (a block sum is exact enough and the
    fp32 matmul is several times faster on a CPU)."""
    h = x.shape[1]
    gram = torch.zeros(h + 1, h + 1, dtype=torch.float64)
    rhs = torch.zeros(h + 1, y.shape[1], dtype=torch.float64)
    for s in range(0, x.shape[0], 4096):
        xb = torch.cat([x[s : s + 4096].float(), torch.ones(min(4096, x.shape[0] - s), 1)], 1)
        gram += (xb.T @ xb).double()
        rhs += (xb.T @ y[s : s + 4096].float()).double()
    return gram, rhs


def _solve(gram: torch.Tensor, rhs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = gram.shape[0]
    ridge = RIDGE * float(gram.diagonal().mean().clamp_min(1e-12))
    m = torch.linalg.solve(gram + ridge * torch.eye(n, dtype=gram.dtype), rhs)  # [H+1, E]
    return m[:-1].T.float().contiguous(), m[-1].float().contiguous()


def fit_predictor(x: torch.Tensor, logits: torch.Tensor, actual: torch.Tensor, shadow: torch.Tensor,
                  select, seq_len: int = 1) -> PredictorFit | None:
    """x [T, H]: layer j's norm of the hidden state leaving layer i (the shadow router's input); logits [T, E]:
    layer j's router logits on its real input; actual [T, K]: its choices; shadow [T, K]: the shadow router's
    prediction; select(logits) -> [T, K]: the router's rule. Rows are sequences of seq_len tokens back to back:
    whole sequences are held back when there are two or more, so no sequence is both fitted and scored. None
    when there are too few tokens to score."""
    t = x.shape[0]
    sequences = t // seq_len if seq_len > 0 and t % seq_len == 0 else 0
    val = max(1, round(sequences * VALIDATION_SHARE)) * seq_len if sequences >= 2 else max(1, round(t * VALIDATION_SHARE))
    if t - val < 2:
        return None
    head, tail = slice(0, t - val), slice(t - val, t)
    g_fit, r_fit = _normal_equations(x[head], logits[head])
    weight, bias = _solve(g_fit, r_fit)
    predicted = select(torch.nn.functional.linear(x[tail].float(), weight, bias))
    score = recall(predicted, actual[tail])
    g_val, r_val = _normal_equations(x[tail], logits[tail])
    weight, bias = _solve(g_fit + g_val, r_fit + r_val)
    return PredictorFit(weight, bias, score, recall(shadow[tail], actual[tail]), val)

"""Fitted prefetch predictors: where they come from (a container's predictor file, or a profile folder) and
their runtime form.

A fitted predictor maps layer j's norm of the hidden state leaving MoE layer i (the previous MoE layer, or
the one before it) to layer j's router logits (prism_convert/profiling/predictor_fit.py fits them during
`prism profile`). Only predictors that beat the shadow router on the profile's held-back tokens are stored,
so the runtime uses every one it finds, and only right after layer i: after a dense layer between i and j
the shadow router predicts j as before.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..container.format import predictor_sources
from ..errors import ProfileError
from ..profile_format import RoutingProfile


@dataclass(frozen=True)
class FittedPredictor:
    from_layer: int
    weight: torch.Tensor  # [E, H] fp32
    bias: torch.Tensor  # [E] fp32

    def to(self, device) -> FittedPredictor:
        return FittedPredictor(self.from_layer, self.weight.to(device), self.bias.to(device))


def container_predictors(container, verify_checksum: bool = True) -> dict[tuple[int, int], FittedPredictor]:
    """The predictors stored in a .prism container (docs/FORMAT.md §4a), by (predicted, source) MoE layer."""
    p = container.manifest.predictor
    if p is None:
        return {}
    tensors = container.predictor_tensors(verify_checksum)
    return {(x.layer, x.from_layer): FittedPredictor(x.from_layer, *tensors[(x.layer, x.from_layer)])
            for x in p.layers}


def profile_predictors(profile: RoutingProfile, layers: list[int] | None = None) -> dict[tuple[int, int], dict]:
    """The predictors of a prism profile that beat the shadow router on its held-back tokens, by (predicted MoE
    layer, source MoE layer), for `layers` only when given: {"from_layer", "recall", "shadow_recall", "weight",
    "bias"}. A profile written before predictors existed has none."""
    fits = profile.offered_predictors(layers)
    tensors = profile.predictor_tensors(fits)
    return {(p.layer, p.from_layer): {"from_layer": p.from_layer, "recall": p.recall, "shadow_recall": p.shadow_recall,
                                      "weight": tensors[(p.layer, p.from_layer)][0],
                                      "bias": tensors[(p.layer, p.from_layer)][1]}
            for p in fits}


def check_predictors(predictors: dict[tuple[int, int], dict], args, where) -> None:
    """A profile's predictors against the model they are loaded with: each (layer, from_layer) a MoE layer and
    one of the two MoE layers before it, weight [E, H] and bias [E], finite (a container's are checked by its
    reader)."""
    moe = sorted(args.moe_layers)
    sources = predictor_sources(moe)
    for (j, i), p in predictors.items():
        w, b = p["weight"], p["bias"]
        if i not in sources.get(j, ()):
            raise ProfileError(f"{where}: a predictor of layer {j} from layer {i}, not a pair of this model's MoE "
                               f"layers {moe}")
        if tuple(w.shape) != (args.num_experts, args.hidden_size) or tuple(b.shape) != (args.num_experts,):
            raise ProfileError(f"{where}: the predictor of layer {j} from layer {i} is {list(w.shape)} / "
                               f"{list(b.shape)}, this model needs [{args.num_experts}, {args.hidden_size}] / "
                               f"[{args.num_experts}]")
        if not (torch.isfinite(w).all() and torch.isfinite(b).all()):
            raise ProfileError(f"{where}: the predictor of layer {j} from layer {i} holds NaN or infinite values")


def as_runtime(predictors: dict[tuple[int, int], dict]) -> dict[tuple[int, int], FittedPredictor]:
    return {key: FittedPredictor(p["from_layer"], p["weight"].float(), p["bias"].float())
            for key, p in predictors.items()}

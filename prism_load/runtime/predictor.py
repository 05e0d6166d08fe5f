"""Fitted prefetch predictors: where they come from (a container's predictor file, or a profile folder) and
their runtime form.

A fitted predictor maps layer j's norm of the hidden state leaving MoE layer i (the previous MoE layer, or
the one before it) to layer j's router logits (prism_convert/profiling/predictor_fit.py fits them during
`prism profile`). Only predictors that beat the shadow router on the profile's held-back tokens are stored,
so the runtime uses every one it finds, and only right after layer i: after a dense layer between i and j
the shadow router predicts j as before.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..container.format import predictor_sources
from ..errors import ProfileError


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


def predictor_key(layer: int, from_layer: int, part: str) -> str:
    """A profile's stats.safetensors name of a fitted predictor's `weight` or `bias` (profile_format)."""
    return f"layers.{layer}.predictor.{from_layer}.{part}"


def profile_predictors(folder: str | Path, layers: list[int] | None = None,
                       entries: list[dict] | None = None) -> dict[tuple[int, int], dict]:
    """The predictors of a prism profile folder that beat the shadow router on its held-back tokens, by
    (predicted MoE layer, source MoE layer), for `layers` only when given: {"from_layer", "recall",
    "shadow_recall", "weight", "bias"}. `entries`: profile.json's layers, when the caller has read them. A
    profile written before predictors existed has none."""
    from safetensors import safe_open

    folder = Path(folder)
    try:
        if entries is None:
            entries = json.loads((folder / "profile.json").read_text())["layers"]
        chosen = {(p["layer"], entry["layer"]): {"from_layer": entry["layer"], "recall": p["recall"],
                                                 "shadow_recall": p["shadow_recall"]}
                  for entry in entries for p in entry.get("predictors", ())
                  if p["recall"] > p["shadow_recall"] and (layers is None or p["layer"] in layers)}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ProfileError(f"{folder / 'profile.json'}: cannot read the predictors ({type(e).__name__}: {e})") from None
    if not chosen:
        return {}
    stats = folder / "stats.safetensors"
    try:
        with safe_open(stats, framework="pt") as f:
            names = set(f.keys())
            for (j, i), p in chosen.items():
                w, b = predictor_key(j, i, "weight"), predictor_key(j, i, "bias")
                if w not in names or b not in names:
                    raise ProfileError(f"{stats}: the predictor of layer {j} from layer {i} is recorded in "
                                       f"profile.json but {w} / {b} is missing")
                p["weight"], p["bias"] = f.get_tensor(w), f.get_tensor(b)
    except ProfileError:
        raise
    except Exception as e:  # noqa: BLE001 - missing or damaged file: name it
        raise ProfileError(f"{stats}: cannot read the predictors ({type(e).__name__}: {e})") from None
    return chosen


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

"""The routing profile on disk: `profile.json` (documented schema below) + `stats.safetensors` + `calibration.safetensors`.

profile.json (version 1):
- `format` "prism-profile", `version` 1
- `model`: `model_type`, `num_hidden_layers`, `num_experts`, `hidden_size`, `moe_intermediate_size`,
  `config_sha256` (of config.json: compress refuses a profile of another model)
- `dataset`: `spec`, `samples`, `seq_len`, `seed`, and `tokenizer` where it is not the checkpoint's tokenizer.json
- `tokens`: calibration tokens (samples x seq_len); `top_k`; `min_tokens`: below it an expert is "rare"
- `layers`: one object per MoE layer:
  - `layer` (index in the model), `experts`: [{`expert`, `tokens` (top-k hits), `gate_mass` (sum of the
    routing weights applied)}],
  - `next_layer` (index of the next MoE layer or null), `next_layer_recall` / `next_layer_precision`
    (next layer's router applied to this layer's output hidden state, top-k vs the real top-k; null for the
    last MoE layer), `next_layer_recall_at_2k` (the same predicting 2k experts),
  - `predictors`: the fitted prefetch predictors from this layer's output (prism_convert/profiling/predictor_fit.py), one
    per MoE layer ahead (`distance` 1: the next, 2: the one after): [{`layer` (the predicted MoE layer),
    `distance`, `recall`, `shadow_recall` (the fitted predictor's and the shadow router's recall, both fitted
    or applied without the last fifth of the calibration sequences and scored on it), `validation_tokens`}],
  - `routing_entropy_bits`, `max_entropy_bits`, `top_expert_share`, `top_quarter_share` (share of
    assignments taken by the top 25% of experts), `temporal_reuse` (share of a token's experts also used by
    the previous token of the same sequence) and `temporal_reuse_baseline` (the same if routing were
    independent between tokens), `rare_experts`.
- `rare_experts`: [[layer, expert], ...]; `seconds`, `tokens_per_second`, `peak_rss_bytes`.

stats.safetensors: `layers.{i}.input_sq` [E, H] and `layers.{i}.down_input_sq` [E, I] — per-channel mean
second moments of each expert's routed inputs (gate/up input; down-projection input), fp32;
`layers.{i}.coactivation` [E, E] int64 — tokens that chose both experts (diagonal: tokens that chose e);
`layers.{j}.predictor.{i}.weight` [E, H] and `layers.{j}.predictor.{i}.bias` [E], fp32 — the fitted
predictor of MoE layer j's router logits from its norm of MoE layer i's output (refitted on every token),
for each entry of layer i's `predictors`. A profile written before predictors existed has none.
calibration.safetensors: `tokens` [samples, seq_len] int64, so compress replays exactly the same data.
tokenizer.json (optional): the tokenizer the calibration text was cut with, when it is not the checkpoint's
own tokenizer.json (`--tokenizer`, or a converted tokenizer.model); `dataset.tokenizer` then says where it
came from, and compress ships it into the work folder (and so into the container).

The profiler (prism_convert/profiling/profiler.py) writes through this module (the file names, `predictor_key`,
`to_json`); the runtime reads a profile folder only as a `RoutingProfile` (`RoutingProfile.read`: profile.json
validated once, each problem named by file and field), and the converter as a `Profile` (the JSON as written,
plus the statistics it needs).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from safetensors import safe_open

from prism_load.checkpoint import config_sha256
from prism_load.errors import ProfileError

PROFILE_FORMAT, PROFILE_VERSION = "prism-profile", 1
PROFILE_JSON, STATS_FILE, CALIBRATION_FILE = "profile.json", "stats.safetensors", "calibration.safetensors"
TOKENIZER_FILE = "tokenizer.json"


def predictor_key(layer: int, from_layer: int, part: str) -> str:
    """stats.safetensors' name of a fitted predictor's `weight` or `bias` (MoE layer `layer` from `from_layer`)."""
    return f"layers.{layer}.predictor.{from_layer}.{part}"


def to_json(data: dict) -> str:
    """profile.json's text, as the profiler writes it."""
    return json.dumps(data, indent=1)


def _read_json(folder: Path) -> dict:
    """profile.json of `folder`: present, a JSON object, of this format and version."""
    path = folder / PROFILE_JSON
    if not path.is_file():
        raise ProfileError(f"{folder}: no {PROFILE_JSON} (not a profile folder, or an interrupted profile)")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ProfileError(f"{path}: not valid JSON ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise ProfileError(f"{path}: not a profile (a JSON {type(data).__name__}, expected an object)")
    if data.get("format") != PROFILE_FORMAT or data.get("version") != PROFILE_VERSION:
        raise ProfileError(
            f"{path}: format {data.get('format')!r} version {data.get('version')!r}, "
            f"expected {PROFILE_FORMAT!r} version {PROFILE_VERSION}"
        )
    return data


def _refuse_other_model(folder: Path, model_type, recorded: str, config: dict) -> None:
    want = config_sha256(config)
    if recorded != want:
        raise ProfileError(
            f"{folder}: profile was recorded on another model "
            f"(model_type {model_type!r}, config sha256 {str(recorded)[:12]}, this model's is {want[:12]})"
        )


class _Fields:
    """Typed reads of one JSON object of profile.json; an error names the file and the field's path."""

    def __init__(self, path: Path, obj, where: str):
        if not isinstance(obj, dict):
            raise ProfileError(f"{path}: `{where}` is a JSON {type(obj).__name__}, expected an object")
        self.path, self.obj, self.where = path, obj, where

    def _get(self, key: str, optional: bool):
        if key not in self.obj:
            if optional:
                return None
            raise ProfileError(f"{self.path}: `{self.name(key)}` is missing")
        return self.obj[key]

    def name(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def _bad(self, key: str, value, expected: str) -> ProfileError:
        return ProfileError(f"{self.path}: `{self.name(key)}` is {value!r}, expected {expected}")

    def integer(self, key: str, minimum: int = 0) -> int:
        value = self._get(key, False)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self._bad(key, value, f"an integer >= {minimum}")
        return value

    def number(self, key: str) -> float:
        value = self._get(key, False)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self._bad(key, value, "a number")
        return value

    def string(self, key: str, optional: bool = False) -> str | None:
        value = self._get(key, optional)
        if value is not None and not isinstance(value, str):
            raise self._bad(key, value, "a string")
        return value

    def object(self, key: str) -> _Fields:
        return _Fields(self.path, self._get(key, False), self.name(key))

    def objects(self, key: str, optional: bool = False) -> list[_Fields]:
        value = self._get(key, optional)
        if value is None and optional:
            return []
        if not isinstance(value, list):
            raise self._bad(key, value, "a list")
        return [_Fields(self.path, x, f"{self.name(key)}[{n}]") for n, x in enumerate(value)]


@dataclass(frozen=True)
class ExpertRouting:
    """One expert of one MoE layer over the calibration tokens."""

    expert: int
    tokens: int  # top-k hits
    gate_mass: float  # sum of the routing weights applied


@dataclass(frozen=True)
class PredictorFit:
    """A fitted prefetch predictor recorded in profile.json: MoE layer `layer` from MoE layer `from_layer`'s output,
    with its and the shadow router's recall on the held-back tokens (its tensors are in stats.safetensors)."""

    layer: int
    from_layer: int
    recall: float
    shadow_recall: float

    @property
    def beats_shadow(self) -> bool:
        """Only these are offered: elsewhere the shadow router predicts as well."""
        return self.recall > self.shadow_recall


@dataclass(frozen=True)
class LayerRouting:
    """One MoE layer of a profile: its experts' routing and the predictors fitted from its output."""

    layer: int
    experts: tuple[ExpertRouting, ...]
    predictors: tuple[PredictorFit, ...]  # empty in a profile written before predictors existed


@dataclass(frozen=True)
class RoutingProfile:
    """What the runtime reads of a profile folder: the profiled model's identity, every expert's routing, the
    fitted predictors. `read` validates profile.json once; `predictor_tensors` reads stats.safetensors."""

    folder: Path
    config_sha256: str
    model_type: str | None
    tokens: int  # calibration tokens
    layers: tuple[LayerRouting, ...]

    @classmethod
    def read(cls, folder: str | Path) -> RoutingProfile:
        folder = Path(folder)
        return cls.from_json(_read_json(folder), folder)

    @classmethod
    def from_json(cls, data: dict, folder: Path) -> RoutingProfile:
        """Validates the fields the runtime reads (the rest of profile.json is the converter's and reports')."""
        top = _Fields(Path(folder) / PROFILE_JSON, data, "")
        model = top.object("model")
        layers = []
        for entry in top.objects("layers"):
            i = entry.integer("layer")
            experts = tuple(ExpertRouting(x.integer("expert"), x.integer("tokens"), x.number("gate_mass"))
                            for x in entry.objects("experts"))
            predictors = tuple(PredictorFit(p.integer("layer"), i, p.number("recall"), p.number("shadow_recall"))
                               for p in entry.objects("predictors", optional=True))
            layers.append(LayerRouting(i, experts, predictors))
        return cls(Path(folder), model.string("config_sha256"), model.string("model_type", optional=True),
                   top.integer("tokens", minimum=1), tuple(layers))

    def check_model(self, config: dict) -> None:
        """Refuse a profile recorded on another model: its frequencies and predictors describe that model."""
        _refuse_other_model(self.folder, self.model_type, self.config_sha256, config)

    def frequencies(self) -> dict[tuple[int, int], float]:
        """Routing frequency of every profiled expert by (layer, expert): its top-k hits / calibration tokens."""
        return {(layer.layer, x.expert): x.tokens / self.tokens for layer in self.layers for x in layer.experts}

    def offered_predictors(self, layers=None) -> list[PredictorFit]:
        """The fitted predictors that beat the shadow router, of the MoE layers `layers` only when given, in
        profile.json's order."""
        return [p for entry in self.layers for p in entry.predictors
                if p.beats_shadow and (layers is None or p.layer in layers)]

    def predictor_tensors(self, fits: list[PredictorFit]) -> dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]:
        """(weight [E, H], bias [E]) of each fit from stats.safetensors, by (layer, from_layer)."""
        if not fits:
            return {}
        stats = self.folder / STATS_FILE
        out = {}
        try:
            with safe_open(stats, framework="pt") as f:
                names = set(f.keys())
                for p in fits:
                    w, b = predictor_key(p.layer, p.from_layer, "weight"), predictor_key(p.layer, p.from_layer, "bias")
                    if w not in names or b not in names:
                        raise ProfileError(f"{stats}: the predictor of layer {p.layer} from layer {p.from_layer} is "
                                           f"recorded in {PROFILE_JSON} but {w} / {b} is missing")
                    out[(p.layer, p.from_layer)] = (f.get_tensor(w), f.get_tensor(b))
        except ProfileError:
            raise
        except Exception as e:  # noqa: BLE001 - missing or damaged file: name it
            raise ProfileError(f"{stats}: cannot read the predictors ({type(e).__name__}: {e})") from None
        return out


@dataclass
class Profile:
    """The converter's view of a profile: its JSON as written plus lazy access to the per-expert statistics."""

    folder: Path
    data: dict

    @classmethod
    def load(cls, folder: str | Path) -> Profile:
        folder = Path(folder)
        data = _read_json(folder)
        for name in (STATS_FILE, CALIBRATION_FILE):
            if not (folder / name).is_file():
                raise ProfileError(f"{folder}: {name} is missing")
        return cls(folder, data)

    @cached_property
    def routing(self) -> RoutingProfile:
        return RoutingProfile.from_json(self.data, self.folder)

    @property
    def top_k(self) -> int:
        return int(self.data["top_k"])

    @property
    def layers(self) -> list[dict]:
        return self.data["layers"]

    def layer(self, i: int) -> dict:
        for entry in self.layers:
            if entry["layer"] == i:
                return entry
        raise ProfileError(f"{self.folder}: no MoE layer {i} in the profile")

    def check_model(self, config: dict) -> None:
        """Refuse a profile recorded on another model (different config.json)."""
        model = self.data["model"]
        _refuse_other_model(self.folder, model.get("model_type"), model["config_sha256"], config)

    def calibration_tokens(self) -> torch.Tensor:
        with safe_open(self.folder / CALIBRATION_FILE, framework="pt") as f:
            return f.get_tensor("tokens")

    def tensor(self, name: str) -> torch.Tensor:
        with safe_open(self.folder / STATS_FILE, framework="pt") as f:
            if name not in f.keys():
                raise ProfileError(f"{self.folder / STATS_FILE}: tensor {name} is missing")
            return f.get_tensor(name)

    def predictors_for(self, j: int) -> list[dict]:
        """MoE layer j's fitted prefetch predictors that beat the shadow router on the held-back tokens:
        [{"from_layer", "recall", "shadow_recall", "weight" [E, H], "bias" [E]}] (fp32), nearest source last."""
        fits = sorted(self.routing.offered_predictors([j]), key=lambda p: p.from_layer)
        tensors = self.routing.predictor_tensors(fits)
        return [{"from_layer": p.from_layer, "recall": p.recall, "shadow_recall": p.shadow_recall,
                 "weight": tensors[(j, p.from_layer)][0], "bias": tensors[(j, p.from_layer)][1]} for p in fits]

    def expert_tokens(self, i: int) -> torch.Tensor:
        return torch.tensor([x["tokens"] for x in self.layer(i)["experts"]], dtype=torch.float64)

    def expert_gate_mass(self, i: int) -> torch.Tensor:
        return torch.tensor([x["gate_mass"] for x in self.layer(i)["experts"]], dtype=torch.float64)

    def channel_weights(self, i: int, which: str = "input_sq") -> torch.Tensor:
        """Per-expert per-channel second moments [E, C]; rare experts get the layer's pooled mean (neutral prior)."""
        sq = self.tensor(f"layers.{i}.{which}").double()
        tokens = self.expert_tokens(i)
        pooled = (sq * tokens[:, None]).sum(0) / tokens.sum().clamp_min(1)
        rare = tokens < self.data["min_tokens"]
        sq[rare] = pooled
        return sq.float()

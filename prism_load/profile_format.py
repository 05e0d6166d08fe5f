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
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from prism_load.checkpoint import config_sha256
from prism_load.errors import ProfileError

PROFILE_FORMAT, PROFILE_VERSION = "prism-profile", 1
PROFILE_JSON, STATS_FILE, CALIBRATION_FILE = "profile.json", "stats.safetensors", "calibration.safetensors"
TOKENIZER_FILE = "tokenizer.json"


@dataclass
class Profile:
    """A loaded profile: its JSON plus lazy access to the per-expert statistics."""

    folder: Path
    data: dict

    @classmethod
    def load(cls, folder: str | Path) -> Profile:
        folder = Path(folder)
        path = folder / PROFILE_JSON
        if not path.is_file():
            raise ProfileError(f"{folder}: no {PROFILE_JSON} (not a profile folder, or an interrupted profile)")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ProfileError(f"{path}: not valid JSON ({e})") from None
        if data.get("format") != PROFILE_FORMAT or data.get("version") != PROFILE_VERSION:
            raise ProfileError(
                f"{path}: format {data.get('format')!r} version {data.get('version')!r}, "
                f"expected {PROFILE_FORMAT!r} version {PROFILE_VERSION}"
            )
        for name in (STATS_FILE, CALIBRATION_FILE):
            if not (folder / name).is_file():
                raise ProfileError(f"{folder}: {name} is missing")
        return cls(folder, data)

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
        want = config_sha256(config)
        if self.data["model"]["config_sha256"] != want:
            raise ProfileError(
                f"{self.folder}: profile was recorded on another model "
                f"(model_type {self.data['model']['model_type']!r}, config sha256 "
                f"{self.data['model']['config_sha256'][:12]}, this model's is {want[:12]})"
            )

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
        from prism_load.runtime.predictor import profile_predictors

        return [p for (layer, _), p in sorted(profile_predictors(self.folder, [j], self.layers).items()) if layer == j]

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

"""What a model family provides: `Family`, `ModelArgs` and the helpers the family files share.

The registry that finds a family by config.json's model_type is prism_load/models/family.py (it imports
every family file; a family file imports only this module, never the registry).

A family turns config.json into ModelArgs, builds one decoder layer at a time, and maps prism's tensor
names to the checkpoint's (mlx-lm's `sanitize`, split per layer so nothing needs the whole model).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import ConfigError
from .rope import RopeConfig


def require(config: dict, key: str, *aliases: str) -> Any:
    for k in (key, *aliases):
        if config.get(k) is not None:
            return config[k]
    raise ConfigError(f"config.json: missing field {key!r}")


def eos_ids(config: dict) -> tuple[int, ...]:
    eos = config.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


@dataclass
class ModelArgs:
    """Fields every family shares; families subclass it for their own switches."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    tie_word_embeddings: bool = False
    eos_token_ids: tuple[int, ...] = ()
    moe_layers: tuple[int, ...] = ()
    raw: dict = field(default_factory=dict, repr=False)

    def is_moe_layer(self, i: int) -> bool:
        return i in self.moe_layers

    @classmethod
    def common(cls, config: dict, **overrides) -> dict:
        """Reads the fields every family names the same way; families pass what differs as overrides."""
        hidden = int(require(config, "hidden_size"))
        heads = int(require(config, "num_attention_heads"))
        head_dim = int(config.get("head_dim") or hidden // heads)
        values = dict(
            model_type=require(config, "model_type"),
            vocab_size=int(require(config, "vocab_size")),
            hidden_size=hidden,
            num_hidden_layers=int(require(config, "num_hidden_layers")),
            num_attention_heads=heads,
            num_key_value_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=head_dim,
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            num_experts_per_tok=int(require(config, "num_experts_per_tok")),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            eos_token_ids=eos_ids(config),
            raw=config,
        )
        values.update(overrides)
        if "rope" not in values:
            values["rope"] = RopeConfig.from_hf(config, dim=values["head_dim"])
        known = {f.name for f in fields(cls)}
        return {k: v for k, v in values.items() if k in known}

    def moe_layer_indices(self) -> list[int]:
        return list(self.moe_layers)


class Family:
    """Base class. Subclasses set model_types and implement parse_config, build_layer and the name maps."""

    model_types: ClassVar[tuple[str, ...]] = ()
    expert_tensor_names: ClassVar[tuple[str, ...]] = ("gate_proj", "up_proj", "down_proj")

    def parse_config(self, config: dict) -> ModelArgs:
        raise NotImplementedError

    def build_layer(self, args: ModelArgs, i: int) -> nn.Module:
        """An empty decoder layer (build it under torch.device('meta') to allocate nothing)."""
        raise NotImplementedError

    def checkpoint_name(self, args: ModelArgs, i: int, key: str) -> str:
        """Checkpoint name of a layer tensor, given its prism key relative to the layer (not routed experts)."""
        return f"model.layers.{i}.{key}"

    def expert_tensors(self, args: ModelArgs, i: int, e: int, ckpt, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Canonical tensors of one routed expert: gate_proj [I, H], up_proj [I, H], down_proj [H, I]
        (plus gate_bias, up_bias, down_bias where the family has them)."""
        raise NotImplementedError

    def top_level_names(self, args: ModelArgs) -> dict[str, str]:
        """prism key -> checkpoint name for the embedding, final norm and LM head."""
        names = {"embed_tokens.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
        if not args.tie_word_embeddings:
            names["lm_head.weight"] = "lm_head.weight"
        return names

    def rotary_config(self, args: ModelArgs) -> RopeConfig:
        return args.rope

    fp32_suffixes: ClassVar[tuple[str, ...]] = ()

    def keeps_fp32(self, checkpoint_name: str) -> bool:
        """Tensors the reference keeps in fp32 whatever the model dtype (DeepSeek's router, for example)."""
        return checkpoint_name.endswith(self.fp32_suffixes) if self.fp32_suffixes else False

    def read_tensor(self, ckpt, name: str, dtype: torch.dtype, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """One non-expert tensor by checkpoint name, in `dtype` (fp32 where keeps_fp32 says so). Block-FP8
        weights are dequantised by Checkpoint.get for every family."""
        if self.keeps_fp32(name):
            return ckpt.get(name, None, shape).float()
        return ckpt.get(name, dtype, shape)


def read_swiglu_expert(
    ckpt,
    args: ModelArgs,
    i: int,
    e: int,
    per_expert: str,
    names: tuple[str, str, str],
    fused_prefix: str,
    dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    """One expert from either the per-expert layout on the Hub (`per_expert.format(i=, e=)` + `.{name}.weight`)
    or the fused v5 in-memory layout (`{fused_prefix}.gate_up_proj [E, 2I, H]`, `.down_proj [E, H, I]`)."""
    h, inter = args.hidden_size, args.moe_intermediate_size
    prefix = per_expert.format(i=i, e=e)
    gate, up, down = names
    fused = fused_prefix.format(i=i) + ".gate_up_proj"
    if f"{prefix}.{gate}.weight" not in ckpt and fused in ckpt:
        gate_up = ckpt.get(fused, dtype, (args.num_experts, 2 * inter, h))[e]
        down_t = ckpt.get(fused_prefix.format(i=i) + ".down_proj", dtype, (args.num_experts, h, inter))[e]
        return {"gate_proj": gate_up[:inter], "up_proj": gate_up[inter:], "down_proj": down_t}
    return {
        "gate_proj": ckpt.get(f"{prefix}.{gate}.weight", dtype, (inter, h)),
        "up_proj": ckpt.get(f"{prefix}.{up}.weight", dtype, (inter, h)),
        "down_proj": ckpt.get(f"{prefix}.{down}.weight", dtype, (h, inter)),
    }

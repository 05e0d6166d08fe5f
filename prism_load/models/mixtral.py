"""Mixtral: every layer MoE, softmax router with renormalised top-k, SwiGLU experts w1/w3/w2.

Reference: transformers `models/mixtral/modeling_mixtral.py` (MixtralTopKRouter, MixtralSparseMoeBlock).
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import Family, ModelArgs, read_swiglu_expert, require
from .layers import Attention, AttentionSpec, DecoderLayer
from .moe import MoEBlock, SoftmaxTopKRouter, StackedExperts


@dataclass
class MixtralArgs(ModelArgs):
    sliding_window: int | None = None


class Mixtral(Family):
    model_types = ("mixtral",)

    def parse_config(self, config: dict) -> MixtralArgs:
        layers = int(require(config, "num_hidden_layers"))
        return MixtralArgs(
            **MixtralArgs.common(
                config,
                num_experts=int(require(config, "num_local_experts", "num_experts")),
                moe_intermediate_size=int(require(config, "intermediate_size")),
                moe_layers=tuple(range(layers)),
                sliding_window=config.get("sliding_window"),
            )
        )

    def build_layer(self, args: MixtralArgs, i: int) -> DecoderLayer:
        spec = AttentionSpec(
            args.hidden_size, args.num_attention_heads, args.num_key_value_heads, args.head_dim,
            sliding_window=args.sliding_window,
        )
        router = SoftmaxTopKRouter(args.hidden_size, args.num_experts, args.num_experts_per_tok, norm_topk_prob=True)
        experts = StackedExperts(args.num_experts, args.hidden_size, args.moe_intermediate_size)
        mlp = MoEBlock(i, router, experts)
        return DecoderLayer(i, Attention(spec, i), mlp, args.hidden_size, args.rms_norm_eps)

    def checkpoint_name(self, args, i, key):
        if key.startswith("mlp.router."):
            key = key.replace("mlp.router.", "block_sparse_moe.gate.")
        return f"model.layers.{i}.{key}"

    def expert_tensors(self, args, i, e, ckpt, dtype):
        return read_swiglu_expert(
            ckpt, args, i, e, "model.layers.{i}.block_sparse_moe.experts.{e}", ("w1", "w3", "w2"),
            "model.layers.{i}.mlp.experts", dtype,
        )

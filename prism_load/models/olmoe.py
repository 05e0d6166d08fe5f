"""OLMoE: every layer MoE, softmax router (optional renormalisation), q/k RMSNorm over the whole projection
(not per head) before RoPE, and optional clipping of q/k/v. Reference: transformers `models/olmoe`.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import Family, ModelArgs, read_swiglu_expert, require
from .layers import Attention, AttentionSpec, DecoderLayer
from .moe import MoEBlock, SoftmaxTopKRouter, StackedExperts


@dataclass
class OlmoeArgs(ModelArgs):
    norm_topk_prob: bool = False
    attention_bias: bool = False
    clip_qkv: float | None = None


class Olmoe(Family):
    model_types = ("olmoe",)

    def parse_config(self, config: dict) -> OlmoeArgs:
        layers = int(require(config, "num_hidden_layers"))
        return OlmoeArgs(
            **OlmoeArgs.common(
                config,
                num_experts=int(require(config, "num_experts", "num_local_experts")),
                moe_intermediate_size=int(require(config, "intermediate_size")),
                moe_layers=tuple(range(layers)),
                norm_topk_prob=bool(config.get("norm_topk_prob", False)),
                attention_bias=bool(config.get("attention_bias", False)),
                clip_qkv=config.get("clip_qkv"),
            )
        )

    def build_layer(self, args: OlmoeArgs, i: int) -> DecoderLayer:
        spec = AttentionSpec(
            args.hidden_size, args.num_attention_heads, args.num_key_value_heads, args.head_dim,
            qkv_bias=args.attention_bias, o_bias=args.attention_bias, qk_norm="full",
            clip_qkv=args.clip_qkv, rms_norm_eps=args.rms_norm_eps,
        )
        router = SoftmaxTopKRouter(args.hidden_size, args.num_experts, args.num_experts_per_tok, args.norm_topk_prob)
        experts = StackedExperts(args.num_experts, args.hidden_size, args.moe_intermediate_size)
        return DecoderLayer(i, Attention(spec, i), MoEBlock(i, router, experts), args.hidden_size, args.rms_norm_eps)

    def checkpoint_name(self, args, i, key):
        return f"model.layers.{i}.{key.replace('mlp.router.', 'mlp.gate.')}"

    def expert_tensors(self, args, i, e, ckpt, dtype):
        return read_swiglu_expert(
            ckpt, args, i, e, "model.layers.{i}.mlp.experts.{e}", ("gate_proj", "up_proj", "down_proj"),
            "model.layers.{i}.mlp.experts", dtype,
        )

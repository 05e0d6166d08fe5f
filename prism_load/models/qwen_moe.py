"""Qwen2-MoE and Qwen3-MoE: softmax router with optional top-k renormalisation, mixed dense/MoE layers.

Qwen2-MoE adds a shared expert behind a sigmoid gate and q/k/v biases; Qwen3-MoE drops the shared expert
and normalises q and k per head (before RoPE). Reference: transformers `models/qwen2_moe`, `models/qwen3_moe`.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import Family, ModelArgs, read_swiglu_expert, require
from .layers import Attention, AttentionSpec, DecoderLayer, SwiGLU
from .linear import Linear
from .moe import MoEBlock, SoftmaxTopKRouter, StackedExperts


def qwen_moe_layers(config: dict, num_layers: int) -> tuple[int, ...]:
    """A layer is MoE iff not in mlp_only_layers, experts exist, and (i+1) % decoder_sparse_step == 0."""
    only_mlp = set(config.get("mlp_only_layers") or [])
    step = int(config.get("decoder_sparse_step", 1) or 1)
    experts = int(config.get("num_experts") or config.get("num_local_experts") or 0)
    return tuple(i for i in range(num_layers) if i not in only_mlp and experts > 0 and (i + 1) % step == 0)


@dataclass
class QwenMoeArgs(ModelArgs):
    intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: str | None = None
    sliding_windows: tuple[int | None, ...] = ()


class _QwenFamily(Family):
    shared_expert = False

    def parse_config(self, config: dict) -> QwenMoeArgs:
        layers = int(require(config, "num_hidden_layers"))
        return QwenMoeArgs(
            **QwenMoeArgs.common(
                config,
                num_experts=int(require(config, "num_experts", "num_local_experts")),
                moe_intermediate_size=int(require(config, "moe_intermediate_size")),
                intermediate_size=int(config.get("intermediate_size") or 0),
                shared_expert_intermediate_size=int(config.get("shared_expert_intermediate_size") or 0),
                norm_topk_prob=bool(config.get("norm_topk_prob", False)),
                moe_layers=qwen_moe_layers(config, layers),
                sliding_windows=self.sliding_windows(config, layers),
                **self.attention_switches(config),
            )
        )

    def attention_switches(self, config: dict) -> dict:
        raise NotImplementedError

    def sliding_windows(self, config: dict, layers: int) -> tuple[int | None, ...]:
        raise NotImplementedError

    def build_layer(self, args: QwenMoeArgs, i: int) -> DecoderLayer:
        spec = AttentionSpec(
            args.hidden_size, args.num_attention_heads, args.num_key_value_heads, args.head_dim,
            qkv_bias=args.qkv_bias, o_bias=args.o_bias, qk_norm=args.qk_norm,
            sliding_window=args.sliding_windows[i], rms_norm_eps=args.rms_norm_eps,
        )
        if args.is_moe_layer(i):
            router = SoftmaxTopKRouter(args.hidden_size, args.num_experts, args.num_experts_per_tok, args.norm_topk_prob)
            experts = StackedExperts(args.num_experts, args.hidden_size, args.moe_intermediate_size)
            shared = gate = None
            if self.shared_expert and args.shared_expert_intermediate_size:
                shared = SwiGLU(args.hidden_size, args.shared_expert_intermediate_size)
                gate = Linear(args.hidden_size, 1, bias=False)
            mlp = MoEBlock(i, router, experts, shared_expert=shared, shared_expert_gate=gate)
        else:
            mlp = SwiGLU(args.hidden_size, args.intermediate_size)
        return DecoderLayer(i, Attention(spec, i), mlp, args.hidden_size, args.rms_norm_eps)

    def checkpoint_name(self, args, i, key):
        return f"model.layers.{i}.{key.replace('mlp.router.', 'mlp.gate.')}"

    def expert_tensors(self, args, i, e, ckpt, dtype):
        return read_swiglu_expert(
            ckpt, args, i, e, "model.layers.{i}.mlp.experts.{e}", ("gate_proj", "up_proj", "down_proj"),
            "model.layers.{i}.mlp.experts", dtype,
        )


class Qwen2Moe(_QwenFamily):
    model_types = ("qwen2_moe",)
    shared_expert = True

    def attention_switches(self, config):
        return {"qkv_bias": bool(config.get("qkv_bias", True))}

    def sliding_windows(self, config, layers):
        if not config.get("use_sliding_window", False):
            return (None,) * layers
        types = config.get("layer_types") or [
            "sliding_attention" if (i + 1) % 2 and i < config.get("max_window_layers", 28) else "full_attention"
            for i in range(layers)
        ]
        window = config.get("sliding_window")
        return tuple(window if t == "sliding_attention" else None for t in types)


class Qwen3Moe(_QwenFamily):
    model_types = ("qwen3_moe",)

    def attention_switches(self, config):
        bias = bool(config.get("attention_bias", False))
        return {"qkv_bias": bias, "o_bias": bias, "qk_norm": "head"}

    def sliding_windows(self, config, layers):
        window = config.get("sliding_window") if config.get("use_sliding_window", False) else None
        return (window,) * layers

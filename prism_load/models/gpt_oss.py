"""GPT-OSS: every layer MoE with biased experts and a biased router (softmax over the top-k logits), a clamped
SwiGLU, attention with biases and per-head sinks, sliding-window and full attention alternating by `layer_types`.

Checkpoints hold fused experts, either bf16 (`gate_up_proj [E, H, 2I]` with gate/up interleaved in the columns,
`down_proj [E, I, H]`, used as x @ W) or MXFP4 as published (`*_blocks` + `*_scales`, rows = outputs). Both
become prism's canonical per-expert tensors (gate_proj [I, H], up_proj [I, H], down_proj [H, I] + biases).

Reference: transformers `models/gpt_oss/modeling_gpt_oss.py` (GptOssTopKRouter, GptOssExperts, GptOssAttention),
`integrations/mxfp4.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..dequant import MXFP4_GROUP, dequantize_mxfp4
from ..errors import CheckpointError, ConfigError
from .base import Family, ModelArgs, require
from .layers import Attention, AttentionSpec, DecoderLayer
from .moe import MoEBlock, RouterOutput, StackedExperts
from .rope import RopeConfig

# transformers GptOssConfig's rope when config.json names none.
DEFAULT_ROPE = {
    "rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
    "original_max_position_embeddings": 4096,
}
DEFAULT_THETA = 150000.0


@dataclass
class GptOssArgs(ModelArgs):
    sliding_windows: tuple[int | None, ...] = ()
    attention_bias: bool = True
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0


def route_gpt_oss(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers GptOssTopKRouter: top-k of the biased logits, then softmax over those k only."""
    values, indices = torch.topk(logits, top_k, dim=-1)  # [N, K]
    return indices, F.softmax(values, dim=-1, dtype=values.dtype)


class GptOssRouter(nn.Module):
    def __init__(self, hidden_size: int, num_experts: int, top_k: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.bias = nn.Parameter(torch.empty(num_experts))
        self.top_k = top_k

    def forward(self, x: torch.Tensor) -> RouterOutput:
        logits = F.linear(x, self.weight, self.bias)  # [N, E]
        indices, weights = route_gpt_oss(logits, self.top_k)
        return RouterOutput(logits, indices, weights)

    def select(self, logits: torch.Tensor) -> torch.Tensor:
        """The experts picked from (biased) logits [N, E]: [N, top_k]."""
        return route_gpt_oss(logits, self.top_k)[0]


class ClampedSwiGLU:
    """GPT-OSS expert activation (transformers GptOssExperts._apply_gate): gate clamped above at `limit`, up
    clamped to +-limit, then (up + 1) * gate * sigmoid(alpha * gate)."""

    def __init__(self, alpha: float, limit: float):
        self.alpha, self.limit = alpha, limit

    def __call__(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        gate = gate.clamp(max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))

    def __repr__(self) -> str:
        return f"ClampedSwiGLU(alpha={self.alpha}, limit={self.limit})"


def gpt_oss_windows(config: dict, num_layers: int) -> tuple[int | None, ...]:
    """Per-layer sliding window: `layer_types` if given, else sliding on even layers (transformers' default)."""
    window = config.get("sliding_window")
    types = config.get("layer_types") or [
        "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)
    ]
    if len(types) != num_layers:
        raise ConfigError(f"config.json: layer_types has {len(types)} entries for {num_layers} layers")
    return tuple(window if t == "sliding_attention" else None for t in types)


class GptOss(Family):
    model_types = ("gpt_oss",)

    def parse_config(self, config: dict) -> GptOssArgs:
        layers = int(require(config, "num_hidden_layers"))
        named_rope = config.get("rope_parameters") or config.get("rope_scaling")
        rope_source = config if named_rope else {**config, "rope_parameters": DEFAULT_ROPE}
        head_dim = int(config.get("head_dim") or require(config, "hidden_size") // require(config, "num_attention_heads"))
        return GptOssArgs(
            **GptOssArgs.common(
                config,
                num_experts=int(require(config, "num_local_experts", "num_experts")),
                moe_intermediate_size=int(require(config, "intermediate_size")),
                moe_layers=tuple(range(layers)),
                rope=RopeConfig.from_hf(rope_source, dim=head_dim, default_theta=DEFAULT_THETA),
                sliding_windows=gpt_oss_windows(config, layers),
                attention_bias=bool(config.get("attention_bias", True)),
                swiglu_alpha=float(config.get("swiglu_alpha", 1.702)),
                swiglu_limit=float(config.get("swiglu_limit", 7.0)),
            )
        )

    def build_layer(self, args: GptOssArgs, i: int) -> DecoderLayer:
        spec = AttentionSpec(
            args.hidden_size, args.num_attention_heads, args.num_key_value_heads, args.head_dim,
            qkv_bias=args.attention_bias, o_bias=args.attention_bias, sliding_window=args.sliding_windows[i],
            sinks=True, rms_norm_eps=args.rms_norm_eps,
        )
        router = GptOssRouter(args.hidden_size, args.num_experts, args.num_experts_per_tok)
        experts = StackedExperts(args.num_experts, args.hidden_size, args.moe_intermediate_size, bias=True)
        mlp = MoEBlock(i, router, experts, activation=ClampedSwiGLU(args.swiglu_alpha, args.swiglu_limit))
        return DecoderLayer(i, Attention(spec, i), mlp, args.hidden_size, args.rms_norm_eps)

    def expert_tensors(self, args, i, e, ckpt, dtype):
        """gate/up rows interleaved on disk (gate j = row 2j, up j = row 2j + 1); canonical tensors split them."""
        p = f"model.layers.{i}.mlp.experts"
        n, h, inter = args.num_experts, args.hidden_size, args.moe_intermediate_size
        if f"{p}.gate_up_proj_blocks" in ckpt:
            gate_up = _mxfp4_rows(ckpt, f"{p}.gate_up_proj", e, (n, 2 * inter, h))  # [2I, H]
            down = _mxfp4_rows(ckpt, f"{p}.down_proj", e, (n, h, inter))  # [H, I]
        else:
            gate_up = ckpt.get(f"{p}.gate_up_proj", None, (n, h, 2 * inter))[e].T  # [2I, H]
            down = ckpt.get(f"{p}.down_proj", None, (n, inter, h))[e].T  # [H, I]
        bias = ckpt.get(f"{p}.gate_up_proj_bias", None, (n, 2 * inter))[e]
        tensors = {
            "gate_proj": gate_up[0::2], "up_proj": gate_up[1::2], "down_proj": down,
            "gate_bias": bias[0::2], "up_bias": bias[1::2],
            "down_bias": ckpt.get(f"{p}.down_proj_bias", None, (n, h))[e],
        }
        return {k: v.to(dtype).contiguous() for k, v in tensors.items()}


def _mxfp4_rows(ckpt, name: str, e: int, shape: tuple[int, int, int]) -> torch.Tensor:
    """Expert e of an MXFP4 tensor stored as [E, rows, cols/32, 16] blocks + [E, rows, cols/32] scales -> fp32 [rows, cols]."""
    n, rows, cols = shape
    if cols % MXFP4_GROUP:
        raise CheckpointError(f"tensor {name}_blocks: {cols} input columns are not a multiple of {MXFP4_GROUP}")
    groups = cols // MXFP4_GROUP
    blocks = ckpt.get(f"{name}_blocks", None, (n, rows, groups, MXFP4_GROUP // 2))[e]
    scales = ckpt.get(f"{name}_scales", None, (n, rows, groups))[e]
    return dequantize_mxfp4(blocks, scales, name)

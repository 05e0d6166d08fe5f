"""DeepSeek-V2 / V3: multi-head latent attention (MLA), dense-then-MoE layers, ungated shared experts, and
group-limited routing (V2: softmax; V3: sigmoid with a score-correction bias). Block-FP8 checkpoints
(V3/R1 as published) are dequantised as each tensor is read.

Reference: transformers `models/deepseek_v2`, `models/deepseek_v3` (DeepseekV3Attention, DeepseekV2TopkRouter,
DeepseekV3TopkRouter); MLA from DeepSeek-V2 (arXiv 2405.04434 §2.1), bias-corrected routing from
DeepSeek-V3 (arXiv 2412.19437 §2.1.2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .base import Family, ModelArgs, read_swiglu_expert, require
from .layers import DecoderLayer, ForwardContext, RMSNorm, SwiGLU, attend
from .linear import Linear
from .moe import MoEBlock, RouterOutput, StackedExperts
from .rope import RopeConfig, apply_rotary, yarn_mscale


@dataclass
class DeepseekArgs(ModelArgs):
    intermediate_size: int = 0  # dense layers
    shared_intermediate_size: int = 0  # moe_intermediate_size * n_shared_experts (0: no shared expert)
    q_lora_rank: int | None = None  # None: plain q_proj
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    attention_bias: bool = False
    rope_interleave: bool = True  # rotary pairs are (x0, x1), (x2, x3), ... rather than the two halves
    softmax_scale: float = 1.0
    topk_method: str = "noaux_tc"  # V2: greedy | group_limited_greedy; V3: noaux_tc (sigmoid + bias)
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0


def route_v2(logits: torch.Tensor, top_k: int, method: str, n_group: int, topk_group: int, scaling: float):
    """transformers DeepseekV2TopkRouter: softmax over experts; `greedy` takes the top-k, `group_limited_greedy`
    first keeps the topk_group groups whose best expert scores highest (others zeroed). Weights are scaled by
    routed_scaling_factor and never renormalised (transformers ignores norm_topk_prob for V2)."""
    scores = logits.softmax(dim=-1, dtype=torch.float32)  # [N, E]
    if method == "group_limited_greedy":
        n = scores.shape[0]
        group_best = scores.view(n, n_group, -1).max(dim=-1).values  # [N, G]
        keep = torch.topk(group_best, topk_group, dim=-1).indices
        mask = torch.zeros_like(group_best, dtype=torch.bool).scatter_(1, keep, True)
        scores = scores.masked_fill(~mask.repeat_interleave(scores.shape[1] // n_group, dim=1), 0.0)
    weights, indices = torch.topk(scores, top_k, dim=-1)
    return indices, weights * scaling


def route_v3(logits: torch.Tensor, bias: torch.Tensor, top_k: int, n_group: int, topk_group: int,
             norm_topk_prob: bool, scaling: float):
    """transformers DeepseekV3TopkRouter (noaux_tc): sigmoid scores; the bias-corrected scores choose (groups
    ranked by the sum of their two best experts, experts outside the topk_group best groups excluded), the
    uncorrected scores weigh; optional renormalisation, then routed_scaling_factor."""
    scores = logits.sigmoid()  # [N, E] fp32
    choice = scores + bias
    n = scores.shape[0]
    group_score = choice.view(n, n_group, -1).topk(2, dim=-1).values.sum(dim=-1)  # [N, G]
    keep = torch.topk(group_score, topk_group, dim=-1).indices
    mask = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, keep, True)
    choice = choice.masked_fill(~mask.repeat_interleave(scores.shape[1] // n_group, dim=1), float("-inf"))
    indices = torch.topk(choice, top_k, dim=-1).indices
    weights = scores.gather(1, indices)
    if norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return indices, weights * scaling


class DeepseekRouter(nn.Module):
    """Router logits in fp32 (the weight stays fp32 whatever the model dtype, as transformers keeps it)."""

    def __init__(self, args: DeepseekArgs, v3: bool):
        super().__init__()
        self.args, self.v3, self.top_k = args, v3, args.num_experts_per_tok
        self.weight = nn.Parameter(torch.empty(args.num_experts, args.hidden_size, dtype=torch.float32))
        if v3:
            self.e_score_correction_bias = nn.Parameter(torch.empty(args.num_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> RouterOutput:
        logits = F.linear(x.float(), self.weight.float())  # [N, E]
        indices, weights = self._route(logits)
        return RouterOutput(logits, indices, weights)  # weights stay fp32; MoEBlock casts the weighted sum

    def select(self, logits: torch.Tensor) -> torch.Tensor:
        """The experts picked from logits [N, E] (bias correction and group limits included): [N, top_k]."""
        return self._route(logits.float())[0]

    def _route(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.args
        if self.v3:
            return route_v3(logits, self.e_score_correction_bias, self.top_k, a.n_group, a.topk_group,
                            a.norm_topk_prob, a.routed_scaling_factor)
        return route_v2(logits, self.top_k, a.topk_method, a.n_group, a.topk_group, a.routed_scaling_factor)


def apply_rotary_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary on interleaved pairs (x0, x1), (x2, x3), ...; the result is laid out as halves, exactly as
    transformers' V3 `apply_rotary_pos_emb_interleave`. V2's complex form keeps the pairs interleaved instead;
    q and k get the same permutation, so every q.k (all attention uses them for) is the same."""
    half = cos.shape[-1] // 2
    cos, sin = cos[..., :half], sin[..., :half]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class MLAttention(nn.Module):
    """Multi-head latent attention. Keys and values come from one low-rank latent c [kv_lora_rank] per token
    plus one shared rotary key part; the KV cache holds (c, k_rot) and expands them per step, as transformers does.

    Shape key: B batch, T new tokens, S cached + new, h heads, C kv_lora_rank, R rope dim, P no-rope dim, V v dim.
    """

    def __init__(self, args: DeepseekArgs, layer_index: int):
        super().__init__()
        self.args, self.layer_index = args, layer_index
        h, hidden = args.num_attention_heads, args.hidden_size
        qk = args.qk_nope_head_dim + args.qk_rope_head_dim
        if args.q_lora_rank is None:
            self.q_proj = Linear(hidden, h * qk, bias=False)
        else:
            self.q_a_proj = Linear(hidden, args.q_lora_rank, bias=args.attention_bias)
            self.q_a_layernorm = RMSNorm(args.q_lora_rank)  # transformers leaves these at eps 1e-6
            self.q_b_proj = Linear(args.q_lora_rank, h * qk, bias=False)
        self.kv_a_proj_with_mqa = Linear(hidden, args.kv_lora_rank + args.qk_rope_head_dim, bias=args.attention_bias)
        self.kv_a_layernorm = RMSNorm(args.kv_lora_rank)
        self.kv_b_proj = Linear(args.kv_lora_rank, h * (args.qk_nope_head_dim + args.v_head_dim), bias=False)
        self.o_proj = Linear(h * args.v_head_dim, hidden, bias=args.attention_bias)
        self.rotate = apply_rotary_interleaved if args.rope_interleave else apply_rotary

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        a = self.args
        b, t, _ = x.shape
        h, nope, rope, vdim = a.num_attention_heads, a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim
        q = self.q_proj(x) if a.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_rot = q.view(b, t, h, nope + rope).transpose(1, 2).split([nope, rope], dim=-1)  # [B, h, T, P|R]
        latent, k_rot = self.kv_a_proj_with_mqa(x).split([a.kv_lora_rank, rope], dim=-1)
        latent = self.kv_a_layernorm(latent)[:, None]  # [B, 1, T, C]
        q_rot = self.rotate(q_rot, ctx.cos, ctx.sin)
        k_rot = self.rotate(k_rot[:, None], ctx.cos, ctx.sin)  # [B, 1, T, R]
        if ctx.cache is not None:
            latent, k_rot = ctx.cache.update(self.layer_index, latent, k_rot)
        s = latent.shape[2]
        kv = self.kv_b_proj(latent[:, 0]).view(b, s, h, nope + vdim).transpose(1, 2)  # [B, h, S, P+V]
        k_nope, v = kv.split([nope, vdim], dim=-1)
        k = torch.cat([k_nope, k_rot.expand(-1, h, -1, -1)], dim=-1)  # [B, h, S, P+R]
        q = torch.cat([q_nope, q_rot], dim=-1)
        out = attend(q, k, v, ctx.positions, a.softmax_scale, key_valid=ctx.key_valid)  # [B, h, T, V]
        return self.o_proj(out.transpose(1, 2).reshape(b, t, h * vdim))


def softmax_scale(qk_head_dim: int, rope: RopeConfig) -> float:
    """transformers `yarn_apply_mscale`: with scaled rope, logits are sharpened by mscale(factor, mscale_all_dim)^2."""
    scale = qk_head_dim**-0.5
    mscale_all_dim = rope.params.get("mscale_all_dim")
    if rope.rope_type != "default" and mscale_all_dim:
        p = rope.params
        factor = p.get("factor") or rope.max_position_embeddings / p["original_max_position_embeddings"]
        scale *= yarn_mscale(float(factor), float(mscale_all_dim)) ** 2
    return scale


def deepseek_moe_layers(config: dict, num_layers: int) -> tuple[int, ...]:
    """MoE iff routed experts exist, i >= first_k_dense_replace and i % moe_layer_freq == 0 (DeepSeek's own code;
    transformers ignores moe_layer_freq, which every released config sets to 1)."""
    experts = int(config.get("n_routed_experts") or 0)
    first_dense = int(config.get("first_k_dense_replace") or 0)
    freq = int(config.get("moe_layer_freq") or 1)
    return tuple(i for i in range(num_layers) if experts and i >= first_dense and i % freq == 0)


class _DeepseekFamily(Family):
    v3: bool = False
    fp32_suffixes = ("mlp.gate.weight", "mlp.gate.e_score_correction_bias")

    def parse_config(self, config: dict) -> DeepseekArgs:
        layers = int(require(config, "num_hidden_layers"))
        heads = int(require(config, "num_attention_heads"))
        nope, rope = int(require(config, "qk_nope_head_dim")), int(require(config, "qk_rope_head_dim"))
        experts = int(config.get("n_routed_experts") or 0)
        shared = int(config.get("n_shared_experts") or 0)
        moe_inter = int(require(config, "moe_intermediate_size")) if experts else 0
        rope_cfg = RopeConfig.from_hf(config, dim=rope)
        q_lora = config.get("q_lora_rank")
        args = DeepseekArgs(
            **DeepseekArgs.common(
                config,
                num_key_value_heads=heads,
                head_dim=nope + rope,
                rope=rope_cfg,
                num_experts=experts,
                num_experts_per_tok=int(config.get("num_experts_per_tok") or 0),
                moe_intermediate_size=moe_inter,
                moe_layers=deepseek_moe_layers(config, layers),
                intermediate_size=int(require(config, "intermediate_size")),
                shared_intermediate_size=moe_inter * shared,
                q_lora_rank=None if q_lora is None else int(q_lora),
                kv_lora_rank=int(require(config, "kv_lora_rank")),
                qk_nope_head_dim=nope,
                qk_rope_head_dim=rope,
                v_head_dim=int(require(config, "v_head_dim")),
                attention_bias=bool(config.get("attention_bias", False)),
                rope_interleave=bool(config.get("rope_interleave", True)) if self.v3 else True,
                softmax_scale=softmax_scale(nope + rope, rope_cfg),
                topk_method="noaux_tc" if self.v3 else str(config.get("topk_method") or "greedy"),
                n_group=int(config.get("n_group") or 1),
                topk_group=int(config.get("topk_group") or 1),
                norm_topk_prob=bool(config.get("norm_topk_prob", False)),
                routed_scaling_factor=float(config.get("routed_scaling_factor") or 1.0),
            )
        )
        self.validate(config, args)
        return args

    def validate(self, config: dict, args: DeepseekArgs) -> None:
        """Reject switches this code (and transformers) would silently compute differently."""
        if config.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"config.json: hidden_act {config['hidden_act']!r} is not supported (expected 'silu')")
        if config.get("mlp_bias"):
            raise ConfigError("config.json: mlp_bias=true is not supported")
        if args.qk_rope_head_dim % 2:
            raise ConfigError(f"config.json: qk_rope_head_dim must be even, got {args.qk_rope_head_dim}")
        scoring = config.get("scoring_func")
        if self.v3:
            if scoring not in (None, "sigmoid") or config.get("topk_method") not in (None, "noaux_tc"):
                raise ConfigError(
                    f"config.json: deepseek_v3 routes with scoring_func 'sigmoid' and topk_method 'noaux_tc', "
                    f"got {scoring!r} / {config.get('topk_method')!r}"
                )
        else:
            if scoring not in (None, "softmax"):
                raise ConfigError(f"config.json: deepseek_v2 scoring_func must be 'softmax', got {scoring!r}")
            if args.topk_method not in ("greedy", "group_limited_greedy"):
                raise ConfigError(
                    f"config.json: topk_method {args.topk_method!r} is not supported "
                    "(deepseek_v2: 'greedy' or 'group_limited_greedy')"
                )
        if not args.num_experts:
            return
        grouped = self.v3 or args.topk_method == "group_limited_greedy"
        e, g, kg, k = args.num_experts, args.n_group, args.topk_group, args.num_experts_per_tok
        if k < 1 or k > e:
            raise ConfigError(f"config.json: num_experts_per_tok {k} must be in 1..n_routed_experts ({e})")
        if grouped and (e % g or kg > g or k > kg * (e // g) or (self.v3 and e // g < 2)):
            raise ConfigError(
                f"config.json: n_group {g} / topk_group {kg} do not fit n_routed_experts {e} with "
                f"num_experts_per_tok {k} (groups must divide the experts, hold at least 2 each for V3, "
                "and the kept groups must hold the top-k)"
            )

    def build_layer(self, args: DeepseekArgs, i: int) -> DecoderLayer:
        if args.is_moe_layer(i):
            experts = StackedExperts(args.num_experts, args.hidden_size, args.moe_intermediate_size)
            shared = SwiGLU(args.hidden_size, args.shared_intermediate_size) if args.shared_intermediate_size else None
            mlp = MoEBlock(i, DeepseekRouter(args, self.v3), experts, shared_expert=shared)
        else:
            mlp = SwiGLU(args.hidden_size, args.intermediate_size)
        return DecoderLayer(i, MLAttention(args, i), mlp, args.hidden_size, args.rms_norm_eps)

    def checkpoint_name(self, args, i, key):
        key = key.replace("mlp.router.", "mlp.gate.").replace("mlp.shared_expert.", "mlp.shared_experts.")
        return f"model.layers.{i}.{key}"

    def expert_tensors(self, args, i, e, ckpt, dtype):
        prefix = f"model.layers.{i}.mlp.experts.{e}"
        if f"{prefix}.gate_proj.weight" not in ckpt:  # transformers' fused in-memory layout, or missing
            return read_swiglu_expert(
                ckpt, args, i, e, "model.layers.{i}.mlp.experts.{e}", ("gate_proj", "up_proj", "down_proj"),
                "model.layers.{i}.mlp.experts", dtype,
            )
        h, inter = args.hidden_size, args.moe_intermediate_size
        return {
            "gate_proj": self.read_tensor(ckpt, f"{prefix}.gate_proj.weight", dtype, (inter, h)),
            "up_proj": self.read_tensor(ckpt, f"{prefix}.up_proj.weight", dtype, (inter, h)),
            "down_proj": self.read_tensor(ckpt, f"{prefix}.down_proj.weight", dtype, (h, inter)),
        }


class DeepseekV2(_DeepseekFamily):
    model_types = ("deepseek_v2",)


class DeepseekV3(_DeepseekFamily):
    model_types = ("deepseek_v3",)
    v3 = True

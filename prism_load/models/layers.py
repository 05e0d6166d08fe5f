"""Layers shared by every family: RMSNorm, the KV cache, grouped-query attention, the SwiGLU MLP.

Shape key: B batch, T new tokens, S cached + new tokens, H hidden, h heads, g kv heads, D head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import native
from ..native.attention_decode import attention_decode, attention_ops, attention_rows
from ..native.decode_layer import decode_layer, layer_step
from . import moe
from .linear import Linear
from .moe import MoEBlock, RouterOutput, SoftmaxTopKRouter
from .rope import apply_rotary


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in fp32, then scaled in the input dtype (as transformers does)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = native.rms_norm(x, self.weight, self.eps)  # decode rows: one native call (None: not taken here)
        if y is not None:
            return y
        # torch's fused rms_norm computes x * rsqrt(mean(x^2) + eps) as transformers' four ops do (the tests
        # hold it to transformers' logits), in one call instead of five on every decode step
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


class KVCache:
    """Per-layer key/value buffers that grow by doubling, so decode appends without reallocating each step."""

    def __init__(self, num_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.lengths = [0] * num_layers
        self.key_valid: torch.Tensor | None = None  # [B, S] False at padding slots; None while no row is padded

    @property
    def length(self) -> int:
        return max(self.lengths) if self.lengths else 0

    def reserve(self, layer: int, t: int, batch: int, heads: int, k_dim: int, v_dim: int, dtype: torch.dtype,
                device) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's key/value buffers [B, g, capacity, D], grown (doubling) so that t more slots fit; the other
        arguments shape a new buffer."""
        n = self.lengths[layer]
        buf_k, buf_v = self.keys[layer], self.values[layer]
        if buf_k is None or n + t > buf_k.shape[2]:
            capacity = max(2 * (n + t), 64)
            new_k = torch.empty(batch, heads, capacity, k_dim, dtype=dtype, device=device)
            new_v = torch.empty(batch, heads, capacity, v_dim, dtype=dtype, device=device)
            if buf_k is not None:
                new_k[:, :, :n] = buf_k[:, :, :n]
                new_v[:, :, :n] = buf_v[:, :, :n]
            buf_k, buf_v = self.keys[layer], self.values[layer] = new_k, new_v
        return buf_k, buf_v

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k/v [B, g, T, D] for a layer; return all cached k/v [B, g, S, D]."""
        n, t = self.lengths[layer], k.shape[2]
        buf_k, buf_v = self.reserve(layer, t, k.shape[0], k.shape[1], k.shape[3], v.shape[3], k.dtype, k.device)
        buf_k[:, :, n : n + t] = k
        buf_v[:, :, n : n + t] = v
        self.lengths[layer] = n + t
        return buf_k[:, :, : n + t], buf_v[:, :, : n + t]


@dataclass
class ForwardContext:
    """What every layer needs besides its input: positions, rotary tables, the cache and, with left-padded rows,
    which slots are real. Padding sits before each row's tokens, so slot order is token order in every row and
    causality and sliding windows can be counted in slots; only the rotary phases need each row's own positions."""

    positions: torch.Tensor  # [T] cache slots of the new tokens (their positions when no row is padded)
    cos: torch.Tensor  # [T, D_rot], or [B, 1, T, D_rot] for per-row positions (padded rows)
    sin: torch.Tensor
    cache: KVCache | None = None
    key_valid: torch.Tensor | None = None  # [B, S] False at padding key slots; None: no padding
    token_valid: torch.Tensor | None = None  # [B, T] False at padding new tokens; None: no padding
    # [B] int64: each row's first real slot, where every row's padding is a prefix of its slots (a decode step of a
    # left-padded batch: the native batch step attends from there); None otherwise
    key_first: torch.Tensor | None = None


def attention_mask(q_pos: torch.Tensor, k_len: int, window: int | None,
                   key_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean mask, True where attending is allowed: causal, and within the sliding window if any; [T, S], or
    [B, 1, T, S] with key_valid [B, S] hiding padding keys. A padding query still sees itself, so its softmax
    row is never empty (no NaN); nothing reads its output."""
    k_pos = torch.arange(k_len, device=q_pos.device)
    allowed = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        allowed &= k_pos[None, :] > q_pos[:, None] - window
    if key_valid is None:
        return allowed
    own = k_pos[None, :] == q_pos[:, None]
    return allowed[None, None] & (key_valid[:, None, None, :] | own)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    scaling: float,
    window: int | None = None,
    sinks: torch.Tensor | None = None,
    key_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention. q [B, h, T, D]; k/v [B, g, S, D]; returns [B, h, T, Dv].

    SDPA handles the plain causal case; sinks (GPT-OSS: a learned per-head logit that joins the softmax
    and is then dropped) need the explicit form. key_valid [B, S]: padding key slots, hidden from every query.
    """
    t, s = q.shape[2], k.shape[2]
    if sinks is None:
        gqa = q.shape[1] != k.shape[1]
        if key_valid is None and window is None and t == s:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=gqa)
        plain_decode = key_valid is None and window is None and t == 1
        mask = None if plain_decode else attention_mask(q_pos, s, window, key_valid)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=gqa)
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = torch.matmul(q, k.transpose(2, 3)) * scaling  # [B, h, T, S]
    scores = scores.masked_fill(~attention_mask(q_pos, s, window, key_valid), float("-inf"))
    sink = sinks.reshape(1, -1, 1, 1).expand(q.shape[0], -1, t, 1).to(scores.dtype)
    logits = torch.cat([scores, sink], dim=-1)
    logits = logits - logits.max(dim=-1, keepdim=True).values
    probs = F.softmax(logits, dim=-1, dtype=logits.dtype)[..., :-1]
    return torch.matmul(probs.to(v.dtype), v)


@dataclass
class AttentionSpec:
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: str | None = None  # None, "head" (Qwen3: per head), "full" (OLMoE: over the whole projection)
    clip_qkv: float | None = None
    sliding_window: int | None = None
    sinks: bool = False
    rms_norm_eps: float = 1e-6


class Attention(nn.Module):
    """Grouped-query attention with the per-family switches of AttentionSpec."""

    def __init__(self, spec: AttentionSpec, layer_index: int):
        super().__init__()
        self.spec, self.layer_index = spec, layer_index
        h, g, d = spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.q_proj = Linear(spec.hidden_size, h * d, bias=spec.qkv_bias)
        self.k_proj = Linear(spec.hidden_size, g * d, bias=spec.qkv_bias)
        self.v_proj = Linear(spec.hidden_size, g * d, bias=spec.qkv_bias)
        self.o_proj = Linear(h * d, spec.hidden_size, bias=spec.o_bias)
        if spec.qk_norm == "head":
            self.q_norm, self.k_norm = RMSNorm(d, spec.rms_norm_eps), RMSNorm(d, spec.rms_norm_eps)
        elif spec.qk_norm == "full":
            self.q_norm, self.k_norm = RMSNorm(h * d, spec.rms_norm_eps), RMSNorm(g * d, spec.rms_norm_eps)
        if spec.sinks:
            self.sinks = nn.Parameter(torch.zeros(h))
        self.scaling = d**-0.5

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        spec = self.spec
        b, t, _ = x.shape
        if t == 1 and b == 1 and ctx.cache is not None and ctx.key_valid is None:
            out = self._native_decode(x, ctx)  # one native call for the whole step where it applies
            if out is not None:
                return out
        elif t == 1 and ctx.cache is not None and (ctx.key_valid is None or ctx.key_first is not None):
            out = self._native_rows(x, ctx)  # a decode batch's step: one native call for all its rows
            if out is not None:
                return out
        if hasattr(self, "qkv_proj") and spec.qk_norm is None and spec.clip_qkv is None:
            # q, k and v fused into one packed operator at load (packed.fuse_qkv): q and k, adjacent in its
            # output, take the rotary phases in one pass (elementwise, so the same bits as two passes)
            qk, v = self.qkv_proj(x).split([self.qkv_sizes[0] + self.qkv_sizes[1], self.qkv_sizes[2]], dim=-1)
            qk = apply_rotary(qk.view(b, t, -1, spec.head_dim).transpose(1, 2), ctx.cos, ctx.sin)
            q, k = qk.split([self.qkv_sizes[0] // spec.head_dim, self.qkv_sizes[1] // spec.head_dim], dim=1)
            v = v.view(b, t, -1, spec.head_dim).transpose(1, 2)
            return self._attend(q, k, v, ctx, b, t)
        if hasattr(self, "qkv_proj"):
            q, k, v = self.qkv_proj(x).split(self.qkv_sizes, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if spec.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if spec.clip_qkv is not None:
            q, k, v = (z.clamp(-spec.clip_qkv, spec.clip_qkv) for z in (q, k, v))
        q = q.view(b, t, -1, spec.head_dim)
        k = k.view(b, t, -1, spec.head_dim)
        if spec.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B, h|g, T, D]
        v = v.view(b, t, -1, spec.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, ctx.cos, ctx.sin), apply_rotary(k, ctx.cos, ctx.sin)
        return self._attend(q, k, v, ctx, b, t)

    def _native_ops(self):
        """The native decode step's operators (native.attention_decode.AttentionOps), or False: the plain case
        only (q, k and v fused and packed on an integer kernel, a packed o projection, fp32 biases or none, no
        q/k norm, clipping or sinks; a sliding window is fine). Worked out at the first decode step."""
        ops = self.__dict__.get("_native_decode_ops")
        if ops is None:
            spec, ops = self.spec, False
            qkv, o = getattr(self, "qkv_proj", None), self.o_proj
            if (qkv is not None and spec.qk_norm is None and spec.clip_qkv is None and not spec.sinks
                    and hasattr(qkv, "op") and hasattr(o, "op")):
                bias = [None if m.bias is None else m.bias.detach() for m in (qkv, o)]
                ops = attention_ops(qkv.op, o.op, spec.num_heads, spec.num_kv_heads, spec.head_dim, *bias) or False
            self.__dict__["_native_decode_ops"] = ops
        return ops

    def _native_decode(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor | None:
        """One decode token of one sequence through attention_decode.c (fp32 models with a full-width rotary
        and an fp32 cache), or None where it does not apply."""
        ops = self._native_ops()
        slot = self.native_slot(x, ctx) if ops else None
        if slot is None:
            return None
        spec, (keys, values, n) = self.spec, slot
        out = attention_decode(x.reshape(-1).contiguous(), ops, ctx.cos[0], ctx.sin[0], keys, values, n,
                               spec.num_heads, spec.num_kv_heads, spec.head_dim, self.scaling, spec.sliding_window)
        ctx.cache.lengths[self.layer_index] = n + 1
        return out.view(1, 1, -1)

    def _native_rows(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor | None:
        """A decode step of B rows (left-padded ones too: each attends from its first real slot) through
        attention_rows, or None where it does not apply (as _native_decode, for fp32 caches of the batch's rows)."""
        ops = self._native_ops()
        spec, b = self.spec, x.shape[0]
        if not ops or x.dtype is not torch.float32 or b > moe.BATCH_ROWS:
            return None
        d = spec.head_dim
        if ctx.cos.dim() == 2 and ctx.cos.shape == (1, d):  # one position for every row
            cos, sin = ctx.cos.expand(b, d).contiguous(), ctx.sin.expand(b, d).contiguous()
        elif ctx.cos.shape == (b, 1, 1, d):  # each row's own (padded rows)
            cos, sin = ctx.cos.reshape(b, d).contiguous(), ctx.sin.reshape(b, d).contiguous()
        else:
            return None
        cache, layer = ctx.cache, self.layer_index
        keys, values = cache.reserve(layer, 1, b, spec.num_kv_heads, d, d, x.dtype, x.device)
        if (keys.dtype is not torch.float32 or keys.shape[0] != b or not (keys.is_contiguous()
                                                                           and values.is_contiguous())):
            return None
        n = cache.lengths[layer]
        out = attention_rows(x.reshape(b, -1).contiguous(), ops, cos, sin, keys, values, n, spec.num_heads,
                             spec.num_kv_heads, d, self.scaling, spec.sliding_window, ctx.key_first)
        cache.lengths[layer] = n + 1
        return out.view(b, 1, -1)

    def native_slot(self, x: torch.Tensor, ctx: ForwardContext) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        """(keys, values, n): the layer's fp32 caches with room for this decode token at slot n, where the native
        step applies to x (fp32) and ctx (a full-width rotary); else None. The caller counts the token."""
        spec = self.spec
        if x.dtype is not torch.float32 or ctx.cos.dim() != 2 or ctx.cos.shape[-1] != spec.head_dim:
            return None
        cache, layer = ctx.cache, self.layer_index
        keys, values = cache.reserve(layer, 1, 1, spec.num_kv_heads, spec.head_dim, spec.head_dim, x.dtype, x.device)
        if keys.dtype is not torch.float32 or not (keys.is_contiguous() and values.is_contiguous()):
            return None
        return keys, values, cache.lengths[layer]

    def _attend(self, q, k, v, ctx: ForwardContext, b: int, t: int) -> torch.Tensor:
        """q [B, h, T, D], k/v [B, g, T, D] (rotary applied): cache, attention, output projection."""
        if ctx.cache is not None:
            k, v = ctx.cache.update(self.layer_index, k, v)
        out = attend(q, k, v, ctx.positions, self.scaling, self.spec.sliding_window, getattr(self, "sinks", None),
                     ctx.key_valid)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class SwiGLU(nn.Module):
    """Dense gated MLP: down(silu(gate(x)) * up(x)). Used for dense layers and shared experts."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm residual block: attention, then the MLP (dense or MoE)."""

    def __init__(self, index: int, self_attn: nn.Module, mlp: nn.Module, hidden_size: int, eps: float):
        super().__init__()
        self.index = index
        self.self_attn = self_attn
        self.mlp = mlp
        self.input_layernorm = RMSNorm(hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(hidden_size, eps)

    def forward(self, x: torch.Tensor, ctx: ForwardContext, keep: int = 0) -> torch.Tensor:
        """keep: only the last `keep` positions' outputs are returned (and only their MLP runs); 0: all. Not with
        padded rows (ctx.token_valid)."""
        if x.shape[0] == 1 and x.shape[1] == 1 and ctx.cache is not None and ctx.key_valid is None:
            out = self._native_decode(x, ctx)  # norms, attention and routing in one native call where it applies
            if out is not None:
                return out
        x = x + self.self_attn(self.input_layernorm(x), ctx)
        if keep:
            if ctx.token_valid is not None:
                raise ValueError("DecoderLayer: keep does not apply to padded rows")
            x = x[:, -keep:].contiguous()
        h = self.post_attention_layernorm(x)
        if ctx.token_valid is None:
            return x + self.mlp(h)
        # padding never reaches the MLP: the experts, the expert cache, its statistics and observers see real
        # tokens only (routing is per token, so the real rows' outputs are the same either way)
        out = torch.zeros_like(h)
        if bool(ctx.token_valid.any()):
            out[ctx.token_valid] = self.mlp(h[ctx.token_valid]).to(out.dtype)
        return x + out

    def _native_step(self):
        """The layer's decode_layer.c step (native.decode_layer.LayerStep), or False: attention on the native
        decode path (Attention._native_ops), both norms plain fp32 RMSNorms, and the MLP's router, where it is a
        softmax top-k router, routed in the same call. Worked out at the first decode step."""
        step = self.__dict__.get("_native_decode_step")
        if step is None:
            attn, norms, step = self.self_attn, (self.input_layernorm, self.post_attention_layernorm), False
            ops = attn._native_ops() if type(attn) is Attention else False
            if ops and all(type(n) is RMSNorm for n in norms):
                router = getattr(self.mlp, "router", None) if isinstance(self.mlp, MoEBlock) else None
                routed = type(router) is SoftmaxTopKRouter
                spec = attn.spec
                step = layer_step(ops, spec.num_heads, spec.num_kv_heads, spec.head_dim, attn.scaling,
                                  spec.sliding_window, norms[0].weight.detach(), norms[0].eps,
                                  norms[1].weight.detach(), norms[1].eps,
                                  router.weight.detach() if routed else None, router.top_k if routed else 0,
                                  router.norm_topk_prob if routed else False) or False
            self.__dict__["_native_decode_step"] = step
        return step

    def _native_decode(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor | None:
        """One decode token of one sequence: decode_layer.c up to the MLP, then the MLP (its experts from
        wherever they live); None where the native step does not apply."""
        step = self._native_step()
        slot = self.self_attn.native_slot(x, ctx) if step else None
        if slot is None:
            return None
        keys, values, n = slot
        y, h, route = decode_layer(x.reshape(-1).contiguous(), step, ctx.cos[0], ctx.sin[0], keys, values, n)
        ctx.cache.lengths[self.index] = n + 1
        h = h.view(1, -1)
        if route is None:
            out = self.mlp(h.view(1, 1, -1)).view(1, -1)
        else:
            out = self.mlp.after_route(h, RouterOutput(*route))
        return (y.view(1, -1) + out).view(1, 1, -1)

"""A decode token through every decoder layer in one native call (native.decode_layer.TokenLayers), for a model
that is resident and plain: every layer takes decode_layer.c's step with a softmax top-k router, every MoE block
is routed experts only (SwiGLU, no shared expert), all resident as native expert_block.c operators.

Why: with the per-layer native steps, what remains between them is Python that decides nothing for such a
model (module calls, expert lookups, wrappers' checks, argument arrays): about 60 microseconds a layer on a
Zen 4 core, a sixth of a decode token of a Mixtral-shaped model of hidden 1024 (bench/results/
decode_profile_zen4.md). The calls are the same C functions in the same order, so the logits are the same bits.

Anything that watches or steers a layer (an expert cache and its statistics, prefetch's layer hook, an observer)
keeps the per-layer path: `token_layers` says None, or `run` steps aside for that token.
"""

from __future__ import annotations

import torch

from ..native.decode_layer import TokenLayers
from .layers import DecoderLayer, ForwardContext
from .moe import MoEBlock, silu_glu


def token_layers(model) -> TokenLayers | None:
    """The model's TokenLayers where every layer qualifies (see the module's docstring), else None. Worked out
    at a model's first decode step, and again if its MLPs or expert sources are replaced (an expert cache
    attached)."""
    steps, experts = [], []
    for layer in model.layers:
        mlp = layer.mlp
        if type(layer) is not DecoderLayer or type(mlp) is not MoEBlock or mlp.activation is not silu_glu \
                or mlp.shared_expert is not None:
            return None
        step = layer._native_step()
        blocks = getattr(mlp.experts, "native_blocks", lambda: None)()
        if not step or step.router is None or blocks is None or len(blocks) != step.router.shape[0]:
            return None
        steps.append(step)
        experts.append(blocks)
    return TokenLayers(steps, experts) if steps else None


def module_refs(model) -> list:
    """What a TokenLayers was made from: each layer's MLP and its expert source (held by the plan anyway, through
    its operators, until the next decode token works it out again)."""
    return [(layer.mlp, getattr(layer.mlp, "experts", None)) for layer in model.layers]


def same_modules(model, refs: list) -> bool:
    return len(refs) == len(model.layers) and all(
        layer.mlp is mlp and getattr(mlp, "experts", None) is source for layer, (mlp, source) in zip(model.layers, refs))


def run(model, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor | None:
    """Every layer's output for one decode token x [1, 1, H] (fp32) in one native call, or None where this token
    needs the per-layer path (no cache, padding, a layer hook, an observer, another dtype or rotary, a graph
    being recorded for gradients)."""
    layers = model.layers
    found = model.__dict__.get("_token_layers")
    if found is None or not same_modules(model, found[1]):  # worked out for other modules
        found = model.__dict__["_token_layers"] = (token_layers(model) or False, module_refs(model))
    plan = found[0]
    if (not plan or model.layer_hook is not None or ctx.cache is None or ctx.key_valid is not None
            or x.dtype is not torch.float32 or ctx.cos.dim() != 2 or (torch.is_grad_enabled() and x.requires_grad)
            or any(layer.mlp.observer is not None for layer in layers)):
        return None
    slots = []
    for layer in layers:
        slot = layer.self_attn.native_slot(x, ctx)
        if slot is None:
            return None
        slots.append(slot)
    out = plan.run(x.reshape(-1), ctx.cos[0], ctx.sin[0], slots)
    lengths = ctx.cache.lengths
    for layer, (_, _, n) in zip(layers, slots):
        lengths[layer.index] = n + 1
    return out.view(1, 1, -1)

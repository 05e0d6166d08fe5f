"""A decode token through every decoder layer in one native call (native.decode_layer.TokenLayers), for a model
whose layers are plain: every layer takes decode_layer.c's step with a softmax top-k router, and every MoE block
is routed experts only (SwiGLU, no shared expert).

- All experts resident as native expert_block.c operators: the loop reads them from a table per layer.
- Otherwise (an expert cache, or resident experts some of which no native block takes): the loop calls back
  into Python between layers, where the experts are acquired as the per-layer path acquires them (the cache
  counts, pins, loads and evicts as before) and, where they are native blocks, handed to the loop; prefetch's
  layer hook is called back after each layer, where the per-layer path called it. An expert cache without
  prefetch also gives the loop a resident table per layer (its ready native experts): a layer whose routed
  experts are all in it runs without a callback, and its hits are counted at the next callback or after the
  token, in order (ExpertCache.record_hits); without prefetch the hook only unpinned, so it runs once after the
  token instead of after every layer.

Why: with the per-layer native steps, what remains between them is Python that decides nothing (module calls,
wrappers' checks, argument arrays): about 60 microseconds a layer on a Zen 4 core, a sixth of a decode token of
a Mixtral-shaped model of hidden 1024 (bench/results/decode_profile_zen4.md). The calls are the same C functions
in the same order, and the callbacks the same Python, so the logits are the same bits.

An observer (prism profile's) keeps the per-layer path for that token; so do padding, another dtype, a graph
recorded for gradients.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from ..native.decode_layer import ExpertServer, TokenLayers
from .layers import DecoderLayer, ForwardContext
from .moe import MoEBlock, silu_glu


def token_layers(model) -> TokenLayers | None:
    """The model's TokenLayers where every layer qualifies (see the module's docstring), else None; experts in
    tables where every one is a resident native block, else served. Worked out at a model's first decode step,
    and again if its MLPs or expert sources are replaced (an expert cache attached)."""
    steps, experts = [], []
    for layer in model.layers:
        mlp = layer.mlp
        if type(layer) is not DecoderLayer or type(mlp) is not MoEBlock or mlp.activation is not silu_glu \
                or mlp.shared_expert is not None:
            return None
        step = layer._native_step()
        if not step or step.router is None:
            return None
        blocks = getattr(mlp.experts, "native_blocks", lambda: None)()
        steps.append(step)
        experts.append(blocks if blocks is not None and len(blocks) == step.router.shape[0] else None)
    if not steps:
        return None
    if all(b is not None for b in experts):
        return TokenLayers(steps, experts)
    resident = [getattr(layer.mlp.experts, "resident_table", lambda _: None)(layer.mlp.layer_index)
                for layer in model.layers]
    return TokenLayers(steps, resident=resident)


def expert_server(model, plan: TokenLayers) -> ExpertServer:
    """The callbacks of a served TokenLayers: a layer's experts acquired from its MoE block's source, handed over
    as native blocks where they are, else summed by the block's Python path into the loop's buffer."""
    layers = list(model.layers)

    def route(at: int, h: torch.Tensor, indices: np.ndarray, weights: torch.Tensor, moe: torch.Tensor):
        """The blocks (their operators hold the experts' tensors until the loop has run them; the cache's pins
        hold the experts until this thread's next acquire, as on the per-layer path), or None once summed."""
        mlp = layers[at].mlp
        k = mlp.router.top_k
        ids = indices[:k].tolist()
        got = mlp.experts.acquire(mlp.layer_index, ids)
        blocks = mlp.native_blocks(ids, got)
        if blocks is None:
            moe.copy_(mlp.decode_sum(h.view(1, -1), ids, got, weights[:k].view(1, -1)).view(-1))
        return blocks

    def hook(at: int, out: torch.Tensor) -> None:
        model.layer_hook(layers[at].index, out.view(1, 1, -1))

    # per loop layer: who keeps its resident table (the expert cache behind its source) and its MoE layer index,
    # looked up once (the plan is made again when the modules change: same_modules)
    keepers = [(getattr(layer.mlp.experts, "cache", layer.mlp.experts), layer.mlp.layer_index) for layer in layers]

    def hits(records: list[tuple[int, list[int]]]) -> None:
        """The layers the loop ran from resident tables: counted by whoever keeps their tables (one expert cache
        behind every layer's source: one call, one lock round trip, a token), in order."""
        run: list = []
        keeper = None
        for at, ids in records:
            owner, index = keepers[at]
            if owner is not keeper and run:
                keeper.record_hits(run)
                run = []
            keeper = owner
            run.append((index, ids))
        if run:
            keeper.record_hits(run)

    owners = {id(owner) for owner, _ in keepers}
    native = getattr(keepers[0][0], "native_misses", lambda: None)() if len(owners) == 1 else None
    positions = None
    if native is not None:
        where = native.cache.policy.position
        positions = np.array([where.get(index, -1) for _, index in keepers], dtype=np.int64)
    return ExpertServer(plan, route, hook, hits, native, positions)


def layer_hook_between_layers(model) -> bool:
    """Whether the model's layer hook must run after every layer of a native token: not where it is only an
    expert cache's unpinning (no prefetch predicts the next layer), which once after the token does
    (Runtime.after_token): a callback into Python per layer saved."""
    hook = model.layer_hook
    runtime = getattr(model, "runtime", None)
    return hook is not None and (runtime is None or hook != runtime.on_layer or runtime.predicts)


def _attribute(module, name: str):
    """getattr(module, name, None) for an nn.Module without its __getattr__ (its instance dict first, then its
    submodules), which costs about a microsecond a call cold, every decode token, every layer."""
    found = module.__dict__
    return found[name] if name in found else module._modules.get(name)


def module_refs(model) -> tuple:
    """What a TokenLayers was made from (held by the plan anyway, through its operators, until the next decode
    token works it out again): the layer list, its layers, and each layer's MLP and expert source."""
    layers = _attribute(model, "layers")
    mlps = tuple(_attribute(layer, "mlp") for layer in layers._modules.values())
    return layers, tuple(layers._modules.values()), mlps, tuple(_attribute(m, "experts") for m in mlps)


def same_modules(model, refs: tuple) -> bool:
    """Whether the model's layers, their MLPs and expert sources are the ones refs holds (identity)."""
    layers, listed, mlps, sources = refs
    if _attribute(model, "layers") is not layers or tuple(layers._modules.values()) != listed:
        return False
    return all(_attribute(layer, "mlp") is mlp and _attribute(mlp, "experts") is source
               for layer, mlp, source in zip(listed, mlps, sources))


def run(model, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor | None:
    """Every layer's output for one decode token x [1, 1, H] (fp32) in one native call, or None where this token
    needs the per-layer path (no cache, padding, an observer, another dtype or rotary, a graph being recorded
    for gradients)."""
    layers = model.layers
    found = model.__dict__.get("_token_layers")
    if found is None or not same_modules(model, found[1]):  # worked out for other modules
        plan = token_layers(model) or False
        server = expert_server(model, plan) if plan and plan.served else None
        found = model.__dict__["_token_layers"] = (plan, module_refs(model), server)
    plan, refs, server = found
    if (not plan or ctx.cache is None or ctx.key_valid is not None
            or x.dtype is not torch.float32 or ctx.cos.dim() != 2 or (torch.is_grad_enabled() and x.requires_grad)
            or any(mlp.observer is not None for mlp in refs[2])
            or (model.layer_hook is not None and server is None)):
        return None
    slots = []
    for layer in layers:
        slot = layer.self_attn.native_slot(x, ctx)
        if slot is None:
            return None
        slots.append(slot)
    hooked = layer_hook_between_layers(model)
    native = None
    if server is not None and server.native is not None and not hooked:  # the cache's lock, held for the token
        native = functools.partial(server.native.token, server.positions_address)
    out = plan.run(x.reshape(-1), ctx.cos[0], ctx.sin[0], slots, server, hooked=hooked, native=native)
    if model.layer_hook is not None and not hooked:
        model.runtime.after_token()
    lengths = ctx.cache.lengths
    for layer, (_, _, n) in zip(layers, slots):
        lengths[layer.index] = n + 1
    return out.view(1, 1, -1)

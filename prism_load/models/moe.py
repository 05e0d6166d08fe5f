"""The MoE block: a router and an expert source kept apart, so later stages can watch and replace them.

- `router(x)` returns logits, the top-k expert indices and the weights actually applied.
- `experts` is any ExpertSource: resident stacked tensors here, a budgeted cache in the runtime.
- `observer`, when set, sees the router output and each expert's inputs (prism profile uses it).

Shape key: N tokens (batch x time flattened), H hidden, E experts, K top-k, I expert intermediate size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .. import native
from ..native import router_topk
from ..native.expert_block import block_ops, expert_block, expert_rows, one_rounding
from .linear import linear

# Rows of x up to which a batch's routed experts run in one native call (expert_rows: decode batches, short prompts),
# and a decode batch's attention (layers.Attention: attention_rows). int16 x on 256-bit tiles only up to
# native.Q16_UPTO_M rows an expert, beyond which the exact kernel (the per-op path's choice) is faster.
BATCH_ROWS = 16


def batch_row_limit(wide: int) -> int:
    """The most rows expert_rows takes for experts of this rounding of x (1: int16, 0: int8) on this CPU."""
    return BATCH_ROWS if not wide or native.q16_vector_bits() == 512 else min(BATCH_ROWS, native.Q16_UPTO_M)


@dataclass
class RouterOutput:
    logits: torch.Tensor  # [N, E] raw router logits
    indices: torch.Tensor  # [N, K] chosen experts
    weights: torch.Tensor  # [N, K] weights applied to the chosen experts' outputs


class SoftmaxTopKRouter(nn.Module):
    """softmax(fp32) -> top-k -> optional renormalisation (Mixtral always; Qwen-MoE/OLMoE by norm_topk_prob).

    Reference: transformers MixtralTopKRouter / Qwen2MoeTopKRouter / OlmoeTopKRouter.
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, norm_topk_prob: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.top_k, self.norm_topk_prob = top_k, norm_topk_prob

    def forward(self, x: torch.Tensor) -> RouterOutput:
        native_route = router_topk(x, self.weight, self.top_k, self.norm_topk_prob)  # decode rows: a call each
        if native_route is not None:
            logits, indices, weights = native_route
            return RouterOutput(logits, indices, weights.to(x.dtype))
        logits = linear(x, self.weight)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, indices = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return RouterOutput(logits, indices, weights.to(x.dtype))

    def select(self, logits: torch.Tensor) -> torch.Tensor:
        """The experts this router picks from logits [N, E] (softmax keeps their order): [N, top_k]. The
        prefetch predictor produces logits from an earlier hidden state and picks with the router's own rule."""
        return torch.topk(logits, self.top_k, dim=-1).indices


class ExpertWeights:
    """One expert's tensors in the runtime layout: gate_up [2I, H] (gate rows, then up rows), down [H, I].

    gate_up and down are plain tensors or any callable linear operator (a low-rank pair, for example).
    """

    __slots__ = ("gate_up", "down", "gate_up_bias", "down_bias", "_block")

    def __init__(self, gate_up, down, gate_up_bias=None, down_bias=None):
        self.gate_up, self.down = gate_up, down
        self.gate_up_bias, self.down_bias = gate_up_bias, down_bias
        self._block = None  # block(): not looked at yet

    def block(self):
        """The expert as native expert_block.c operators (native.expert_block.BlockOps), or None where it is
        not three packed integer-kernel operators without biases; worked out once per ExpertWeights."""
        b = self._block
        if b is None:
            pair = getattr(self.gate_up, "ops", None)
            b = False
            if pair is not None and len(pair) == 2 and self.gate_up_bias is None and self.down_bias is None:
                b = block_ops(pair[0], pair[1], self.down) or False
            self._block = b
        return b or None


def apply_linear(x: torch.Tensor, op, bias: torch.Tensor | None = None) -> torch.Tensor:
    y = linear(x, op) if isinstance(op, torch.Tensor) else op(x)
    return y if bias is None else y + bias


def silu_glu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


Activation = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def expert_forward(x: torch.Tensor, w: ExpertWeights, act: Activation) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (output [n, H], down-projection input [n, I])."""
    pair = getattr(w.gate_up, "ops", None)
    if pair is not None and len(pair) == 2 and w.gate_up_bias is None:  # gate and up as two operators: no cat
        if all(getattr(op, "fp32_inside", False) for op in (*pair, w.down)):
            # kernels that compute in fp32 whatever the input: one conversion in and one out per expert
            # instead of one each way per projection
            xf = x.float()
            gate, up = pair[0].pair(pair[1], xf)  # one kernel call for both (PackedLinear.pair)
            # the kernels' outputs are fresh fp32 tensors: SwiGLU can overwrite gate (the same bits as silu_glu)
            h = F.silu(gate, inplace=True).mul_(up) if act is silu_glu else act(gate, up)
            return apply_linear(h, w.down, w.down_bias).to(x.dtype), h
        gate, up = apply_linear(x, pair[0]), apply_linear(x, pair[1])
    else:
        gate, up = apply_linear(x, w.gate_up, w.gate_up_bias).chunk(2, dim=-1)
    h = act(gate, up)
    return apply_linear(h, w.down, w.down_bias), h


class ExpertSource(Protocol):
    num_experts: int

    def acquire(self, layer_index: int, expert_ids: list[int]) -> dict[int, ExpertWeights]:
        """Weights of the given experts, ready to multiply; may block on a fetch."""


class StackedExperts(nn.Module):
    """All experts of one layer resident as stacked tensors (the transformers v5 in-memory layout)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, bias: bool = False):
        super().__init__()
        self.num_experts = num_experts
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        if bias:
            self.gate_up_bias = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size))
            self.down_bias = nn.Parameter(torch.empty(num_experts, hidden_size))

    def acquire(self, layer_index: int, expert_ids: list[int]) -> dict[int, ExpertWeights]:
        gb, db = getattr(self, "gate_up_bias", None), getattr(self, "down_bias", None)
        return {
            e: ExpertWeights(
                self.gate_up_proj[e],
                self.down_proj[e],
                None if gb is None else gb[e],
                None if db is None else db[e],
            )
            for e in expert_ids
        }


class MoEObserver(Protocol):
    def on_route(self, layer_index: int, x: torch.Tensor, route: RouterOutput) -> None: ...

    def on_expert(
        self, layer_index: int, expert: int, x: torch.Tensor, h: torch.Tensor, weight: torch.Tensor
    ) -> None: ...


class MoEBlock(nn.Module):
    """Routed experts plus an optional shared expert (sigmoid-gated for Qwen2-MoE, ungated for DeepSeek)."""

    def __init__(
        self,
        layer_index: int,
        router: nn.Module,
        experts: nn.Module,
        activation: Activation = silu_glu,
        shared_expert: nn.Module | None = None,
        shared_expert_gate: nn.Module | None = None,
    ):
        super().__init__()
        self.layer_index = layer_index
        self.router = router
        self.experts = experts
        self.activation = activation
        self.shared_expert = shared_expert
        self.shared_expert_gate = shared_expert_gate
        self.observer: MoEObserver | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # [N, H]
        return self.after_route(flat, self.router(flat)).reshape(shape)

    def after_route(self, flat: torch.Tensor, route: RouterOutput) -> torch.Tensor:
        """The block's output [N, H] for tokens flat [N, H] that its router has routed (the decode step of
        decode_layer.c routes them natively, then hands over here)."""
        if self.observer is not None:
            self.observer.on_route(self.layer_index, flat, route)
        out = self.routed(flat, route)
        if self.shared_expert is not None:
            shared = self.shared_expert(flat)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(flat)) * shared
            out = out + shared
        return out

    def native_blocks(self, ids: list[int], weights) -> list | None:
        """The acquired experts `ids` as expert_block.c operators (ExpertWeights.block) where every one is, in one
        rounding of x, and nothing watches them one by one (an observer) or changes their activation; else None."""
        if self.observer is not None or self.activation is not silu_glu or not getattr(weights, "holds", True):
            return None
        blocks = one_rounding([weights[e].block() for e in ids])
        # a lease that could not keep them all pinned (a budget below the step's experts) may have reused an
        # earlier one's memory for a later one: the caller then runs them one at a time (decode_sum)
        return blocks if getattr(weights, "holds", True) else None

    def decode_sum(self, flat: torch.Tensor, ids: list[int], weights, route_weights: torch.Tensor) -> torch.Tensor:
        """One token's sum of weight x expert(x) over its acquired experts `ids`, one expert at a time (the path
        for experts expert_block.c does not take): flat [1, H], route_weights [1, K]."""
        out = torch.zeros_like(flat)
        for k, e in enumerate(ids):
            y, h = expert_forward(flat, weights[e], self.activation)
            w = route_weights[:, k : k + 1]
            if self.observer is not None:
                self.observer.on_expert(self.layer_index, e, flat, h, w[:, 0])
            out += y * w
        return out

    def routed(self, flat: torch.Tensor, route: RouterOutput) -> torch.Tensor:
        """Sum of weight x expert(x) over each token's chosen experts; one matmul pair per used expert."""
        indices = route.indices
        if indices.shape[0] == 1:  # decode: no sort needed, just the K chosen experts
            ids = indices[0].tolist()
            weights = self.experts.acquire(self.layer_index, ids)
            blocks = self.native_blocks(ids, weights)
            if blocks is not None:  # one native call where each is a native block
                return expert_block(flat, blocks, route.weights).to(flat.dtype)
            return self.decode_sum(flat, ids, weights, route.weights)
        batch = indices.shape[0] <= BATCH_ROWS  # a decode batch (or a short prompt): one native call where it can
        if batch:
            routed = indices.tolist()
            used = sorted({e for row in routed for e in row})  # torch.unique's order, without its sort's dispatch
        else:
            used = torch.unique(indices).tolist()
        weights = self.experts.acquire(self.layer_index, used)
        if batch:
            blocks = self.native_blocks(used, weights)
            if blocks is not None and indices.shape[0] <= batch_row_limit(blocks[0].wide):
                by_id = dict(zip(used, blocks))
                rows = [[by_id[e] for e in row] for row in routed]
                return expert_rows(flat, rows, route.weights).to(flat.dtype)
        out = torch.zeros_like(flat)
        for e in used:
            token_idx, slot = torch.where(indices == e)
            xe = flat[token_idx]
            y, h = expert_forward(xe, weights[e], self.activation)
            w = route.weights[token_idx, slot]
            if self.observer is not None:
                self.observer.on_expert(self.layer_index, e, xe, h, w)
            out.index_add_(0, token_idx, (y * w[:, None]).to(out.dtype))
        return out

"""Captures each expert's routed inputs during a layer's forward pass, for its Hessian and error measures.

Memory stays bounded: per expert a seeded reservoir keeps at most `max_tokens` inputs (random keys, the
smallest kept), and the layer keeps a pooled reservoir of all MoE inputs — the neutral prior for experts
that calibration barely reached.
"""

from __future__ import annotations

import torch

from prism_load.models.moe import RouterOutput


class Reservoir:
    """Uniform sample of at most `capacity` rows from a stream, deterministic under the generator."""

    def __init__(self, capacity: int, generator: torch.Generator):
        self.capacity, self.generator = capacity, generator
        self.keys: torch.Tensor | None = None
        self.rows: torch.Tensor | None = None

    def add(self, rows: torch.Tensor) -> None:
        keys = torch.rand(rows.shape[0], generator=self.generator)
        if self.rows is not None:
            keys, rows = torch.cat([self.keys, keys]), torch.cat([self.rows, rows])
        if rows.shape[0] > self.capacity:
            keep = torch.topk(keys, self.capacity, largest=False).indices.sort().values
            keys, rows = keys[keep], rows[keep]
        self.keys, self.rows = keys, rows

    def sample(self) -> torch.Tensor | None:
        return self.rows


class ExpertCapture:
    """MoEObserver collecting routed inputs, token counts and sum of squared routing weights per expert."""

    def __init__(self, num_experts: int, max_tokens: int, seed: int):
        gen = torch.Generator().manual_seed(seed)
        self.inputs = [Reservoir(max_tokens, gen) for _ in range(num_experts)]
        self.pooled = Reservoir(max_tokens, gen)
        self.tokens = torch.zeros(num_experts, dtype=torch.int64)
        self.weight_sq = torch.zeros(num_experts, dtype=torch.float64)
        self.gate_mass = torch.zeros(num_experts, dtype=torch.float64)
        self.seen_tokens = 0

    def on_route(self, layer_index: int, x: torch.Tensor, route: RouterOutput) -> None:
        self.seen_tokens += x.shape[0]
        self.pooled.add(x.detach().clone())

    def on_expert(self, layer_index: int, expert: int, x: torch.Tensor, h: torch.Tensor, weight: torch.Tensor) -> None:
        self.tokens[expert] += x.shape[0]
        self.weight_sq[expert] += weight.double().pow(2).sum()
        self.gate_mass[expert] += weight.double().sum()
        self.inputs[expert].add(x.detach().clone())

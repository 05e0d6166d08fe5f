"""Which dtype each tensor of a model is held in, when weights and arithmetic differ.

Why: a CPU model holds its dense weights in bf16 (half the bytes to hold and to stream per token) but
computes in fp32, as llama.cpp does: rounding every activation to bf16 is what cost the reference model's
logits a KL of 2e-4 to the fp32 path (bench/results/packed.md), while the weights cost nothing (a container
stores them in bf16 already). One token's activations are a few KiB, so fp32 costs no bandwidth, and the
native kernels compute in fp32 anyway. The big matrices (Linear and Embedding weights, stacked expert
matrices) are held in the weight dtype; everything else (norm weights, biases, routers, sinks) is small and
held in the compute dtype, so a router ranks experts with the weights the container stores.
"""

from __future__ import annotations

import torch
from torch import nn

from .moe import StackedExperts

EXPERT_MATRICES = ("gate_up_proj", "down_proj")


def default_compute_dtype(dtype: torch.dtype, device: str | torch.device) -> torch.dtype:
    """fp32 on the CPU (whatever the weights), the weight dtype elsewhere (a GPU's bf16 arithmetic is its fast path)."""
    return torch.float32 if torch.device(device).type == "cpu" else dtype


def held_dtype(module: nn.Module, key: str, weights: torch.dtype, compute: torch.dtype | None) -> torch.dtype:
    """The dtype `module`'s state_dict entry `key` is held in: `weights` for a Linear's or an Embedding's weight
    and for stacked expert matrices, `compute` for everything else (`weights` throughout when compute is None)."""
    if compute is None or compute == weights:
        return weights
    owner_name, _, leaf = key.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if leaf == "weight" and isinstance(owner, (nn.Linear, nn.Embedding)):
        return weights
    if leaf in EXPERT_MATRICES and isinstance(owner, StackedExperts):
        return weights
    return compute

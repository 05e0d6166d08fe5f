"""Layer-sequential execution: embed calibration tokens, then load, run and free one layer at a time.

Peak memory is one layer's weights + the calibration hidden states, independent of the number of layers —
the property that lets profile and compress handle models far larger than RAM (llm-compressor's
sequential pipeline; exllamav2's measurement pass).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from prism_load.hf_loader import empty_model, layer_state, open_checkpoint, top_level_state
from prism_load.models.family import Family, ModelArgs
from prism_load.models.layers import ForwardContext
from prism_load.models.rope import Rotary


@dataclass
class LayerStream:
    """Runs hidden states [N, L, H] through a checkpoint's layers, one resident layer at a time."""

    path: Path
    dtype: torch.dtype = torch.float32
    micro_batch: int = 16

    def __post_init__(self):
        self.ckpt, self.family, self.args = open_checkpoint(self.path)
        self.family: Family
        self.args: ModelArgs
        self.rotary = Rotary(self.family.rotary_config(self.args))

    @property
    def num_layers(self) -> int:
        return self.args.num_hidden_layers

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [N, L] -> hidden [N, L, H] (reads only the embedding table)."""
        model = empty_model(self.family, self.args, build_layers=False)
        state = top_level_state(self.ckpt, self.family, self.args, model, self.dtype)
        return nn.functional.embedding(tokens, state["embed_tokens.weight"]).to(self.dtype)

    def load_layer(self, i: int) -> nn.Module:
        with torch.device("meta"):
            layer = self.family.build_layer(self.args, i)
        layer.load_state_dict(layer_state(self.ckpt, self.family, self.args, layer, self.dtype), assign=True)
        # drop the shard mappings: once this layer is freed its file pages leave the resident set too
        self.ckpt.close()
        return layer.eval()

    def context(self, seq_len: int) -> ForwardContext:
        positions = torch.arange(seq_len)
        cos, sin = self.rotary(positions, self.dtype)
        return ForwardContext(positions, cos, sin, None)

    @torch.inference_mode()
    def run_layer(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, L, H] -> layer output, in micro-batches of samples to bound activation memory."""
        ctx = self.context(hidden.shape[1])
        out = torch.empty_like(hidden)
        for s in range(0, hidden.shape[0], self.micro_batch):
            out[s : s + self.micro_batch] = layer(hidden[s : s + self.micro_batch], ctx)
        return out

    def forward_to(self, hidden: torch.Tensor, layer_index: int) -> torch.Tensor:
        """Hidden states entering `layer_index` (runs the original layers before it, one at a time)."""
        for i in range(layer_index):
            layer = self.load_layer(i)
            hidden = self.run_layer(layer, hidden)
            del layer
        return hidden

"""The causal LM every family shares: embedding, decoder layers, final norm, LM head, KV-cached decode."""

from __future__ import annotations

import torch
from torch import nn

from .family import Family, ModelArgs
from .layers import ForwardContext, KVCache, RMSNorm
from .linear import Linear
from .rope import Rotary


class MoEForCausalLM(nn.Module):
    """`model(input_ids)` -> logits [B, T, V]; `model.generate(...)` decodes with the KV cache."""

    def __init__(self, args: ModelArgs, family: Family, layers: list[nn.Module]):
        super().__init__()
        self.args, self.family = args, family
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.lm_head = Linear(args.hidden_size, args.vocab_size, bias=False)
        self.rotary = Rotary(family.rotary_config(args))
        self.tokenizer = None
        self.layer_hook = None  # called as hook(layer_index, hidden) after each layer (runtime prefetch)

    def tie_weights(self) -> None:
        if self.args.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def new_cache(self) -> KVCache:
        return KVCache(len(self.layers))

    def context(self, start: int, length: int, cache: KVCache | None, device, dtype) -> ForwardContext:
        positions = torch.arange(start, start + length, device=device)
        cos, sin = self.rotary(positions, dtype)
        return ForwardContext(positions, cos, sin, cache)

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        start = cache.length if cache is not None else 0
        ctx = self.context(start, input_ids.shape[1], cache, x.device, x.dtype)
        for layer in self.layers:
            x = layer(x, ctx)
            if self.layer_hook is not None:
                self.layer_hook(layer.index, x)
        return self.lm_head(self.norm(x))

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 32, **kwargs) -> torch.Tensor:
        from ..generate import generate

        return generate(self, input_ids, max_new_tokens=max_new_tokens, **kwargs)

    def moe_blocks(self):
        """(layer_index, MoEBlock) for every MoE layer."""
        from .moe import MoEBlock

        return [(layer.index, layer.mlp) for layer in self.layers if isinstance(layer.mlp, MoEBlock)]

"""The causal LM every family shares: embedding, decoder layers, final norm, LM head, KV-cached decode."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import GenerationError
from ..generation_config import GenerationConfig
from . import native_token
from .base import Family, ModelArgs
from .layers import ForwardContext, KVCache, RMSNorm
from .linear import Linear
from .rope import Rotary


class MoEForCausalLM(nn.Module):
    """`model(input_ids)` -> logits [B, T, V]; `model.generate(...)` decodes with the KV cache."""

    def __init__(self, args: ModelArgs, family: Family, layers: list[nn.Module]):
        super().__init__()
        self.args, self.family = args, family
        # on the meta device (a container's skeleton) the initialisation is skipped: nn.Embedding's normal_ on
        # meta runs torch's Python reference ops, whose first use imports torch._dynamo and sympy (tens of MiB
        # of resident modules for values that are overwritten anyway)
        meta = torch.empty(0).is_meta  # the default device, as the skeleton's torch.device("meta") sets it
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size,
                                         _weight=torch.empty(args.vocab_size, args.hidden_size) if meta else None)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.lm_head = Linear(args.hidden_size, args.vocab_size, bias=False)
        self.rotary = Rotary(family.rotary_config(args))
        self.tokenizer = None
        self.generation_config = GenerationConfig()  # the checkpoint's generation_config.json, set by the loaders
        self.layer_hook = None  # called as hook(layer_index, hidden) after each layer (runtime prefetch)
        self._runtime = None  # set through `runtime` by prism_load/runtime/attach.py
        self.hub = None  # the Hub snapshot (prism_load.hub.HubSnapshot) when loaded from a repo id, else None
        # the activations' dtype where it differs from the weights' (bf16 weights computing in fp32 on CPUs:
        # prism_load/models/precision.py); set by the loaders, None: the embedding's dtype
        self.compute_dtype: torch.dtype | None = None

    # -- the runtime (prism_load/runtime) of a model loaded with an expert_cache --------------------------
    # Absent (AttributeError) on a model without one, so `hasattr(model, "stats")` says whether it has one.
    @property
    def runtime(self):
        """The Runtime serving this model's experts from the cache (prism_load/runtime/attach.py)."""
        if self._runtime is None:
            raise AttributeError("runtime: this model was loaded without an expert_cache")
        return self._runtime

    @runtime.setter
    def runtime(self, runtime) -> None:
        self._runtime = runtime

    @property
    def stats(self):
        """`model.stats()`: the runtime's counters as a dict (Runtime.stats)."""
        return self.runtime.stats

    @property
    def reset_stats(self):
        """`model.reset_stats()`: zero the runtime's counters."""
        return self.runtime.reset_stats

    def tie_weights(self) -> None:
        if self.args.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def new_cache(self) -> KVCache:
        return KVCache(len(self.layers))

    def context(self, batch: int, length: int, cache: KVCache | None, device, dtype,
                attention_mask: torch.Tensor | None = None) -> ForwardContext:
        start = cache.length if cache is not None else 0
        slots = torch.arange(start, start + length, device=device)
        key_valid = padding(attention_mask, batch, start, length, cache, device)
        if key_valid is None:  # no row padded: one position vector for the whole batch
            cos, sin = self.rotary.span(start, length, dtype)
            return ForwardContext(slots, cos, sin, cache)
        if cache is not None:
            cache.key_valid = key_valid
        # a row's position counts its real tokens only (transformers: cumsum(attention_mask) - 1)
        positions = (key_valid.long().cumsum(1) - 1).clamp(min=0)[:, start:]  # [B, T]
        cos, sin = self.rotary(positions, dtype)
        return ForwardContext(slots, cos[:, None], sin[:, None], cache, key_valid, key_valid[:, start:],
                              padding_prefix(key_valid) if length == 1 else None)

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None,
                attention_mask: torch.Tensor | None = None, logits_to_keep: int = 0) -> torch.Tensor:
        """attention_mask (1 real, 0 padding), as in transformers: [B, T] over the new tokens, or [B, S] over the
        cached and new ones; a cache remembers the padding of earlier calls. logits_to_keep (transformers'
        name): logits of the last n positions only ([B, n, V]; 0: all), so a prefill that samples from its
        last position skips the LM head's product over every other one."""
        x = self.embed_tokens(input_ids)
        if self.compute_dtype is not None and x.dtype != self.compute_dtype:
            x = x.to(self.compute_dtype)
        ctx = self.context(input_ids.shape[0], input_ids.shape[1], cache, x.device, x.dtype, attention_mask)
        # a decode token of a plain resident model: every layer in one native call (models/native_token.py)
        out = native_token.run(self, x, ctx) if x.shape[0] == 1 and x.shape[1] == 1 else None
        if out is not None:
            x = out
        else:
            # only the kept positions leave the last layer, so its MLP runs for them alone (llama.cpp does the
            # same): every earlier position's last-layer output feeds nothing, its keys and values are cached
            # before the attention anyway
            keep = logits_to_keep if logits_to_keep and ctx.token_valid is None and x.shape[1] > logits_to_keep else 0
            last = len(self.layers) - 1
            for i, layer in enumerate(self.layers):
                x = layer(x, ctx, keep) if i == last and keep else layer(x, ctx)
                if self.layer_hook is not None:
                    self.layer_hook(layer.index, x if ctx.token_valid is None else x[ctx.token_valid])
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        return self.lm_head(self.norm(x))

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int | None = None, **kwargs) -> torch.Tensor:
        """prism_load.generation.generate: attention_mask for left-padded rows; None arguments take the
        checkpoint's generation_config.json defaults."""
        from ..generation import generate

        return generate(self, input_ids, max_new_tokens=max_new_tokens, **kwargs)

    def moe_blocks(self):
        """(layer_index, MoEBlock) for every MoE layer."""
        from .moe import MoEBlock

        return [(layer.index, layer.mlp) for layer in self.layers if isinstance(layer.mlp, MoEBlock)]


def padding_prefix(key_valid: torch.Tensor) -> torch.Tensor | None:
    """Each row's first real slot, int64 [B], where every row's padding slots are a prefix of its slots and its
    last slot is real (a decode step of a left-padded batch); else None."""
    lead = (~key_valid).long().cumprod(1).sum(1)
    real = key_valid.long().sum(1)
    if bool(((real + lead) == key_valid.shape[1]).all()) and bool((lead < key_valid.shape[1]).all()):
        return lead.contiguous()
    return None


def padding(attention_mask: torch.Tensor | None, batch: int, start: int, length: int, cache: KVCache | None,
            device) -> torch.Tensor | None:
    """Which of the S = start + length key slots are real, [B, S] bool; None when none is padding (the fast
    path: shared positions, SDPA's own causal mask)."""
    past = cache.key_valid if cache is not None else None
    if attention_mask is None:
        if past is None:
            return None
        return torch.cat([past, past.new_ones(batch, length)], dim=1)
    if attention_mask.dim() != 2 or attention_mask.shape[0] != batch or attention_mask.shape[1] not in (
            length, start + length):
        raise GenerationError(f"attention_mask: shape {tuple(attention_mask.shape)} does not match the input "
                              f"({batch} rows of {length} new tokens after {start} cached: expected "
                              f"[{batch}, {length}] or [{batch}, {start + length}])")
    mask = attention_mask.to(device=device, dtype=torch.bool)
    if mask.shape[1] == start + length and start + length != length:
        full = mask
    else:
        head = past if past is not None else mask.new_ones(batch, start)
        full = torch.cat([head, mask], dim=1)
    if past is None and bool(full.all()):
        return None
    return full

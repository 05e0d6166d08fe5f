"""Token generation with the KV cache: prefill the prompt once, then one token per step."""

from __future__ import annotations

from collections.abc import Callable

import torch


def sample_next(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int | None,
                top_p: float | None, generator: torch.Generator | None) -> torch.Tensor:
    """logits [B, V] -> next token ids [B]. Greedy unless do_sample."""
    if not do_sample:
        return logits.argmax(dim=-1)
    logits = logits.float() / max(temperature, 1e-5)
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


@torch.inference_mode()
def generate(
    model,
    input_ids: torch.Tensor,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | list[int] | None = None,
    seed: int | None = None,
    on_token: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Returns prompt + new tokens [B, T + n]. Stops early only when every row has produced an eos token
    (the config's eos ids unless eos_token_id is given); finished rows are padded with eos."""
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    eos = model.args.eos_token_ids if eos_token_id is None else eos_token_id
    eos = torch.tensor([eos] if isinstance(eos, int) else list(eos), dtype=torch.long, device=input_ids.device)
    generator = torch.Generator(device=input_ids.device).manual_seed(seed) if seed is not None else None
    cache = model.new_cache()
    logits = model(input_ids, cache=cache)[:, -1]
    out = [input_ids]
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for step in range(max_new_tokens):
        nxt = sample_next(logits, do_sample, temperature, top_k, top_p, generator)
        if eos.numel():
            nxt = torch.where(done, eos[0], nxt)
            done |= torch.isin(nxt, eos)
        out.append(nxt[:, None])
        if on_token is not None:
            on_token(nxt)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        logits = model(nxt[:, None], cache=cache)[:, -1]
    return torch.cat(out, dim=1)

"""Token generation with the KV cache: prefill the prompts once, then one token per row per step.

Rows may be left-padded (attention_mask 0 before a row's tokens, as transformers' batched generate): each row's
positions, rotary phases and cache slots follow its real tokens only, so a row of a padded batch continues
exactly as the same prompt alone would. Rows finish independently (eos, or a caller's stop rule); a finished
row's later tokens are filled with eos and masked out, so the experts no longer compute them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from .errors import GenerationError
from .generation_config import GenerationConfig
from .sampling import Draws, next_tokens, sample_next, sample_without_native

DEFAULT_MAX_NEW_TOKENS = 32


def settings(model, **overrides) -> GenerationConfig:
    """The model's generation_config.json defaults, then the caller's arguments (None: not given)."""
    base = getattr(model, "generation_config", None) or GenerationConfig()
    eos = overrides.pop("eos_token_id", None)
    config = base.updated(**overrides)
    if eos is not None:
        config = config.updated(eos_token_id=(eos,) if isinstance(eos, int) else tuple(eos))
    elif config.eos_token_id is None:
        config = config.updated(eos_token_id=tuple(model.args.eos_token_ids))
    if config.max_new_tokens is None:
        config = config.updated(max_new_tokens=DEFAULT_MAX_NEW_TOKENS)
    if config.max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens: expected at least 1, got {config.max_new_tokens}")
    return config


def check_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor | None):
    """[B, T] ids and a left-padding mask (or None); errors name the argument at fault."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() not in (1, 2):
        raise GenerationError("input_ids: expected a [B, T] (or [T]) tensor of token ids")
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.shape[1] == 0 or input_ids.shape[0] == 0:
        raise GenerationError(f"input_ids: empty prompt (shape {tuple(input_ids.shape)})")
    if attention_mask is None:
        return input_ids, None
    if attention_mask.dim() == 1:
        attention_mask = attention_mask[None]
    if attention_mask.shape != input_ids.shape:
        raise GenerationError(f"attention_mask: shape {tuple(attention_mask.shape)} does not match input_ids' "
                              f"{tuple(input_ids.shape)}")
    if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        raise GenerationError("attention_mask: expected only 0 (padding) and 1 (token)")
    mask = attention_mask.to(device=input_ids.device, dtype=torch.bool)
    empty = (~mask.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise GenerationError(f"attention_mask: row {empty[0]} has no tokens (an empty prompt)")
    if bool((mask[:, :-1] & ~mask[:, 1:]).any()):
        row = int((mask[:, :-1] & ~mask[:, 1:]).any(dim=1).nonzero()[0])
        raise GenerationError(f"attention_mask: row {row} is right-padded (a 0 after a 1); generation needs left "
                              "padding, every row's last token real")
    return input_ids, mask


@torch.inference_mode()
def decode_steps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, config: GenerationConfig,
                 seed: int | None = None,
                 stop: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Iterator[torch.Tensor]:
    """Yields every row's next token [B] per step, up to config.max_new_tokens steps, until every row is done.
    stop(tokens [B]) -> bool [B]: rows the caller ends after this token (stop strings), besides eos.
    On a CPU the rows' tokens and states are Python values between the steps (sampling.next_tokens), each
    step's tokens a row of one tensor made up front: a step runs no torch op of its own to choose and record its
    tokens (those cost tens of microseconds each on a small model's token, run cold after its layers)."""
    input_ids, mask = check_inputs(input_ids, attention_mask)
    device, rows = input_ids.device, input_ids.shape[0]
    eos = tuple(config.eos_token_id or ())
    fill = eos[0] if eos else (config.pad_token_id or 0)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    if device.type != "cpu":
        yield from _device_steps(model, input_ids, mask, config, generator, eos, fill, stop)
        return
    draws = Draws(generator, rows, steps=64) if config.do_sample else None
    sample = (config.do_sample, config.temperature, config.top_k, config.top_p)
    cache = model.new_cache()
    logits = model(input_ids, cache=cache, attention_mask=mask, logits_to_keep=1)[:, -1]
    tokens = torch.empty(config.max_new_tokens, rows, dtype=torch.long)  # step by step, one row each
    held, ended, done = tokens.numpy(), set(eos), [False] * rows
    for step in range(config.max_new_tokens):
        chosen = next_tokens(logits, *sample, draws)
        if chosen is None:  # a distribution the native sampler does not take, or no native kernels
            chosen = sample_without_native(logits, *sample, generator).tolist()
        chosen = [fill if d else t for t, d in zip(chosen, done)]
        held[step] = chosen
        nxt = tokens[step]
        done = [d or t in ended for t, d in zip(chosen, done)]
        if stop is not None:
            done = [d or bool(s) for d, s in zip(done, stop(nxt).tolist())]
        yield nxt
        if all(done) or step == config.max_new_tokens - 1:
            return
        # a finished row's token is masked out: its attention output is unused and the experts skip it
        live = torch.tensor([not d for d in done])[:, None] if any(done) else None
        logits = model(nxt[:, None], cache=cache, attention_mask=live)[:, -1]


def _device_steps(model, input_ids: torch.Tensor, mask: torch.Tensor | None, config: GenerationConfig,
                  generator: torch.Generator | None, eos: tuple, fill: int, stop) -> Iterator[torch.Tensor]:
    """decode_steps off the CPU: the tokens stay on the device, no step waits for it but the end test."""
    device = input_ids.device
    eos = torch.tensor(list(eos), dtype=torch.long, device=device)
    cache = model.new_cache()
    logits = model(input_ids, cache=cache, attention_mask=mask, logits_to_keep=1)[:, -1]
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=device)
    for step in range(config.max_new_tokens):
        nxt = sample_next(logits, config.do_sample, config.temperature, config.top_k, config.top_p, generator)
        nxt = torch.where(done, fill, nxt)
        if eos.numel():
            done = done | torch.isin(nxt, eos)
        if stop is not None:
            done = done | stop(nxt).to(device)
        yield nxt
        if bool(done.all()) or step == config.max_new_tokens - 1:
            return
        logits = model(nxt[:, None], cache=cache, attention_mask=(~done)[:, None] if bool(done.any()) else None)[:, -1]


def generate(
    model,
    input_ids: torch.Tensor,
    max_new_tokens: int | None = None,
    do_sample: bool | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | list[int] | None = None,
    seed: int | None = None,
    on_token: Callable[[torch.Tensor], None] | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Returns prompt + new tokens [B, T + n] (padding kept where the prompt had it). Stops early only when
    every row has produced an eos token (the generation config's eos ids, else the model config's, unless
    eos_token_id is given); finished rows are filled with eos. Arguments left None take the checkpoint's
    generation_config.json defaults, as transformers does (greedy and 32 new tokens where it names none)."""
    config = settings(model, max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                      top_k=top_k, top_p=top_p, eos_token_id=eos_token_id)
    input_ids, _ = check_inputs(input_ids, attention_mask)
    out = [input_ids]
    for nxt in decode_steps(model, input_ids, attention_mask, config, seed):
        out.append(nxt[:, None])
        if on_token is not None:
            on_token(nxt)
    return torch.cat(out, dim=1)

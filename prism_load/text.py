"""Text in, text out: `prism_load.generate(model, "prompt")` with the model's own tokenizer.

Several prompts run as one left-padded batch (generation.py keeps each row equal to its prompt alone). Stop
strings end a row where they first appear; the text returned stops before them (OpenAI's convention), and a
stream holds back any tail that might still become one, so nothing is printed that is later taken back.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .errors import GenerationError
from .generation import decode_steps, settings


class _Row:
    """One prompt's continuation: its new token ids, the text so far and how much of it has been streamed."""

    def __init__(self):
        self.ids: list[int] = []
        self.text = ""
        self.shown = 0
        self.finished = False


def generate(model, prompt: str | list[str], max_new_tokens: int | None = None, *, stream: bool = False,
             stop: str | list[str] | None = None, tokenizer=None, seed: int | None = None, **sampling):
    """The continuation of `prompt` (a str), or of each prompt of a list (one batch), without the prompt.
    stream=True returns an iterator of the new text instead: a str per step for a str prompt, a list of str
    (one per prompt, "" where nothing new) for a list. `stop`: strings that end a row. `sampling`: do_sample,
    temperature, top_k, top_p, eos_token_id; what is not given comes from the checkpoint's
    generation_config.json (greedy where it names nothing). `tokenizer`: a tokenizers.Tokenizer instead of
    model.tokenizer."""
    tok = tokenizer if tokenizer is not None else model.tokenizer
    if tok is None:
        raise GenerationError("tokenizer: the model has no tokenizer (pass tokenizer=...)")
    single = isinstance(prompt, str)
    prompts = [prompt] if single else list(prompt)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise GenerationError("prompt: expected a string or a non-empty list of strings")
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if any(not isinstance(s, str) or not s for s in stops):
        raise GenerationError(f"stop: expected non-empty strings, got {stops!r}")
    config = settings(model, max_new_tokens=max_new_tokens, **sampling)
    ids, mask = left_padded(model, tok, prompts, config.pad_token_id)
    rows = [_Row() for _ in prompts]
    steps = _steps(rows, model, tok, ids, mask, config, seed, stops)
    if stream:
        return (deltas[0] for deltas in steps) if single else steps
    for _ in steps:
        pass
    return rows[0].text if single else [r.text for r in rows]


def left_padded(model, tok, prompts: list[str], pad_id: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoded prompts as [B, T] ids with padding on the left, and the attention mask (1 real, 0 padding)."""
    encoded = [tok.encode(p).ids for p in prompts]
    for i, e in enumerate(encoded):
        if not e:
            raise GenerationError(f"prompt: prompt {i} is empty (no tokens)")
    width = max(map(len, encoded))
    pad = pad_id if pad_id is not None else 0
    ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for i, e in enumerate(encoded):
        ids[i, width - len(e):] = torch.tensor(e)
        mask[i, width - len(e):] = 1
    device = next(model.parameters()).device
    return ids.to(device), mask.to(device)


def _steps(rows: list[_Row], model, tok, ids, mask, config, seed, stops) -> Iterator[list[str]]:
    """Per step, the new visible text of every row; the rows hold the whole text as it grows."""
    eos = set(config.eos_token_id or ())

    def on_tokens(nxt: torch.Tensor) -> torch.Tensor:
        ended = []
        for row, token in zip(rows, nxt.tolist()):
            if not row.finished:
                if token in eos:
                    row.finished = True
                else:
                    row.ids.append(token)
                    row.text = tok.decode(row.ids)
                    row.finished = _cut_at_stop(row, stops)
            ended.append(row.finished)
        return torch.tensor(ended)

    for _ in decode_steps(model, ids, mask, config, seed, stop=on_tokens):
        yield [_new_text(row, stops) for row in rows]
    tail = [_new_text(row, stops, final=True) for row in rows]
    if any(tail):
        yield tail


def _cut_at_stop(row: _Row, stops: list[str]) -> bool:
    """Truncate the row's text before the first stop string in it; True if one was found."""
    hits = [i for i in (row.text.find(s) for s in stops) if i >= 0]
    if not hits:
        return False
    row.text = row.text[: min(hits)]
    return True


def _new_text(row: _Row, stops: list[str], final: bool = False) -> str:
    """The text not streamed yet, less a tail that may still change: an incomplete UTF-8 character (decoded as
    U+FFFD) or the beginning of a stop string."""
    text = row.text
    if not (row.finished or final):
        text = text.rstrip("\ufffd")
        held = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        text = text[: len(text) - held]
    new = text[row.shown:] if len(text) > row.shown else ""
    row.shown = max(row.shown, len(text))
    return new

"""`prism run`: load a model, stream a continuation of a prompt, report speed."""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console

from prism_load.errors import PrismError


def run_prompt(model_path: Path, prompt: str, max_new_tokens: int, console: Console) -> dict:
    import torch

    import prism_load

    model = prism_load.load(model_path)
    tok = model.tokenizer
    if tok is None:
        raise PrismError(f"{model_path}: no tokenizer.json, cannot encode a text prompt")
    ids = torch.tensor([tok.encode(prompt).ids])
    console.print(prompt, end="", style="bold", highlight=False)
    new: list[int] = []
    shown = [0]

    def on_token(nxt):
        new.append(int(nxt[0]))
        text = tok.decode(new)
        console.print(text[shown[0]:], end="", highlight=False, markup=False)
        shown[0] = len(text)

    start = time.perf_counter()
    model.generate(ids, max_new_tokens=max_new_tokens, on_token=on_token)
    seconds = time.perf_counter() - start
    console.print()
    rate = len(new) / seconds if seconds > 0 else float("inf")
    console.print(f"[dim]{len(new)} tokens in {seconds:.2f} s ({rate:.1f} tokens/s, prefill included)[/]")
    return {"tokens": len(new), "seconds": seconds}

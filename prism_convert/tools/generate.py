"""`prism run`: load a model, stream a continuation of a prompt, report speed (prefill and decode apart)
and, for a model whose experts sit behind the runtime's cache, the cache and prefetch statistics."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from prism_load.errors import DoesNotFit, PrismError

TextSink = Callable[[str, str], None]  # (text, role): role "prompt", "text" (generated) or "end" (of one continuation)


def run_prompt(model_path: Path, prompt: str | list[str], max_new_tokens: int, on_text: TextSink | None = None, *, cache=None,
               prefetch: bool | str = "auto", numa=None, expert_form: str | None = None, lookahead: int = 1,
               predictor: bool = True, tokenizer: str | None = None, expert_kernel: str = "auto",
               temperature: float | None = None, top_p: float | None = None, seed: int | None = None,
               mmap: bool = False, eviction: str = "next-use") -> dict:
    """Generate from `prompt`, streaming tokens; a list of prompts runs as one left-padded batch and prints each
    continuation at the end. cache: None (every expert resident) or the expert cache's
    budget (bytes, "50%", "2GB"); prefetch, numa, expert_form, lookahead, predictor and eviction as in prism_load.load
    (None: the runtime's default, packed for containers; codes needs the cache: "100%" when no budget is
    given); mmap as prism_load.load's (resident containers). `tokenizer` (--tokenizer, a path or Hub id)
    replaces the model's own, or stands in where it has none. temperature (0: greedy) and top_p sample;
    None leaves the checkpoint's generation_config.json defaults. `on_text(text, role)` receives the prompt and the
    text as it streams (a batch: each prompt and its continuation once all are done), and a "note" where the run
    chose something for the user: a container whose experts do not fit resident in the memory this process may
    take (the load refuses it, prism_load/runtime/memory.py), loaded without --cache or --mmap, runs behind
    expert_cache="auto" instead; the result holds the speeds and, behind the expert cache, `stats`
    (model.stats())."""
    import prism_load
    from prism_convert.tokenizer import check_vocabulary, resolve_tokenizer

    named = resolve_tokenizer(tokenizer) if tokenizer is not None else None  # before the (long) load
    if expert_form == "codes" and cache is None:
        cache = "100%"
    form = {} if expert_form is None else {"expert_form": expert_form}
    if expert_kernel != "auto":
        form["expert_kernel"] = expert_kernel
    if mmap:
        if cache is not None:
            raise PrismError(f"--mmap maps every expert resident; --cache {cache} serves them from a budgeted cache "
                             "instead: pass one of the two")
        form["mmap"] = True
    if eviction != "next-use" and cache is None:
        raise PrismError(f"--eviction {eviction} orders the expert cache's evictions: pass --cache too")

    def behind_cache(budget) -> dict:
        return {"expert_cache": budget, "prefetch": prefetch, "numa": numa, "lookahead": lookahead,
                "predictor": predictor, "eviction": eviction, **form}

    on_text = on_text or (lambda text, role: None)
    try:
        model = prism_load.load(model_path, **(form if cache is None else behind_cache(cache)))
    except DoesNotFit as e:  # every expert resident was the default, not a request: serve them from a cache
        if cache is not None or mmap or expert_form == "codes":
            raise
        on_text(f"every expert resident would hold {e.need_bytes:,} bytes, more than the {e.available_bytes:,} "
                f"this process may still take ({e.source}): serving them from an expert cache sized to what is "
                "left (--cache auto; --mmap maps them instead)", "note")
        model = prism_load.load(model_path, **behind_cache("auto"))
    if named is None and model.tokenizer is None and Path(model_path).is_dir():
        named = resolve_tokenizer(None, Path(model_path))  # a checkpoint's tokenizer.model, or a clear error
    if named is not None:
        check_vocabulary(named, model.args.vocab_size)
        model.tokenizer = named.tokenizer
    if model.tokenizer is None:
        raise PrismError(f"{model_path}: no tokenizer, cannot encode a text prompt; name one with --tokenizer")
    sampling = sampling_options(temperature, top_p)
    if isinstance(prompt, str):
        result = _stream_one(model, prompt, max_new_tokens, on_text, sampling, seed)
    else:
        result = _run_batch(model, prompt, max_new_tokens, on_text, sampling, seed)
    if hasattr(model, "stats"):
        result["stats"] = model.stats()
    return result


def sampling_options(temperature: float | None, top_p: float | None) -> dict:
    """--temperature / --top-p as generate's arguments: temperature 0 is greedy, a positive one or a top-p samples;
    neither: the checkpoint's generation_config.json decides."""
    if temperature is not None and temperature < 0:
        raise PrismError(f"--temperature {temperature}: expected 0 (greedy) or more")
    if top_p is not None and not 0 < top_p <= 1:
        raise PrismError(f"--top-p {top_p}: expected a probability in (0, 1]")
    if temperature == 0:
        return {"do_sample": False}
    out = {"temperature": temperature, "top_p": top_p}
    if temperature is not None or top_p is not None:
        out["do_sample"] = True
    return out


def read_prompts(path: Path) -> list[str]:
    """--prompts-file: one prompt per line, blank lines skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise PrismError(f"--prompts-file {path}: cannot read it ({type(e).__name__}: {e})") from None
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise PrismError(f"--prompts-file {path}: no prompts (one per line)")
    return prompts


def _stream_one(model, prompt: str, max_new_tokens: int, on_text: TextSink, sampling: dict, seed) -> dict:
    import torch

    tok = model.tokenizer
    ids = torch.tensor([tok.encode(prompt).ids])
    on_text(prompt, "prompt")
    new: list[int] = []
    shown = [0]
    times: list[float] = []  # when each token was sampled (before it is printed)
    printing = [0.0]

    def on_token(nxt):
        times.append(time.perf_counter())
        new.append(int(nxt[0]))
        text = tok.decode(new)
        on_text(text[shown[0]:], "text")
        shown[0] = len(text)
        printing[0] += time.perf_counter() - times[-1]

    start = time.perf_counter()
    model.generate(ids, max_new_tokens=max_new_tokens, on_token=on_token, seed=seed, **sampling)
    on_text("", "end")
    return speed(ids.shape[1], start, times, printing[0])


def _run_batch(model, prompts: list[str], max_new_tokens: int, on_text: TextSink, sampling: dict, seed) -> dict:
    """Every prompt in one left-padded batch; each continuation printed after its prompt once all are done."""
    import torch

    from prism_load.generation import settings
    from prism_load.text import left_padded

    config = settings(model, max_new_tokens=max_new_tokens, **sampling)
    eos = torch.tensor(list(config.eos_token_id or ()), dtype=torch.long)
    eos_ids = set(eos.tolist())
    ids, mask = left_padded(model, model.tokenizer, prompts, config.pad_token_id)
    times: list[float] = []
    live_rows: list[int] = []  # rows still generating at each step: tokens of that step
    live = torch.ones(len(prompts), dtype=torch.bool)

    def on_token(nxt):
        nonlocal live
        times.append(time.perf_counter())
        live_rows.append(int(live.sum()))
        live = live & ~torch.isin(nxt.cpu(), eos)

    start = time.perf_counter()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, on_token=on_token, seed=seed,
                         **sampling)
    for i, p in enumerate(prompts):
        row = out[i, ids.shape[1]:].tolist()
        ended = [k for k, t in enumerate(row) if t in eos_ids]
        on_text(p, "prompt")
        on_text(model.tokenizer.decode(row[: ended[0] if ended else len(row)]), "text")
        on_text("", "end")
    return speed(int(mask.sum()), start, times, 0.0, live_rows)


def speed(prompt_tokens: int, start: float, times: list[float], printing_seconds: float,
          rows: list[int] | None = None) -> dict:
    """Prefill = prompt in, first token out; decode = every later token (printing time taken out).
    rows: tokens produced at each step (a batch's unfinished rows), one per step when not given."""
    rows = rows or [1] * len(times)
    prefill = times[0] - start
    decode_tokens = sum(rows[1:])
    decode = max(times[-1] - times[0] - printing_seconds, 0.0) if len(times) > 1 else 0.0
    return {"tokens": sum(rows), "prompt_tokens": prompt_tokens, "prefill_seconds": prefill,
            "prefill_tokens_per_second": prompt_tokens / prefill if prefill > 0 else float("inf"),
            "decode_tokens": decode_tokens, "decode_seconds": decode,
            "decode_tokens_per_second": decode_tokens / decode if decode > 0 else float("nan"),
            "seconds": times[-1] - start}



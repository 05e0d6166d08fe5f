"""`prism run`: load a model, stream a continuation of a prompt, report speed (prefill and decode apart)
and, for a model whose experts sit behind the runtime's cache, the cache and prefetch statistics."""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from prism_load.errors import PrismError


def run_prompt(model_path: Path, prompt: str | list[str], max_new_tokens: int, console: Console, *, cache=None,
               prefetch: bool = True, numa=None, expert_form: str | None = None, lookahead: int = 1,
               predictor: bool = True, tokenizer: str | None = None, expert_kernel: str = "auto",
               temperature: float | None = None, top_p: float | None = None, seed: int | None = None) -> dict:
    """Generate from `prompt`, streaming tokens; a list of prompts runs as one left-padded batch and prints each
    continuation at the end. cache: None (every expert resident) or the expert cache's
    budget (bytes, "50%", "2GB"); prefetch, numa, expert_form, lookahead and predictor as in prism_load.load
    (None: the runtime's default, packed for containers; codes needs the cache: "100%" when no budget is
    given). `tokenizer` (--tokenizer, a path or Hub id)
    replaces the model's own, or stands in where it has none. temperature (0: greedy) and top_p sample;
    None leaves the checkpoint's generation_config.json defaults."""
    import prism_load
    from prism_convert.tokenizer import check_vocabulary, resolve_tokenizer

    named = resolve_tokenizer(tokenizer) if tokenizer is not None else None  # before the (long) load
    if expert_form == "codes" and cache is None:
        cache = "100%"
    form = {} if expert_form is None else {"expert_form": expert_form}
    if expert_kernel != "auto":
        form["expert_kernel"] = expert_kernel
    options = form if cache is None else {"expert_cache": cache, "prefetch": prefetch, "numa": numa,
                                          "lookahead": lookahead, "predictor": predictor, **form}
    model = prism_load.load(model_path, **options)
    if named is None and model.tokenizer is None and Path(model_path).is_dir():
        named = resolve_tokenizer(None, Path(model_path))  # a checkpoint's tokenizer.model, or a clear error
    if named is not None:
        check_vocabulary(named, model.args.vocab_size)
        model.tokenizer = named.tokenizer
    if model.tokenizer is None:
        raise PrismError(f"{model_path}: no tokenizer, cannot encode a text prompt; name one with --tokenizer")
    sampling = sampling_options(temperature, top_p)
    if isinstance(prompt, str):
        result = _stream_one(model, prompt, max_new_tokens, console, sampling, seed)
    else:
        result = _run_batch(model, prompt, max_new_tokens, console, sampling, seed)
    if hasattr(model, "stats"):
        result["stats"] = model.stats()
        console.print(stats_table(result["stats"], result["seconds"]))
        console.print(layer_table(result["stats"]))
    console.print(f"[dim]prefill {result['prompt_tokens']} tokens in {result['prefill_seconds']:.3f} s "
                  f"({result['prefill_tokens_per_second']:.1f} tokens/s); decode {result['decode_tokens']} tokens in "
                  f"{result['decode_seconds']:.2f} s ({result['decode_tokens_per_second']:.1f} tokens/s)[/]",
                  highlight=False)
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


def _stream_one(model, prompt: str, max_new_tokens: int, console: Console, sampling: dict, seed) -> dict:
    import torch

    tok = model.tokenizer
    ids = torch.tensor([tok.encode(prompt).ids])
    console.print(prompt, end="", style="bold", highlight=False)
    new: list[int] = []
    shown = [0]
    times: list[float] = []  # when each token was sampled (before it is printed)
    printing = [0.0]

    def on_token(nxt):
        times.append(time.perf_counter())
        new.append(int(nxt[0]))
        text = tok.decode(new)
        console.print(text[shown[0]:], end="", highlight=False, markup=False)
        shown[0] = len(text)
        printing[0] += time.perf_counter() - times[-1]

    start = time.perf_counter()
    model.generate(ids, max_new_tokens=max_new_tokens, on_token=on_token, seed=seed, **sampling)
    console.print()
    return speed(ids.shape[1], start, times, printing[0])


def _run_batch(model, prompts: list[str], max_new_tokens: int, console: Console, sampling: dict, seed) -> dict:
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
        console.print(f"[dim][{i}][/] ", end="")
        console.print(p, end="", style="bold", highlight=False, markup=False)
        console.print(model.tokenizer.decode(row[: ended[0] if ended else len(row)]), highlight=False, markup=False)
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


def _pct(x) -> str:
    return "-" if x is None else f"{x:.1%}"


def _mib(n) -> str:
    return f"{n / 2**20:,.2f} MiB"


def stats_table(s: dict, seconds: float | None = None) -> Table:
    """The runtime's counters (model.stats()) as one table; seconds: the generation's wall time."""
    t = Table(title="expert cache", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column(justify="right")
    res = s["residency"]
    t.add_row("budget (fast tier)", f"{_mib(res['budget_bytes'])} of {_mib(s['expert_bytes_total'])} decoded "
              f"({res['budget_bytes'] / s['expert_bytes_total']:.0%})")
    t.add_row("resident", f"{res['fast_experts']} experts, {_mib(res['fast_bytes'])} "
              f"({res['pinned_experts']} pinned hot)")
    if "host_bytes" in res:
        t.add_row("host tier (pinned)", f"{res['host_experts']} experts, {_mib(res['host_bytes'])}")
    t.add_row("expert uses", f"{s['uses']:,}")
    t.add_row("hits / misses", f"{s['hits']:,} / {s['misses']:,} (hit rate {_pct(s['hit_rate'])})")
    stall = f"{s['stall_seconds']:.3f} s"
    if seconds:
        stall += f" ({s['stall_seconds'] / seconds:.0%} of the generation time)"
    t.add_row("stalled", stall)
    t.add_row("bytes fetched (cold tier)", f"{_mib(s['bytes_fetched'])} in {s['loads']:,} reads")
    if s.get("prefetch"):
        pairs = s.get("predictor_layers", [])
        t.add_row("predicted by", "the shadow router" if not pairs else
                  "fitted: " + ", ".join(f"{i}→{j}" for j, i in pairs) + "; shadow router elsewhere")
        t.add_row("prefetch recall / precision", f"{_pct(s['prefetch_recall'])} / {_pct(s['prefetch_precision'])}")
        t.add_row("prefetches used / loaded", f"{s['prefetch_used']:,} / {s['prefetch_loads']:,} "
                  f"({s['prefetch_cancelled']:,} cancelled, {s['prefetch_aborted']:,} aborted)")
        t.add_row("wasted bytes", _mib(s["wasted_bytes"]))
    return t


def layer_table(s: dict) -> Table:
    t = Table(title="per MoE layer", title_justify="left")
    for name in ("layer", "uses", "hit rate", "stall s", "recall", "precision"):
        t.add_column(name, justify="right")
    for i, x in s["layers"].items():
        hit = x["hits"] / x["uses"] if x["uses"] else None
        t.add_row(str(i), f"{x['uses']:,}", _pct(hit), f"{x['stall_seconds']:.3f}", _pct(x["recall"]),
                  _pct(x["precision"]))
    return t

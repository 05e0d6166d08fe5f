"""`prism run`: load a model, stream a continuation of a prompt, report speed (prefill and decode apart)
and, for a model whose experts sit behind the runtime's cache, the cache and prefetch statistics."""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from prism_load.errors import PrismError


def run_prompt(model_path: Path, prompt: str, max_new_tokens: int, console: Console, *, cache=None,
               prefetch: bool = True, numa=None, expert_form: str | None = None, lookahead: int = 1,
               predictor: bool = True, tokenizer: str | None = None, expert_kernel: str = "auto") -> dict:
    """Generate from `prompt`, streaming tokens. cache: None (every expert resident) or the expert cache's
    budget (bytes, "50%", "2GB"); prefetch, numa, expert_form, lookahead and predictor as in prism_load.load
    (None: the runtime's default, packed for containers; codes needs the cache: "100%" when no budget is
    given). `tokenizer` (--tokenizer, a path or Hub id)
    replaces the model's own, or stands in where it has none."""
    import torch

    import prism_load

    from .tokenizer import check_vocabulary, resolve_tokenizer

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
    tok = model.tokenizer
    if tok is None:
        raise PrismError(f"{model_path}: no tokenizer, cannot encode a text prompt; name one with --tokenizer")
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
    model.generate(ids, max_new_tokens=max_new_tokens, on_token=on_token)
    console.print()
    result = speed(ids.shape[1], start, times, printing[0])
    if hasattr(model, "stats"):
        result["stats"] = model.stats()
        console.print(stats_table(result["stats"], result["seconds"]))
        console.print(layer_table(result["stats"]))
    console.print(f"[dim]prefill {result['prompt_tokens']} tokens in {result['prefill_seconds']:.3f} s "
                  f"({result['prefill_tokens_per_second']:.1f} tokens/s); decode {result['decode_tokens']} tokens in "
                  f"{result['decode_seconds']:.2f} s ({result['decode_tokens_per_second']:.1f} tokens/s)[/]",
                  highlight=False)
    return result


def speed(prompt_tokens: int, start: float, times: list[float], printing_seconds: float) -> dict:
    """Prefill = prompt in, first token out; decode = every later token (printing time taken out)."""
    prefill = times[0] - start
    decode_tokens = len(times) - 1
    decode = max(times[-1] - times[0] - printing_seconds, 0.0) if decode_tokens else 0.0
    return {"tokens": len(times), "prompt_tokens": prompt_tokens, "prefill_seconds": prefill,
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

"""Batched decode benchmark on the reference model (issue 16): tokens/s at batch 1, 4 and 16, fully resident
and behind an expert cache of 50%, and resident with a batch's attention and experts run by torch ops (the path
before native attention_rows and expert_rows, measured in the same run).

A batch routes each row's token on its own, so a decode step touches the union of the rows' experts: more
distinct experts per layer as the batch grows, hence more bytes moved per step and, behind a cache, a hit
rate that falls as the working set of a step grows. The table reports, per configuration: decode tokens/s
(all rows), tokens/s per row, distinct experts touched per MoE layer per decode step (of the layer's E), and
the cache's hit rate. The cache loads on demand, load()'s default on a CPU (prefetch predicts single rows only).
Prompts are held-out prose and code windows of 16 to 32 tokens (so the batch is left-padded), sampled with a
fixed seed and no eos, so both configurations decode exactly the same tokens.

Writes bench/results/batch.json and bench/results/batch.md.

    python bench/bench_batch.py [--container PATH] [--batches 1,4,16] [--tokens 32] [--threads 1]
    python bench/bench_batch.py --synthetic --batches 1,4 --tokens 4      # a smoke run, no reference model
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from bench_runtime import add_container_options, chosen_container
from common import write_report

import prism_load
from prism_load.models import moe

# (name, expert cache budget, a batch's attention and experts one native call each a layer): the last row is the A/B
# of attention_rows and expert_rows (the torch-op path they replaced)
CONFIGS = [("resident", None, True), ("cache 50%", "50%", True),
           ("resident, batch by torch ops", None, False)]


class ExpertsTouched:
    """MoE observer: distinct experts each layer runs per forward (a decode step), counted once `active`."""

    def __init__(self, model):
        self.active = False
        self.per_step: list[int] = []
        self.blocks = [block for _, block in model.moe_blocks()]
        for block in self.blocks:
            block.observer = self

    def detach(self) -> None:
        for block in self.blocks:
            block.observer = None

    def on_route(self, layer_index, x, route):
        if self.active:
            self.per_step.append(int(torch.unique(route.indices).numel()))

    def on_expert(self, *args):
        pass


def bench_prompts(container: Path, count: int, synthetic: bool, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """count prompts of 16..32 tokens (held-out prose and code, random for a synthetic model), left-padded."""
    gen = torch.Generator().manual_seed(0)
    if synthetic:
        rows = [torch.randint(0, vocab, (32,), generator=gen) for _ in range(count)]
    else:
        from prism_convert.profiling.profiler import calibration_tokens

        half = (count + 1) // 2
        rows = [*calibration_tokens(container, "builtin:prose", half, 32, seed=1, split="heldout"),
                *calibration_tokens(container, "builtin:code", half, 32, seed=1, split="heldout")][:count]
    rows = [r[: 16 + int(torch.randint(0, 17, (1,), generator=gen))] for r in rows]
    width = max(len(r) for r in rows)
    ids = torch.zeros(count, width, dtype=torch.long)
    mask = torch.zeros(count, width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):], mask[i, width - len(r):] = r, 1
    return ids, mask


def generate(model, ids: torch.Tensor, mask: torch.Tensor, tokens: int, on_token) -> None:
    model.generate(ids, attention_mask=mask, max_new_tokens=tokens, do_sample=True, temperature=0.8, top_k=50,
                   seed=0, eos_token_id=[], on_token=on_token)


def measure(model, ids: torch.Tensor, mask: torch.Tensor, tokens: int) -> dict:
    """One sampled batch generation, timed unobserved (an observer takes the MoE blocks off their native paths);
    decode = first token to last; cache stats of decode steps only. Then the same generation again with an
    observer counting the experts each decode step touches (the same tokens: the sampling is seeded)."""
    times = []
    cached = hasattr(model, "stats")

    def on_token(_):
        if not times and cached:
            model.reset_stats()
        times.append(time.perf_counter())

    start = time.perf_counter()
    generate(model, ids, mask, tokens, on_token)
    steps = len(times) - 1
    out = {"batch": ids.shape[0], "prompt_tokens": int(mask.sum()), "prefill_seconds": times[0] - start,
           "decode_steps": steps, "decode_tokens": steps * ids.shape[0], "decode_seconds": times[-1] - times[0]}
    if cached:
        s = model.stats()
        out |= {"hit_rate": s["hit_rate"], "uses": s["uses"], "misses": s["misses"],
                "stall_seconds": s["stall_seconds"], "bytes_fetched": s["bytes_fetched"]}
    touched = ExpertsTouched(model)
    try:
        generate(model, ids, mask, tokens, lambda _: setattr(touched, "active", True))
    finally:
        touched.detach()
    out["experts_per_layer_step"] = statistics.fmean(touched.per_step) if touched.per_step else None
    return out


def run(container: Path, batches: list[int], tokens: int, repeats: int, synthetic: bool) -> list[dict]:
    """Every configuration's model loaded at once and measured in turn, batch by batch and repeat by repeat, so a
    drift of the host's speed falls on all of them alike (their ratios are what the bench is for)."""
    models = [prism_load.load(container, **({} if budget is None else {"expert_cache": budget}))
              for _, budget, _ in CONFIGS]
    rows = []
    try:
        for b in batches:
            ids, mask = bench_prompts(container, b, synthetic, models[0].args.vocab_size)
            runs: list[list[dict]] = [[] for _ in CONFIGS]
            for _ in range(repeats):
                for (_, _, batch_native), model, done in zip(CONFIGS, models, runs):
                    saved = moe.BATCH_ROWS
                    if not batch_native:  # only unpadded single rows take the native calls
                        moe.BATCH_ROWS = 0
                    try:
                        done.append(measure(model, ids, mask, tokens))
                    finally:
                        moe.BATCH_ROWS = saved
            for (name, _, _), model, done in zip(CONFIGS, models, runs):
                best = sorted(done, key=lambda m: m["decode_seconds"])[len(done) // 2]  # the median run
                rate = best["decode_tokens"] / best["decode_seconds"] if best["decode_seconds"] > 0 else float("nan")
                experts = model.args.num_experts
                rows.append({"name": name, "num_experts": experts, "decode_tokens_per_second": rate,
                             "tokens_per_second_per_row": rate / b, **best})
                print(f"{name:>28} batch {b:>3}: {rate:8.1f} tokens/s, {best['experts_per_layer_step'] or 0:.1f}/"
                      f"{experts} experts per layer step, hit rate {_pct(best.get('hit_rate'))}", file=sys.stderr)
    finally:
        for model in models:
            if hasattr(model, "runtime"):
                model.runtime.close()
    # one table row per configuration and batch, configuration by configuration
    return sorted(rows, key=lambda r: [c[0] for c in CONFIGS].index(r["name"]))


def _pct(x) -> str:
    return "-" if x is None else f"{x:.1%}"


def markdown(result: dict) -> str:
    lines = [f"# Batched decode ({result['device']}, {result['threads']} thread(s), {result['tokens']} new tokens a row)",
             "", f"container: `{result['container']}`", "",
             "| configuration | batch | decode tokens/s | per row | experts / layer / step | cache hit rate |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        touched = "-" if r["experts_per_layer_step"] is None else f"{r['experts_per_layer_step']:.1f} of {r['num_experts']}"
        lines.append(f"| {r['name']} | {r['batch']} | {r['decode_tokens_per_second']:.1f} | "
                     f"{r['tokens_per_second_per_row']:.1f} | {touched} | {_pct(r.get('hit_rate'))} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_container_options(ap, "smoke runs")
    ap.add_argument("--batches", default="1,4,16", help="comma-separated batch sizes")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--name", default="batch", help="results file name (bench/results/NAME.json)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    container = chosen_container(args)
    batches = [int(b) for b in args.batches.split(",")]
    rows = run(container, batches, args.tokens, args.repeats, args.synthetic)
    result = {"container": str(container), "device": "cpu", "threads": args.threads, "tokens": args.tokens,
              "repeats": args.repeats, "rows": rows}
    path = write_report(args.name, result, markdown(result))
    print(markdown(result))
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()

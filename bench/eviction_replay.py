"""Eviction orders replayed on recorded routing: each order's misses, and the oracle's, in seconds.

bench_runtime.py decodes again for every order it compares, and its tokens/s carry the host's noise. The cache
loading on demand on one thread is deterministic given the routing it sees: which experts each layer step asks
for, in order. `record` decodes once and keeps that routing (ExpertCache.route_log), the resident set and
the eviction estimate the cache started from. `replay` hands that routing to a fresh ExpertCache with any
eviction order, over a store of placeholder experts of the recorded sizes: the cache's own pins, expected
flags and evictions, with no model to run. It reproduces the live cache's misses exactly
(tests/test_eviction.py). It counts misses, not time. What it answers: how much an order, or NextUse's decay,
moves the misses on the same routing.

    python bench/eviction_replay.py [--container PATH] [--budgets 50%,25%] [--tokens 48]
"""

from __future__ import annotations

import argparse
import copy
import sys
from dataclasses import dataclass

import torch
from common import write_report
from eviction_oracle import belady_misses_by_layer

import prism_load
from prism_load.models.moe import ExpertWeights
from prism_load.runtime import ExpertCache, MemoryStore
from prism_load.runtime.eviction import ROUTING_DECAY
from prism_load.runtime.tiers import footprint

DECAYS = (0.5, 0.7, ROUTING_DECAY, 0.95)  # NextUse's weight on the past per layer step: the default and around it


@dataclass
class Recording:
    """One live decode behind a cache: its routing, and what the cache held and estimated when it started."""

    trace: list[tuple[int, tuple[int, ...]]]
    start: set  # the experts resident when the recording began
    state: dict  # NextUse's estimate then (level, scale, current)
    nbytes: dict  # (layer, expert) -> its bytes in the fast tier (store.nbytes)
    prior: dict  # (layer, expert) -> the profile's routing frequency
    num_experts: int
    top_k: int
    budget_bytes: int
    live_misses: int


def record(container, budget: str, prompts: list[torch.Tensor], tokens: int) -> Recording:
    """Decode `prompts` (sampled, a fixed seed, as bench_runtime measures) behind a `budget` cache on demand with
    the default order (next-use), recording the routing after a short warm-up."""
    model = prism_load.load(container, expert_cache=budget, prefetch=False)
    model.generate(prompts[0], max_new_tokens=8, do_sample=True, temperature=0.8, top_k=50, seed=0, eos_token_id=[])
    cache = model.runtime.cache
    start, cache.route_log = cache.resident_keys(), []
    state = copy.deepcopy({k: getattr(cache.policy, k) for k in ("level", "scale", "current")})
    model.reset_stats()
    for p in prompts:
        model.generate(p, max_new_tokens=tokens, do_sample=True, temperature=0.8, top_k=50, seed=0, eos_token_id=[])
    store = cache.store
    out = Recording(list(cache.route_log), start, state, {k: store.nbytes(*k) for k in cache.keys}, dict(cache._prior),
                    store.num_experts, store.top_k, cache.budget_bytes, model.stats()["misses"])
    model.runtime.close()
    return out


def replay(rec: Recording, eviction: str = "next-use", decay: float | None = None) -> dict[int, int]:
    """Misses per layer of a fresh ExpertCache with `eviction` (NextUse: from the estimate the live cache had,
    at `decay` if given; the other orders from the prior) given `rec`'s routing, from the same resident set."""
    placeholders = {k: ExpertWeights(torch.zeros(n, dtype=torch.uint8), torch.zeros(0, dtype=torch.uint8))
                    for k, n in rec.nbytes.items()}
    store = MemoryStore(placeholders, rec.num_experts, rec.top_k, frequencies=rec.prior)
    cache = ExpertCache(store, rec.budget_bytes, eviction=eviction, pin_hot=False)
    for key in rec.start:
        cache.use(*key)
    cache.release_thread()
    if eviction == "next-use":
        for name, value in copy.deepcopy(rec.state).items():
            setattr(cache.policy, name, value)
        if decay is not None:
            cache.policy.decay = decay
    cache.reset_stats()
    for layer, ids in rec.trace:  # as a MoE block asks: the step's routing, then each expert in order
        got = cache.acquire(layer, list(ids))
        for e in ids:
            got[e]
    return {i: cache.stats.layer(i).misses for i in store.moe_layers}


def compare(rec: Recording) -> list[dict]:
    """Every order of one recording: next-use at each decay (from the live estimate), GreedyDual and LRU (from the
    prior), and the oracle."""
    rows = [{"order": f"next-use, decay {d}" + (" (the default)" if d == ROUTING_DECAY else ""),
             "layers": replay(rec, "next-use", d)} for d in DECAYS]
    rows += [{"order": name, "layers": replay(rec, name)} for name in ("frequency", "lru")]
    nbytes = {k: footprint(n) for k, n in rec.nbytes.items()}  # what each reserves against the budget
    oracle = belady_misses_by_layer(rec.trace, nbytes, rec.budget_bytes, set(rec.start))
    rows.append({"order": "oracle (Belady, the future known)", "layers": {i: oracle[i] for i in rows[0]["layers"]}})
    for r in rows:
        r["misses"] = sum(r["layers"].values())
    return rows


def markdown(result: dict) -> str:
    lines = [f"# Eviction orders replayed on recorded routing ({result['prompts']} prompts x {result['tokens']} "
             "sampled decode tokens, prefill included)", "", f"Container: `{result['container']}`. Each budget "
             "decodes once with the default order, on demand; every order is then replayed on that routing from "
             "the same resident set (bench/eviction_replay.py; the replay of the default reproduces the live "
             "misses, checked below).", ""]
    for b in result["budgets"]:
        default = next(r for r in b["rows"] if r["order"].endswith("(the default)"))["misses"]
        lines += [f"## cache {b['budget']} ({b['steps']:,} layer steps; the live cache missed {b['live_misses']:,} "
                  f"times, the replayed default {default:,})", "",
                  "| order | misses | vs the default | by MoE layer |", "|---|---|---|---|"]
        for r in b["rows"]:
            lines.append(f"| {r['order']} | {r['misses']:,} | {r['misses'] / default - 1:+.1%} | "
                         + ", ".join(f"{i}: {m:,}" for i, m in r["layers"].items()) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    from bench_runtime import add_container_options, bench_prompts, chosen_container

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_container_options(ap, "random routing")
    ap.add_argument("--budgets", default="50%,25%")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--name", default="eviction_replay")
    args = ap.parse_args()
    torch.set_num_threads(1)
    container = chosen_container(args)
    prompts = bench_prompts(container, args.synthetic)
    budgets = []
    for budget in args.budgets.split(","):
        rec = record(container, budget, prompts, args.tokens)
        budgets.append({"budget": budget, "steps": len(rec.trace), "live_misses": rec.live_misses,
                        "rows": compare(rec)})
        print(f"cache {budget}: recorded {len(rec.trace):,} layer steps", file=sys.stderr)
    result = {"container": str(container), "prompts": len(prompts), "tokens": args.tokens, "budgets": budgets}
    path = write_report(args.name, result, markdown(result))
    print(markdown(result))
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()

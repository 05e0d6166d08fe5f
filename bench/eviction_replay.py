"""Eviction orders replayed on recorded routing: each order's misses, and the oracle's, in seconds.

bench_runtime.py decodes again for every order it compares, and its tokens/s carry the host's noise. The cache
loading on demand on one thread is deterministic given the routing it sees: which experts each layer step asks
for, in order. `record` decodes once and keeps that routing (ExpertCache.route_log), the resident set and
the eviction estimate the cache started from. `replay` then runs ExpertCache's bookkeeping over any policy
of prism_load/runtime/eviction.py:
- a step's experts stay pinned until the next step where the budget holds them all, else one at a time;
- routed experts are flagged expected until used;
- a miss evicts the policy's victims until the expert fits.
It reproduces the live cache's misses exactly (tests/test_eviction.py). It counts misses, not time. What it
answers: how much an order, or NextUse's decay, moves the misses on the same routing.

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
from prism_load.runtime.eviction import ROUTING_DECAY, eviction_policy
from prism_load.runtime.tiers import Entry, footprint

DECAYS = (0.5, 0.7, ROUTING_DECAY, 0.95)  # NextUse's weight on the past per layer step: the default and around it


@dataclass
class Recording:
    """One live decode behind a cache: its routing, and what the cache held and estimated when it started."""

    trace: list[tuple[int, tuple[int, ...]]]
    start: set  # the experts resident when the recording began
    state: dict  # NextUse's estimate then (level, scale, current)
    nbytes: dict  # (layer, expert) -> the bytes it reserves (footprint)
    prior: dict  # (layer, expert) -> the profile's routing frequency
    layers: tuple[int, ...]
    num_experts: int
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
    out = Recording(list(cache.route_log), start, state, {k: footprint(cache.store.nbytes(*k)) for k in cache.keys},
                    dict(cache._prior), tuple(cache.store.moe_layers), cache.store.num_experts, cache.budget_bytes,
                    model.stats()["misses"])
    model.runtime.close()
    return out


def replay(rec: Recording, eviction: str = "next-use", decay: float | None = None,
           live_state: bool = True) -> dict[int, int]:
    """Misses per layer of the cache's on-demand bookkeeping over `rec`'s routing with another order (or NextUse
    with another decay). live_state: NextUse starts from the estimate the live cache had (else from the prior, as
    the other orders do)."""
    entries: dict = {}
    policy = eviction_policy(eviction, entries, rec.prior, rec.layers, rec.num_experts)
    if eviction == "next-use":
        if live_state:
            for name, value in copy.deepcopy(rec.state).items():
                setattr(policy, name, value)
        if decay is not None:
            policy.decay = decay
    used = 0
    for key in rec.start:
        used += _add(entries, key, rec.nbytes[key])
        policy.touch(entries[key])
    largest = max(rec.nbytes.values())
    misses = dict.fromkeys(rec.layers, 0)
    for layer, ids in rec.trace:
        _unpin(entries)  # the next acquire releases the last step's pins
        policy.observe(layer, ids)
        for e in ids:
            if (layer, e) in entries:
                entries[(layer, e)].expected = True
        holds = len(ids) * largest <= rec.budget_bytes  # ExpertLease.holds: else one expert pinned at a time
        for e in ids:
            if not holds:
                _unpin(entries)
            key = (layer, e)
            entry = entries.get(key)
            if entry is None:
                misses[layer] += 1
                while used + rec.nbytes[key] > rec.budget_bytes:
                    victim = policy.victim(True)
                    if victim is None:
                        raise RuntimeError(f"replay: no room for {key} (every expert pinned)")
                    del entries[victim.key]
                    used -= victim.nbytes
                    policy.evicted(victim)
                used += _add(entries, key, rec.nbytes[key])
                entry = entries[key]
            entry.pins += 1
            entry.expected, entry.used = False, True
            policy.touch(entry)
    return misses


def _add(entries: dict, key, nbytes: int) -> int:
    entry = Entry(key, 0, 0)
    entry.nbytes, entry.ready = nbytes, True  # the footprint as recorded
    entries[key] = entry
    return nbytes


def _unpin(entries: dict) -> None:
    for entry in entries.values():
        entry.pins = 0


def compare(rec: Recording) -> list[dict]:
    """Every order of one recording: next-use at each decay (from the live estimate), GreedyDual and LRU (from the
    prior), and the oracle."""
    rows = [{"order": f"next-use, decay {d}" + (" (the default)" if d == ROUTING_DECAY else ""),
             "layers": replay(rec, "next-use", d)} for d in DECAYS]
    rows += [{"order": name, "layers": replay(rec, name)} for name in ("frequency", "lru")]
    oracle = belady_misses_by_layer(rec.trace, rec.nbytes, rec.budget_bytes, set(rec.start))
    rows.append({"order": "oracle (Belady, the future known)", "layers": {i: oracle[i] for i in rec.layers}})
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

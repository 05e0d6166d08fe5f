"""Where a cache miss's time goes: the steps of the expert cache's miss path timed inside the decode loop.

The torch profiler (bench_decode_profile.py) sees aten ops and the native kernels; a miss on the Python path is
neither: it is a callback from the native decode loop into Python that chooses a victim, reads the expert into a
slab and publishes it to the loop's table. By default a miss is served inside the loop instead
(runtime/native_misses.py), where no timer here sees it: the script measures that path's token time first (with
the loads' time the loop records, stall_seconds, and one timer on the Python replay of its log), then
times the Python path's steps with PRISM_NATIVE_MISSES=0 (what the native path replaces, and what still serves
an expert's first read and the steps the loop cannot serve). This script wraps each of those steps (functions of the runtime, by name)
with a timer, decodes sampled continuations of the bench prompts with the cache on demand, and reports each
step's calls and time per decode token. The times are inclusive (a step's row contains the steps it calls;
the indentation shows which) and include the timer's own cost, about a microsecond a call. The same prompts
decoded by the resident model give the token time the miss path adds to.

    python bench/miss_profile.py [--container PATH] [--cache 50%] [--tokens 32] [--threads 1] [--name miss_profile]

Without --container it uses the reference model at 4.25 bits (bench_runtime's container). Writes
bench/results/NAME.json and NAME.md.
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch
from bench_runtime import bench_prompts, measure, reference_container
from common import write_report

import prism_load

# (depth, module, class, function): the miss path from the loop's callback down, in call order
STEPS = [
    (0, "prism_load.native.decode_layer", "ExpertServer", "_route"),
    (1, "prism_load.native.decode_layer", "ExpertServer", "flush_hits"),
    (2, "prism_load.native.decode_layer", "TokenLayers", "take_hits"),
    (2, "prism_load.runtime.cache", "ExpertCache", "record_hits"),
    (1, "prism_load.runtime.cache", "ExpertCache", "acquire"),
    (2, "prism_load.runtime.cache", "ExpertCache", "_serve_now"),
    (3, "prism_load.runtime.cache", "ExpertCache", "_make_room"),
    (4, "prism_load.runtime.eviction", "NextUse", "victim"),
    (4, "prism_load.runtime.cache", "ExpertCache", "_evict"),
    (5, "prism_load.native.decode_layer", "ResidentTable", "drop"),
    (3, "prism_load.runtime.cache", "ExpertCache", "_add_entry"),
    (3, "prism_load.runtime.container_store", "ContainerStore", "read_into"),
    (4, "prism_load.runtime.container_store", "ContainerStore", "_read"),
    (5, "prism_load.container.reader", None, "pread_into"),
    (4, "prism_load.runtime.container_store", "ContainerStore", "_view_plan"),
    (3, "prism_load.runtime.cache", "ExpertCache", "_finish"),
    (4, "prism_load.native.decode_layer", "ResidentTable", "put"),
    (1, "prism_load.models.moe", "MoEBlock", "native_blocks"),
    (1, "prism_load.native.expert_block", None, "op_table"),
]


def label(module: str, owner: str | None, name: str) -> str:
    return f"{owner or module.rsplit('.', 1)[-1]}.{name}"


def wrap(totals: dict, steps: list | None = None) -> Callable[[], None]:
    """Replace each step (STEPS by default) by a timed wrapper that adds its calls and seconds to totals[label];
    returns what puts the steps back."""
    originals = []
    for _, module, owner, name in steps or STEPS:
        holder = importlib.import_module(module)
        if owner is not None:
            holder = getattr(holder, owner)
        inner, key = getattr(holder, name), label(module, owner, name)
        totals[key] = [0, 0.0, 0, 0.0]  # calls and seconds so far; of the decode tokens (decode_rate)

        def timed(*args, _inner=inner, _slot=totals[key], **kwargs):
            start = time.perf_counter()
            try:
                return _inner(*args, **kwargs)
            finally:
                _slot[0] += 1
                _slot[1] += time.perf_counter() - start

        originals.append((holder, name, inner))
        setattr(holder, name, timed)
    if steps is None:  # a name imported into another module before the wrap: rebound there too
        from prism_load.native import decode_layer, expert_block

        originals.append((decode_layer, "op_table", decode_layer.op_table))
        decode_layer.op_table = expert_block.op_table

    def restore() -> None:
        for holder, name, inner in reversed(originals):
            setattr(holder, name, inner)

    return restore


def decode_rate(model, prompts, tokens: int, totals: dict | None = None,
                stalls: list | None = None) -> tuple[float, int, int]:
    """Decode tokens/s, decode tokens and misses over the prompts (bench_runtime's sampled generation); with
    totals, the steps' calls and seconds of the decode tokens only (each prompt's prefill taken off); stalls:
    gets each prompt's stall_seconds (the time the cache's loads took, timed where they run)."""
    seconds, count, misses = 0.0, 0, 0
    for p in prompts:
        at_first: dict = {}

        def on_token(_, at_first=at_first):
            if not at_first:
                if hasattr(model, "reset_stats"):
                    model.reset_stats()
                at_first.update({k: list(v) for k, v in (totals or {}).items()}, start=time.perf_counter())
            at_first["end"], at_first["tokens"] = time.perf_counter(), at_first.get("tokens", -1) + 1

        model.generate(p, max_new_tokens=tokens, do_sample=True, temperature=0.8, top_k=50, seed=0,
                       eos_token_id=[], on_token=on_token)
        seconds += at_first["end"] - at_first["start"]
        count += at_first["tokens"]
        misses += model.stats()["misses"] if hasattr(model, "stats") else 0
        if stalls is not None:
            stalls.append(model.stats()["stall_seconds"])
        for k, v in (totals or {}).items():  # what the prefill and first token spent is not the decode's
            v[2] += v[0] - at_first[k][0]
            v[3] += v[1] - at_first[k][1]
    return count / seconds, count, misses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--container", type=Path)
    ap.add_argument("--cache", default="50%", help="expert_cache budget (on demand)")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--name", default="miss_profile")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    container = args.container or reference_container()
    prompts = bench_prompts(container, synthetic=args.container is not None)
    resident = prism_load.load(container)
    measure(resident, prompts[0], 8)
    resident_rate, _, _ = decode_rate(resident, prompts, args.tokens)
    # the native miss path (the default) serves a miss inside the loop, where no timer sees it: with it on, the
    # token time alone; the steps are timed on the Python path it replaces (PRISM_NATIVE_MISSES=0)
    native = prism_load.load(container, expert_cache=args.cache, prefetch=False)
    measure(native, prompts[0], 8)
    # the loop's loads are timed where they run (stall_seconds: slab, read, block); the Python side's replay of
    # its log after each token by a timer here (one call a token, so its own cost is small)
    replay: dict = {}
    restore_replay = wrap(replay, [(0, "prism_load.runtime.native_misses", "NativeMisses", "replay")])
    stalls: list = []
    native_rate, native_tokens, native_misses = decode_rate(native, prompts, args.tokens, replay, stalls)
    restore_replay()
    replay_seconds = next(iter(replay.values()))[3]
    os.environ["PRISM_NATIVE_MISSES"] = "0"
    totals: dict = {}
    wrap(totals)
    cached = prism_load.load(container, expert_cache=args.cache, prefetch=False)
    measure(cached, prompts[0], 8)  # warm: first reads, plans, block templates
    rate, tokens, misses = decode_rate(cached, prompts, args.tokens, totals)
    token_us = 1e6 / rate
    rows = []
    for d, m, o, n in STEPS:
        calls, seconds = totals[label(m, o, n)][2:]
        rows.append({"step": label(m, o, n), "depth": d, "calls_per_token": calls / tokens,
                     "us_per_call": 1e6 * seconds / max(calls, 1), "us_per_token": 1e6 * seconds / tokens})
    commit = subprocess.run(["git", "-C", str(Path(__file__).parent), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    native_us = (1e6 / native_rate - 1e6 / resident_rate) / max(native_misses / native_tokens, 1e-9)
    native_load_us = 1e6 * sum(stalls) / max(native_misses, 1)
    replay_us = 1e6 * replay_seconds / max(native_misses, 1)
    data = {"prism_commit": commit, "container": str(container), "cache": args.cache, "threads": args.threads, "decode_tokens": tokens,
            "resident_tokens_per_s": resident_rate, "cached_tokens_per_s": rate, "misses_per_token": misses / tokens,
            "native_tokens_per_s": native_rate, "native_misses_per_token": native_misses / native_tokens,
            "native_us_per_miss": native_us, "native_load_us_per_miss": native_load_us,
            "native_replay_us_per_miss": replay_us, "steps": rows}
    lines = [f"# Where a miss's time goes (cache {args.cache} on demand, {args.threads} thread(s), "
             f"{tokens} decode tokens, timers on)", "",
             f"prism at {commit}. Container: `{container}`. Resident {resident_rate:.1f} tokens/s ({1e6 / resident_rate:.0f} us a token); "
             f"cached with the timers on {rate:.1f} tokens/s ({token_us:.0f} us a token), "
             f"{misses / tokens:.2f} misses a token: {(token_us - 1e6 / resident_rate) / max(misses / tokens, 1e-9):.0f} "
             f"us of the token per miss. With the native miss path (the default; the steps below are the "
             f"Python path it replaces, PRISM_NATIVE_MISSES=0): {native_rate:.1f} tokens/s, "
             f"{native_misses / native_tokens:.2f} misses a token: {native_us:.0f} us of the token per miss, of "
             f"which the load (stall_seconds: in the loop its slab, read and block; an expert's first read "
             f"through Python) {native_load_us:.0f} us and Python's replay of the loop's log after the token "
             f"{replay_us:.0f} us (its hits' records included; the one timer of this run).", "",
             "Decode tokens only (each prompt's prefill and first token left out). Inclusive times: a row contains the rows "
             "below it with one more dot; each includes its timer (about 1 us a call).",
             "", "| step | calls/token | us/call | us/token | share of a token |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {'· ' * r['depth']}{r['step']} | {r['calls_per_token']:.2f} | "
                     f"{r['us_per_call']:.1f} | {r['us_per_token']:.1f} | {r['us_per_token'] / token_us:.0%} |")
    path = write_report(args.name, data, "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()

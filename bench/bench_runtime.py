"""Runtime benchmark on the reference model (issue 6): the expert cache, prefetch and what they cost.

In one run, on the same container and the same prompts (held-out prose and code, sampled with a fixed seed,
so every configuration decodes exactly the same tokens): decode tokens/s fully resident (packed, and decoded
to fp32 as the runtime did before) vs an expert cache of 25% and 50% of the experts' bytes in the fast tier
(packed: about the container's expert bytes), each with the shadow-router prefetch and on demand only, 50%
also with every expert read from the disk (pages dropped from the page cache); plus 100% with prefetch: the cache's own overhead; 50% with the shadow router only, without the container's fitted
predictors; and 50% with lookahead 2, with and without them); hit rate, misses per token, prefetch
recall and precision per layer, share of decode time stalled; the misses of the eviction orders against an
oracle replaying the same routing (Belady's rule with the future known); and, in a fresh process per
configuration, the resident set against dense weights + cache budget + a stated overhead.

Configurations are measured round-robin (each repeat in a rotated order) so that a shared machine's load
falls on all of them alike; the figure is the median over repeats. Statistics cover decode steps only (they
are reset when the prefill's token comes out).

Writes bench/results/runtime.json and bench/results/runtime.md.

    python bench/bench_runtime.py [--container PATH] [--threads 1] [--tokens 48] [--repeats 3]
    python bench/bench_runtime.py --device cuda --synthetic        # bench/gpu_check.sh
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from common import run_measured, write_report
from eviction_oracle import belady_misses_by_layer

import prism_load
from prism_load.runtime.tiers import footprint

CACHE = Path(os.environ.get("PRISM_CACHE", Path.home() / ".cache" / "prism")) / "bench-runtime"
BITS = 4.25
CONFIGS = [  # name, expert_cache, prefetch, extra load options
    ("resident", None, False, {}),
    ("cache 100%, prefetch", "100%", True, {}),
    ("cache 50%, prefetch", "50%", True, {}),
    ("cache 50%, prefetch, shadow router only", "50%", True, {"predictor": False}),
    ("cache 50%, prefetch, lookahead 2", "50%", True, {"lookahead": 2}),
    ("cache 50%, prefetch, lookahead 2, shadow router only", "50%", True, {"lookahead": 2, "predictor": False}),
    ("cache 50%, on demand", "50%", False, {}),
    # the same with every miss served by a callback into Python (the path before native/expert_miss.c)
    ("cache 50%, on demand, Python misses", "50%", False, {"python_misses": True}),
    # the same served in the loop with its reads split across the threads from 1 MiB only (the default: 64 KiB)
    ("cache 50%, on demand, reads split from 1 MiB", "50%", False, {"split_bytes": 1 << 20}),
    ("cache 25%, prefetch", "25%", True, {}),
    ("cache 25%, on demand", "25%", False, {}),
    ("cache 50%, on demand, hot tier pinned", "50%", False, {"pin_hot": "pin"}),
    ("cache 50%, on demand, plain LRU", "50%", False, {"pin_hot": False, "eviction": "lru"}),
    ("cache 50%, on demand, GreedyDual", "50%", False, {"eviction": "frequency"}),
    ("cache 25%, on demand, GreedyDual", "25%", False, {"eviction": "frequency"}),
    # the checksum of every reload too (the default checks an expert's first read only)
    ("cache 50%, on demand, every read checked", "50%", False, {"verify_checksums": "always"}),
    ("cache 25%, on demand, every read checked", "25%", False, {"verify_checksums": "always"}),
    # the case the product exists for: a miss is a read from the disk (each read's pages are dropped from the
    # page cache right after it, and every shard's before the run)
    ("cache 50%, on demand, reads from disk", "50%", False, {"cold_reads": True}),
    ("cache 50%, on demand, reads from disk, GreedyDual", "50%", False, {"cold_reads": True, "eviction": "frequency"}),
    # the same with the kernel's readahead left on the shards (as before Container.read_randomly): each miss
    # reads past its expert
    ("cache 50%, on demand, reads from disk, kernel readahead", "50%", False, {"cold_reads": True,
                                                                            "kernel_readahead": True}),
    ("cache 50%, prefetch, reads from disk", "50%", True, {"cold_reads": True}),
    # the earlier default: every expert expanded to dense fp32 weights at load
    ("resident, decoded fp32 (the earlier default)", None, False, {"expert_form": "decoded", "dtype": torch.float32}),
]
CPU_ONLY = {"cold_reads"}  # options the CUDA runs skip
BENCH_OPTIONS = ("cold_reads", "python_misses", "split_bytes", "kernel_readahead")  # the bench's own, not load()'s
# Stated allowance past dense weights + expert bytes: what a resident model carries besides its weights on
# this machine (~27 MiB measured: first-forward kernel set-up, KV cache, tokenizer, allocator slack) plus
# the runtime's temporaries (a decode's int64 unpack buffers and read buffer, on two threads).
OVERHEAD_BYTES = 40 * 2**20
SUMMED = ("uses", "hits", "misses", "stall_seconds", "loads", "bytes_fetched", "wasted_bytes", "prefetch_loads",
          "prefetch_used", "ahead_loads", "late_prefetches", "prefetch_cancelled", "prefetch_aborted", "evictions")
LAYER_SUMMED = ("uses", "hits", "misses", "stall_seconds", "predicted", "actual", "correct")


# in the cached container's name: bumped when conversion writes something new (4: predictors; 5: budgets
# priced at the bytes the runtime holds)
CONVERT_VERSION = 5


# -- the container -----------------------------------------------------------------------------------------
def reference_container() -> Path:
    """The full reference model converted at 4.25 bits per expert weight, cached beside the checkpoint's key."""
    import prism_convert
    from prism_reference.train import reference_model

    ref = reference_model("full")
    out = CACHE / f"{ref.name}-{BITS}bit-c{CONVERT_VERSION}.prism"
    if not (out / "manifest.json").is_file():
        print(f"converting {ref} -> {out} ...", file=sys.stderr)
        prism_convert.convert(ref, out=out, bits=BITS, samples=64, eval_samples=0)
    return out


def synthetic_container(folder: Path) -> Path:
    """A random Mixtral-layout container big enough for a GPU to notice (4 layers x 8 experts of 512 x 1408,
    int4): the GPU check cannot wait for the reference model to train."""
    sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
    from containers import TINY_CONFIG, random_model, write_tiny

    config = dict(TINY_CONFIG, hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_local_experts=8,
                  vocab_size=2048, num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024)
    out = folder / "synthetic.prism"
    if not (out / "manifest.json").is_file():
        write_tiny(out, model=random_model(config), config=config, mix=[dict(kind="int", bits=4, group_size=128)],
                   shard_size_bytes=2 * 10**9)
    return out


def add_container_options(ap: argparse.ArgumentParser, synthetic_use: str) -> None:
    """--container / --synthetic, the choice every runtime benchmark offers (chosen_container reads it)."""
    ap.add_argument("--container", type=Path, help="reuse this container (default: the reference model at 4.25 bits)")
    ap.add_argument("--synthetic", action="store_true", help=f"a random 512x1408 container ({synthetic_use})")


def chosen_container(args: argparse.Namespace) -> Path:
    return args.container or (synthetic_container(CACHE) if args.synthetic else reference_container())


def bench_prompts(container: Path, synthetic: bool) -> list[torch.Tensor]:
    """Two held-out prose and two held-out code windows of 32 tokens (random tokens for a synthetic model)."""
    if synthetic:
        gen = torch.Generator().manual_seed(0)
        return [torch.randint(0, 2048, (1, 32), generator=gen) for _ in range(4)]
    from prism_convert.profiling.profiler import calibration_tokens

    out = []
    for source in ("builtin:prose", "builtin:code"):
        tokens = calibration_tokens(container, source, 2, 32, seed=1, split="heldout")
        out += [row[None] for row in tokens]
    return out


# -- measuring -----------------------------------------------------------------------------------------------
def measure(model, ids: torch.Tensor, tokens: int) -> dict:
    """One sampled generation; decode time from the first token to the last; stats of the decode steps only."""
    times, cpu = [], []  # wall clock; (this thread's, the whole process's) CPU time
    cached = hasattr(model, "stats")

    def on_token(_):
        if not times and cached:
            model.reset_stats()
        times.append(time.perf_counter())
        cpu.append((time.thread_time(), time.process_time()))

    start = time.perf_counter()
    model.generate(ids, max_new_tokens=tokens, do_sample=True, temperature=0.8, top_k=50, seed=0,
                   eos_token_id=[], on_token=on_token)
    if model_device(model).type == "cuda":
        torch.cuda.synchronize()
    out = {"prefill_seconds": times[0] - start, "prompt_tokens": ids.shape[1],
           "decode_seconds": times[-1] - times[0], "decode_tokens": len(times) - 1,
           "compute_cpu_seconds": cpu[-1][0] - cpu[0][0], "process_cpu_seconds": cpu[-1][1] - cpu[0][1]}
    if cached:
        out["stats"] = model.stats()
    return out


def model_device(model) -> torch.device:
    return model.embed_tokens.weight.device


def add_stats(total: dict, s: dict) -> None:
    for k in SUMMED:
        total[k] = total.get(k, 0) + s[k]
    layers = total.setdefault("layers", {})
    for i, x in s["layers"].items():
        acc = layers.setdefault(int(i), {})
        for k in LAYER_SUMMED:
            acc[k] = acc.get(k, 0) + x[k]
    total["residency"] = s["residency"]
    total["predictor_layers"] = s.get("predictor_layers", [])


def summarise(name: str, runs: list[list[dict]], stats: dict | None) -> dict:
    """runs: per repeat, the measurements of every prompt."""
    per_repeat = [sum(m["decode_tokens"] for m in r) / sum(m["decode_seconds"] for m in r) for r in runs]
    prefill = [sum(m["prompt_tokens"] for m in r) / sum(m["prefill_seconds"] for m in r) for r in runs]
    decode_seconds = sum(m["decode_seconds"] for r in runs for m in r)
    decode_tokens = sum(m["decode_tokens"] for r in runs for m in r)
    cpu = {k: sum(m[k] for r in runs for m in r) for k in ("compute_cpu_seconds", "process_cpu_seconds")}
    out = {"name": name, "decode_tokens_per_second": statistics.median(per_repeat),
           "decode_tokens_per_second_repeats": per_repeat, "prefill_tokens_per_second": statistics.median(prefill),
           "decode_tokens": decode_tokens, "decode_seconds": decode_seconds,
           "compute_cpu_ms_per_token": 1e3 * cpu["compute_cpu_seconds"] / decode_tokens,
           "process_cpu_ms_per_token": 1e3 * cpu["process_cpu_seconds"] / decode_tokens}
    if stats:
        uses = stats["uses"]
        out |= {k: stats[k] for k in SUMMED}
        out |= {"hit_rate": stats["hits"] / uses if uses else None,
                "misses_per_token": stats["misses"] / decode_tokens,
                "stall_share": stats["stall_seconds"] / decode_seconds,
                "bytes_fetched_per_token": stats["bytes_fetched"] / decode_tokens,
                "residency": stats["residency"], "predictor_layers": stats.get("predictor_layers", [])}
        layers = {}
        for i, x in sorted(stats["layers"].items()):
            layers[i] = {"hit_rate": x["hits"] / x["uses"] if x["uses"] else None,
                         "recall": x["correct"] / x["actual"] if x["actual"] else None,
                         "precision": x["correct"] / x["predicted"] if x["predicted"] else None,
                         "stall_seconds": x["stall_seconds"]}
        out["layers"] = layers
        predicted = sum(x["predicted"] for x in stats["layers"].values())
        actual = sum(x["actual"] for x in stats["layers"].values())
        correct = sum(x["correct"] for x in stats["layers"].values())
        out["prefetch_recall"] = correct / actual if actual else None
        out["prefetch_precision"] = correct / predicted if predicted else None
    return out


@functools.cache
def expert_tier_bytes(container: Path) -> int:
    """What every expert takes in the fast tier (packed): the total that "50%" budgets are shares of."""
    return prism_load.load(container, expert_cache="100%", prefetch=False).stats()["expert_bytes_total"]


def load_options(budget, prefetch: bool, options: dict) -> dict:
    """prism_load.load's keywords for one configuration (BENCH_OPTIONS are the bench's own: cold_reads;
    python_misses, which turns the native miss path off for that model; split_bytes, that path's split read
    threshold)."""
    kw = {k: v for k, v in options.items() if k not in BENCH_OPTIONS}
    return kw if budget is None else {"expert_cache": budget, "prefetch": prefetch, **kw}


def cold_reads(model) -> None:
    """Every expert read of this model comes from the disk: the container's shards leave the page cache now,
    and each read's pages right after it (posix_fadvise DONTNEED), so a miss costs a real read."""
    store = model.runtime.cache.store
    c = store.container
    for i, shard in enumerate(c.manifest.expert_shards):
        with c.shard_fd(i) as fd:
            os.posix_fadvise(fd, 0, shard.bytes, os.POSIX_FADV_DONTNEED)

    def dropping(read):
        def wrapped(layer, expert, *args, **kwargs):
            out = read(layer, expert, *args, **kwargs)
            r = c.record(layer, expert)
            with c.shard_fd(r.shard) as fd:
                os.posix_fadvise(fd, r.offset, r.length, os.POSIX_FADV_DONTNEED)
            return out
        return wrapped

    store.read_into, store.fetch = dropping(store.read_into), dropping(store.fetch)
    model.runtime.cache.drop_read_pages = True  # the native miss path's reads (runtime/native_misses.py)


def run_speed(container: Path, device: str, prompts: list[torch.Tensor], tokens: int, repeats: int,
              configs=CONFIGS) -> list[dict]:
    models = {}
    for name, budget, prefetch, options in configs:
        if device != "cpu" and CPU_ONLY & set(options):
            continue
        models[name] = prism_load.load(container, device=device, **load_options(budget, prefetch, options))
        if options.get("cold_reads"):
            cold_reads(models[name])
        if options.get("python_misses"):
            models[name].runtime.cache.native_allowed = False
        if "split_bytes" in options:
            models[name].runtime.cache.native_split_bytes = options["split_bytes"]
        if options.get("kernel_readahead"):
            models[name].runtime.cache.store.container.read_randomly(False)
    prompts = [p.to(device) for p in prompts]
    for model in models.values():
        measure(model, prompts[0], 8)  # warm up: first-call costs, a cache in its steady state
    runs = {name: [] for name in models}
    stats = {name: {} for name in models}
    names = list(models)
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            ms = [measure(models[name], p, tokens) for p in prompts]
            runs[name].append(ms)
            for m in ms:
                if "stats" in m:
                    add_stats(stats[name], m["stats"])
            print(f"  repeat {r + 1}/{repeats} {name}: "
                  f"{sum(m['decode_tokens'] for m in ms) / sum(m['decode_seconds'] for m in ms):.1f} tokens/s",
                  file=sys.stderr)
    for m in models.values():
        if hasattr(m, "runtime"):
            m.runtime.close()
    return [summarise(name, runs[name], stats[name] or None) for name in names]


def decode_loop(container: str, stop, count) -> None:
    """Load the container's experts round-robin until stopped, as prism's prefetch worker loads one (a read,
    then the decode straight into a fast-tier buffer), counting them."""
    from prism_load.container.reader import Container, model_args
    from prism_load.runtime.container_store import ContainerStore
    from prism_load.runtime.tiers import footprint

    torch.set_num_threads(1)
    with Container(Path(container)) as c:
        store = ContainerStore(c, model_args(c.config)[1])
        buf = torch.empty(footprint(max(store.nbytes(r.layer, r.expert) for r in c.records)), dtype=torch.uint8)
        while not stop.is_set():
            r = c.records[count.value % len(c.records)]
            store.decode_into(r.layer, r.expert, store.fetch(r.layer, r.expert), lambda n: buf[:n])
            with count.get_lock():
                count.value += 1


def overlap_probe(container: Path, prompt: torch.Tensor, tokens: int) -> dict:
    """Can a second core decode experts without slowing the compute? Resident decode tokens/s alone, then while
    a background *thread* decodes experts in a loop (what prism's CPU prefetch worker is), then while a
    background *process* does (no shared interpreter lock), with each decoder's rate. The thread-vs-process
    gap is what the interpreter lock costs; what remains in the process case is the hardware (memory
    bandwidth, shared caches)."""
    import multiprocessing
    import threading

    model = prism_load.load(container)
    measure(model, prompt, 8)

    def rate(ms):
        return sum(m["decode_tokens"] for m in ms) / sum(m["decode_seconds"] for m in ms)

    def alongside(worker, stop, count, ready=lambda: None):
        worker.start()
        ready()
        start, before = time.perf_counter(), count.value
        busy = [measure(model, prompt, tokens) for _ in range(2)]
        seconds, done = time.perf_counter() - start, count.value - before
        stop.set()
        worker.join()
        return rate(busy), done / seconds

    alone = rate([measure(model, prompt, tokens) for _ in range(2)])
    ctx = multiprocessing.get_context("spawn")
    stop, count = threading.Event(), ctx.Value("l", 0)
    thread_rate, thread_decodes = alongside(
        threading.Thread(target=decode_loop, args=(str(container), stop, count), daemon=True), stop, count)
    stop, count = ctx.Event(), ctx.Value("l", 0)

    def started():  # the child's imports are not decode work: wait for its first expert
        while count.value == 0:
            time.sleep(0.01)

    process_rate, process_decodes = alongside(
        ctx.Process(target=decode_loop, args=(str(container), stop, count), daemon=True), stop, count, started)
    return {"alone_tokens_per_second": alone,
            "with_decoder_tokens_per_second": thread_rate, "decoder_experts_per_second": thread_decodes,
            "with_decoder_process_tokens_per_second": process_rate,
            "decoder_process_experts_per_second": process_decodes}


RSS_CODE = """
import json, threading, time, torch
torch.set_num_threads({threads})
import prism_load
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
peak, stop = [0], threading.Event()
def sample():
    while not stop.is_set():
        peak[0] = max(peak[0], rss())
        time.sleep(0.002)
import prism_load.container.loader, prism_load.hub, prism_load.packed, prism_load.runtime, tokenizers  # noqa: E401 - imports
from prism_load.container.reader import Container, model_args
torch.nn.functional.linear(torch.randn(4, 64), torch.randn(64, 64))  # BLAS set up before the baseline, and
with Container({container!r}) as c:  # the one-time lazy imports of a first (meta-device) model build
    prism_load.container.loader.build_skeleton(*model_args(c.config))
ids = torch.tensor({ids})
before = rss()
sampler = threading.Thread(target=sample, daemon=True)
sampler.start()
model = prism_load.load({container!r}, **{kw})
dense = prism_load.packed.dense_nbytes(model)
loaded = rss()
model.generate(ids, max_new_tokens={tokens}, eos_token_id=[])
stop.set()
sampler.join()
cache = model.runtime.cache if hasattr(model, "runtime") else None
print(json.dumps({{"before": before, "loaded": loaded, "after": rss(), "peak": max(peak[0], rss()),
                  "dense_bytes": dense, "held_bytes": None if cache is None else cache.decoded_bytes(),
                  "budget_bytes": None if cache is None else cache.budget_bytes}}))
"""


def run_memory(container: Path, prompt: torch.Tensor, tokens: int, threads: int, expert_bytes: int) -> list[dict]:
    """Each configuration in a fresh process: peak RSS growth past the imports vs dense + budget + overhead."""
    out = []
    for name, budget, prefetch, options in CONFIGS:
        if {"lookahead", "predictor", *BENCH_OPTIONS} & set(options):  # the same memory as another row's
            continue
        kw = load_options(budget, prefetch, options)
        result, _ = run_measured(RSS_CODE.format(threads=threads, ids=prompt.tolist(), kw=kw,
                                                 container=str(container), tokens=tokens))
        growth = result["peak"] - result["before"]  # ru_maxrss would be the import's transient peak
        experts = expert_bytes if result["budget_bytes"] is None else result["budget_bytes"]
        row = {"name": name, "growth_bytes": growth, "expert_allowance_bytes": experts, **result,
               "overhead_bytes": growth - result["dense_bytes"] - experts,
               "allowance_bytes": result["dense_bytes"] + experts + OVERHEAD_BYTES}
        row["within"] = growth <= row["allowance_bytes"]
        out.append(row)
    return out


HEADROOM = [("50%", "next-use"), ("50%", "frequency"), ("25%", "next-use"), ("25%", "frequency")]


def eviction_headroom(container: Path, prompts: list[torch.Tensor], tokens: int) -> list[dict]:
    """Each (budget, eviction order) of HEADROOM decodes the prompts once more (as measure does, prefill
    included) with the cache's routing recorded; Belady's rule replays that routing from the same resident set
    (bench/eviction_oracle.py): the misses any order could have saved. On the CPU, on demand."""
    out = []
    for budget, eviction in HEADROOM:
        model = prism_load.load(container, expert_cache=budget, prefetch=False, eviction=eviction)
        measure(model, prompts[0], 8)  # warm up as run_speed does
        cache = model.runtime.cache
        start, cache.route_log = cache.resident_keys(), []
        model.reset_stats()
        for p in prompts:
            model.generate(p, max_new_tokens=tokens, do_sample=True, temperature=0.8, top_k=50, seed=0,
                           eos_token_id=[])
        s = model.stats()
        nbytes = {k: footprint(cache.store.nbytes(*k)) for k in cache.keys}
        oracle = belady_misses_by_layer(cache.route_log, nbytes, cache.budget_bytes, start)
        out.append({"budget": budget, "eviction": eviction, "uses": s["uses"], "misses": s["misses"],
                    "oracle_misses": sum(oracle.values()), "steps": len(cache.route_log),
                    # layer -> [the order's misses, the oracle's]: where the misses an order could save are
                    "layers": {i: [s["layers"][i]["misses"], oracle[i]] for i in cache.store.moe_layers}})
        model.runtime.close()
    return out


# -- report --------------------------------------------------------------------------------------------------
def headroom_where(h: dict) -> str:
    """Which MoE layer holds most of the misses an order could save (its share of the gap to the oracle)."""
    layers = {int(i): mo for i, mo in h["layers"].items()}  # int keys, or strings read back from the JSON
    gaps = {i: m - o for i, (m, o) in layers.items()}
    total = sum(gaps.values())
    if total <= 0:
        return f"At {h['budget']} ({h['eviction']}) the order missed no more often than the oracle."
    worst = max(gaps, key=gaps.get)
    m, o = layers[worst]
    return (f"Where the misses an order could save are, at {h['budget']} ({h['eviction']}): {gaps[worst] / total:.0%} "
            f"of them in MoE layer {worst} ({m:,} misses against the oracle's {o:,}).")


def _pct(x) -> str:
    return "-" if x is None else f"{x:.0%}"


def markdown(result: dict) -> str:
    speed = {r["name"]: r for r in result["speed"]}
    base = speed["resident"]["decode_tokens_per_second"]
    lines = [f"# Runtime benchmark ({result['device']}, {result['threads']} compute thread(s), "
             f"{result['tokens']} decode tokens x {result['prompts']} prompts x {result['repeats']} repeats)", "",
             f"Container: `{result['container']}` ({result['expert_bytes'] / 2**20:.1f} MiB of packed experts in the fast tier). "
             f"Load average before / after: {result['load_before']} / {result['load_after']}.", "",
             "| configuration | decode tok/s | vs resident | CPU ms/token: compute thread / all | hit rate "
             "| misses/token | stalled | recall | precision | wasted MiB | MiB fetched/token |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["speed"]:
        tps = r["decode_tokens_per_second"]
        cpu = f"{r['compute_cpu_ms_per_token']:.2f} / {r['process_cpu_ms_per_token']:.2f}"
        if "hit_rate" not in r:
            lines.append(f"| {r['name']} | {tps:.1f} | 1.00x | {cpu} | - | - | - | - | - | - | - |")
            continue
        lines.append(f"| {r['name']} | {tps:.1f} | {tps / base:.2f}x | {cpu} | {_pct(r['hit_rate'])} | "
                     f"{r['misses_per_token']:.2f} | {_pct(r['stall_share'])} | {_pct(r.get('prefetch_recall'))} | "
                     f"{_pct(r.get('prefetch_precision'))} | {r['wasted_bytes'] / 2**20:.2f} | "
                     f"{r['bytes_fetched_per_token'] / 2**20:.3f} |")
    t = result["targets"]
    if not t or "cache 50%, prefetch, shadow router only" not in speed:  # --only: the table is all there is
        return "\n".join(lines) + "\n"
    on_demand = (f"; on demand (the CPU's default) {t['on_demand_vs_resident']:.2f}x resident"
                 if "on_demand_vs_resident" in t else "")
    lines += ["", f"Targets (50% cache): prefetch {t['prefetch_vs_resident']:.2f}x resident (target >= 0.8x), "
              f"{t['prefetch_vs_on_demand']:.2f}x on demand (target >= 1.5x){on_demand}.", "",
              "Prefetch per MoE layer (50% cache): recall / precision / hit rate with the container's fitted "
              "predictors where it has them (the default), and recall / hit rate with the shadow router only", "",
              "| layer | predicted by | recall | precision | hit rate | shadow only: recall | hit rate |",
              "|---|---|---|---|---|---|---|"]
    fitted = {j for j, _ in speed["cache 50%, prefetch"].get("predictor_layers", [])}
    shadow_only = speed["cache 50%, prefetch, shadow router only"]["layers"]
    for i, x in speed["cache 50%, prefetch"]["layers"].items():
        y = shadow_only[i]
        by = "-" if x["recall"] is None else ("fitted predictor" if int(i) in fitted else "shadow router")
        lines.append(f"| {i} | {by} | {_pct(x['recall'])} | {_pct(x['precision'])} | {_pct(x['hit_rate'])} | "
                     f"{_pct(y['recall'])} | {_pct(y['hit_rate'])} |")
    demand = speed["cache 50%, on demand"]
    miss_ms = 1e3 * demand["stall_seconds"] / max(demand["misses"], 1)
    pre = speed["cache 50%, prefetch"]
    lines += ["", f"A miss costs {miss_ms:.2f} ms on demand (stall per miss, 50% cache): "
              f"{miss_ms / (1e3 / base):.0%} of a resident decode token ({1e3 / base:.2f} ms, "
              f"{1e3 / base / len(pre['layers']):.2f} ms per MoE layer). "
              f"With prefetch, {pre['late_prefetches']:,} of the fetch worker's "
              f"{pre['prefetch_loads'] + pre['ahead_loads']:,} loads ({pre['prefetch_loads']:,} predicted, "
              f"{pre['ahead_loads']:,} of a step's other missing experts) were still loading when their layer asked "
              "for them (late)."]
    if result.get("overlap"):
        o = result["overlap"]
        lines.append(f"Overlap probe: resident decode {o['alone_tokens_per_second']:.1f} tokens/s alone, "
                     f"{o['with_decoder_tokens_per_second']:.1f} while another thread decodes experts "
                     f"({o['decoder_experts_per_second']:.0f} experts/s) — what prism's prefetch thread costs the "
                     f"compute — and {o['with_decoder_process_tokens_per_second']:.1f} while another process does "
                     f"({o['decoder_process_experts_per_second']:.0f} experts/s): the gap between the two is the "
                     "interpreter lock.")
    if result.get("headroom"):
        lines += ["", "Eviction against the oracle: each order decodes the prompts once more (prefill included) with "
                  "its routing recorded, and Belady's rule (evict the expert used furthest ahead) replays that "
                  "routing with the future known, from the same resident set (bench/eviction_oracle.py)", "",
                  "| cache | eviction | expert uses | misses | oracle's misses on the same routing | "
                  "misses an order could still save | by MoE layer: misses / oracle's |", "|---|---|---|---|---|---|---|"]
        for h in result["headroom"]:
            by_layer = ", ".join(f"{i}: {m:,} / {o:,}" for i, (m, o) in h.get("layers", {}).items())
            lines.append(f"| {h['budget']} | {h['eviction']} | {h['uses']:,} | {h['misses']:,} | "
                         f"{h['oracle_misses']:,} | {1 - h['oracle_misses'] / max(h['misses'], 1):.0%} | {by_layer} |")
        if result["headroom"][0].get("layers"):
            lines += ["", headroom_where(result["headroom"][0])]
    if result.get("memory"):
        lines += ["", "Resident set, a fresh process per configuration: growth = peak RSS (sampled every 2 ms) - RSS "
                  "after imports and a first model build; experts = the cache budget (all packed experts when "
                  f"resident); overhead = growth - dense - experts; allowance = dense + experts + "
                  f"{OVERHEAD_BYTES // 2**20} MiB.", "",
                  "| configuration | growth MiB | dense MiB | experts MiB | overhead MiB | allowance MiB | within |",
                  "|---|---|---|---|---|---|---|"]
        for m in result["memory"]:
            lines.append(f"| {m['name']} | {m['growth_bytes'] / 2**20:.1f} | {m['dense_bytes'] / 2**20:.1f} | "
                         f"{m['expert_allowance_bytes'] / 2**20:.1f} | {m['overhead_bytes'] / 2**20:.1f} | "
                         f"{m['allowance_bytes'] / 2**20:.1f} | {'yes' if m['within'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_container_options(ap, "GPU check")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch compute threads (the fetch worker uses one more)")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-memory", action="store_true", help="skip the fresh-process RSS measurements")
    ap.add_argument("--name", default="runtime", help="results file name (bench/results/NAME.json)")
    ap.add_argument("--only", help="measure only these configurations (names separated by ';'; the resident one "
                    "always, as every ratio's base) and none of the probes (memory, overlap, eviction oracle)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    container = chosen_container(args)
    prompts = bench_prompts(container, args.synthetic)
    configs = CONFIGS
    if args.only:
        wanted = {"resident", *(n.strip() for n in args.only.split(";"))}
        unknown = wanted - {c[0] for c in CONFIGS}
        if unknown:
            ap.error(f"--only: no configuration named {sorted(unknown)}")
        configs = [c for c in CONFIGS if c[0] in wanted]
    probes = args.device == "cpu" and not args.only
    load_before = os.getloadavg()
    speed = run_speed(container, args.device, prompts, args.tokens, args.repeats, configs)
    expert_bytes = expert_tier_bytes(container)
    memory = None if args.no_memory or not probes else run_memory(container, prompts[0], args.tokens, args.threads,
                                                                  expert_bytes)
    overlap = overlap_probe(container, prompts[0].to(args.device), args.tokens) if probes else None
    headroom = eviction_headroom(container, prompts, args.tokens) if probes else None
    by = {r["name"]: r["decode_tokens_per_second"] for r in speed}
    targets = {}
    if {"cache 50%, prefetch", "cache 50%, on demand"} <= set(by):
        targets = {"prefetch_vs_resident": by["cache 50%, prefetch"] / by["resident"],
                   "prefetch_vs_on_demand": by["cache 50%, prefetch"] / by["cache 50%, on demand"],
                   "on_demand_vs_resident": by["cache 50%, on demand"] / by["resident"]}
        targets["met"] = targets["prefetch_vs_resident"] >= 0.8 and targets["prefetch_vs_on_demand"] >= 1.5
    result = {"container": str(container), "device": args.device, "threads": args.threads, "tokens": args.tokens,
              "prompts": len(prompts), "repeats": args.repeats, "expert_bytes": expert_bytes,
              "load_before": [round(x, 2) for x in load_before],
              "load_after": [round(x, 2) for x in os.getloadavg()], "speed": speed, "memory": memory,
              "overlap": overlap, "headroom": headroom,
              "targets": targets}
    path = write_report(args.name, result, markdown(result))
    print(markdown(result))
    print(f"wrote {path}", file=sys.stderr)
    json.dumps(result)  # fail loudly here rather than on a reader's machine


if __name__ == "__main__":
    main()

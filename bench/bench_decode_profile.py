"""Where a decode step's time goes (issue 14, part 4): torch.profiler over greedy decode of a resident container.

Loads a container with the runtime's defaults (experts packed, bf16), decodes a few untimed tokens, then
profiles `--tokens` decode steps. The native kernels are ctypes calls the profiler cannot see, so this script
wraps each in a `record_function` range ("prism::native_int_linear", "prism::native_decode_layers", ...); every
other row is an aten op. The table
splits a token's wall time into the native expert kernels, aten ops (self time, so nothing is counted twice)
and the rest: Python between ops, the runtime's bookkeeping, the profiler's own cost per event (stated: the
same decode without the profiler is timed first). Writes bench/results/NAME.json and NAME.md.

    python bench/bench_decode_profile.py [--container PATH] [--tokens 32] [--threads 2] [--name decode_profile]

Without --container it profiles the reference model at 4.25 bits (bench_runtime's container).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from common import write_report

import prism_load
from prism_load import native

NATIVE_RANGE = "prism::native_int_linear"  # the int kernels: experts and int dense layers (exact or int8 activations)
DENSE_RANGE = "prism::native_bf16_linear"  # the dense bf16 matrix-vector kernel
BLOCK_RANGE = "prism::native_expert_block"  # a decode token's routed experts in one call (expert_block.c)
ATTENTION_RANGE = "prism::native_attention_decode"  # a decode token's attention in one call (attention_decode.c)
LAYER_RANGE = "prism::native_decode_layer"  # a layer's norms, attention and routing in one call (decode_layer.c)
TOKEN_RANGE = "prism::native_decode_layers"  # every layer of a resident model's token in one call (decode_layer.c)
RANGES = (NATIVE_RANGE, DENSE_RANGE, BLOCK_RANGE, ATTENTION_RANGE, LAYER_RANGE, TOKEN_RANGE)


def _traced(inner, name: str):
    def traced(*args, **kwargs):
        with torch.profiler.record_function(name):
            return inner(*args, **kwargs)

    return traced


def wrap_native() -> None:
    """Name the native kernels' calls for the profiler (a ctypes call is invisible to it otherwise): the bound
    call and the gate/up pair call, int_linear itself (other threads, odd inputs) and the dense bf16 kernel."""
    native.int_linear = _traced(native.int_linear, NATIVE_RANGE)
    native.BoundIntLinear.__call__ = _traced(native.BoundIntLinear.__call__, NATIVE_RANGE)
    native.BoundIntLinear.pair = _traced(native.BoundIntLinear.pair, NATIVE_RANGE)  # gate and up in one call
    native.bf16_linear = _traced(native.bf16_linear, DENSE_RANGE)
    fn = native.build.load()[0]
    if fn is not None:  # the ctypes entry itself, so the wrapper's conversions count as the aten ops they are
        fn.expert_block = _traced(fn.expert_block, BLOCK_RANGE)
        fn.attention_decode = _traced(fn.attention_decode, ATTENTION_RANGE)
        fn.decode_layer = _traced(fn.decode_layer, LAYER_RANGE)
        fn.decode_layers = _traced(fn.decode_layers, TOKEN_RANGE)  # a served loop's callbacks' Python inside


def decode(model, prompt: torch.Tensor, tokens: int) -> float:
    """Seconds per decode token after the prompt (greedy, KV-cached), prefill excluded."""
    start = time.perf_counter()
    model.generate(prompt, max_new_tokens=1, eos_token_id=[])
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    model.generate(prompt, max_new_tokens=tokens + 1, eos_token_id=[])
    return (time.perf_counter() - start - prefill) / tokens


def profile(model, prompt: torch.Tensor, tokens: int):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        model.generate(prompt, max_new_tokens=tokens + 1, eos_token_id=[])
        wall = time.perf_counter() - start
    return prof.key_averages(), wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--container", type=Path)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--top", type=int, default=12, help="ops listed by self time")
    ap.add_argument("--name", default="decode_profile")
    ap.add_argument("--expert-kernel", default="auto", help="load()'s expert_kernel (e.g. native-int8)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.container is None:
        from bench_runtime import reference_container

        args.container = reference_container()
    wrap_native()
    model = prism_load.load(args.container, expert_kernel=args.expert_kernel)
    vocab = model.args.vocab_size
    prompt = (torch.arange(args.prompt_tokens)[None] * 7919) % vocab
    decode(model, prompt, 4)  # untimed: builds the kernel, warms the allocator
    plain = min(decode(model, prompt, args.tokens) for _ in range(3))
    # prefill apart: profile a 1-token generate and subtract its events, so the table is decode only
    profile(model, prompt, 0)  # untimed: the profiler's first session pays its own start-up
    prefill_avgs, prefill_wall = profile(model, prompt, 0)
    avgs, wall = profile(model, prompt, args.tokens)
    pre = {e.key: (e.self_cpu_time_total, e.count) for e in prefill_avgs}
    rows = []
    for e in avgs:
        self_us = e.self_cpu_time_total - pre.get(e.key, (0, 0))[0]
        calls = e.count - pre.get(e.key, (0, 0))[1]
        if calls > 0:
            rows.append({"op": e.key, "self_us_per_token": self_us / args.tokens, "calls_per_token": calls / args.tokens})
    rows.sort(key=lambda r: -r["self_us_per_token"])
    per_token_us = (wall - prefill_wall) / args.tokens * 1e6
    ranges_us = {name: sum(r["self_us_per_token"] for r in rows if r["op"] == name) for name in RANGES}
    aten_us = sum(r["self_us_per_token"] for r in rows if r["op"] not in RANGES)
    events = sum(r["calls_per_token"] for r in rows)
    result = {
        "container": str(args.container), "threads": args.threads, "tokens": args.tokens,
        "dtype": str(next(model.parameters()).dtype), "decode_ms_per_token": plain * 1e3,
        "expert_kernel": args.expert_kernel,
        "profiled_ms_per_token": per_token_us / 1e3, "native_kernel_ms": ranges_us[NATIVE_RANGE] / 1e3,
        "dense_kernel_ms": ranges_us[DENSE_RANGE] / 1e3, "expert_block_ms": ranges_us[BLOCK_RANGE] / 1e3,
        "attention_ms": ranges_us[ATTENTION_RANGE] / 1e3, "layer_step_ms": ranges_us[LAYER_RANGE] / 1e3,
        "token_layers_ms": ranges_us[TOKEN_RANGE] / 1e3, "aten_ms": aten_us / 1e3,
        "rest_ms": (per_token_us - sum(ranges_us.values()) - aten_us) / 1e3, "events_per_token": events,
        "ops": rows[: args.top],
    }
    path = write_report(args.name, result, markdown(result))
    print(markdown(result))
    print(f"wrote {path}")


def markdown(r: dict) -> str:
    total = r["profiled_ms_per_token"]

    def share(ms):
        return f"{ms:.3f} ms ({ms / total:.0%})"

    lines = [f"# Where a decode token's time goes ({Path(r['container']).name}, {r['threads']} threads, "
             f"{r['dtype']}, {r['tokens']} tokens)", "",
             f"Decode without the profiler: {r['decode_ms_per_token']:.3f} ms per token; under it "
             f"{total:.3f} ms ({r['events_per_token']:.0f} profiled events per token).", "",
             "| part | per token |", "|---|---|",
             f"| native decoder layers (a resident model's whole token: one call) | {share(r.get('token_layers_ms', 0.0))} |",
             f"| native layer step (norms, attention, routing: one call a layer) | {share(r.get('layer_step_ms', 0.0))} |",
             f"| native attention (projections, rotary, cache, attention: one call a layer) | {share(r.get('attention_ms', 0.0))} |",
             f"| native expert block (a token's routed experts, one call a layer) | {share(r.get('expert_block_ms', 0.0))} |",
             f"| native int kernel (experts; int dense layers) ({r.get('expert_kernel', 'auto')}) | {share(r['native_kernel_ms'])} |",
             f"| native dense bf16 kernel | {share(r.get('dense_kernel_ms', 0.0))} |",
             f"| aten ops (self time) | {share(r['aten_ms'])} |",
             f"| Python, runtime bookkeeping, profiler | {share(r['rest_ms'])} |", "",
             "| op | self µs per token | calls per token |", "|---|---|---|"]
    lines += [f"| {o['op']} | {o['self_us_per_token']:.1f} | {o['calls_per_token']:.1f} |" for o in r["ops"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

"""Matmul kernels on expert-shaped weights: prism's native `int` kernel (prism_load/native) against stock torch.

y = x @ w.T for w [N, K] at M rows of x, on the same threads: native int2, int4 and int8 on the container's
stored bytes (fp32 x, exact), the same with x rounded to int8 per group (expert_kernel="native-int8"; VNNI
where the CPU has it, else AVX2, named in the results), the runtime's dense bf16 product (linear(): prism's
bf16 kernel up to 4 rows, torch beyond), torch's tinygemm int4 (`_weight_int4pack_mm_for_cpu`, bf16 x, its own packed layout), torch's
int8 (`_weight_int8pack_mm`, per-row scales), and dense fp32 and bf16 F.linear. Methods are timed round-robin
(each round calls every method once, in a rotated order) so a shared machine's load falls on all alike; the
figure is the median over rounds. GB/s counts the bytes of each method's weight representation (codes plus
scales and zeros) once per call; the timed call follows an untimed one, so the weights are in cache (the
last-level cache holds one shape's weights for one method at a time); a second table times M=1 with the
weights coming from DRAM, as for an expert just fetched. Also measured: the Python cost of one tiny call,
the first-use compile time, and a torch matmul right after a native call (one OpenMP pool: no
oversubscription).

Writes bench/results/kernels.json and bench/results/kernels.md.

    python bench/bench_kernels.py [--threads 2] [--group 64] [--rounds 15] [--shapes 5632x1024,...] [--m 1,16,64]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F
from common import RESULTS, machine
from rich.console import Console
from rich.table import Table

from prism_load import native
from prism_load.container.codecs import pack_bits
from prism_load.models.linear import linear

SHAPES = "768x192,192x384,5632x1024,1024x2816,22528x1024,1024x11264"  # N x K (out x in)
METHODS = ["native int2", "native int4", "native int8", "native int4, int16 x", "native int8, int16 x",
           "native int4, int8 x", "native int8, int8 x", "torch int4 (tinygemm)", "torch int8", "fp32 F.linear",
           "bf16 F.linear", "bf16 linear()"]


def int_weights(n: int, k: int, bits: int, g: int, gen: torch.Generator) -> dict:
    q = torch.randint(0, 2**bits, (n, k), dtype=torch.uint8, generator=gen)
    scales = ((torch.rand(n, k // g, generator=gen) + 0.5) / 2**bits / 8).half()
    zeros = (torch.rand(n, k // g, generator=gen) * (2**bits - 1)).half()
    return {"q": q, "qweight": pack_bits(q, bits), "scales": scales, "zeros": zeros}


def dequantize(w: dict, g: int) -> torch.Tensor:
    s = w["scales"].float().repeat_interleave(g, 1)
    return (w["q"].float() - w["zeros"].float().repeat_interleave(g, 1)) * s  # [N, K]


def method(name: str, n: int, k: int, x: torch.Tensor, g: int, gen: torch.Generator):
    """(zero-argument call computing x @ w.T, bytes of its weight representation) for a fresh random w."""
    m, groups = x.shape[0], 4 * n * (k // g)  # fp16 scale + zero per group
    out = torch.empty(m, n)
    if name.startswith("native"):
        bits = int(name.removeprefix("native int").split(",")[0])
        w = int_weights(n, k, bits, g, gen)
        # x rounded to int16 / int8 per group, integer products (expert_kernel="native-int16" / "native-int8")
        activations = name.split(", ")[1].removesuffix(" x") if ", " in name else "fp32"
        return (lambda: native.int_linear(x, w["qweight"], w["scales"], w["zeros"], bits, g, k, out=out,
                                          activations=activations), n * k * bits // 8 + groups)
    xb = x.bfloat16()
    if name == "torch int4 (tinygemm)":  # tinygemm dequantises (q - 8) * scale + zero: zero = (8 - z) * s
        w = int_weights(n, k, 4, g, gen)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(w["q"].to(torch.int32), 1)
        s, z = w["scales"].float(), w["zeros"].float()  # [N, G]
        scale_zero = torch.stack([s, (8 - z) * s], -1).transpose(0, 1).contiguous().bfloat16()  # [G, N, 2]
        return lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(xb, packed, g, scale_zero), n * k // 2 + groups
    if name == "torch int8":
        q8 = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=gen)
        s8 = (torch.rand(n, generator=gen) / 64).bfloat16()
        return lambda: torch.ops.aten._weight_int8pack_mm(xb, q8, s8), n * k + 2 * n
    w = dequantize(int_weights(n, k, 4, g, gen), g)
    if name == "fp32 F.linear":
        return lambda: F.linear(x, w), 4 * n * k
    w = w.bfloat16()
    if name == "bf16 linear()":  # the runtime's dense product: the native bf16 kernel up to 4 rows, torch beyond
        return lambda: linear(xb, w), 2 * n * k
    return lambda: F.linear(xb, w), 2 * n * k


def check_methods(g: int) -> None:
    """The int4 methods compute x @ w.T for the same w (tinygemm's scale/zero mapping above), native int8 too."""
    n, k = 96, 4 * g
    x = torch.randn(3, k)
    for bits, names, tol in ((2, ["native int2"], (1e-5,)),
                             (4, ["native int4", "native int4, int16 x", "torch int4 (tinygemm)"], (1e-5, 1e-4, 2e-2)),
                             (8, ["native int8", "native int8, int16 x"], (1e-5, 1e-4))):
        for name, rtol in zip(names, tol):
            fn, _ = method(name, n, k, x, g, torch.Generator().manual_seed(7))
            ref = x.double() @ dequantize(int_weights(n, k, bits, g, torch.Generator().manual_seed(7)), g).double().T
            rel = ((fn().double() - ref).norm() / ref.norm()).item()
            assert rel < rtol, f"{name} is off the reference: {rel:.2e}"


def calls(n: int, k: int, m: int, g: int) -> tuple[dict, dict]:
    """{method: call} and {method: weight bytes} for one shape (each method its own random w)."""
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(0))
    made = {name: method(name, n, k, x, g, torch.Generator().manual_seed(i)) for i, name in enumerate(METHODS)}
    return {name: fn for name, (fn, _) in made.items()}, {name: b for name, (_, b) in made.items()}


def cold(n: int, k: int, g: int, rounds: int, cache_bytes: int) -> dict:
    """M=1 with the weights coming from DRAM, as an expert just fetched: each method cycles through copies of
    its weight totalling three times the last-level cache; median over every call after the first pass."""
    x = torch.randn(1, k)
    result = {}
    for name in METHODS:
        fn, nbytes = method(name, n, k, x, g, torch.Generator().manual_seed(0))
        copies = [fn] + [method(name, n, k, x, g, torch.Generator().manual_seed(c))[0]
                         for c in range(1, -(-3 * cache_bytes // nbytes))]
        seconds = []
        for r in range(max(2, rounds // 4)):
            for f in copies:
                start = time.perf_counter()
                f()
                if r:
                    seconds.append(time.perf_counter() - start)
        us = statistics.median(seconds) * 1e6
        result[name] = {"us": us, "gb_per_s": nbytes / us / 1e3, "copies": len(copies)}
        del copies, fn
    return result


def llc_bytes() -> int:
    try:
        return os.sysconf("SC_LEVEL3_CACHE_SIZE") or 32 << 20
    except (ValueError, OSError):
        return 32 << 20


def time_round_robin(fns: dict, rounds: int) -> dict[str, list[float]]:
    names = list(fns)
    for fn in fns.values():  # warm-up: caches, OpenMP pool, first-call paths
        fn()
        fn()
    seconds = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            fns[name]()  # untimed: the weights back in cache after the other methods' calls evicted them
            start = time.perf_counter()
            fns[name]()
            seconds[name].append(time.perf_counter() - start)
    return seconds


def call_overhead_us() -> dict:
    """Python + ctypes cost of one call on a tiny weight (8 x 64), with and without `out`."""
    w = int_weights(8, 64, 4, 64, torch.Generator().manual_seed(1))
    x, out = torch.randn(1, 64), torch.empty(1, 8)
    result = {}
    for name, fn in (("int_linear", lambda: native.int_linear(x, w["qweight"], w["scales"], w["zeros"], 4, 64, 64)),
                     ("int_linear out=", lambda: native.int_linear(x, w["qweight"], w["scales"], w["zeros"], 4, 64, 64,
                                                                   out=out)),
                     ("F.linear fp32 8x64", lambda: F.linear(x, w["q"].float()))):
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(2000):
                fn()
            best = min(best, (time.perf_counter() - start) / 2000)
        result[name] = best * 1e6
    return result


def oversubscription_probe(rounds: int) -> dict:
    """A torch fp32 matmul alone and right after a native call: one OpenMP pool means no slowdown."""
    native_call, _ = method("native int4", 5632, 1024, torch.randn(1, 1024), 64, torch.Generator().manual_seed(1))
    x, w = torch.randn(64, 1024), torch.randn(5632, 1024)
    probe = {"matmul alone": lambda: F.linear(x, w), "native call": native_call,
             "native call, then matmul": lambda: (native_call(), F.linear(x, w))}
    t = {name: statistics.median(s) * 1e6 for name, s in time_round_robin(probe, rounds).items()}
    return {"matmul_alone_us": t["matmul alone"], "matmul_after_native_us": t["native call, then matmul"] - t["native call"],
            "threads_in_process": len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else None}


def markdown(result: dict) -> str:
    lines = [f"# Kernel benchmark ({result['threads']} threads, group size {result['group_size']}, "
             f"median of {result['rounds']} round-robin rounds)", "",
             f"Machine: {result['machine']['cpu']}, torch {result['machine']['torch']}; load average before / after: "
             f"{result['load_before']} / {result['load_after']}. Weights in cache (each timed call follows an untimed one). x is fp32 for native and fp32 F.linear, bf16 for "
             "tinygemm, torch int8 and bf16 F.linear. Each cell: microseconds (GB/s of weight bytes).", "",
             "| N x K | M | " + " | ".join(METHODS) + " |", "|---|---|" + "---|" * len(METHODS)]
    for row in result["rows"]:
        cells = [f"{row['us'][m]:.0f} ({row['gb_per_s'][m]:.1f})" for m in METHODS]
        lines.append(f"| {row['n']}x{row['k']} | {row['m']} | " + " | ".join(cells) + " |")
    if result["cold"]:
        lines += ["", "M = 1 with the weights coming from DRAM (each method cycles through copies of its weight "
                  "totalling 3x the last-level cache): microseconds (GB/s of weight bytes)", "",
                  "| N x K | " + " | ".join(METHODS) + " |", "|---|" + "---|" * len(METHODS)]
        for row in result["cold"]:
            cells = [f"{row[m]['us']:.0f} ({row[m]['gb_per_s']:.1f})" for m in METHODS]
            lines.append(f"| {row['n']}x{row['k']} | " + " | ".join(cells) + " |")
    o, p = result["call_overhead_us"], result["oversubscription"]
    lines += ["", f"Per-call Python overhead (tiny weight): int_linear {o['int_linear']:.1f} us, with out= "
              f"{o['int_linear out=']:.1f} us (F.linear on a tiny fp32 weight: {o['F.linear fp32 8x64']:.1f} us).",
              f"First-use compile: {result['compile_seconds']:.1f} s (0 when the kernel came from the cache).",
              f"One OpenMP pool: a 64x1024 @ 1024x5632 fp32 matmul takes {p['matmul_alone_us']:.0f} us alone and "
              f"{p['matmul_after_native_us']:.0f} us right after a native call ({p['threads_in_process']} threads in "
              "the process)."]
    return "\n".join(lines) + "\n"


def write_atomic(path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--group", type=int, default=64, help="group size (every K in --shapes must be a multiple)")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--shapes", default=SHAPES, help="N x K, comma separated")
    ap.add_argument("--m", default="1,16,64", help="rows of x, comma separated")
    ap.add_argument("--cold", default="5632x1024,1024x2816", help="N x K shapes also timed at M=1 from DRAM ('' for none)")
    ap.add_argument("--name", default="kernels", help="results file name (bench/results/NAME.json)")
    args = ap.parse_args()
    if not native.available():
        raise SystemExit(f"native kernels unavailable: {native.unavailable_reason()}")
    torch.set_num_threads(args.threads)
    console = Console()
    check_methods(args.group)
    load_before = [round(v, 2) for v in os.getloadavg()]
    rows = []
    table = Table(title=f"y = x @ w.T, {args.threads} threads, group {args.group}: us (GB/s of weight bytes)")
    for col in ["N x K", "M", *METHODS]:
        table.add_column(col, justify="right")
    for shape in filter(None, args.shapes.split(",")):
        n, k = (int(v) for v in shape.split("x"))
        for m in (int(v) for v in args.m.split(",")):
            fns, nbytes = calls(n, k, m, args.group)
            seconds = time_round_robin(fns, args.rounds)
            us = {name: statistics.median(s) * 1e6 for name, s in seconds.items()}
            gbs = {name: nbytes[name] / us[name] / 1e3 for name in fns}
            rows.append({"n": n, "k": k, "m": m, "us": us, "gb_per_s": gbs, "weight_bytes": nbytes,
                         "min_us": {name: min(s) * 1e6 for name, s in seconds.items()}})
            table.add_row(f"{n}x{k}", str(m), *(f"{us[name]:.0f} ({gbs[name]:.1f})" for name in METHODS))
            del fns
    console.print(table)
    cold_rows = [{"n": n, "k": k, **cold(n, k, args.group, args.rounds, llc_bytes())}
                 for n, k in (tuple(int(v) for v in shape.split("x")) for shape in args.cold.split(",") if shape)]
    result = {"machine": machine(), "threads": args.threads, "group_size": args.group, "rounds": args.rounds,
              "compile_seconds": native.build.load()[2], "rows": rows, "cold": cold_rows, "call_overhead_us": call_overhead_us(),
              "oversubscription": oversubscription_probe(args.rounds),
              "load_before": load_before, "load_after": [round(v, 2) for v in os.getloadavg()]}
    RESULTS.mkdir(exist_ok=True)
    write_atomic(RESULTS / f"{args.name}.json", json.dumps(result, indent=1))
    write_atomic(RESULTS / f"{args.name}.md", markdown(result))
    console.print(markdown(result).split("\n\n", 3)[-1])


if __name__ == "__main__":
    main()

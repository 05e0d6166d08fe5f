"""What an int+lowrank projection costs in the native expert block (expert_block.c, expert_block.h).

The default recipe may store a projection as an `int` base plus a low-rank correction of its residual; the
native block runs the base on its integer tiles and adds a(b x) by the exact kernel. For each shape this times
one expert's block call with its down projection plain (the base alone) and as the composite, and the same
expert called one product at a time from Python (the per-expert path such a step took before the composite:
the gate and up pair, SwiGLU, then base(h) + a(b(h))), on random weights stored as the container stores them.
Median of --repeats timed calls after a warm-up; the weights stay in the CPU's caches where they fit, so small
shapes measure the calls' overhead and large ones the weights' bytes.

    python bench/bench_lowrank_block.py [--shapes 192x384:12,1024x2816:64,4096x14336:256] [--threads 2]

Writes bench/results/NAME.json and NAME.md (NAME: --name, default lowrank_block).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from common import machine, write_report

from prism_load import native
from prism_load.container.codecs import pack_bits
from prism_load.native.expert_block import BlockOps, LowRankBound, expert_block

BASE_BITS, FACTOR_BITS, GROUP = 2, 8, 128  # the reference model's low-rank expert: a 2-bit base, int8 factors


def stored(n: int, k: int, bits: int, group: int, seed: int) -> native.BoundIntLinear:
    """A bound native operator over random codes, scales and zeros in the container's layout."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 2**bits, (n, k), dtype=torch.uint8, generator=gen)
    groups = -(-k // group)
    scales = ((torch.rand(n, groups, generator=gen) + 0.05) / 2**bits).half()
    zeros = (torch.rand(n, groups, generator=gen) * (2**bits - 1)).half()
    return native.BoundIntLinear(pack_bits(q, bits), scales, zeros, bits, group, k, activations="int16")


def timed(fn, repeats: int) -> float:
    """Median seconds of one call of fn, after three untimed ones."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(hidden: int, inter: int, rank: int, repeats: int) -> dict:
    gate, up = stored(inter, hidden, BASE_BITS, GROUP, 1), stored(inter, hidden, BASE_BITS, GROUP, 2)
    base = stored(hidden, inter, BASE_BITS, GROUP, 3)
    b = stored(rank, inter, FACTOR_BITS, GROUP, 4)
    a = stored(hidden, rank, FACTOR_BITS, min(GROUP, rank), 5)
    plain, composite = BlockOps(gate, up, base), BlockOps(gate, up, LowRankBound(base, b, a))
    x, w = torch.randn(1, hidden, generator=torch.Generator().manual_seed(0)), torch.ones(1)

    def one_by_one():
        g, u = gate.pair(up, x)
        h = F.silu(g) * u
        return base(h) + a(b(h))

    return {"hidden": hidden, "intermediate": inter, "rank": rank,
            "plain_ms": 1e3 * timed(lambda: expert_block(x, [plain], w), repeats),
            "composite_ms": 1e3 * timed(lambda: expert_block(x, [composite], w), repeats),
            "one_by_one_ms": 1e3 * timed(one_by_one, repeats),
            "factor_share": rank * (hidden + inter) * FACTOR_BITS / (3 * hidden * inter * BASE_BITS)}


def markdown(result: dict) -> str:
    lines = [f"# An int+lowrank down projection in the native expert block ({result['threads']} threads, median of "
             f"{result['repeats']} calls)", "",
             f"One expert: gate, up and down {BASE_BITS}-bit (group {GROUP}); the composite's down adds factors "
             f"b [rank, I] and a [H, rank] at {FACTOR_BITS} bits. CPU: {result['machine']['cpu']}.", "",
             "| H x I | rank | block, plain down | block, int+lowrank down | composite / plain | factors' bytes "
             "/ the expert's | one product at a time from Python |", "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['hidden']} x {r['intermediate']} | {r['rank']} | {r['plain_ms']:.3f} ms | "
                     f"{r['composite_ms']:.3f} ms | {r['composite_ms'] / r['plain_ms']:.2f}x | "
                     f"{100 * r['factor_share']:.1f}% | {r['one_by_one_ms']:.3f} ms |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="192x384:12,1024x2816:64,4096x14336:256",
                    help="HIDDENxINTERMEDIATE:RANK, comma-separated")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--name", default="lowrank_block")
    args = ap.parse_args()
    if not native.available():
        raise SystemExit(f"native kernels unavailable: {native.unavailable_reason()}")
    torch.set_num_threads(args.threads)
    rows = []
    for spec in args.shapes.split(","):
        dims, rank = spec.split(":")
        hidden, inter = (int(v) for v in dims.split("x"))
        rows.append(measure(hidden, inter, int(rank), args.repeats))
        print(markdown({"threads": args.threads, "repeats": args.repeats, "machine": machine(), "rows": rows[-1:]}).splitlines()[-1])
    result = {"threads": args.threads, "repeats": args.repeats, "machine": machine(), "rows": rows}
    write_report(args.name, result, markdown(result))
    print(f"wrote bench/results/{args.name}.md")


if __name__ == "__main__":
    main()

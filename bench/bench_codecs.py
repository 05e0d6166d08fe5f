"""Encoder benchmark: time and activation-weighted error of every encoder on expert-shaped matrices.

Synthetic but LLM-like statistics: weights with a few outlier input channels, inputs with log-normal
per-channel scales, a handful of outlier channels and correlated directions (so H is anisotropic and
far from diagonal), H = xᵀx / N from N routed tokens (N < in, so H is rank-deficient, as for an expert).
Errors are relative: tr(ΔW H ΔWᵀ) / tr(W H Wᵀ). Writes bench/results/codecs.json.

    python bench/bench_codecs.py [--shapes 512x1024,2048x7168] [--tokens 2048] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import torch
from common import write_result

from prism_convert.compression.encode import encode, encode_many
from prism_convert.compression.math.hessian import clear_cache, compute_factors
from prism_convert.compression.math.measure import output_error
from prism_convert.compression.math.quantize import rtn
from prism_load.container.codecs import decode
from prism_load.container.format import INT_BITS, Encoding


def problem(out: int, inp: int, tokens: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    scale = torch.exp(torch.randn(inp, generator=gen) * 0.6)  # [I] log-normal channel scales
    scale[torch.randperm(inp, generator=gen)[: max(1, inp // 200)]] *= 15  # outlier channels
    basis = torch.randn(32, inp, generator=gen)  # [32, I] shared directions: correlated channels
    x = (torch.randn(tokens, inp, generator=gen) + torch.randn(tokens, 32, generator=gen) @ basis * 0.3) * scale
    w = torch.randn(out, inp, generator=gen) * inp**-0.5
    w[:, torch.randperm(inp, generator=gen)[:4]] *= 6  # a few large weight columns
    return w, x.T @ x / tokens


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    value = fn(*args, **kwargs)
    return value, time.perf_counter() - start


def bench_shape(out: int, inp: int, tokens: int, group: int = 128) -> dict:
    w, h = problem(out, inp, tokens)
    ref = output_error(w, torch.zeros_like(w), hessian=h)
    rel = lambda enc, stored: output_error(w, decode(enc, stored), hessian=h) / ref
    m = h.diagonal().clone()
    row: dict = {"shape": [out, inp], "tokens": tokens, "seconds": {}, "relative_error": {}}
    sec, err = row["seconds"], row["relative_error"]
    clear_cache()
    _, sec["hessian_factor"] = timed(compute_factors, h)
    _, sec["output_error_hessian"] = timed(output_error, w, w * 0.99, hessian=h)
    for bits in (2, 3, 4):
        enc = Encoding("int", (out, inp), bits=bits, group_size=group)
        for name, fn, kw in (("rtn", rtn, {}), ("clipped_diag", encode, {"channel_weights": m}),
                             ("gptq_natural_order", encode, {"hessian": h, "act_order": False}),
                             ("gptq_act_order", encode, {"hessian": h, "act_order": True})):
            stored, sec[f"{name}_int{bits}"] = timed(fn, w, enc, **kw)
            err[f"{name}_int{bits}"] = rel(enc, stored)
    menu = [Encoding("int", (out, inp), bits=b, group_size=group) for b in INT_BITS]
    _, sec["gptq_all_6_bitwidths"] = timed(encode_many, w, menu, hessian=h)
    rank = max(8, min(out, inp) // 32)
    for fb in (16, 4):
        enc = Encoding("lowrank", (out, inp), rank=rank, factor_bits=fb, group_size=group)
        stored, sec[f"lowrank_r{rank}_fb{fb}"] = timed(encode, w, enc, hessian=h)
        err[f"lowrank_r{rank}_fb{fb}"] = rel(enc, stored)
        stored = encode(w, enc)
        err[f"plain_svd_r{rank}_fb{fb}"] = rel(enc, stored)
    enc = Encoding("int+lowrank", (out, inp), bits=2, rank=rank, factor_bits=4, group_size=group)
    stored, sec[f"int2+r{rank}"] = timed(encode, w, enc, hessian=h)
    err[f"int2+r{rank}"] = rel(enc, stored)
    row["bits_per_weight"] = {f"int{b}": Encoding("int", (out, inp), bits=b, group_size=group).bits_per_weight for b in (2, 3, 4)}
    row["bits_per_weight"][f"int2+r{rank}"] = enc.bits_per_weight
    return row


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="512x1024,2048x7168")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for spec in args.shapes.split(","):
        out, inp = (int(s) for s in spec.split("x"))
        rows.append(bench_shape(out, inp, args.tokens))
        print(rows[-1])
    print(write_result("codecs", {"shapes": rows}))


if __name__ == "__main__":
    main()

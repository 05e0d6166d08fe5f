"""Quality benchmark on the reference model (issue: prism compress).

In one run: calibrate on prose, measure candidates once, then for 2.25 / 3.25 / 4.25 bits per expert weight
compare prism's allocation with uniform round-to-nearest (int2/3/4, group 128, fp16 scale and zero — the
same bytes) on held-out prose (in-distribution) and held-out code (distribution shift): KL(original ‖
quantized) per token and perplexity. Also an ablation: prism's allocation with routing importance switched
off (every expert weighted alike), to show what routing statistics add over error-only allocation.
Dense tensors are stored identically in every variant (the recipe's dense rules). Both sides are priced
as stored: each expert's bytes rounded up to the container's 4 KiB expert alignment, so "the same bits"
means the same bytes on disk (uniform int2/g128 is 2.25 bits in its tensors and a little more as stored).

Writes bench/results/quality.json, bench/results/quality.md and bench/results/quality.png.

    python bench/bench_quality.py [--model PATH] [--samples 128] [--eval-samples 32]
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
from common import RESULTS, reference, write_result

import prism_load
from prism_convert.allocation.bit_plan import Budget, PlanInputs, make_plan
from prism_convert.allocation.knapsack import Option
from prism_convert.compression.compress_layers import run_compress
from prism_convert.compression.math.quantize import rtn
from prism_convert.compression.workdir import WorkDir
from prism_convert.packing.materialize import apply_in_memory, decoded_state, dense_tensors, planned_experts
from prism_convert.plots import pyplot
from prism_convert.profiling.profiler import calibration_tokens, run_profile
from prism_convert.recipe import load_recipe
from prism_convert.tools.evaluate import compare_models
from prism_load.container import aligned
from prism_load.container.codecs import decode
from prism_load.container.format import Encoding
from prism_load.hf_loader import open_checkpoint

POINTS = {2.25: 2, 3.25: 3, 4.25: 4}  # bits per weight -> the uniform RTN bit-width that costs exactly that


def uniform_rtn_state(model: Path, works: list[WorkDir], bits: int) -> dict[str, torch.Tensor]:
    """Every routed-expert matrix RTN-quantized at `bits` (group 128), dense as in the work."""
    ckpt, family, args = open_checkpoint(model)
    state = {name: decode(enc, t) for name, (enc, t) in dense_tensors(works).items()}
    for i in range(args.num_hidden_layers):
        if not args.is_moe_layer(i):
            continue
        dec = []
        for e in range(args.num_experts):
            tensors = family.expert_tensors(args, i, e, ckpt, torch.float32)
            out = {}
            for name in ("gate_proj", "up_proj", "down_proj"):
                enc = Encoding("int", tuple(tensors[name].shape), bits=bits, group_size=128)
                out[name] = decode(enc, rtn(tensors[name], enc))
            dec.append(out)
        state[f"layers.{i}.mlp.experts.gate_up_proj"] = torch.stack([torch.cat([d["gate_proj"], d["up_proj"]]) for d in dec])
        state[f"layers.{i}.mlp.experts.down_proj"] = torch.stack([d["down_proj"] for d in dec])
    return state


def rtn_stored_bits(inputs: PlanInputs, bits: int) -> float:
    """Bits per expert weight that uniform int{bits}/g128 takes as stored in a container: each expert's
    tensor bytes rounded up to the 4 KiB expert alignment, exactly as prism's own plans are priced."""
    stored = 0
    for rec in inputs.records.values():
        nbytes = sum(Encoding("int", tuple(c[0]["encoding"]["shape"]), bits=bits, group_size=128).nbytes()
                     for c in rec["tensors"].values())
        stored += aligned(nbytes, inputs.alignment)
    return 8 * stored / inputs.expert_weights


def plan_state(works, plan, recipe) -> dict[str, torch.Tensor]:
    experts = list(planned_experts(works, plan, recipe.tiers.hot_share, recipe.tiers.hot_min_frequency))
    return decoded_state(dense_tensors(works), experts)


def without_importance(inputs: PlanInputs) -> PlanInputs:
    """The same candidate tables with every expert weighted alike (error-only allocation)."""
    flat = copy.copy(inputs)
    flat.tables = [[Option(o.nbytes, o.error / inputs.records[key[:2]]["importance"]) for o in t]
                   for key, t in zip(inputs.keys, inputs.tables)]
    return flat


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path)
    ap.add_argument("--samples", type=int, default=128, help="calibration sequences (prose)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-samples", type=int, default=32, help="held-out sequences per domain")
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "prism" / "bench-quality")
    args = ap.parse_args()
    model = args.model or reference("full")
    start = time.perf_counter()
    recipe = load_recipe(None, "mixtral")
    root = args.work / model.name  # one work folder per model; candidates are reused across reruns
    profile_dir, work_dir = root / "profile-prose", root / f"compress-{recipe.name}"
    if not (profile_dir / "profile.json").is_file():
        tokens = calibration_tokens(model, "builtin:prose", args.samples, args.seq_len, 0)
        run_profile(model, tokens, profile_dir, {"spec": "builtin:prose", "samples": args.samples, "seq_len": args.seq_len, "seed": 0})
    run_compress(model, profile_dir, recipe, work_dir)
    works = [WorkDir(work_dir)]
    inputs = PlanInputs.read(works, price="stored")  # prism and RTN compared at the same container bytes
    flat = without_importance(inputs)
    evals = {d: calibration_tokens(model, f"builtin:{d}", args.eval_samples, args.seq_len, 1, split="heldout")
             for d in ("prose", "code")}
    original = prism_load.load(model, dtype=torch.float32)
    rows = []
    stored_bits = {}
    for bpw, rtn_bits in POINTS.items():
        stored_bits[str(bpw)] = same_bytes = rtn_stored_bits(inputs, rtn_bits)  # prism gets exactly RTN's stored bytes
        variants = {
            "prism": plan_state(works, make_plan(inputs, Budget(bits=same_bytes, price="stored")), recipe),
            "prism (no routing importance)": plan_state(works, make_plan(flat, Budget(bits=same_bytes, price="stored")), recipe),
            f"uniform RTN int{rtn_bits}/g128": uniform_rtn_state(model, works, rtn_bits),
        }
        for name, state in variants.items():
            candidate = apply_in_memory(prism_load.load(model, dtype=torch.float32), state)
            for domain, tokens in evals.items():
                r = compare_models(original, candidate, tokens)
                rows.append({"bits": bpw, "method": name, "eval": domain, **r})
                print(f"{bpw:5.2f} {name:32s} {domain:5s} KL {r['kl']:.5f}  ppl {r['perplexity_reference']:.2f} -> {r['perplexity']:.2f}")
    summary = []
    for bpw in POINTS:
        for domain in evals:
            ratio = kl_of(rows, bpw, domain, "prism") / kl_of(rows, bpw, domain, f"uniform RTN int{POINTS[bpw]}/g128")
            summary.append({"bits": bpw, "eval": domain, "kl_ratio_prism_vs_rtn": ratio, "target_met": ratio <= 0.5})
    result = {"model": str(model), "calibration": {"dataset": "builtin:prose", "samples": args.samples, "seq_len": args.seq_len},
              "eval_tokens_per_domain": {d: int(t[:, 1:].numel()) for d, t in evals.items()},
              "recipe": recipe.name, "stored_bits_per_weight": stored_bits, "rows": rows, "summary": summary, "seconds": time.perf_counter() - start}
    path = write_result("quality", result)
    write_markdown(result)
    write_plot(result)
    for s in summary:
        print(f"{s['bits']} bpw, {s['eval']}: prism KL / RTN KL = {s['kl_ratio_prism_vs_rtn']:.3f} (target <= 0.5: {'met' if s['target_met'] else 'missed'})")
    print(f"wrote {path}")


def kl_of(rows: list[dict], bpw: float, domain: str, method: str) -> float:
    return next(r["kl"] for r in rows if r["bits"] == bpw and r["eval"] == domain and r["method"] == method)


def write_markdown(result: dict) -> None:
    lines = ["| bits/weight (tensors; as stored) | method | KL prose | KL code | ppl prose | ppl code |",
             "|---|---|---|---|---|---|"]
    methods = list(dict.fromkeys(r["method"] for r in result["rows"]))
    for bpw in POINTS:
        for m in methods:
            rs = {r["eval"]: r for r in result["rows"] if r["bits"] == bpw and r["method"] == m}
            if rs:
                lines.append(f"| {bpw}; {result['stored_bits_per_weight'][str(bpw)]:.3f} | {m} | {rs['prose']['kl']:.2e} | {rs['code']['kl']:.2e} | "
                             f"{rs['prose']['perplexity']:.2f} | {rs['code']['perplexity']:.2f} |")
    ref = next(r for r in result["rows"] if r["eval"] == "prose")["perplexity_reference"]
    ref_code = next(r for r in result["rows"] if r["eval"] == "code")["perplexity_reference"]
    lines.append(f"| 32 (fp32) | original | 0 | 0 | {ref:.2f} | {ref_code:.2f} |")
    (RESULTS / "quality.md").write_text("\n".join(lines) + "\n")


def write_plot(result: dict) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, domain in zip(axes, ("prose", "code")):
        for method in dict.fromkeys(r["method"].split(" int")[0] for r in result["rows"]):
            pts = sorted((r["bits"], r["kl"]) for r in result["rows"] if r["eval"] == domain and r["method"].split(" int")[0] == method)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
        ax.set_yscale("log")
        ax.set_xlabel("bits per expert weight in the tensors\n(scales, zeros included; both get the same stored bytes)")
        ax.set_title(f"held-out {domain} (calibrated on prose)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("KL(original || quantized), nats/token")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "quality.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()

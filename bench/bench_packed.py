"""What the packed fast tier costs in quality (issue 14): the default runtime (experts packed, bf16 dense weights,
fp32 activations on the CPU) against the fp32 reference path (experts decoded to fp32) on the same container.

On the reference model at 4.25 bits (bench_runtime's container): KL(fp32 decoded || candidate) and top-1
agreement on held-out prose and code, and whether greedy continuations of the README's demo prompt agree, for
each kernel the packed form can use here, with fp32 activations (the CPU default) and with bf16 activations
(compute_dtype=bf16), and the native kernel in fp32 throughout (its own rounding apart from bf16's). Writes bench/results/packed.json and .md.

    python bench/bench_packed.py [--container PATH] [--samples 8] [--seq-len 256]
"""

from __future__ import annotations

import argparse
import sys
import warnings

import torch
from bench_runtime import reference_container
from common import RESULTS, write_result

import prism_load
from prism_convert.profiling.profiler import calibration_tokens
from prism_convert.tools.evaluate import compare_models
from prism_load import native
from prism_load.native import Q16_UPTO_M

DEMO_PROMPT = "def fibonacci(n):"
BF16 = torch.bfloat16
EVERY_ROW = "int16 on every row count"  # a bench-only option: native.Q16_UPTO_M lifted while the variant runs
VARIANTS = [  # name, load options
    ("packed, default (bf16 weights, fp32 activations)", {}),
    ("packed native (exact), fp32 activations", {"expert_kernel": "native"}),
    ("packed native-int16, fp32 activations", {"expert_kernel": "native-int16"}),
    # int16 x serves decode rows only (native.Q16_UPTO_M): these full-sequence forwards give each expert more
    # rows, so the rows above run the exact kernel; this one forces int16 on every row to measure its rounding
    ("packed native-int16 on every row count", {"expert_kernel": "native-int16", EVERY_ROW: True}),
    ("packed native-int8, fp32 activations", {"expert_kernel": "native-int8"}),
    ("packed native, bf16 activations", {"expert_kernel": "native", "compute_dtype": BF16}),
    ("packed int4pack, bf16 activations", {"expert_kernel": "int4pack", "compute_dtype": BF16}),
    ("packed dequant, bf16 activations", {"expert_kernel": "dequant", "compute_dtype": BF16}),
    ("packed native-int8, bf16 activations", {"expert_kernel": "native-int8", "compute_dtype": BF16}),
    ("decoded, bf16 activations", {"expert_form": "decoded", "compute_dtype": BF16}),
    ("packed native, fp32", {"expert_kernel": "native", "dtype": torch.float32}),
]


def kernels_used(model) -> dict[str, int]:
    from prism_load.packed import PackedLinear

    out: dict[str, int] = {}
    for _, block in model.moe_blocks():
        for w in getattr(block.experts, "experts", []):
            for op in (*getattr(w.gate_up, "ops", [w.gate_up]), w.down):
                if isinstance(op, PackedLinear):
                    out[op.backend] = out.get(op.backend, 0) + 1
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--container")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=48, help="greedy tokens of the demo prompt")
    args = ap.parse_args()
    torch.set_num_threads(2)
    container = args.container or reference_container()
    reference = prism_load.load(container, dtype=torch.float32, expert_form="decoded")
    evals = {d: calibration_tokens(container, f"builtin:{d}", args.samples, args.seq_len, 1, split="heldout")
             for d in ("prose", "code")}
    prompt = torch.tensor([reference.tokenizer.encode(DEMO_PROMPT).ids])
    greedy = reference.generate(prompt, max_new_tokens=args.tokens, eos_token_id=[])[0].tolist()
    rows = []
    for name, options in VARIANTS:
        options = dict(options)
        native.Q16_UPTO_M = 10**9 if options.pop(EVERY_ROW, False) else Q16_UPTO_M
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = prism_load.load(container, **options)
        row = {"name": name, "options": {k: str(v) for k, v in options.items()}, "kernels": kernels_used(model),
               "warnings": [str(w.message) for w in caught]}
        with torch.inference_mode():
            for domain, tokens in evals.items():
                r = compare_models(reference, model, tokens)
                row[domain] = {"kl": r["kl"], "top1_agreement": r["top1_agreement"], "tokens": r["tokens"]}
            out = model.generate(prompt, max_new_tokens=args.tokens, eos_token_id=[])[0].tolist()
        row["greedy_same"] = out == greedy
        row["greedy_first_difference"] = next((i for i, (a, b) in enumerate(zip(out, greedy)) if a != b), None)
        rows.append(row)
        print(f"{name:28s} KL prose {row['prose']['kl']:.2e} code {row['code']['kl']:.2e}  "
              f"top-1 {row['prose']['top1_agreement']:.4f}  greedy same: {row['greedy_same']}  {row['kernels']}",
              file=sys.stderr)
    result = {"container": str(container), "samples": args.samples, "seq_len": args.seq_len,
              "demo_prompt": DEMO_PROMPT, "greedy_tokens": args.tokens, "rows": rows}
    write_result("packed", result)
    lines = ["# The packed runtime against the fp32 decoded path (`python bench/bench_packed.py`)", "",
             f"Container: `{container}`; held-out {args.samples} x {args.seq_len} tokens of prose and of code; "
             f"greedy continuation of `{DEMO_PROMPT}` ({args.tokens} tokens).", "",
             "| runtime | kernels (int tensors) | KL prose | KL code | top-1 prose | top-1 code | greedy same |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        k = ", ".join(f"{n} {c}" for n, c in sorted(r["kernels"].items())) or "-"
        lines.append(f"| {r['name']} | {k} | {r['prose']['kl']:.2e} | {r['code']['kl']:.2e} | "
                     f"{r['prose']['top1_agreement']:.4f} | {r['code']['top1_agreement']:.4f} | "
                     f"{'yes' if r['greedy_same'] else 'no (token ' + str(r['greedy_first_difference']) + ')'} |")
    (RESULTS / "packed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

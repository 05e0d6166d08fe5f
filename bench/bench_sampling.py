"""The next token's cost on a CPU: prism_load/sampling.py against the way it replaced (torch ops as transformers
uses them: mask the vocabulary, softmax, torch.multinomial; torch's argmax for greedy), per vocabulary size of
the families prism converts and per setting, in one run on the same logits; prism's numpy path (what runs
without the native kernels, and for settings the native sampler does not take) beside its native one.
These are warm calls in a loop: between two decode steps the calls run cold and cost more (sampling.py).

    python bench/bench_sampling.py [--repeats 200] [--threads 2] [--name sampling]

Writes bench/results/NAME.{json,md}: microseconds per call for one row, and the ratio.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_report  # noqa: E402

from prism_load import sampling  # noqa: E402
from prism_load.sampling import _torch_sample, sample_next, sample_without_native  # noqa: E402

VOCABULARIES = {"the reference model (4,096)": 4_096, "Mixtral (32,000)": 32_000, "OLMoE (50,304)": 50_304,
                "DeepSeek-V2 (102,400)": 102_400, "Qwen-MoE (151,936)": 151_936}
SETTINGS = {  # name: (do_sample, temperature, top_k, top_p)
    "greedy": (False, 1.0, None, None),
    "temperature 0.8": (True, 0.8, None, None),
    "top_k 50, temperature 0.8": (True, 0.8, 50, None),
    "top_p 0.95": (True, 1.0, None, 0.95),
    "top_k 50, top_p 0.95": (True, 1.0, 50, 0.95),
}


def per_call(fn, logits: torch.Tensor, setting: tuple, repeats: int) -> float:
    """Median microseconds of one call over `repeats` calls (after a few to warm up)."""
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        fn(logits, *setting, gen)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(logits, *setting, gen)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2, help="torch's threads (the decode's)")
    ap.add_argument("--name", default="sampling")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for vocab_name, vocab in VOCABULARIES.items():
        # a wide spread (the nucleus of 0.95 holds thousands of tokens: the worst case for top_p alone; a trained
        # model's is usually far narrower)
        logits = torch.randn(1, vocab, generator=torch.Generator().manual_seed(vocab)) * 2.5
        for name, setting in SETTINGS.items():
            before = per_call(_torch_sample, logits, setting, args.repeats)
            numpy_us = per_call(sample_without_native, logits, setting, args.repeats)
            now = per_call(sample_next, logits, setting, args.repeats)
            native = sampling.next_tokens(logits, setting[0], setting[1], setting[2], setting[3],
                                          sampling.Draws(None, 1)) is not None
            rows.append({"vocabulary": vocab_name, "vocab": vocab, "setting": name, "torch_us": before,
                         "numpy_us": numpy_us, "prism_us": now, "native": native, "speedup": before / now})
            print(f"{vocab_name}, {name}: {before:.1f} -> {numpy_us:.1f} (numpy) / {now:.1f} us", file=sys.stderr)
    result = {"threads": args.threads, "repeats": args.repeats, "rows": rows}
    lines = [f"# Next-token cost on a CPU ({args.threads} torch threads, median of {args.repeats} calls, one row)", "",
             "torch: masking, softmax and torch.multinomial (argmax for greedy), as transformers samples; prism: "
             "prism_load/sampling.py, its numpy path and what it runs (the native sampler where it takes the "
             "setting: greedy and top-k). Microseconds per token, warm calls.", "",
             "| vocabulary | setting | torch | prism, numpy path | prism | prism runs | speedup over torch |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['vocabulary']} | {r['setting']} | {r['torch_us']:.1f} | {r['numpy_us']:.1f} | "
                     f"{r['prism_us']:.1f} | {'native' if r['native'] else 'numpy'} | {r['speedup']:.1f}x |")
    path = write_report(args.name, result, "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()

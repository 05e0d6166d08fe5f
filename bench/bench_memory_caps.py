"""prism against llama.cpp on a machine with less RAM than the model: decode speed at several memory caps.

For each cap, one bench_peer.py run (`--memory-cap CAP --mmap --cache BUDGET`, the peer benchmark's 583 M model,
made already: run bench_peer.py once first): every measured process may charge CAP MiB past its imports, page
cache included (bench/memory_cap.py), its model's files dropped from the page cache first. prism's expert cache
gets CAP minus --overhead MiB (what a resident prism model holds besides its experts: dense weights, KV cache,
buffers; a budget that leaves less would be killed at the cap), and a second row lets it choose
(`expert_cache="auto"`: the room under the cgroup's limit less a reserve, prism_load/runtime/memory.py). Writes bench/results/memory_caps.{json,md,png}
(decode tokens/s against the cap, one line per runtime configuration) beside each cap's peer file
(memory_cap<CAP>.md).

    python bench/bench_memory_caps.py [--caps 150,200,250,300] [--overhead 80] [--rounds 1] [--suffix _xeon]

--suffix names another machine's files (memory_caps_xeon.md, memory_cap150_xeon.md) beside the default ones.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import RESULTS, machine, write_report  # noqa: E402


def run_cap(cap: int, args) -> dict:
    name = f"memory_cap{cap}{args.suffix}"
    cmd = [sys.executable, str(HERE / "bench_peer.py"), "--widths", "1", "--layers", "8", "--recipes", args.recipes,
           "--kernels", "auto", "--gguf-types", "Q4_K_M", "--mmap", "--cache", f"{cap - args.overhead}MiB,auto",
           "--memory-cap", str(cap), "--tokens", str(args.tokens), "--repeats", str(args.repeats), "--rounds",
           str(args.rounds), "--skip-convert", "--name", name]
    print(f"cap {cap} MiB: {' '.join(cmd[1:])}", flush=True)
    subprocess.run(cmd, check=True)
    return json.loads((RESULTS / f"{name}.json").read_text())


def series(results: dict[int, dict]) -> dict[str, dict[int, float | str]]:
    """{row name: {cap: decode tokens/s, or "killed" (for memory) / "refused" (prism refused the load as larger
    than the memory left)}}; the expert cache's sized rows, whose budget differs by cap, under one name ("auto"
    rows keep theirs)."""
    from bench_peer import stopped

    out: dict[str, dict[int, float | str]] = {}
    for cap, result in results.items():
        for row in result["shapes"][0]["rows"]:
            name = row["name"]
            if "expert_cache" in name and not name.endswith("expert_cache auto"):
                name = name.split(", expert_cache")[0] + ", expert_cache (cap - overhead)"
            out.setdefault(name, {})[cap] = stopped(row) or row["decode_tokens_per_second"]
    return out


def cell(value: float | str | None) -> str:
    return "-" if value is None else value if isinstance(value, str) else f"{value:.1f}"


def markdown(data: dict) -> str:
    caps = data["caps"]
    lines = [f"# Decode tokens/s under a memory cap (2 threads, the peer benchmark's 583 M model; {data['rounds']} "
             f"round(s), median of {data['repeats']} repeats of {data['tokens']} tokens)", "",
             f"Each process may charge the cap past its imports, page cache included; prism's expert cache gets the "
             f"cap minus {data['overhead']} MiB. Killed: over the cap; refused: prism refused the load, which would not "
             f"fit the memory left. Per-cap files: memory_cap<CAP>{data.get('suffix', '')}.md.", "",
             "| runtime | " + " | ".join(f"{c} MiB" for c in caps) + " |", "|---|" + "---|" * len(caps)]
    for name, by_cap in data["series"].items():
        lines.append(f"| {name} | " + " | ".join(cell(by_cap.get(c)) for c in caps) + " |")
    return "\n".join(lines) + "\n"


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, by_cap in data["series"].items():
        points = [(c, v) for c, v in sorted(by_cap.items()) if isinstance(v, float | int)]
        if points:
            ax.plot(*zip(*points), marker="o", label=name)
    ax.set_xlabel("memory past the runtime's imports, MiB (page cache included)")
    ax.set_ylabel("decode tokens/s")
    ax.set_yscale("log")
    ax.set_title("583 M-parameter MoE (318-340 MiB on disk) under a memory cap")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--caps", default="150,200,250,300", help="MiB, comma-separated")
    ap.add_argument("--overhead", type=int, default=80, help="MiB of a cap that prism's expert cache leaves free")
    ap.add_argument("--recipes", default="uniform")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--suffix", default="", help="appended to every results file's name (e.g. _xeon)")
    args = ap.parse_args()
    caps = [int(c) for c in args.caps.split(",")]
    if min(caps) <= args.overhead:
        ap.error(f"every cap must exceed --overhead {args.overhead} MiB (the expert cache's budget is the rest)")
    results = {cap: run_cap(cap, args) for cap in caps}
    data = {"caps": caps, "overhead": args.overhead, "tokens": args.tokens, "repeats": args.repeats,
            "rounds": args.rounds, "suffix": args.suffix, "series": series(results), "machine": machine(),
            "prism_commit": results[caps[0]]["prism_commit"]}
    name = f"memory_caps{args.suffix}"
    path = write_report(name, data, markdown(data))
    plot(data, RESULTS / f"{name}.png")
    print(markdown(data))
    print(f"wrote {path}, {RESULTS / f'{name}.md'} and {RESULTS / f'{name}.png'}")


if __name__ == "__main__":
    main()

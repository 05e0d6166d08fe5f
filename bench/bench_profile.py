"""Profiling benchmark on the reference model (issue: calibration + prism profile).

Records, in one run: profiling tokens/s; peak RSS against model size for copies of the model with 2, n
and 4n layers (same layer size; flat = layer-sequential streaming works); next-layer prediction recall per
layer (the shadow router, and the fitted predictor against it on held-back tokens); routing skew per layer
(share of assignments taken by the top 25% of experts); and the routing
shift between prose and code. Writes bench/results/profile.json.

    python bench/bench_profile.py [--model PATH] [--samples 64] [--seq-len 256]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from common import reference, run_measured, write_result


def deepened_copy(model: Path, layers: int, folder: Path) -> Path:
    """The reference checkpoint with `layers` decoder layers (layer i reuses layer i mod n's tensors), one
    safetensors file per layer: same per-layer size, more layers, so peak memory can be read off depth."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    out = folder / f"L{layers}"
    out.mkdir()
    config = json.loads((model / "config.json").read_text())
    n = config["num_hidden_layers"]
    source = {}
    for f in model.glob("*.safetensors"):
        with safe_open(f, framework="pt") as h:
            source.update({k: (f, k) for k in h.keys()})
    weight_map = {}

    def read(key):
        f, k = source[key]
        with safe_open(f, framework="pt") as h:
            return h.get_tensor(k).clone()

    top = {k: read(k) for k in source if not k.startswith("model.layers.")}
    save_file(top, out / "top.safetensors")
    weight_map.update({k: "top.safetensors" for k in top})
    for i in range(layers):
        prefix = f"model.layers.{i % n}."
        tensors = {f"model.layers.{i}." + k[len(prefix):]: read(k) for k in source if k.startswith(prefix)}
        save_file(tensors, out / f"layer-{i:03d}.safetensors")
        weight_map.update({k: f"layer-{i:03d}.safetensors" for k in tensors})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    shutil.copy(model / "tokenizer.json", out / "tokenizer.json")
    config["num_hidden_layers"] = layers
    (out / "config.json").write_text(json.dumps(config))
    return out


def profile_in_subprocess(model: Path, dataset: str, samples: int, seq_len: int, out: Path) -> tuple[dict, int]:
    code = f"""
import json
from pathlib import Path
import prism_convert
d = prism_convert.profile(Path({str(model)!r}), out=Path({str(out)!r}), dataset={dataset!r}, samples={samples},
                          seq_len={seq_len}, seed=0)
print(json.dumps({{k: d[k] for k in ("seconds", "tokens_per_second", "tokens")}}))
"""
    return run_measured(code)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    args = ap.parse_args()
    model = args.model or reference("full")
    config = json.loads((model / "config.json").read_text())
    n_layers = config["num_hidden_layers"]
    tmp = Path(tempfile.mkdtemp(prefix="prism-bench-profile-"))
    try:
        memory = []
        for layers in (2, n_layers, 4 * n_layers):
            copy = deepened_copy(model, layers, tmp)
            stats, rss = profile_in_subprocess(copy, "builtin:mix", args.samples, args.seq_len, tmp / f"p{layers}")
            weights = sum(f.stat().st_size for f in copy.glob("*.safetensors"))
            memory.append({"layers": layers, "peak_rss_bytes": rss, "approx_weight_bytes": int(weights),
                           "tokens_per_second": stats["tokens_per_second"]})
            print(f"{layers} layers: peak RSS {rss / 2**20:.0f} MiB, weights ~{weights / 2**20:.0f} MiB, "
                  f"{stats['tokens_per_second']:.0f} tokens/s")
        import prism_convert
        from prism_convert.profiling.routing_report import routing_shift, verdicts

        runs = {}
        for name in ("prose", "code"):
            runs[name] = prism_convert.profile(model, out=tmp / name, dataset=f"builtin:{name}",
                                               samples=args.samples, seq_len=args.seq_len, seed=0)
        prism_convert.profile(model, out=tmp / "mix", dataset="builtin:mix", samples=args.samples,
                              seq_len=args.seq_len, seed=0)
        full = json.loads((tmp / "mix" / "profile.json").read_text())
        layers = [{
            "layer": x["layer"], "next_layer_recall": x["next_layer_recall"],
            "next_layer_recall_at_2k": x["next_layer_recall_at_2k"], "top_quarter_share": x["top_quarter_share"],
            "predictors": x["predictors"],
            "top_expert_share": x["top_expert_share"], "routing_entropy_bits": x["routing_entropy_bits"],
            "temporal_reuse": x["temporal_reuse"], "temporal_reuse_baseline": x["temporal_reuse_baseline"],
            "prose_top_quarter_share": p["top_quarter_share"], "code_top_quarter_share": c["top_quarter_share"],
        } for x, p, c in zip(full["layers"], runs["prose"]["layers"], runs["code"]["layers"])]
        shift = routing_shift(runs["prose"], runs["code"])
        result = {
            "model": str(model), "samples": args.samples, "seq_len": args.seq_len,
            "profiling_tokens_per_second": full["tokens_per_second"],
            "memory_vs_layers": memory, "layers": layers, "shift_prose_vs_code": shift,
            "verdicts": verdicts(full),
        }
        path = write_result("profile", result)
        for line in result["verdicts"]:
            print("-", line)
        print(f"prose vs code: mean TV distance {shift['mean_total_variation']:.3f}")
        print(f"wrote {path}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

"""`prism inspect`: what a .prism container holds — model, tiers, bits histogram, bytes, hottest experts,
metadata overhead — as a JSON-able summary (`--json`) and as rich tables."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from rich.console import Group
from rich.table import Table

from prism_load.container import TIERS
from prism_load.container_reader import Container, metadata_overhead

HISTOGRAM_STEP_BITS = 0.25
HOTTEST = 10


def inspect_container(path: str | Path) -> dict:
    """A summary of the container at `path` (opened and validated; no data read beyond shard headers)."""
    with Container(path) as c:
        m = c.manifest
        cfg = c.config
        tiers = {}
        for tier in TIERS:
            recs = [r for r in c.records if r.tier == tier]
            weights = sum(r.numel for r in recs)
            stored = sum(r.length for r in recs)
            tiers[tier] = {"experts": len(recs), "shards": sum(s.tier == tier for s in m.expert_shards),
                           "bytes": stored, "bits_per_weight": 8 * stored / weights if weights else 0.0}
        histogram = Counter(round(r.bits_per_weight / HISTOGRAM_STEP_BITS) * HISTOGRAM_STEP_BITS for r in c.records)
        labels = Counter(enc.label() for r in c.records for enc in r.encodings.values())
        hottest = sorted(c.records, key=lambda r: (-r.frequency, r.layer, r.expert))[:HOTTEST]
        return {
            "path": str(path),
            "format_version": m.format_version,
            "writer": m.writer,
            "source": m.source.to_dict(),
            "model": {k: cfg.get(k) for k in ("model_type", "num_hidden_layers", "hidden_size", "vocab_size",
                                              "num_experts_per_tok")}
            | {"num_experts": len({r.expert for r in c.records}), "moe_layers": len({r.layer for r in c.records})},
            "bytes": {"dense": sum(f.bytes for f in m.dense_shards), "experts": sum(f.bytes for f in m.expert_shards),
                      "tokenizer": sum(f.bytes for f in m.tokenizer_files),
                      "predictor": m.predictor.file.bytes if m.predictor else 0},
            "predictor": [x.to_dict() for x in m.predictor.layers] if m.predictor else [],
            "tiers": tiers,
            "bits_histogram": {f"{k:.2f}": v for k, v in sorted(histogram.items())},
            "tensor_encodings": dict(labels.most_common()),
            "dense_encodings": dict(Counter(r.encoding.label() for r in m.dense.values()).most_common()),
            "hottest_experts": [{"layer": r.layer, "expert": r.expert, "tier": r.tier, "frequency": r.frequency,
                                 "gate_mass": r.gate_mass, "placement": r.placement,
                                 "bits_per_weight": r.bits_per_weight, "rank": r.rank, "bytes": r.length}
                                for r in hottest],
            "overhead": metadata_overhead(c).to_dict(),
            "recipe": m.recipe,
            "budget": m.budget,
            "quality": m.quality,
        }


def _mib(n: int) -> str:
    return f"{n / 2**20:,.2f} MiB"


def summary_tables(s: dict) -> Group:
    """Rich rendering of inspect_container's summary."""
    model = s["model"]
    head = Table(title=f"{s['path']} (format {s['format_version']}, {s['writer']})", show_header=False)
    head.add_row("source", f"{s['source']['model_id']} @ {s['source']['revision'] or '-'}")
    head.add_row("model", f"{model['model_type']}: {model['num_hidden_layers']} layers ({model['moe_layers']} MoE), "
                          f"{model['num_experts']} experts, top-{model['num_experts_per_tok']}, hidden {model['hidden_size']}")
    b = s["bytes"]
    head.add_row("bytes", f"dense {_mib(b['dense'])}, experts {_mib(b['experts'])}, tokenizer {_mib(b['tokenizer'])}"
                          + (f", predictor {_mib(b['predictor'])}" if b["predictor"] else ""))
    if s["predictor"]:
        head.add_row("prefetch", "fitted predictors " + ", ".join(
            f"{x['from_layer']}→{x['layer']} ({x['recall']:.0%} vs shadow {x['shadow_recall']:.0%})" for x in s["predictor"])
            + " — recall on the profile's held-back tokens")
    o = s["overhead"]
    head.add_row("overhead", f"{o['bits_per_expert_weight']:.4f} bits per expert weight (manifest {o['manifest_bytes']:,} B, "
                             f"headers {o['header_bytes']:,} B, padding {o['padding_bytes']:,} B)")
    if s["quality"]:
        head.add_row("quality", ", ".join(f"{k}={v}" for k, v in s["quality"].items()))

    tiers = Table(title="tiers")
    for col in ("tier", "experts", "shards", "bytes", "bits/weight"):
        tiers.add_column(col, justify="right" if col != "tier" else "left")
    for name, t in s["tiers"].items():
        tiers.add_row(name, str(t["experts"]), str(t["shards"]), _mib(t["bytes"]), f"{t['bits_per_weight']:.3f}")

    hist = Table(title="experts by bits per weight")
    hist.add_column("bits/weight", justify="right")
    hist.add_column("experts", justify="right")
    hist.add_column("")
    top = max(s["bits_histogram"].values(), default=1)
    for k, v in s["bits_histogram"].items():
        hist.add_row(k, str(v), "█" * max(1, round(30 * v / top)))

    hot = Table(title="hottest experts")
    for col in ("layer", "expert", "tier", "frequency", "gate mass", "placement", "bits/weight", "rank"):
        hot.add_column(col, justify="right")
    for r in s["hottest_experts"]:
        hot.add_row(str(r["layer"]), str(r["expert"]), r["tier"], f"{r['frequency']:.4f}", f"{r['gate_mass']:.4f}",
                    r["placement"], f"{r['bits_per_weight']:.3f}", str(r["rank"]))
    return Group(head, tiers, hist, hot)

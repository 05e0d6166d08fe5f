"""`prism inspect`: what a .prism container holds — model, tiers (stored bytes, and the bytes the packed runtime
holds: packed.held_nbytes), bits histogram, bytes, hottest experts, metadata overhead — as a JSON-able summary (`--json`; its tables: prism_convert/cli/render.py)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from prism_load.container import TIERS
from prism_load.container.reader import Container, metadata_overhead
from prism_load.packed import held_nbytes

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
            held = sum(held_nbytes(enc) for r in recs for enc in r.encodings.values())  # tensors, unaligned
            tiers[tier] = {"experts": len(recs), "shards": sum(s.tier == tier for s in m.expert_shards),
                           "bytes": stored, "bits_per_weight": 8 * stored / weights if weights else 0.0,
                           "runtime_bytes": held, "runtime_bits_per_weight": 8 * held / weights if weights else 0.0}
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



"""Routing reports: verdicts and a heatmap for a profile, and the routing shift between two profiles (their
tables: prism_convert/cli/render.py).

The report states plainly where skew or prediction will not help on this model, instead of assuming it.
"""

from __future__ import annotations

import html
from pathlib import Path

from prism_convert.plots import layer_expert_heatmap, pyplot

SKEW_USEFUL = 0.40  # top-25% share above which frequency-driven precision has something to exploit
RECALL_USEFUL = 0.60  # shadow-router recall above which prefetching the prediction mostly hits


def verdicts(data: dict) -> list[str]:
    """Plain sentences on what skew, prediction and locality can and cannot buy on this model."""
    layers = data["layers"]
    if not layers:
        return ["no MoE layers were profiled"]
    quarter = sum(x["top_quarter_share"] for x in layers) / len(layers)
    out = [
        f"skew: the top 25% of experts take {quarter:.1%} of assignments on average (25% if uniform); "
        + ("frequency-driven precision has skew to exploit." if quarter >= SKEW_USEFUL
           else "routing is close to uniform here, so spending bits by frequency buys little; "
                "the error-weighted allocation still applies.")
    ]
    recalls = [x["next_layer_recall"] for x in layers if x["next_layer_recall"] is not None]
    if recalls:
        mean = sum(recalls) / len(recalls)
        out.append(
            f"prediction: the shadow router recovers {mean:.1%} of next-layer experts "
            f"(range {min(recalls):.1%}–{max(recalls):.1%}); "
            + ("prefetching its prediction mostly hits." if mean >= RECALL_USEFUL
               else "most prefetched experts would be wasted; prefetch helps little on this model.")
        )
    for distance, what in ((1, "the next MoE layer"), (2, "two MoE layers ahead (lookahead 2)")):
        fitted = [p for x in layers for p in x.get("predictors", ()) if p["distance"] == distance]
        if not fitted:
            continue
        used = [p for p in fitted if p["recall"] > p["shadow_recall"]]
        mean = sum(p["recall"] for p in fitted) / len(fitted)
        shadow = sum(p["shadow_recall"] for p in fitted) / len(fitted)
        out.append(
            f"fitted predictor, {what}: on held-back calibration tokens it recovers {mean:.1%} of experts against "
            f"the shadow router's {shadow:.1%}, and beats it in {len(used)} of {len(fitted)} layer pairs; "
            + ("the runtime uses it there." if used else "the runtime keeps the shadow router.")
        )
    reuse = sum(x["temporal_reuse"] for x in layers) / len(layers)
    base = sum(x["temporal_reuse_baseline"] for x in layers) / len(layers)
    out.append(
        f"locality: {reuse:.1%} of a token's experts were also used by the previous token "
        f"({base:.1%} expected if independent); "
        + ("a recency cache has temporal locality to exploit." if reuse > 1.2 * base
           else "little temporal locality beyond what frequency explains.")
    )
    if data["rare_experts"]:
        out.append(f"rare: {len(data['rare_experts'])} experts saw fewer than {data['min_tokens']} tokens "
                   f"and use a neutral prior: {data['rare_experts'][:12]}{' ...' if len(data['rare_experts']) > 12 else ''}")
    return out


def frequency_matrix(data: dict) -> list[list[float]]:
    """Per MoE layer, each expert's share of that layer's assignments."""
    rows = []
    for x in data["layers"]:
        total = sum(e["tokens"] for e in x["experts"]) or 1
        rows.append([e["tokens"] / total for e in x["experts"]])
    return rows


def write_heatmap(data: dict, folder: Path) -> Path:
    """PNG with matplotlib when installed (the `plot` extra), else a self-contained HTML/SVG heatmap."""
    freq = frequency_matrix(data)
    layers = [x["layer"] for x in data["layers"]]
    recall = [x["next_layer_recall"] for x in data["layers"]]
    plt = pyplot()
    if plt is None:
        return _write_html(freq, layers, recall, folder / "routing.html")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 0.45 * len(layers) + 2.5), width_ratios=[3, 1])
    layer_expert_heatmap(fig, ax1, freq, layers, "viridis", "share of each layer's assignments")
    ax2.barh(range(len(layers)), [r or 0 for r in recall], color="tab:orange")
    ax2.set_yticks(range(len(layers)), [str(i) for i in layers])
    ax2.invert_yaxis()
    ax2.set_xlim(0, 1)
    ax2.set_title("next-layer recall\n(shadow router)")
    fig.tight_layout()
    path = folder / "routing.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _write_html(freq, layers, recall, path: Path) -> Path:
    cell = 22
    peak = max((v for row in freq for v in row), default=1) or 1
    rects = []
    for r, row in enumerate(freq):
        for c, v in enumerate(row):
            shade = int(255 * (1 - v / peak))
            rects.append(f'<rect x="{60 + c * cell}" y="{20 + r * cell}" width="{cell}" height="{cell}" '
                         f'fill="rgb({shade},{shade},255)"><title>layer {layers[r]} expert {c}: {v:.1%}</title></rect>')
        rec = "—" if recall[r] is None else f"{recall[r]:.0%}"
        rects.append(f'<text x="5" y="{35 + r * cell}">{layers[r]}</text>'
                     f'<text x="{70 + len(row) * cell}" y="{35 + r * cell}">recall {html.escape(rec)}</text>')
    width = 200 + cell * max((len(r) for r in freq), default=1)
    svg = f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{40 + cell * len(freq)}">{"".join(rects)}</svg>'
    path.write_text(f"<html><body><h3>Routing share per layer x expert</h3>{svg}</body></html>")
    return path


def routing_shift(a: dict, b: dict) -> dict:
    """Per layer, total-variation distance between the expert distributions of two profiles, and the
    experts that move between the hot quarter and the rest."""
    fa, fb = frequency_matrix(a), frequency_matrix(b)
    layers = []
    for xa, row_a, row_b in zip(a["layers"], fa, fb):
        tv = 0.5 * sum(abs(p - q) for p, q in zip(row_a, row_b))
        quarter = max(1, -(-len(row_a) // 4))
        hot_a = set(sorted(range(len(row_a)), key=lambda e: -row_a[e])[:quarter])
        hot_b = set(sorted(range(len(row_b)), key=lambda e: -row_b[e])[:quarter])
        layers.append({
            "layer": xa["layer"], "total_variation": tv,
            "hot_only_in_a": sorted(hot_a - hot_b), "hot_only_in_b": sorted(hot_b - hot_a),
        })
    mean_tv = sum(x["total_variation"] for x in layers) / max(1, len(layers))
    return {"a": a["dataset"].get("spec"), "b": b["dataset"].get("spec"), "mean_total_variation": mean_tv, "layers": layers}



"""How the plan spent the budget, as a plot (bits per layer x expert, the
error-versus-size curve)."""

from __future__ import annotations

from pathlib import Path

from prism_convert.allocation.bit_plan import BitPlan
from prism_convert.plots import layer_expert_heatmap, pyplot


def write_plan_plot(plan: BitPlan, curve: list[dict], path: Path) -> Path | None:
    """PNG (needs matplotlib, the `plot` extra); returns None when matplotlib is not installed."""
    plt = pyplot()
    if plt is None:
        return None
    layers = plan.layers()
    experts = max(x.expert for x in plan.experts) + 1
    grid = [[float("nan")] * experts for _ in layers]
    for x in plan.experts:
        grid[layers.index(x.layer)][x.expert] = x.bits_per_weight
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 0.4 * len(layers) + 3), width_ratios=[3, 2])
    layer_expert_heatmap(fig, ax1, grid, layers, "magma", "bits per weight (scales, zeros, low-rank factors included)")
    if curve:
        ax2.plot([p["bits"] for p in curve], [p["error"] for p in curve], marker="o")
        ax2.axvline(plan.priced_bits, color="gray", linestyle="--", label="this plan")
        ax2.set_yscale("log")
        ax2.set_xlabel(f"bits per expert weight ({'held by the runtime' if plan.budget.price == 'runtime' else 'stored'})")
        ax2.set_ylabel("expected weighted output error")
        ax2.set_title("error vs size (optimal allocation)")
        ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

"""How the plan spent the budget, as a plot (bits per layer x expert, the
error-versus-size curve)."""

from __future__ import annotations

from pathlib import Path

from prism_convert.allocation.bit_plan import BitPlan


def write_plan_plot(plan: BitPlan, curve: list[dict], path: Path) -> Path | None:
    """PNG (needs matplotlib, the `plot` extra); returns None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    layers = plan.layers()
    experts = max(x.expert for x in plan.experts) + 1
    grid = [[float("nan")] * experts for _ in layers]
    for x in plan.experts:
        grid[layers.index(x.layer)][x.expert] = x.bits_per_weight
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 0.4 * len(layers) + 3), width_ratios=[3, 2])
    im = ax1.imshow(grid, aspect="auto", cmap="magma")
    ax1.set_yticks(range(len(layers)), [str(i) for i in layers])
    ax1.set_xlabel("expert")
    ax1.set_ylabel("layer")
    ax1.set_title("bits per weight (scales, zeros, low-rank factors included)")
    fig.colorbar(im, ax=ax1)
    if curve:
        ax2.plot([p["bits"] for p in curve], [p["error"] for p in curve], marker="o")
        ax2.axvline(plan.bits_per_expert_weight, color="gray", linestyle="--", label="this plan")
        ax2.set_yscale("log")
        ax2.set_xlabel("bits per expert weight")
        ax2.set_ylabel("expected weighted output error")
        ax2.set_title("error vs size (optimal allocation)")
        ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

"""How the plan spent the budget: a rich table per layer and a plot (bits per layer x expert, the
error-versus-size curve)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from rich.table import Table


def plan_table(plan: dict) -> Table:
    title = (f"allocation: {plan['bits_per_expert_weight']:.3f} bits per expert weight, "
             f"{plan['total_bytes'] / 2**20:,.1f} MiB total ({plan['expert_bytes'] / 2**20:,.1f} MiB experts, "
             f"{plan['dense_bytes'] / 2**20:,.1f} MiB dense)")
    table = Table(title=title)
    for col in ("layer", "mean bits", "min–max", "hot 25%", "rest", "low-rank"):
        table.add_column(col, justify="right", no_wrap=True)  # numbers stay whole; the encodings column wraps
    table.add_column("most used encodings", justify="left", overflow="fold")
    by_layer = defaultdict(list)
    for x in plan["experts"]:
        by_layer[x["layer"]].append(x)
    for layer, experts in sorted(by_layer.items()):
        bits = [x["bits_per_weight"] for x in experts]
        ranked = sorted(experts, key=lambda x: -x["tokens"])
        quarter = max(1, -(-len(ranked) // 4))
        hot, rest = ranked[:quarter], ranked[quarter:]
        mean = lambda xs: sum(x["bits_per_weight"] for x in xs) / len(xs) if xs else float("nan")
        labels = defaultdict(int)
        lowrank = 0
        for x in experts:
            for t in x["tensors"].values():
                labels[t["label"]] += 1
                lowrank += t["rank"] is not None
        common = " ".join(f"{k}×{v}" for k, v in sorted(labels.items(), key=lambda kv: -kv[1])[:3])
        table.add_row(str(layer), f"{sum(bits) / len(bits):.2f}", f"{min(bits):.2f}–{max(bits):.2f}",
                      f"{mean(hot):.2f}", f"{mean(rest):.2f}", str(lowrank), common)
    return table


def write_plan_plot(plan: dict, curve: list[dict], path: Path) -> Path | None:
    """PNG (needs matplotlib, the `plot` extra); returns None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    layers = sorted({x["layer"] for x in plan["experts"]})
    experts = max(x["expert"] for x in plan["experts"]) + 1
    grid = [[float("nan")] * experts for _ in layers]
    for x in plan["experts"]:
        grid[layers.index(x["layer"])][x["expert"]] = x["bits_per_weight"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 0.4 * len(layers) + 3), width_ratios=[3, 2])
    im = ax1.imshow(grid, aspect="auto", cmap="magma")
    ax1.set_yticks(range(len(layers)), [str(i) for i in layers])
    ax1.set_xlabel("expert")
    ax1.set_ylabel("layer")
    ax1.set_title("bits per weight (scales, zeros, low-rank factors included)")
    fig.colorbar(im, ax=ax1)
    if curve:
        ax2.plot([p["bits"] for p in curve], [p["error"] for p in curve], marker="o")
        ax2.axvline(plan["bits_per_expert_weight"], color="gray", linestyle="--", label="this plan")
        ax2.set_yscale("log")
        ax2.set_xlabel("bits per expert weight")
        ax2.set_ylabel("expected weighted output error")
        ax2.set_title("error vs size (optimal allocation)")
        ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

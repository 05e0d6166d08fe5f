"""Plot pieces the reports share: matplotlib (an optional extra) opened headless, and the layer x expert
heatmap that the routing report and the bit plan both draw."""

from __future__ import annotations


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed), or None when matplotlib (the `plot` extra)
    is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def layer_expert_heatmap(fig, ax, grid, layers: list[int], cmap: str, title: str) -> None:
    """grid [layer][expert] on `ax`, one row per entry of `layers` (labelled by layer index), with a colour bar."""
    im = ax.imshow(grid, aspect="auto", cmap=cmap)
    ax.set_yticks(range(len(layers)), [str(i) for i in layers])
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_title(title)
    fig.colorbar(im, ax=ax)

"""prism_load: open a Hugging Face MoE checkpoint or a .prism container and run it with slim torch code."""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import (  # noqa: F401
    BudgetError,
    CalibrationError,
    CheckpointError,
    ConfigError,
    ContainerError,
    PrismError,
    ProfileError,
    RecipeError,
)


def load(path, dtype=None, device="cpu", **runtime_options):
    """Load a model: a Hugging Face checkpoint folder (more sources come with the container and Hub).

    Returns a torch.nn.Module: `model(input_ids)` gives logits [B, T, V]; `model.generate(...)` decodes.
    """
    from pathlib import Path

    import torch

    from .hf_loader import load_hf

    dtype = dtype or torch.float32
    folder = Path(path)
    if (folder / "config.json").is_file():
        if runtime_options:
            raise TypeError(f"options {sorted(runtime_options)} apply to .prism containers only")
        return load_hf(folder, dtype=dtype, device=device)
    raise CheckpointError(f"{path}: not a checkpoint folder (no config.json)")

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


def load(path, dtype=None, device="cpu", *, revision=None, token=None, cache_dir=None, local_files_only=None,
         download_experts="lazy", **runtime_options):
    """Load a model: a .prism container folder (manifest.json) or a Hugging Face checkpoint folder.

    Returns a torch.nn.Module: `model(input_ids)` gives logits [B, T, V]; `model.generate(...)` decodes.
    `path` may also be a Hub repo id ("org/name" where no such local path exists), resolved through
    huggingface_hub (`revision`, `token`, `cache_dir`, `local_files_only`, else HF_HUB_OFFLINE): manifest,
    dense shards and tokenizer first, expert shards on demand (`download_experts="lazy"`) or all at once ("all").
    Container options: `verify_checksums` (default True), `resolve_file` (fetch a shard not in the folder).
    """
    from pathlib import Path

    import torch

    from .hf_loader import load_hf
    from .hub import is_repo_id, load_from_hub

    hub = dict(revision=revision, token=token, cache_dir=cache_dir, local_files_only=local_files_only)
    if is_repo_id(path):
        return load_from_hub(str(path), **hub, download_experts=download_experts, dtype=dtype, device=device,
                             **runtime_options)
    if any(v is not None for v in hub.values()) or download_experts != "lazy":
        raise TypeError(f"{path}: revision, token, cache_dir, local_files_only and download_experts apply to "
                        "Hub repo ids, not to local folders")

    dtype = dtype or torch.float32
    folder = Path(path)
    if (folder / "manifest.json").is_file():
        from .container_loader import load_container

        known = {"verify_checksums", "resolve_file"}
        if set(runtime_options) - known:
            raise TypeError(f"unknown container options {sorted(set(runtime_options) - known)}")
        return load_container(folder, dtype=dtype, device=device, **runtime_options)
    if (folder / "config.json").is_file():
        if runtime_options:
            raise TypeError(f"options {sorted(runtime_options)} apply to .prism containers only")
        return load_hf(folder, dtype=dtype, device=device)
    raise CheckpointError(f"{path}: not a checkpoint folder (no config.json)")

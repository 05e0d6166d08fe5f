"""prism_load: open a Hugging Face MoE checkpoint or a .prism container and run it with slim torch code."""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import (  # noqa: F401
    BudgetError,
    CalibrationError,
    CheckpointError,
    ConfigError,
    ContainerError,
    GenerationError,
    PrismError,
    ProfileError,
    RecipeError,
)


def generate(model, prompt, max_new_tokens=None, *, stream=False, stop=None, **options):
    """Text in, text out with the model's tokenizer: a str for a str prompt, a list for a list (one left-padded
    batch); stream=True: an iterator of new text. See prism_load/text.py."""
    from .text import generate as generate_text

    return generate_text(model, prompt, max_new_tokens, stream=stream, stop=stop, **options)


def load(path, dtype=None, device="cpu", *, expert_cache=None, prefetch=True, numa=None, revision=None, token=None,
         cache_dir=None, local_files_only=None, download_experts="lazy", **runtime_options):
    """Load a model: a .prism container folder (manifest.json) or a Hugging Face checkpoint folder.

    Returns a torch.nn.Module: `model(input_ids)` gives logits [B, T, V]; `model.generate(...)` decodes.
    `path` may also be a Hub repo id ("org/name" where no such local path exists), resolved through
    huggingface_hub (`revision`, `token`, `cache_dir`, `local_files_only`, else HF_HUB_OFFLINE): manifest,
    dense shards and tokenizer first, expert shards on demand (`download_experts="lazy"`) or all at once ("all").
    Container options: `verify_checksums` (default True), `resolve_file` (fetch a shard not in the folder),
    `expert_form` ("packed", the default: experts stay as stored and kernels multiply that form, so the
    model needs about the container's bytes; "decoded": dense weights, the reference), `expert_kernel`
    ("auto", "native", "int4pack", "dequant": prism_load/packed.py).

    dtype: bfloat16 unless given (dense weights and activations; pass torch.float32 for the reference
    arithmetic, as the parity tests do).

    Runtime (prism_load/runtime): with `expert_cache` (bytes, "50%" of every expert's bytes in the fast tier's
    form, which for packed experts is about the container's expert bytes, or "2GB") the
    experts stay in the cold tier (the container, or the checkpoint's safetensors) and are served by a cache
    of that budget on `device`; `prefetch` starts the shadow-router prefetch; `numa=True` places the hottest
    experts on the compute's NUMA node. More: `prefetch_extra`, `lookahead`, `host_cache` (CUDA pinned tier),
    `decode_on` (CUDA), `pin_hot`, `frequency_weight` (eviction), `profile` (checkpoints: a prism profile
    folder for routing frequencies).
    Such a model has `model.stats()` and `model.reset_stats()`.
    """
    from pathlib import Path

    import torch

    from .hub import is_repo_id, load_from_hub

    hub = dict(revision=revision, token=token, cache_dir=cache_dir, local_files_only=local_files_only)
    if is_repo_id(path):
        return load_from_hub(str(path), **hub, download_experts=download_experts, dtype=dtype, device=device,
                             expert_cache=expert_cache, prefetch=prefetch, numa=numa, **runtime_options)
    if any(v is not None for v in hub.values()) or download_experts != "lazy":
        raise TypeError(f"{path}: revision, token, cache_dir, local_files_only and download_experts apply to "
                        "Hub repo ids, not to local folders")

    dtype = dtype or torch.bfloat16
    # An inference model: no parameter asks autograd to record (a call outside no_grad would otherwise build
    # a graph each step, and refuse experts loaded under inference_mode by generate).
    return _open(Path(path), dtype, device, expert_cache, prefetch, numa, runtime_options).requires_grad_(False)


def _open(folder, dtype, device, expert_cache, prefetch, numa, runtime_options):
    from .hf_loader import load_hf

    if expert_cache is not None:
        return _load_cached(folder, dtype, device, expert_cache, prefetch, numa, runtime_options)
    if numa is not None:
        raise TypeError("numa applies to models loaded with an expert_cache")
    if (folder / "manifest.json").is_file():
        from .container.loader import load_container

        known = {"verify_checksums", "resolve_file", "expert_form", "expert_kernel"}
        if set(runtime_options) - known:
            raise TypeError(f"unknown container options {sorted(set(runtime_options) - known)}")
        return load_container(folder, dtype=dtype, device=device, **runtime_options)
    if (folder / "config.json").is_file():
        if runtime_options:
            raise TypeError(f"options {sorted(runtime_options)} apply to .prism containers only")
        return load_hf(folder, dtype=dtype, device=device)
    raise CheckpointError(f"{folder}: not a checkpoint folder (no config.json)")


def _load_cached(folder, dtype, device, expert_cache, prefetch, numa, options):
    """load(..., expert_cache=...): experts behind the runtime's budgeted cache (prism_load/runtime)."""
    from .runtime import RUNTIME_OPTIONS, load_cached

    container = (folder / "manifest.json").is_file()
    if not container and not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder}: not a checkpoint folder (no config.json)")
    allowed = set(RUNTIME_OPTIONS) | ({"verify_checksums", "resolve_file"} if container else set())
    if set(options) - allowed:
        raise TypeError(f"unknown options {sorted(set(options) - allowed)} for {folder}")
    return load_cached(folder, dtype, device, expert_cache=expert_cache, prefetch=prefetch, numa=numa, **options)

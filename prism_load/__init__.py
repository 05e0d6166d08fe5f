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


def load(path, dtype=None, device="cpu", *, compute_dtype=None, config=None, revision=None, token=None,
         cache_dir=None, local_files_only=None, download_experts="lazy", **options):
    """Load a model: a .prism container folder (manifest.json) or a Hugging Face checkpoint folder.

    Returns a torch.nn.Module: `model(input_ids)` gives logits [B, T, V]; `model.generate(...)` decodes.
    `path` may also be a Hub repo id ("org/name" where no such local path exists), resolved through
    huggingface_hub (`revision`, `token`, `cache_dir`, `local_files_only`, else HF_HUB_OFFLINE): manifest,
    dense shards and tokenizer first, expert shards on demand (`download_experts="lazy"`) or all at once ("all").

    dtype: the dense weights' dtype, bfloat16 unless given (torch.float32 for the reference arithmetic, as the
    parity tests use). compute_dtype: the activations' (and the KV cache's) dtype; unless given, float32 on the
    CPU, where bf16 arithmetic costs accuracy and no bandwidth (prism_load/models/precision.py), and `dtype`
    on a GPU. Routers, norms and biases are held in compute_dtype, the big matrices in dtype.

    Everything else is a `RuntimeConfig` (prism_load/runtime/config.py, where each option is described):
    pass `config=RuntimeConfig(...)`, or its fields as keywords. Container options: `verify_checksums`
    (True, the default: each byte range checked the first time it is read; "always"; False), `resolve_file`,
    `expert_form` ("packed", the default: experts stay as stored and kernels multiply that form, so the model
    needs about the container's bytes; "decoded": dense weights, the reference), `expert_kernel`, `mmap`
    (experts view a memory map of the shards: see RuntimeConfig). Runtime (prism_load/runtime): with
    `expert_cache` (bytes, "50%", "2GB") the experts stay in the cold tier (the container, or the checkpoint's
    safetensors) and are served by a cache of that budget on `device`; `prefetch`, `numa`, `prefetch_extra`,
    `lookahead`, `host_cache`, `decode_on`, `pin_hot`, `eviction`, `frequency_weight`, `profile`, `predictor`.
    Such a model has `model.runtime`, `model.stats()` and `model.reset_stats()`.
    """
    from pathlib import Path

    import torch

    from .hub import is_repo_id

    hub = dict(revision=revision, token=token, cache_dir=cache_dir, local_files_only=local_files_only)
    if is_repo_id(path):
        return _load_from_hub(str(path), **hub, download_experts=download_experts, dtype=dtype, device=device,
                              compute_dtype=compute_dtype, config=config, **options)
    if any(v is not None for v in hub.values()) or download_experts != "lazy":
        raise TypeError(f"{path}: revision, token, cache_dir, local_files_only and download_experts apply to "
                        "Hub repo ids, not to local folders")

    from .models.precision import default_compute_dtype

    dtype = dtype or torch.bfloat16
    compute_dtype = compute_dtype or default_compute_dtype(dtype, device)
    # An inference model: no parameter asks autograd to record (a call outside no_grad would otherwise build
    # a graph each step, and refuse experts loaded under inference_mode by generate).
    return _open(Path(path), dtype, device, config, options, compute_dtype).requires_grad_(False)


def _open(folder, dtype, device, config, options, compute_dtype):
    from .runtime.config import RuntimeConfig

    container = (folder / "manifest.json").is_file()
    checkpoint = container or (folder / "config.json").is_file()
    if config is not None and options:
        raise TypeError(f"options {sorted(options)} given beside config=: set them in the RuntimeConfig")
    cached = (config.expert_cache if config is not None else options.get("expert_cache")) is not None
    if not checkpoint and (cached or "numa" not in (config.given() if config is not None else options)):
        raise CheckpointError(f"{folder}: not a checkpoint folder (no config.json)")
    if config is None:
        config = RuntimeConfig.from_options(options, folder, container)
    else:
        config.check(folder, container)
    if config.expert_cache is not None:
        from .runtime import load_cached

        return load_cached(folder, dtype, device, config, compute_dtype)
    if container:
        from .container.loader import load_container

        return load_container(folder, dtype=dtype, device=device, verify_checksums=config.verify_checksums,
                              resolve_file=config.resolve_file, expert_form=config.expert_form or "packed",
                              expert_kernel=config.expert_kernel, compute_dtype=compute_dtype, mmap=config.mmap)
    from .hf_loader import load_hf

    return load_hf(folder, dtype=dtype, device=device, compute_dtype=compute_dtype)


def _load_from_hub(repo_id: str, *, revision, token, cache_dir, local_files_only, download_experts, config,
                   **load_options):
    """`load("org/name", ...)`: resolve through the Hub cache (prism_load/hub.py), then load the local files."""
    import shutil
    import tempfile
    import weakref
    from dataclasses import replace
    from pathlib import Path

    from .hub import MANIFEST, resolve

    if "resolve_file" in load_options or (config is not None and config.resolve_file is not None):
        raise TypeError("resolve_file is set by the Hub loader itself")
    snap = resolve(repo_id, revision, token, cache_dir, local_files_only, download_experts)
    if snap.kind == "checkpoint":
        model = load(snap.folder, config=config, **load_options)
    else:
        view = Path(tempfile.mkdtemp(prefix="prism-hub-"))
        shutil.copyfile(snap.folder / MANIFEST, view / MANIFEST)
        try:
            if config is not None:
                model = load(view, config=replace(config, resolve_file=snap.resolve_file), **load_options)
            else:
                model = load(view, resolve_file=snap.resolve_file, **load_options)
        except BaseException:
            shutil.rmtree(view, ignore_errors=True)
            raise
        weakref.finalize(model, shutil.rmtree, view, True)
    model.hub = snap
    return model

"""Load a model whose experts stay in the cold tier: dense weights resident, experts behind the cache.

`prism_load.load(path, expert_cache=...)` lands here. The dense part is built exactly as the resident
loaders build it (container/loader.py / hf_loader.py); the MoE blocks get a CachedExperts view instead of their
stacked expert tensors, which are never read.
"""

from __future__ import annotations

import weakref
from dataclasses import replace
from pathlib import Path

import torch

from ..errors import BudgetError
from ..profile_format import RoutingProfile
from .attach import attach_runtime
from .config import RuntimeConfig, prefetch_on
from .container_store import ContainerStore
from .predictor import as_runtime, check_predictors, container_predictors, profile_predictors
from .stores import CheckpointStore

EXPERT_FORMS = ("packed", "decoded", "codes")


def expert_form_for(expert_form: str | None, container: bool, device) -> str:
    """The fast tier's form: "packed" for containers unless asked otherwise; checkpoints store dense experts."""
    form = expert_form or ("packed" if container else "decoded")
    if form not in EXPERT_FORMS:
        raise BudgetError(f"expert_form={form!r}: expected one of {', '.join(EXPERT_FORMS)}")
    if form != "decoded" and not container:
        raise BudgetError(f"expert_form={form!r} needs a .prism container (a checkpoint's experts are dense)")
    if form == "codes" and torch.device(device).type != "cpu":
        raise BudgetError("expert_form='codes' needs a .prism container on the CPU")
    return form


def load_cached(path: str | Path, dtype: torch.dtype = torch.bfloat16, device="cpu",
                config: RuntimeConfig | None = None, compute_dtype: torch.dtype | None = None):
    """A container folder (manifest.json) or a checkpoint folder, with its experts behind an ExpertCache of
    config.expert_cache ("50%" when the config has none). The options (prism_load/runtime/config.py):
    `profile` (checkpoints only): a prism profile folder whose routing frequencies inform eviction and
    whose fitted predictors (those that beat the shadow router) feed prefetch.
    `expert_form` (containers): "packed" (the default) keeps experts as stored and multiplies them there
    (prism_load/packed.py; `expert_kernel` picks the kernel: "auto", "native", "int4pack", "dequant", "native-int16", "native-int8");
    "decoded" keeps dense weights; "codes" (CPU) keeps `int` projections as unpacked codes, a byte per
    weight, dequantised at each use. The budget counts the bytes of the form held.
    `predictor`: prefetch with the fitted predictors of the container (or of `profile`) where it has them
    (runtime/predictor.py); False: the shadow router everywhere. compute_dtype: the activations' dtype where it
    differs from the weights' `dtype` (models/precision.py)."""
    config = config or RuntimeConfig()
    if config.expert_cache is None:
        config = replace(config, expert_cache="50%")
    profile, verify_checksums = config.profile, config.verify_checksums
    prefetch = prefetch_on(config.prefetch, torch.device(device), config.lookahead, config.prefetch_extra)
    folder = Path(path)
    container = (folder / "manifest.json").is_file()
    form = expert_form_for(config.expert_form, container, device)
    profiled = RoutingProfile.read(profile) if profile is not None and not container else None  # read once
    if container:
        model, store = _container_model(folder, dtype, verify_checksums, config.resolve_file, form,
                                        config.expert_kernel, device, compute_dtype)
    else:
        model, store = _checkpoint_model(folder, dtype, profiled, compute_dtype)
    model = model.to(device).eval()
    if isinstance(store, ContainerStore):  # close its files before interpreter teardown, not in __del__ then
        weakref.finalize(model, store.container.close)
    predictors = {}
    if prefetch and config.predictor:
        if isinstance(store, ContainerStore):
            predictors = container_predictors(store.container, verify_checksums)
        elif profiled is not None:
            found = profile_predictors(profiled)
            check_predictors(found, store.args, profile)
            predictors = as_runtime(found)
    attach_runtime(model, store, config.expert_cache, device, prefetch=prefetch, predictors=predictors,
                   **config.runtime_options())
    return model


def _detach_experts(model) -> None:
    """Drop the meta-device stacked expert tensors (the cache replaces them in attach_runtime)."""
    from .cache import CachedExperts

    for _, block in model.moe_blocks():
        block.experts = CachedExperts(None, block.experts.num_experts)


def _container_model(folder: Path, dtype, verify_checksums: bool, resolve_file, form: str, kernel: str, device,
                     compute_dtype=None):
    from ..container.loader import (
        build_rotary,
        build_skeleton,
        load_dense,
        read_generation_config,
        read_tokenizer,
    )
    from ..container.reader import Container, model_args

    c = Container(folder, resolve_file)  # stays open: the store reads experts through it
    family, args = model_args(c.config)
    model = build_skeleton(family, args)
    load_dense(c, model, dtype, verify_checksums, form, kernel, device, compute_dtype)
    _detach_experts(model)
    model.tie_weights()
    model.rotary = build_rotary(family, args)
    model.tokenizer = read_tokenizer(c, verify_checksums)
    model.generation_config = read_generation_config(c, verify_checksums)
    store = ContainerStore(c, args, dtype, verify_checksums, form, kernel, device)
    if store.packer is not None:
        from ..packed import fallback_warning

        fallback_warning(store.packer.backends, torch.device(device), kernel)
    return model, store


def _checkpoint_model(folder: Path, dtype, profiled: RoutingProfile | None, compute_dtype=None):
    """profiled: the `profile` folder as a RoutingProfile, or None."""
    from ..generation_config import GenerationConfig
    from ..hf_loader import empty_model, layer_state, load_tokenizer, open_checkpoint, top_level_state

    ckpt, family, args = open_checkpoint(folder)
    model = empty_model(family, args)
    model.load_state_dict(top_level_state(ckpt, family, args, model, dtype, compute_dtype), assign=True, strict=False)
    for layer in model.layers:
        layer.load_state_dict(layer_state(ckpt, family, args, layer, dtype, experts=False, compute_dtype=compute_dtype),
                              assign=True, strict=False)
    model.compute_dtype = compute_dtype
    _detach_experts(model)
    model.tie_weights()
    model.tokenizer = load_tokenizer(ckpt.tokenizer_path())
    model.generation_config = GenerationConfig.from_folder(ckpt.folder)
    frequencies = None
    if profiled is not None:
        profiled.check_model(ckpt.config)
        frequencies = profiled.frequencies()
    return model, CheckpointStore(ckpt, family, args, dtype, frequencies)

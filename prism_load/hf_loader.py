"""Build a prism model from a Hugging Face checkpoint folder, one layer at a time, on the meta device first."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .checkpoint import Checkpoint, read_config
from .generation_config import GenerationConfig
from .models.base import Family, ModelArgs
from .models.family import family_for
from .models.model import MoEForCausalLM
from .models.moe import MoEBlock
from .models.precision import held_dtype
from .models.rope import Rotary


def open_checkpoint(path: str | Path) -> tuple[Checkpoint, Family, ModelArgs]:
    config = read_config(Path(path))
    family = family_for(config)  # unsupported architectures fail before any tensor is touched
    args = family.parse_config(config)
    return Checkpoint(path), family, args


def empty_model(family: Family, args: ModelArgs, build_layers: bool = True) -> MoEForCausalLM:
    """The model skeleton on the meta device (no memory); layers are filled by load_layer."""
    with torch.device("meta"):
        layers = [family.build_layer(args, i) for i in range(args.num_hidden_layers)] if build_layers else []
        model = MoEForCausalLM(args, family, layers)
    model.rotary = Rotary(family.rotary_config(args))
    return model


def _read(ckpt: Checkpoint, family: Family, name: str, dtype: torch.dtype, shape) -> torch.Tensor:
    return family.read_tensor(ckpt, name, dtype, shape)


def stack_experts(experts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per-expert canonical tensors -> StackedExperts' state (gate and up rows concatenated)."""
    state = {
        "gate_up_proj": torch.stack([torch.cat([x["gate_proj"], x["up_proj"]]) for x in experts]),
        "down_proj": torch.stack([x["down_proj"] for x in experts]),
    }
    if "gate_bias" in experts[0]:
        state["gate_up_bias"] = torch.stack([torch.cat([x["gate_bias"], x["up_bias"]]) for x in experts])
        state["down_bias"] = torch.stack([x["down_bias"] for x in experts])
    return state


def layer_state(
    ckpt: Checkpoint, family: Family, args: ModelArgs, layer: nn.Module, dtype: torch.dtype, experts: bool = True,
    compute_dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """Read one layer's tensors (shapes checked against the module); routed experts stacked if asked. Big
    matrices in `dtype`, the rest in `compute_dtype` (models/precision.py)."""
    i = layer.index
    state = {}
    for key, p in layer.state_dict(keep_vars=True).items():
        if key.startswith("mlp.experts."):
            continue
        state[key] = _read(ckpt, family, family.checkpoint_name(args, i, key),
                           held_dtype(layer, key, dtype, compute_dtype), tuple(p.shape))
    if experts and isinstance(layer.mlp, MoEBlock):
        per_expert = [family.expert_tensors(args, i, e, ckpt, dtype) for e in range(args.num_experts)]
        for key, value in stack_experts(per_expert).items():
            state[f"mlp.experts.{key}"] = value
    return state


def load_layer(ckpt: Checkpoint, family: Family, args: ModelArgs, i: int, dtype: torch.dtype) -> nn.Module:
    """One decoder layer with its weights, built alone (layer-sequential profiling and compression)."""
    with torch.device("meta"):
        layer = family.build_layer(args, i)
    layer.load_state_dict(layer_state(ckpt, family, args, layer, dtype), assign=True, strict=True)
    return layer


def top_level_state(ckpt: Checkpoint, family: Family, args: ModelArgs, model: nn.Module, dtype,
                    compute_dtype: torch.dtype | None = None) -> dict:
    shapes = {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()}
    return {key: _read(ckpt, family, name, held_dtype(model, key, dtype, compute_dtype), shapes[key])
            for key, name in family.top_level_names(args).items()}


def load_tokenizer(path: Path | None):
    if path is None:
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))


def load_hf(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
            compute_dtype: torch.dtype | None = None) -> MoEForCausalLM:
    """Load a whole checkpoint folder as a resident prism model (compute_dtype: as load_container's)."""
    ckpt, family, args = open_checkpoint(path)
    model = empty_model(family, args)
    model.load_state_dict(top_level_state(ckpt, family, args, model, dtype, compute_dtype), assign=True, strict=False)
    for layer in model.layers:
        layer.load_state_dict(layer_state(ckpt, family, args, layer, dtype, compute_dtype=compute_dtype), assign=True,
                              strict=True)
    model.compute_dtype = compute_dtype
    model.tie_weights()
    model.tokenizer = load_tokenizer(ckpt.tokenizer_path())
    model.generation_config = GenerationConfig.from_folder(ckpt.folder)
    return model.to(device).eval()

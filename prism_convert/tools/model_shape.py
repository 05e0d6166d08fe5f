"""What a model holds, from config.json alone: every weight tensor by parameter class, and the KV cache.

Counted on the family's own model built on the meta device (no memory), so the count is what prism loads;
the tests hold it to an independent, explicit arithmetic count (tests/shape_arithmetic.py).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from prism_load.checkpoint import read_config_file
from prism_load.errors import ConfigError

CLASSES = (
    "embedding",
    "lm_head",
    "attention",
    "norms",
    "routers",
    "shared_experts",
    "dense_mlp",
    "routed_experts",
)


# -- tensors by class ------------------------------------------------------------------------------------
@dataclass
class ModelShape:
    """Every weight tensor of a model by class, plus the per-token KV cache size, from config.json."""

    model_type: str
    num_hidden_layers: int
    experts_per_layer: int
    experts_per_token: int
    tensors: list[tuple[str, tuple[int, ...]]]  # (class, shape) of every non-routed tensor
    expert_tensors: dict[
        int, list[tuple[tuple[int, ...], int]]
    ]  # MoE layer -> (shape, count) of all its experts
    kv_elements: list[tuple[int, int | None]]  # per layer: (K+V elements per token, sliding window or None)
    method: str  # how the parameters were counted
    config: dict = field(default_factory=dict, repr=False)


def classify(name: str, moe_layers: set[int]) -> str:
    """Parameter class of a prism tensor name (`layers.3.self_attn.q_proj.weight`, `lm_head.weight`)."""
    parts = name.split(".")
    if any("norm" in p for p in parts[:-1]):
        return "norms"
    if parts[0] in ("embed_tokens", "lm_head"):
        return "embedding" if parts[0] == "embed_tokens" else "lm_head"
    if parts[0] != "layers" or len(parts) < 4:
        raise ConfigError(f"tensor {name!r} belongs to no known parameter class")
    i, block, sub = int(parts[1]), parts[2], parts[3]
    if block == "self_attn":
        return "attention"
    if block == "mlp" and i not in moe_layers:
        return "dense_mlp"
    if block == "mlp":
        if sub == "experts":
            return "routed_experts"
        if sub in ("router", "gate", "shared_expert_gate"):
            return "routers"
        if sub.startswith("shared_expert"):
            return "shared_experts"
    raise ConfigError(f"tensor {name!r} belongs to no known parameter class")


_SHAPES: dict[str, ModelShape] = {}


def shape_from_config(config: dict) -> ModelShape:
    """Counted on the family's meta-device model (cached per config)."""
    key = json.dumps(config, sort_keys=True)
    if key not in _SHAPES:
        _SHAPES[key] = shape_from_meta(config)
    return _SHAPES[key]


def shape_from_meta(config: dict) -> ModelShape:
    from prism_load.hf_loader import empty_model
    from prism_load.models.family import family_for

    family = family_for(config)
    args = family.parse_config(config)
    model = empty_model(family, args)
    model.tie_weights()
    moe = set(args.moe_layers)
    tensors, experts, seen = [], {}, set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        cls = classify(name, moe)
        if cls != "routed_experts":
            tensors.append((cls, tuple(p.shape)))
            continue
        i = int(name.split(".")[1])
        stacked = p.dim() >= 2 and p.shape[0] == args.num_experts and not name.split(".")[4].isdigit()
        experts.setdefault(i, []).append(
            (tuple(p.shape[1:]), args.num_experts) if stacked else (tuple(p.shape), 1)
        )
    return ModelShape(
        args.model_type,
        args.num_hidden_layers,
        args.num_experts,
        args.num_experts_per_tok,
        tensors,
        experts,
        kv_from_meta(model, args),
        "meta-device model built by the prism_load family code",
        config,
    )


class _Recorded(Exception):
    """Raised by the recording cache once the layer has shown what it caches (the rest of attention is moot)."""


class _KVRecorder:
    length = 0

    def __init__(self):
        self.elements: dict[int, int] = {}

    def update(self, layer: int, k, v):  # k, v [B, heads, T, D]: whatever the family caches per token
        self.elements[layer] = k[0, ..., 0, :].numel() + v[0, ..., 0, :].numel()
        raise _Recorded


def kv_from_meta(model, args) -> list[tuple[int, int | None]]:
    """K and V elements each token adds to the cache, per layer: each attention runs on meta up to its
    cache update, so MLA's latent cache and GQA's grouped heads are both counted as the family stores them."""
    import torch

    from prism_load.models.layers import ForwardContext

    cos, sin = model.rotary(torch.arange(1), torch.float32)
    ctx = ForwardContext(torch.arange(1, device="meta"), cos.to("meta"), sin.to("meta"), _KVRecorder())
    x = torch.empty(1, 1, args.hidden_size, device="meta")
    out = []
    for layer in model.layers:
        with contextlib.suppress(_Recorded):
            layer.self_attn(x, ctx)
        if layer.index not in ctx.cache.elements:
            raise ConfigError(
                f"{args.model_type}: layer {layer.index}'s attention never updated the KV cache"
            )
        spec = getattr(layer.self_attn, "spec", None)
        out.append((ctx.cache.elements[layer.index], getattr(spec, "sliding_window", None)))
    return out


@dataclass(frozen=True)
class DenseBytes:
    """One dense tensor of a container: its prism name and stored bytes."""

    name: str
    nbytes: int


@dataclass(frozen=True)
class ExpertBytes:
    """One expert of a container: where it sits, its stored byte range, how often it is routed, its tier."""

    layer: int
    expert: int
    nbytes: int
    frequency: float
    tier: str


@dataclass
class ContainerBytes:
    """What a .prism container really stores, from its manifest alone (no data file is read)."""

    path: str
    dense: list[DenseBytes]
    experts: list[ExpertBytes]
    file_bytes: int  # every listed file: headers and alignment padding included


def read_container(folder: Path) -> ContainerBytes:
    from prism_load.container.reader import Container

    with Container(folder, check_files=False) as c:
        dense = [DenseBytes(name, r.encoding.nbytes()) for name, r in c.manifest.dense.items()]
        experts = [ExpertBytes(r.layer, r.expert, r.length, r.frequency, r.tier) for r in c.records]
        return ContainerBytes(str(folder), dense, experts, c.data_bytes()), c.config


def load_shape(source: str | Path) -> tuple[ModelShape, ContainerBytes | None]:
    """A config.json file, a folder holding one, or a .prism container (its embedded config and real bytes)."""
    path = Path(source)
    if (path / "manifest.json").is_file():
        container, config = read_container(path)
        return shape_from_config(config), container
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(
            f"{source}: neither a config.json file, a folder holding one, nor a .prism container"
        )
    return shape_from_config(read_config_file(path)), None

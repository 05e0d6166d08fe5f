"""What a model holds, from config.json alone: every weight tensor by parameter class, and the KV cache.

Counted on the family's own model built on the meta device (no memory), so the count is what prism loads;
families not registered yet fall back to explicit arithmetic, which the tests hold to the same numbers.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path

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
    """Counted on the family's meta-device model; families not registered yet use explicit arithmetic."""
    from prism_load.models.family import supported_model_types

    key = json.dumps(config, sort_keys=True)
    if key not in _SHAPES:
        model_type = config.get("model_type")
        if model_type not in supported_model_types() and model_type in ARITHMETIC:
            _SHAPES[key] = ARITHMETIC[model_type](config)
        else:
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


def deepseek_v3_shape(config: dict) -> ModelShape:
    """DeepSeek-V3 by explicit arithmetic (MLA attention, first_k_dense_replace dense layers, shared experts).

    The MTP layer (num_nextn_predict_layers) is not counted: prism does not load it. KV: MLA caches the
    compressed latent (kv_lora_rank) plus the shared rope key (qk_rope_head_dim) per token and layer.
    """
    c = {k: v for k, v in config.items() if v is not None}
    h, n_layers, heads = c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"]
    q_lora, kv_lora = c.get("q_lora_rank"), c["kv_lora_rank"]
    nope, rope, v_dim = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
    experts, inter = c["n_routed_experts"], c["moe_intermediate_size"]
    shared = c.get("n_shared_experts", 0) * inter
    moe = {
        i
        for i in range(n_layers)
        if i >= c.get("first_k_dense_replace", 0) and i % c.get("moe_layer_freq", 1) == 0
    }
    tensors = [("embedding", (c["vocab_size"], h)), ("norms", (h,))]
    if not c.get("tie_word_embeddings", False):
        tensors.append(("lm_head", (c["vocab_size"], h)))
    expert_tensors = {}
    for i in range(n_layers):
        q = (
            [("attention", (q_lora, h)), ("norms", (q_lora,)), ("attention", (heads * (nope + rope), q_lora))]
            if q_lora
            else [("attention", (heads * (nope + rope), h))]
        )
        tensors += q + [
            ("attention", (kv_lora + rope, h)),
            ("norms", (kv_lora,)),
            ("attention", (heads * (nope + v_dim), kv_lora)),
            ("attention", (h, heads * v_dim)),
            ("norms", (h,)),
            ("norms", (h,)),
        ]
        if i in moe:
            tensors += [("routers", (experts, h)), ("routers", (experts,))]
            tensors += (
                [("shared_experts", s) for s in ((shared, h), (shared, h), (h, shared))] if shared else []
            )
            expert_tensors[i] = [((inter, h), experts), ((inter, h), experts), ((h, inter), experts)]
        else:
            d = c["intermediate_size"]
            tensors += [("dense_mlp", s) for s in ((d, h), (d, h), (h, d))]
    kv = [(kv_lora + rope, None)] * n_layers
    return ModelShape(
        "deepseek_v3",
        n_layers,
        experts,
        c["num_experts_per_tok"],
        tensors,
        expert_tensors,
        kv,
        "explicit arithmetic in prism_convert/plan.py (deepseek_v3 family not registered)",
        config,
    )


def gpt_oss_shape(config: dict) -> ModelShape:
    """GPT-OSS by explicit arithmetic: biased GQA attention with sinks, biased router and experts."""
    c = config
    h, n_layers, heads, kv_heads = (
        c["hidden_size"],
        c["num_hidden_layers"],
        c["num_attention_heads"],
        c["num_key_value_heads"],
    )
    d, experts, inter = c.get("head_dim") or h // heads, c["num_local_experts"], c["intermediate_size"]
    tensors = [("embedding", (c["vocab_size"], h)), ("norms", (h,))]
    if not c.get("tie_word_embeddings", False):
        tensors.append(("lm_head", (c["vocab_size"], h)))
    types = c.get("layer_types") or [
        "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)
    ]
    for _ in range(n_layers):
        for out, inp in ((heads * d, h), (kv_heads * d, h), (kv_heads * d, h), (h, heads * d)):
            tensors += [("attention", (out, inp)), ("attention", (out,))]
        tensors += [
            ("attention", (heads,)),
            ("norms", (h,)),
            ("norms", (h,)),
            ("routers", (experts, h)),
            ("routers", (experts,)),
        ]
    expert_tensors = {
        i: [((2 * inter, h), experts), ((2 * inter,), experts), ((h, inter), experts), ((h,), experts)]
        for i in range(n_layers)
    }
    window = c.get("sliding_window")
    kv = [(2 * kv_heads * d, window if t == "sliding_attention" else None) for t in types]
    return ModelShape(
        "gpt_oss",
        n_layers,
        experts,
        c["num_experts_per_tok"],
        tensors,
        expert_tensors,
        kv,
        "explicit arithmetic in prism_convert/plan.py (gpt_oss family not registered)",
        config,
    )


ARITHMETIC = {"deepseek_v3": deepseek_v3_shape, "gpt_oss": gpt_oss_shape}


@dataclass
class ContainerBytes:
    """What a .prism container really stores, from its manifest alone (no data file is read)."""

    path: str
    dense: list[tuple[str, int]]  # (prism name, stored bytes)
    experts: list[tuple[int, int, int, float, str]]  # (layer, expert, stored bytes, routing frequency, tier)
    file_bytes: int  # every listed file: headers and alignment padding included


def read_container(folder: Path) -> ContainerBytes:
    from prism_load.container_reader import Container

    with Container(folder, check_files=False) as c:
        dense = [(name, r.encoding.nbytes()) for name, r in c.manifest.dense.items()]
        experts = [(r.layer, r.expert, r.length, r.frequency, r.tier) for r in c.records]
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
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return shape_from_config(config), None

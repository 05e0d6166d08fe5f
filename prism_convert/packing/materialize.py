"""Turn a plan over work folders into stored tensors: the chosen candidate of every expert tensor and the
dense tensors — used by pack (to write the container) and by the in-memory check (same decode, same bits)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from prism_convert.allocation.bit_plan import BitPlan, gather_layers
from prism_convert.compression.workdir import WorkDir, split_encoded
from prism_load.container.codecs import decode
from prism_load.container.format import Encoding

EncodedTensor = tuple[Encoding, dict[str, torch.Tensor]]


@dataclass
class PlannedExpert:
    layer: int
    expert: int
    tokens: int
    gate_mass: float
    frequency: float  # share of the layer's calibration tokens routed to this expert
    tier: str  # "hot" | "cold"
    placement: str  # "fast" | "host" | "cold": where the runtime should keep it when memory is short
    tensors: dict[str, EncodedTensor]


def dense_tensors(works: list[WorkDir]) -> dict[str, EncodedTensor]:
    """Every dense tensor (top level and per layer), by prism state_dict name."""
    _, owner = gather_layers(works)
    top_meta, top_stored = works[0].top()
    out = {name: (Encoding.from_dict(r["encoding"]), split_encoded(top_stored, f"dense.{name}"))
           for name, r in top_meta["dense"].items()}
    for i in sorted(owner):
        meta = owner[i].layer_meta(i)
        stored = owner[i].layer_tensors(i, "dense")
        for name, r in meta["dense"].items():
            out[name] = (Encoding.from_dict(r["encoding"]), split_encoded(stored, name))
    return out


def predictors(works: list[WorkDir]) -> dict[tuple[int, int], dict]:
    """The fitted prefetch predictors compress carried from the profile (only those that beat the shadow
    router), by (predicted MoE layer, source MoE layer), in the form write_container takes."""
    _, owner = gather_layers(works)
    out = {}
    for j in sorted(owner):
        meta = owner[j].layer_meta(j)
        if meta.get("predictors"):
            stored = owner[j].layer_tensors(j, "predictor")
            for p in meta["predictors"]:
                i = p["from_layer"]
                out[(j, i)] = {**p, "weight": stored[f"{i}.weight"], "bias": stored[f"{i}.bias"]}
    return out


def planned_experts(works: list[WorkDir], plan: BitPlan, hot_share: float, hot_min_frequency: float) -> Iterator[PlannedExpert]:
    """The chosen encodings of every expert, one layer in memory at a time."""
    _, owner = gather_layers(works)
    for i in sorted(owner):
        meta = owner[i].layer_meta(i)
        if not meta.get("experts"):
            continue
        stored = owner[i].layer_tensors(i, "experts")
        seen = max(1, meta["seen_tokens"])
        order = sorted(meta["experts"], key=lambda r: (-r["tokens"], r["expert"]))
        hot_n = math.ceil(hot_share * len(order))
        rank = {r["expert"]: n for n, r in enumerate(order)}
        for rec in meta["experts"]:
            e = rec["expert"]
            freq = rec["tokens"] / seen
            tensors = {}
            for pick in plan.expert(i, e).tensors:
                cand = rec["tensors"][pick.name][pick.candidate]
                tensors[pick.name] = (Encoding.from_dict(cand["encoding"]),
                                      split_encoded(stored, f"{e}.{pick.name}.c{pick.candidate}"))
            for name, bias in rec.get("biases", {}).items():
                tensors[name] = (Encoding.from_dict(bias["encoding"]), split_encoded(stored, f"{e}.{name}"))
            hot = rank[e] < hot_n and freq >= hot_min_frequency
            placement = "fast" if hot else ("host" if rank[e] < 2 * hot_n else "cold")
            yield PlannedExpert(i, e, rec["tokens"], rec["gate_mass"], freq, "hot" if hot else "cold", placement, tensors)


def decoded_state(dense: dict[str, EncodedTensor], experts: list[PlannedExpert], dtype=torch.float32,
                  family=None, args=None) -> dict[str, torch.Tensor]:
    """prism model state_dict with every tensor decoded exactly as the container loader decodes it
    (with `family`/`args`, tensors the family keeps in fp32 stay fp32 whatever `dtype`)."""
    from prism_load.container.loader import dense_decode_dtype

    def dense_dtype(name):
        return dtype if family is None else dense_decode_dtype(family, args, name, dtype)

    state = {name: decode(enc, t, dense_dtype(name)) for name, (enc, t) in dense.items()}
    by_layer: dict[int, list[PlannedExpert]] = {}
    for x in experts:
        by_layer.setdefault(x.layer, []).append(x)
    for i, xs in by_layer.items():
        xs.sort(key=lambda x: x.expert)
        dec = [{k: decode(enc, t, dtype) for k, (enc, t) in x.tensors.items()} for x in xs]
        state[f"layers.{i}.mlp.experts.gate_up_proj"] = torch.stack([torch.cat([d["gate_proj"], d["up_proj"]]) for d in dec])
        state[f"layers.{i}.mlp.experts.down_proj"] = torch.stack([d["down_proj"] for d in dec])
        if "gate_bias" in dec[0]:
            state[f"layers.{i}.mlp.experts.gate_up_bias"] = torch.stack([torch.cat([d["gate_bias"], d["up_bias"]]) for d in dec])
            state[f"layers.{i}.mlp.experts.down_bias"] = torch.stack([d["down_bias"] for d in dec])
    return state


def apply_in_memory(model, state: dict[str, torch.Tensor]):
    """Replace a resident model's weights with decoded ones (the reference for the container round trip).
    Tensors are assigned, not copied into the old (possibly file-backed, unaligned) storage: CPU matmuls
    round differently by alignment, and the container loader also hands out fresh, owned tensors."""
    state = {k: v.clone() for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not (k == "lm_head.weight" and model.args.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"decoded state does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    return model

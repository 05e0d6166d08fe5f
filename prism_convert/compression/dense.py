"""Dense tensors (everything but routed experts): classified, then stored as the recipe's class rule says.

Classes: attention, norm, router, shared_expert, dense_mlp, embedding, lm_head. 1-D tensors (norms,
biases, attention sinks, DeepSeek's score-correction bias) stay fp32: they are tiny and sensitive.
"""

from __future__ import annotations

import torch

from prism_convert.compression.encode import encode
from prism_convert.recipe import Recipe
from prism_load.container.format import Encoding


def tensor_class(key: str) -> str:
    """Recipe class of a layer tensor, from its prism name relative to the layer."""
    if key.startswith("self_attn."):
        return "norm" if "norm" in key else "attention"
    if "layernorm" in key:
        return "norm"
    if key.startswith("mlp.router."):
        return "router"
    if key.startswith("mlp.shared_expert"):
        return "shared_expert"
    return "dense_mlp"


TOP_CLASSES = {"embed_tokens.weight": "embedding", "norm.weight": "norm", "lm_head.weight": "lm_head"}


def dense_encoding(name: str, shape: tuple[int, ...], tensor_class: str, recipe: Recipe) -> Encoding:
    """How a dense tensor is stored (the budget check prices the same rule before anything is encoded)."""
    return Encoding("fp32", shape) if len(shape) == 1 else recipe.dense_encoding(tensor_class, shape, name)


def encode_dense(name: str, tensor: torch.Tensor, tensor_class: str, recipe: Recipe, stored: dict) -> dict:
    shape = tuple(tensor.shape)
    enc = dense_encoding(name, shape, tensor_class, recipe)
    for suffix, t in encode(tensor.detach().float(), enc).items():
        stored[f"dense.{name}.{suffix}"] = t
    return {"encoding": enc.to_dict(), "class": tensor_class, "nbytes": enc.nbytes()}


def encode_dense_layer(layer, recipe: Recipe, stored: dict) -> dict:
    """Every non-expert tensor of a decoder layer, keyed by its full prism name (`layers.{i}.{key}`)."""
    records = {}
    for key, tensor in layer.state_dict().items():
        if key.startswith("mlp.experts."):
            continue
        name = f"layers.{layer.index}.{key}"
        records[name] = encode_dense(name, tensor, tensor_class(key), recipe, stored)
    return records


def encode_top(stream, recipe: Recipe, work) -> None:
    """Embedding, final norm and (untied) LM head into the work folder."""
    from prism_load.hf_loader import empty_model, top_level_state

    model = empty_model(stream.family, stream.args, build_layers=False)
    state = top_level_state(stream.ckpt, stream.family, stream.args, model, torch.float32)
    stored: dict = {}
    records = {name: encode_dense(name, t, TOP_CLASSES[name], recipe, stored) for name, t in state.items()}
    work.write_top({"dense": records, "tie_word_embeddings": stream.args.tie_word_embeddings}, stored)

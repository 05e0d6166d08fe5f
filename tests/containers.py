"""Tiny .prism containers for the container tests: a random prism model (no transformers), simple encoders
(round-to-nearest int, SVD low-rank) and the inputs write_container takes."""

from __future__ import annotations

import itertools
from pathlib import Path

import torch

from prism_convert.packing.container_writer import ExpertInput, write_container
from prism_load.container.codecs import decode, pack_bits
from prism_load.container.format import Encoding
from prism_load.hf_loader import empty_model, stack_experts
from prism_load.models.family import family_for
from prism_load.models.rope import Rotary

TINY_CONFIG = {
    "model_type": "mixtral", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 40, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 128, "tie_word_embeddings": False,
}

# Expert encodings cycled over (layer, expert, tensor): every kind and odd group sizes. Low-rank entries with
# rank "dense" get the smallest rank that decode_linear decodes dense (so the round trip is bit-exact).
EXACT_MIX = [
    dict(kind="int", bits=2, group_size=16), dict(kind="int", bits=3, group_size=32), dict(kind="int", bits=4, group_size=12),
    dict(kind="bf16"), dict(kind="int", bits=8, group_size=32), dict(kind="fp32"),
    dict(kind="lowrank", rank="dense", factor_bits=16), dict(kind="int+lowrank", bits=3, group_size=16, rank=2, factor_bits=16),
    dict(kind="lowrank", rank="dense", factor_bits=4, group_size=8), dict(kind="int", bits=5, group_size=32),
    dict(kind="int", bits=6, group_size=7), dict(kind="fp16"),
]
FACTORED_MIX = [dict(kind="lowrank", rank=4, factor_bits=16), dict(kind="int", bits=4, group_size=16)]


def random_model(config: dict = TINY_CONFIG, seed: int = 0):
    """A prism model with random weights, built from the config alone."""
    family = family_for(config)
    args = family.parse_config(config)
    model = empty_model(family, args).to_empty(device="cpu")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1 + 0.1 * torch.randn(p.shape, generator=gen)) if "norm" in name else 0.2 * torch.randn(p.shape, generator=gen))
    model.rotary = Rotary(family.rotary_config(args))  # to_empty wiped the rotary buffer
    model.tie_weights()
    return model.eval()


def rtn(w: torch.Tensor, bits: int, group_size: int) -> dict[str, torch.Tensor]:
    """Round-to-nearest asymmetric group quantization in the codecs' stored layout."""
    out, inp = w.shape
    groups = -(-inp // group_size)
    padded = torch.nn.functional.pad(w.float(), (0, groups * group_size - inp), value=float(w[0, 0]))
    g = padded.reshape(out, groups, group_size)
    lo, hi = g.amin(-1), g.amax(-1)
    scales = ((hi - lo) / (2**bits - 1)).clamp(min=1e-6).half()
    zeros = (-lo / scales.float()).round().clamp(0, 2**bits - 1).half()
    s = scales.float().repeat_interleave(group_size, 1)[:, :inp]
    z = zeros.float().repeat_interleave(group_size, 1)[:, :inp]
    q = (w.float() / s + z).round().clamp(0, 2**bits - 1).to(torch.uint8)
    return {"qweight": pack_bits(q, bits), "scales": scales, "zeros": zeros}


def encode(w: torch.Tensor, enc: Encoding) -> dict[str, torch.Tensor]:
    if enc.kind in ("bf16", "fp16", "fp32"):
        return {"weight": w.to({"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[enc.kind]).contiguous()}
    if enc.kind == "int":
        return rtn(w, enc.bits, enc.group_size)
    out = {}
    if enc.kind == "int+lowrank":
        base = enc.parts()["base"]
        out = {f"base.{k}": v for k, v in rtn(w, base.bits, base.group_size).items()}
        w = w - decode(base, rtn(w, base.bits, base.group_size))
    u, s, vh = torch.linalg.svd(w.float(), full_matrices=False)
    factors = {"lr_a": u[:, : enc.rank] * s[: enc.rank], "lr_b": vh[: enc.rank]}
    for prefix, f in factors.items():
        out.update({f"{prefix}.{k}": v for k, v in encode(f, enc.parts()[prefix]).items()})
    return out


def make_encoding(spec: dict, shape: tuple[int, ...]) -> Encoding:
    if len(shape) == 1:
        return Encoding("fp32", shape)
    if spec.get("rank") == "dense":
        out, inp = shape
        spec = dict(spec, rank=-(-out * inp // (out + inp)))
    return Encoding(shape=shape, **spec)


def container_inputs(model, mix=EXACT_MIX, hot_per_layer: int = 1):
    """(dense, experts) for write_container: dense tensors bf16 / fp32 / int4, experts cycled through `mix`."""
    args = model.args
    dense = {}
    for i, (name, t) in enumerate(model.state_dict().items()):
        if ".mlp.experts." in name or (name == "lm_head.weight" and args.tie_word_embeddings):
            continue
        kind = dict(kind="fp32") if t.dim() == 1 else [dict(kind="bf16"), dict(kind="int", bits=4, group_size=16)][i % 2]
        enc = make_encoding(kind, tuple(t.shape))
        dense[name] = (enc, encode(t, enc))
    cycle = itertools.cycle(mix)
    experts = []
    inter = args.moe_intermediate_size
    for layer, block in model.moe_blocks():
        gate_up, down = block.experts.gate_up_proj.detach(), block.experts.down_proj.detach()
        biases = getattr(block.experts, "gate_up_bias", None)
        for e in range(args.num_experts):
            tensors = {"gate_proj": gate_up[e, :inter], "up_proj": gate_up[e, inter:], "down_proj": down[e]}
            if biases is not None:
                tensors |= {"gate_bias": biases[e, :inter].detach(), "up_bias": biases[e, inter:].detach(),
                            "down_bias": block.experts.down_bias[e].detach()}
            encoded = {}
            for name, w in tensors.items():
                enc = make_encoding(next(cycle), tuple(w.shape))
                encoded[name] = (enc, encode(w, enc))
            hot = e < hot_per_layer
            experts.append(ExpertInput(layer, e, "hot" if hot else "cold", 0.5 / (e + 1), 0.25 / (e + 1),
                                       "fast" if hot else "cold", encoded))
    return dense, experts


def decoded_state(dense, experts, dtype=torch.float32, model=None) -> dict[str, torch.Tensor]:
    """The model state with every tensor decoded in memory (the reference for the round trip); with `model`,
    dense tensors its family keeps in fp32 are decoded in fp32, as the loaders do. Every tensor is a fresh
    allocation: CPU matmuls round differently on misaligned memory (an mmap view), so a reference that
    computes on views is not bit-comparable."""
    from prism_load.container.loader import dense_decode_dtype

    dtype_for = (lambda name: dtype) if model is None else (lambda name: dense_decode_dtype(model.family, model.args, name, dtype))
    state = {name: decode(enc, t, dtype_for(name)).clone() for name, (enc, t) in dense.items()}
    for layer in sorted({x.layer for x in experts}):
        xs = sorted((x for x in experts if x.layer == layer), key=lambda x: x.expert)
        stacked = stack_experts([{n: decode(enc, t, dtype) for n, (enc, t) in x.tensors.items()} for x in xs])
        state.update({f"layers.{layer}.mlp.experts.{k}": v for k, v in stacked.items()})
    return state


def assign_state(model, state: dict[str, torch.Tensor]):
    """Put fresh tensors into a model (assign, not copy into its possibly memory-mapped parameters)."""
    missing, unexpected = model.load_state_dict(state, assign=True, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    return model


def write_tiny(out: Path, model=None, config: dict = TINY_CONFIG, mix=EXACT_MIX, **kwargs) -> Path:
    model = model if model is not None else random_model(config)
    dense, experts = container_inputs(model, mix)
    kwargs.setdefault("shard_size_bytes", 40_000)
    kwargs.setdefault("tokenizer_files", [])
    return write_container(out, config=config, source={"model_id": "test/tiny", "revision": "abc123"},
                           dense=dense, experts=experts, recipe={"name": "test"}, budget={"bits": 3.0}, **kwargs)


def assert_container_equals_in_memory_decode(folder: Path, work: Path, container: Path, plan, tokens: torch.Tensor):
    """The container, loaded with decoded experts in fp32, gives the logits and greedy continuation of the
    original checkpoint with the plan's decoded tensors swapped in memory (the pack adds nothing)."""
    import prism_load
    from prism_convert.compression.workdir import WorkDir
    from prism_convert.packing.materialize import (
        apply_in_memory,
        decoded_state,
        dense_tensors,
        planned_experts,
    )

    works = [WorkDir(work)]
    state = decoded_state(dense_tensors(works), list(planned_experts(works, plan, 0.25, 0.0)))
    expected = apply_in_memory(prism_load.load(folder, dtype=torch.float32), state)
    model = prism_load.load(container, dtype=torch.float32, expert_form="decoded")
    with torch.no_grad():
        assert torch.equal(model(tokens), expected(tokens))
    prompt = tokens[:1, :5]
    assert model.generate(prompt, max_new_tokens=6).tolist() == expected.generate(prompt, max_new_tokens=6).tolist()

"""DeepSeek-V2/V3 and GPT-OSS beyond the shared parity cases: quantised checkpoints (block FP8, MXFP4) against
transformers on the dequantised weights, cached decoding (MLA latents, sliding windows with sinks), and the
config switches one at a time."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from containers import assert_container_equals_in_memory_decode
from numerics import e2m1_reference, e4m3_reference, rel_max_error
from safetensors.torch import load_file, save_file
from tiny import CASES, build_hf_model, prefill_then_steps

import prism_load
from prism_load.errors import CheckpointError, ConfigError
from prism_load.models.family import family_for

INDEX = "model.safetensors.index.json"


def rewrite_checkpoint(src: Path, dst: Path, convert, config_update: dict | None = None) -> Path:
    """Copy a sharded checkpoint, passing every tensor through convert(name, tensor) -> {name: tensor}."""
    dst.mkdir(parents=True)
    index = json.loads((src / INDEX).read_text())
    weight_map = {}
    for shard in sorted(set(index["weight_map"].values())):
        out = {}
        for name, tensor in load_file(src / shard).items():
            out.update(convert(name, tensor))
        save_file(out, dst / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(out, shard))
    (dst / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, **(config_update or {})}))
    shutil.copy(src / "generation_config.json", dst / "generation_config.json")
    return dst


def assert_matches(folder: Path, ref, vocab: int) -> None:
    """The shared parity criteria: fp32 logits within 1e-4 relative, identical greedy continuation."""
    model = prism_load.load(folder, dtype=torch.float32)
    ids = torch.randint(0, vocab, (2, 13))
    with torch.no_grad():
        assert rel_max_error(model(ids), ref(ids).logits) < 1e-4
    prompt = torch.randint(0, vocab, (1, 7))
    ours = model.generate(prompt, max_new_tokens=12, eos_token_id=[])
    assert ours.tolist() == ref.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=vocab).tolist()


# --- DeepSeek-V3 in block FP8 ------------------------------------------------------------------------------------

FP8_BLOCK = [16, 16]  # small blocks so the tiny shapes (40, 18, 24, 80 ...) have several, with partial edges


def fp8_quantize(w: torch.Tensor, block: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block absmax scaling into e4m3 (as DeepSeek's converter does); returns (fp8, scale_inv)."""
    rows, cols = w.shape
    scale = torch.empty(math.ceil(rows / block[0]), math.ceil(cols / block[1]))
    q = torch.empty_like(w)
    for bi in range(scale.shape[0]):
        for bj in range(scale.shape[1]):
            tile = w[bi * block[0] : (bi + 1) * block[0], bj * block[1] : (bj + 1) * block[1]]
            scale[bi, bj] = tile.abs().max().clamp_min(1e-12) / 448.0
            q[bi * block[0] : (bi + 1) * block[0], bj * block[1] : (bj + 1) * block[1]] = tile / scale[bi, bj]
    return q.to(torch.float8_e4m3fn), scale


def fp8_dequantize_reference(q: torch.Tensor, scale: torch.Tensor, block: list[int]) -> torch.Tensor:
    values = torch.from_numpy(e4m3_reference(q.view(torch.uint8).numpy())).float()
    i = torch.arange(q.shape[0]) // block[0]
    j = torch.arange(q.shape[1]) // block[1]
    return values * scale[i[:, None], j[None, :]]


def fp8_quantised(name: str) -> bool:
    """The tensors DeepSeek-V3's published FP8 checkpoint stores in e4m3: every linear but router, embedding, head."""
    return name.endswith(".weight") and "layernorm" not in name and not name.endswith(
        ("mlp.gate.weight", "embed_tokens.weight", "lm_head.weight", "norm.weight"))


@pytest.fixture(scope="module")
def fp8_checkpoints(tmp_path_factory):
    """(FP8 checkpoint, transformers model on the reference-dequantised weights)."""
    root = tmp_path_factory.mktemp("deepseek_v3_fp8")
    build_hf_model("deepseek_v3", seed=3).save_pretrained(root / "fp32", max_shard_size="40KB")
    encoded = {}

    def quantise(name, t):
        if name == "model.norm.weight":  # plus a multi-token-prediction layer past the last one, as V3 ships
            mtp = "model.layers.3.eh_proj.weight"
            q, s = fp8_quantize(torch.randn(40, 80), FP8_BLOCK)
            return {name: t, "model.layers.3.enorm.weight": torch.ones(40), mtp: q, f"{mtp}_scale_inv": s}
        if not fp8_quantised(name):
            return {name: t}
        q, s = fp8_quantize(t, FP8_BLOCK)
        encoded[name] = (q, s)
        return {name: q, f"{name}_scale_inv": s}

    def dequantise(name, t):
        if name in encoded:
            return {name: fp8_dequantize_reference(*encoded[name], FP8_BLOCK)}
        return {name: t}

    qc = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": FP8_BLOCK}
    fp8 = rewrite_checkpoint(root / "fp32", root / "fp8", quantise,
                             {"quantization_config": qc, "num_nextn_predict_layers": 1})
    reference = rewrite_checkpoint(root / "fp32", root / "reference", dequantise)
    import transformers

    ref = transformers.AutoModelForCausalLM.from_pretrained(
        reference, dtype=torch.float32, attn_implementation="eager", experts_implementation="eager"
    ).eval()
    return fp8, ref, encoded


def test_fp8_checkpoint_is_really_quantised(fp8_checkpoints):
    fp8, _, encoded = fp8_checkpoints
    names = set(json.loads((fp8 / INDEX).read_text())["weight_map"])
    assert "model.layers.1.mlp.experts.3.down_proj.weight_scale_inv" in names
    assert "model.layers.0.self_attn.kv_b_proj.weight_scale_inv" in names
    assert "model.layers.1.mlp.gate.weight_scale_inv" not in names
    assert "model.layers.3.eh_proj.weight" in names  # the MTP layer, which loading must skip
    q, s = encoded["model.layers.1.mlp.experts.3.gate_proj.weight"]  # [18, 40] in 16x16 blocks: 2 x 3
    assert q.dtype == torch.float8_e4m3fn and s.shape == (2, 3)


def test_fp8_deepseek_v3_matches_transformers_on_dequantised_weights(fp8_checkpoints):
    fp8, ref, _ = fp8_checkpoints
    assert_matches(fp8, ref, CASES["deepseek_v3"][1]["vocab_size"])


def test_fp8_expert_tensors_are_dequantised_when_read(fp8_checkpoints):
    from prism_load.hf_loader import open_checkpoint

    fp8, _, encoded = fp8_checkpoints
    ckpt, family, args = open_checkpoint(fp8)
    tensors = family.expert_tensors(args, 2, 7, ckpt, torch.float32)
    for key in ("gate_proj", "up_proj", "down_proj"):
        expected = fp8_dequantize_reference(*encoded[f"model.layers.2.mlp.experts.7.{key}.weight"], FP8_BLOCK)
        assert torch.equal(tensors[key], expected)


def test_fp8_checkpoint_of_any_family_is_dequantised_when_read(tmp_path):
    """Block FP8 is a checkpoint encoding, not a DeepSeek feature (Qwen3-MoE ships FP8 checkpoints too): every
    family reads it dequantised, and matches transformers on the reference-dequantised weights."""
    build_hf_model("qwen3_moe", seed=5).save_pretrained(tmp_path / "fp32", max_shard_size="40KB")
    encoded = {}

    def quantise(name, t):
        if t.dim() != 2 or not name.endswith("proj.weight"):
            return {name: t}
        encoded[name] = fp8_quantize(t, FP8_BLOCK)
        return {name: encoded[name][0], f"{name}_scale_inv": encoded[name][1]}

    def dequantise(name, t):
        return {name: fp8_dequantize_reference(*encoded[name], FP8_BLOCK)} if name in encoded else {name: t}

    qc = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": FP8_BLOCK}
    fp8 = rewrite_checkpoint(tmp_path / "fp32", tmp_path / "fp8", quantise, {"quantization_config": qc})
    reference = rewrite_checkpoint(tmp_path / "fp32", tmp_path / "reference", dequantise)
    assert any(".mlp.experts." in n for n in encoded) and any(".self_attn." in n for n in encoded)
    import transformers

    ref = transformers.AutoModelForCausalLM.from_pretrained(
        reference, dtype=torch.float32, attn_implementation="eager", experts_implementation="eager"
    ).eval()
    assert_matches(fp8, ref, CASES["qwen3_moe"][1]["vocab_size"])


def test_fp8_tensor_without_its_scale_is_refused(tmp_path):
    """Casting e4m3 bits to float without the block scales gives a silently wrong weight: refuse, naming both."""
    build_hf_model("mixtral", seed=6).save_pretrained(tmp_path / "fp32", max_shard_size="40KB")
    name = "model.layers.0.self_attn.q_proj.weight"
    fp8 = rewrite_checkpoint(
        tmp_path / "fp32", tmp_path / "fp8", lambda n, t: {n: t.to(torch.float8_e4m3fn) if n == name else t}
    )
    with pytest.raises(CheckpointError, match=rf"{name} in .* is torch.float8_e4m3fn .* neither {name}_scale_inv "
                                              rf"\(block scales\) nor {name}_scale "):
        prism_load.load(fp8)


def test_compressed_tensors_fp8_with_tensor_and_row_scales(tmp_path):
    """The compressed-tensors FP8 layout (FP8 Mixtral checkpoints): `weight_scale` per tensor or per output
    row, multiplied in; `input_scale` (activations) beside it and unused. Matches transformers on the
    weights dequantised by hand."""
    build_hf_model("mixtral", seed=7).save_pretrained(tmp_path / "fp32", max_shard_size="40KB")
    encoded = {}

    def quantise(name, t):
        if t.dim() != 2 or not name.endswith(("proj.weight", ".w1.weight", ".w2.weight", ".w3.weight")):
            return {name: t}
        per_row = len(encoded) % 2 == 0  # alternate the two strategies
        amax = t.abs().amax(dim=1, keepdim=True) if per_row else t.abs().amax().reshape(1)
        scale = (amax / 448.0).clamp(min=1e-12)
        q = (t / scale).to(torch.float8_e4m3fn)
        encoded[name] = q.to(torch.float32) * scale
        return {name: q, f"{name}_scale": scale, f"{name.removesuffix('.weight')}.input_scale": torch.ones(1)}

    fp8 = rewrite_checkpoint(tmp_path / "fp32", tmp_path / "fp8", quantise,
                             {"quantization_config": {"quant_method": "compressed-tensors", "format": "float-quantized"}})
    reference = rewrite_checkpoint(tmp_path / "fp32", tmp_path / "reference",
                                   lambda n, t: {n: encoded.get(n, t)})
    assert any(".experts." in n for n in encoded) and any(".self_attn." in n for n in encoded)
    import transformers

    ref = transformers.AutoModelForCausalLM.from_pretrained(
        reference, dtype=torch.float32, attn_implementation="eager", experts_implementation="eager"
    ).eval()
    assert_matches(fp8, ref, CASES["mixtral"][1]["vocab_size"])


# --- GPT-OSS in MXFP4 --------------------------------------------------------------------------------------------


def mxfp4_reference(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """[E, rows, G, 16] + [E, rows, G] -> [E, rows, 32 G], one element at a time from the bits."""
    lut = torch.tensor([e2m1_reference(n) for n in range(16)])
    low, high = lut[(blocks & 0xF).long()], lut[(blocks >> 4).long()]
    values = torch.stack([low, high], dim=-1).flatten(-2)  # even element from the low nibble
    values = values * torch.pow(2.0, scales.double() - 127).float()[..., None]
    return values.flatten(-2)


@pytest.fixture(scope="module")
def mxfp4_checkpoint(tmp_path_factory):
    """(MXFP4 checkpoint, transformers model holding the same expert weights decoded by the reference)."""
    root = tmp_path_factory.mktemp("gpt_oss_mxfp4")
    ref = build_hf_model("gpt_oss", seed=4)
    g = torch.Generator().manual_seed(4)
    codes = {}
    with torch.no_grad():
        for i, layer in enumerate(ref.model.layers):
            experts = layer.mlp.experts
            for proj in ("gate_up_proj", "down_proj"):
                n, cols, rows = getattr(experts, proj).shape  # in memory [E, in, out], used as x @ W
                blocks = torch.randint(0, 256, (n, rows, cols // 32, 16), generator=g, dtype=torch.uint8)
                scales = torch.randint(120, 125, (n, rows, cols // 32), generator=g, dtype=torch.uint8)
                codes[f"model.layers.{i}.mlp.experts.{proj}"] = (blocks, scales)
                getattr(experts, proj).copy_(mxfp4_reference(blocks, scales).transpose(1, 2))
    ref.save_pretrained(root / "fp32", max_shard_size="40KB")

    def encode(name, t):
        if name not in codes:
            return {name: t}
        return {f"{name}_blocks": codes[name][0], f"{name}_scales": codes[name][1]}

    qc = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    return rewrite_checkpoint(root / "fp32", root / "mxfp4", encode, {"quantization_config": qc}), ref


def test_mxfp4_gpt_oss_matches_transformers_on_decoded_weights(mxfp4_checkpoint):
    folder, ref = mxfp4_checkpoint
    names = json.loads((folder / INDEX).read_text())["weight_map"]
    assert "model.layers.0.mlp.experts.gate_up_proj_blocks" in names
    assert "model.layers.0.mlp.experts.gate_up_proj" not in names
    assert_matches(folder, ref, CASES["gpt_oss"][1]["vocab_size"])


def test_mxfp4_layout_agrees_with_transformers_own_loader(mxfp4_checkpoint):
    """transformers dequantises MXFP4 itself on CPU: its experts must equal ours (layout, interleave, bias split)."""
    import transformers

    folder, _ = mxfp4_checkpoint
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, quantization_config=transformers.Mxfp4Config(dequantize=True),
        attn_implementation="eager", experts_implementation="eager",
    )
    ours = prism_load.load(folder, dtype=torch.float32)
    for i in range(len(ours.layers)):
        t, o = theirs.model.layers[i].mlp.experts, ours.layers[i].mlp.experts
        inter = o.down_proj.shape[2]
        gate_up = t.gate_up_proj.transpose(1, 2)  # [E, 2I, H], gate/up rows interleaved
        assert torch.equal(o.gate_up_proj[:, :inter], gate_up[:, 0::2].float())
        assert torch.equal(o.gate_up_proj[:, inter:], gate_up[:, 1::2].float())
        assert torch.equal(o.down_proj, t.down_proj.transpose(1, 2).float())
        assert torch.equal(o.gate_up_bias[:, :inter], t.gate_up_proj_bias[:, 0::2].float())
        assert torch.equal(o.down_bias, t.down_proj_bias.float())


@pytest.mark.parametrize("name", ["deepseek_v3", "gpt_oss"])
def test_bfloat16_load_holds_routers_as_the_arithmetic_needs(name, tiny_checkpoint):
    """bf16 weights computing in fp32 (the CPU default): every router in fp32 with the big matrices in bf16. With
    bf16 arithmetic asked for, DeepSeek's router stays fp32 as transformers keeps it, GPT-OSS's is bf16."""
    folder, ref = tiny_checkpoint(name)
    for compute, router_dtype in ((None, torch.float32),
                                  (torch.bfloat16, torch.float32 if name.startswith("deepseek") else torch.bfloat16)):
        model = prism_load.load(folder, dtype=torch.bfloat16, compute_dtype=compute)
        router = model.layers[-1].mlp.router
        assert router.weight.dtype == router_dtype
        assert model.layers[-1].self_attn.o_proj.weight.dtype == torch.bfloat16
        assert model.embed_tokens.weight.dtype == torch.bfloat16
        ids = torch.randint(0, ref.config.vocab_size, (1, 5))
        with torch.no_grad():
            assert model(ids).dtype == (compute or torch.float32)
        out = model.generate(ids, max_new_tokens=4, eos_token_id=[])
        assert out.shape == (1, 9)


# --- cached decoding ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["deepseek_v3", "deepseek_v2_group_limited", "gpt_oss"])
def test_incremental_decode_matches_full_forward(name, tiny_checkpoint):
    """Prefill + one-token steps (MLA's latent cache; GPT-OSS windows of 4 with sinks, crossed at step 6) equal one
    forward over the whole sequence."""
    folder, ref = tiny_checkpoint(name)
    model = prism_load.load(folder, dtype=torch.float32)
    stepped, full, cache = prefill_then_steps(model, torch.randint(0, ref.config.vocab_size, (2, 11)), 5)
    assert rel_max_error(stepped, full) < 1e-5
    assert cache.keys[0].shape[1] == (1 if name.startswith("deepseek") else ref.config.num_key_value_heads)


# --- config switches ---------------------------------------------------------------------------------------------


def hf_config(name: str, **overrides) -> dict:
    import transformers

    model_type, kwargs = CASES[name]
    return transformers.AutoConfig.for_model(model_type, **{**kwargs, **overrides}).to_dict()


@pytest.mark.parametrize("name", ["deepseek_v2_greedy_yarn", "deepseek_v3", "deepseek_v3_halves_bias"])
def test_softmax_scale_and_rope_match_transformers(name):
    """The yarn mscale correction of the softmax scale, and the rotary tables, as transformers builds them."""
    model = build_hf_model(name)
    args = family_for(model.config.to_dict()).parse_config(model.config.to_dict())
    assert args.softmax_scale == pytest.approx(model.model.layers[0].self_attn.scaling, rel=1e-12)
    from prism_load.models.rope import Rotary

    rotary = Rotary(args.rope)
    assert torch.equal(rotary.inv_freq, model.model.rotary_emb.inv_freq)
    assert rotary.attention_scaling == pytest.approx(model.model.rotary_emb.attention_scaling, rel=1e-12)


def test_deepseek_layer_map_follows_first_k_dense_and_moe_layer_freq():
    config = hf_config("deepseek_v3", num_hidden_layers=7, first_k_dense_replace=2)
    family = family_for(config)
    assert family.parse_config(config).moe_layers == (2, 3, 4, 5, 6)
    config["moe_layer_freq"] = 2  # DeepSeek's own code: MoE iff i >= k and i % freq == 0
    assert family.parse_config(config).moe_layers == (2, 4, 6)


def test_deepseek_legacy_rope_scaling_reads_like_rope_parameters():
    """Published configs carry rope_theta + rope_scaling {"type": "yarn", ...}; transformers v5 saves rope_parameters."""
    config = hf_config("deepseek_v3")
    params = dict(config["rope_parameters"])
    legacy = {k: v for k, v in config.items() if k != "rope_parameters"}
    legacy["rope_theta"] = params.pop("rope_theta")
    params["type"] = params.pop("rope_type")
    legacy["rope_scaling"] = params
    family = family_for(config)
    new, old = family.parse_config(config), family.parse_config(legacy)
    assert old.rope.rope_type == new.rope.rope_type == "yarn"
    assert (old.rope.theta, old.softmax_scale) == (new.rope.theta, new.softmax_scale)
    assert torch.equal(old.rope.inv_freq()[0], new.rope.inv_freq()[0])
    assert old.rope.inv_freq()[1] == new.rope.inv_freq()[1] != 1.0


@pytest.mark.parametrize("overrides,field", [
    (dict(n_group=5), "n_group"),  # 12 experts do not split into 5 groups
    (dict(topk_group=1, num_experts_per_tok=4), "n_group"),  # one kept group of 3 cannot hold the top-4
    (dict(scoring_func="softmax"), "scoring_func"),
    (dict(hidden_act="gelu"), "hidden_act"),
])
def test_deepseek_v3_rejects_switches_it_would_compute_differently(overrides, field):
    config = {**hf_config("deepseek_v3"), **overrides}
    with pytest.raises(ConfigError, match=field):
        family_for(config).parse_config(config)


def test_deepseek_v2_rejects_unknown_topk_method():
    config = {**hf_config("deepseek_v2_greedy_yarn"), "topk_method": "noaux_tc"}
    with pytest.raises(ConfigError, match="topk_method 'noaux_tc'"):
        family_for(config).parse_config(config)


def test_gpt_oss_default_layer_types_and_rope_match_transformers():
    """Without layer_types / rope in config.json, transformers slides on even layers and uses yarn x32."""
    import transformers

    _, kwargs = CASES["gpt_oss"]
    kwargs = {k: v for k, v in kwargs.items() if k != "layer_types"}
    config = transformers.AutoConfig.for_model("gpt_oss", **kwargs)
    raw = {k: v for k, v in config.to_dict().items() if k not in ("layer_types", "rope_parameters", "rope_scaling")}
    args = family_for(raw).parse_config(raw)
    assert args.sliding_windows == tuple(4 if t == "sliding_attention" else None for t in config.layer_types)
    from prism_load.models.rope import Rotary

    theirs = transformers.AutoModelForCausalLM.from_config(config).model.rotary_emb
    assert torch.equal(Rotary(args.rope).inv_freq, theirs.inv_freq)
    assert Rotary(args.rope).attention_scaling == pytest.approx(theirs.attention_scaling)


def test_router_functions_match_transformers_on_many_tokens():
    """Group masking and bias correction decide ties the tiny parity runs rarely reach: 2,000 tokens each."""
    from prism_load.models.deepseek import DeepseekRouter
    from prism_load.models.gpt_oss import GptOssRouter

    torch.manual_seed(5)
    x = torch.randn(2000, 48)
    for name in ("deepseek_v2_group_limited", "deepseek_v3"):
        model = build_hf_model(name)
        layer = model.config.first_k_dense_replace
        theirs = model.model.layers[layer].mlp.gate
        family = family_for(model.config.to_dict())
        args = family.parse_config(model.config.to_dict())
        ours = DeepseekRouter(args, v3=name == "deepseek_v3")
        ours.load_state_dict({k: v for k, v in theirs.state_dict().items()})
        h = x[:, : args.hidden_size]
        _, t_weights, t_idx = theirs(h)
        route = ours(h)
        order_t, order_o = t_idx.sort(dim=-1), route.indices.sort(dim=-1)
        assert torch.equal(order_t.values, order_o.values)
        assert torch.allclose(t_weights.gather(1, order_t.indices), route.weights.gather(1, order_o.indices))
    model = build_hf_model("gpt_oss")
    theirs = model.model.layers[0].mlp.router
    ours = GptOssRouter(96, 5, 2)
    ours.load_state_dict(theirs.state_dict())
    h = torch.randn(2000, 96)
    _, t_weights, t_idx = theirs(h)
    route = ours(h)
    assert torch.equal(route.indices, t_idx) and torch.equal(route.weights, t_weights)


# --- whole pipeline: profile -> compress -> pack -> load ---------------------------------------------------------

PIPELINE_RECIPE = {"quantization": {"group_size": 16, "max_tokens_per_expert": 64},
                   "candidates": {"int_bits": [2, 3, 4, 8], "int_lowrank": [[2, 0.25]]}, "limits": {"max_bits": 12.0},
                   "dense": {"attention": "int8"}}


def run_pipeline(folder: Path, root: Path, vocab: int, recipe: dict, extra_bits: float):
    """profile -> compress -> pack at `extra_bits` above the lowest budget the recipe allows (tiny experts
    are dominated by their 4 KiB alignment, so absolute bit-widths mean little here)."""
    from prism_convert.allocation.bit_plan import Budget, PlanInputs
    from prism_convert.compression.compress_layers import run_compress
    from prism_convert.compression.workdir import WorkDir
    from prism_convert.pipeline import pack_work
    from prism_convert.profiling.profiler import run_profile
    from prism_convert.recipe import Recipe

    tokens = torch.randint(0, vocab, (6, 16), generator=torch.Generator().manual_seed(5))
    run_profile(folder, tokens, root / "profile", {"spec": "random"}, min_tokens=4)
    run_compress(folder, root / "profile", Recipe.from_dict(recipe), root / "work")
    bits = PlanInputs.read([WorkDir(root / "work")]).lowest_bits() + extra_bits
    plan = pack_work([root / "work"], root / "m.prism", Budget(bits=bits), shard_size_bytes=1 << 16)
    assert plan.bits_per_expert_weight <= bits
    return tokens, plan


SLOW = pytest.mark.slow


@pytest.mark.parametrize("source", [
    "fp8", "mxfp4",  # one source per family by default: the quantised ones cover the most code
    pytest.param("deepseek_v2_group_limited", marks=SLOW), pytest.param("deepseek_v3", marks=SLOW),
    pytest.param("gpt_oss", marks=SLOW),
])
def test_pipeline_container_equals_in_memory_decode(source, tiny_checkpoint, tmp_path, request):
    """The container of each family (and of the FP8 / MXFP4 sources, dequantised while streaming) loads and
    equals the source model with the same encodings applied in memory; DeepSeek's router stays fp32 in it."""
    if source == "fp8":
        folder, ref = request.getfixturevalue("fp8_checkpoints")[:2]
    elif source == "mxfp4":
        folder, ref = request.getfixturevalue("mxfp4_checkpoint")
    else:
        folder, ref = tiny_checkpoint(source)
    tokens, plan = run_pipeline(folder, tmp_path, ref.config.vocab_size, PIPELINE_RECIPE, extra_bits=1.0)
    assert_container_equals_in_memory_decode(folder, tmp_path / "work", tmp_path / "m.prism", plan, tokens)
    if source not in ("gpt_oss", "mxfp4"):
        assert prism_load.load(tmp_path / "m.prism", dtype=torch.bfloat16).layers[-1].mlp.router.weight.dtype == torch.float32


@SLOW
@pytest.mark.parametrize("source", ["fp8", "mxfp4"])
def test_pipeline_at_8_bits_stays_close_to_transformers(source, tmp_path, request):
    """Quantised sources through the pipeline with room for 8 bits (dense fp32): logits near transformers' on the
    dequantised weights, so the streamed dequantisation feeds compress the right numbers."""
    folder, ref = (request.getfixturevalue("fp8_checkpoints")[:2] if source == "fp8"
                   else request.getfixturevalue("mxfp4_checkpoint"))
    exact = {k: "fp32" for k in ("attention", "shared_expert", "dense_mlp", "embedding", "lm_head")}
    recipe = {**PIPELINE_RECIPE, "candidates": {"int_bits": [8]}, "dense": exact}
    tokens, _ = run_pipeline(folder, tmp_path, ref.config.vocab_size, recipe, extra_bits=0.0)  # the menu is int8 only
    model = prism_load.load(tmp_path / "m.prism", dtype=torch.float32)
    with torch.no_grad():
        assert rel_max_error(model(tokens), ref(tokens).logits) < 0.02

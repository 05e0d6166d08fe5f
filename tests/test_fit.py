"""prism plan: parameter counts, bytes, placement and decode ceilings against hand-computed numbers.

Every expected number below is worked out by hand from the published config values (written out in the
comments), never by calling the code under test a second way.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from shape_arithmetic import ARITHMETIC

from prism_convert.tools import model_shape
from prism_convert.tools.fit import (
    Machine,
    Storage,
    WeightFormat,
    human_bytes,
    inventory,
    parse_bytes,
    plan,
    routing_frequencies,
)
from prism_load.errors import BudgetError, ConfigError

CONFIGS = Path(__file__).parent / "fixtures" / "configs"
GB = 10**9


# -- units -------------------------------------------------------------------------------------------------
def test_parse_bytes_decimal_binary_and_rates():
    assert parse_bytes("32GB") == 32 * GB
    assert parse_bytes("24GiB") == 24 * 2**30
    assert parse_bytes("1.5 TB") == 1_500_000_000_000
    assert parse_bytes("25GB/s") == 25 * GB
    assert parse_bytes("0") == 0
    with pytest.raises(BudgetError, match="'32 GX'"):
        parse_bytes("32 GX")
    assert human_bytes(122_649_876_480) == "122.6 GB"


# -- bits per weight ---------------------------------------------------------------------------------------
def test_int_format_counts_scales_and_zeros():
    fmt = WeightFormat(2, 128)
    # [2048, 7168] at 2 bits: qweight 2048 x 1792 B, scales and zeros 2048 x 56 groups x 2 B each
    assert fmt.nbytes((2048, 7168)) == 2048 * 1792 + 2 * 2048 * 56 * 2 == 4_128_768
    assert 8 * fmt.nbytes((2048, 7168)) / (2048 * 7168) == 2.25
    # row padding: 130 inputs at 3 bits = 390 bits -> 49 bytes per row; 2 groups per row
    assert WeightFormat(3, 128).nbytes((3, 130)) == 3 * 49 + 2 * (3 * 2 * 2)
    assert WeightFormat(16).nbytes((10, 7)) == 140
    assert WeightFormat(2.5).nbytes((10, 7)) == 22  # average bits: ceil(70 * 2.5 / 8)
    assert WeightFormat(4, 64).label() == "int4/g64"
    with pytest.raises(BudgetError, match="--bits 0.5"):
        WeightFormat(0.5)
    with pytest.raises(BudgetError, match="'fp4'"):
        Storage(WeightFormat(4), "fp4")


# -- parameter counts of real models -----------------------------------------------------------------------
def deepseek_v3_params() -> dict:
    """DeepSeek-V3: vocab 129280, H 7168, 61 layers (3 dense), 128 heads, q_lora 1536, kv_lora 512,
    nope 128, rope 64, v 128, dense I 18432, 256 experts of 2048 + 1 shared, top-8."""
    h, v = 7168, 129280
    attn = 1536 * h + 128 * 192 * 1536 + (512 + 64) * h + 128 * 256 * 512 + h * 128 * 128
    expert = 3 * h * 2048
    return {
        "embedding": v * h,
        "lm_head": v * h,
        "attention": 61 * attn,
        "norms": 61 * (2 * h + 1536 + 512) + h,
        "routers": 58 * (256 * h + 256),
        "shared_experts": 58 * expert,
        "dense_mlp": 3 * 3 * h * 18432,
        "routed_experts": 58 * 256 * expert,
    }


def mixtral_params() -> dict:
    """Mixtral-8x7B: vocab 32000, H 4096, 32 layers, 32 heads of 128 (8 kv), 8 experts of 14336, top-2."""
    h = 4096
    return {
        "embedding": 32000 * h,
        "lm_head": 32000 * h,
        "attention": 32 * (2 * h * h + 2 * h * 1024),
        "norms": 32 * 2 * h + h,
        "routers": 32 * 8 * h,
        "shared_experts": 0,
        "dense_mlp": 0,
        "routed_experts": 32 * 8 * 3 * h * 14336,
    }


def qwen3_params() -> dict:
    """Qwen3-30B-A3B: vocab 151936, H 2048, 48 layers, 32 heads (4 kv) of 128, q/k norms, 128 experts of 768."""
    h = 2048
    return {
        "embedding": 151936 * h,
        "lm_head": 151936 * h,
        "attention": 48 * (2 * h * 4096 + 2 * h * 512),
        "norms": 48 * (2 * h + 2 * 128) + h,
        "routers": 48 * 128 * h,
        "shared_experts": 0,
        "dense_mlp": 0,
        "routed_experts": 48 * 128 * 3 * h * 768,
    }


def gpt_oss_params() -> dict:
    """GPT-OSS-120B: vocab 201088, H 2880, 36 layers, 64 heads (8 kv) of 64 with biases and sinks,
    128 experts of 2880 with biases, biased router, top-4."""
    h = 2880
    attn = (h * 4096 + 4096) + 2 * (h * 512 + 512) + (4096 * h + h) + 64
    expert = (2 * 2880 * h + 2 * 2880) + (h * 2880 + h)
    return {
        "embedding": 201088 * h,
        "lm_head": 201088 * h,
        "attention": 36 * attn,
        "norms": 36 * 2 * h + h,
        "routers": 36 * (128 * h + 128),
        "shared_experts": 0,
        "dense_mlp": 0,
        "routed_experts": 36 * 128 * expert,
    }


# (fixture, hand-computed classes, published total, active per token, experts per token x expert params x layers)
MODELS = {
    "deepseek-v3": (deepseek_v3_params, 671_026_419_200, 8 * 3 * 7168 * 2048 * 58),
    "mixtral-8x7b": (mixtral_params, 46_702_792_704, 2 * 3 * 4096 * 14336 * 32),
    "qwen3-30b-a3b": (qwen3_params, 30_532_122_624, 8 * 3 * 2048 * 768 * 48),
    "gpt-oss-120b": (gpt_oss_params, 116_829_156_672, 4 * (3 * 2880 * 2880 + 2 * 2880 + 2880) * 36),
}


@pytest.fixture(scope="module")
def plans():
    """One 2-bit plan per fixture against 32 GB GPU + 64 GB RAM (meta-device models are built once)."""
    return {name: plan(CONFIGS / f"{name}.json", 2, 32 * GB, 64 * GB) for name in MODELS}


@pytest.mark.parametrize("name", MODELS)
def test_parameter_counts_match_hand_arithmetic(plans, name):
    hand, total, routed_active = MODELS[name]
    expected = hand()
    params = plans[name]["parameters"]
    assert {k: params[k] for k in expected} == expected
    assert params["total"] == sum(expected.values()) == total
    # active = everything read per token: all but the embedding table (one row) and the unchosen experts
    dense_read = sum(n for k, n in expected.items() if k not in ("embedding", "routed_experts"))
    assert params["active_per_token"] == dense_read + routed_active


def test_published_sizes(plans):
    """Cross-check against the model cards: 671B/37B, 46.7B/12.9B, 30.5B/3.3B, 116.8B/5.1B (active incl. embedding
    for Mixtral/Qwen/DeepSeek; OpenAI's 5.13B for gpt-oss counts the unembedding only)."""
    p = {n: r["parameters"] for n, r in plans.items()}
    active_with_embedding = {n: x["active_per_token"] + x["embedding"] for n, x in p.items()}
    assert (
        round(p["deepseek-v3"]["total"] / 1e9) == 671
        and round(active_with_embedding["deepseek-v3"] / 1e9) == 38
    )
    assert (
        round(p["mixtral-8x7b"]["total"] / 1e8) == 467
        and round(active_with_embedding["mixtral-8x7b"] / 1e8) == 129
    )
    assert (
        round(p["qwen3-30b-a3b"]["total"] / 1e8) == 305
        and round(active_with_embedding["qwen3-30b-a3b"] / 1e8) == 34
    )
    assert (
        round(p["gpt-oss-120b"]["total"] / 1e8) == 1168
        and round(p["gpt-oss-120b"]["active_per_token"] / 1e7) == 513
    )


# -- the case: DeepSeek-V3 at 2 bits on 32 GB GPU + 64 GB RAM --------------------------------------
def test_deepseek_v3_at_2_bits_does_not_fit_32gb_gpu_64gb_ram(plans):
    r = plans["deepseek-v3"]
    p = deepseek_v3_params()
    # routed experts int2/g128: 2.25 bits per weight exactly (7168 and 2048 are multiples of 128)
    expert_bytes = p["routed_experts"] * 9 // 32
    # bf16: attention, shared experts, dense MLP layers, embedding, LM head; fp32: routers, norms
    dense_bytes = 2 * (
        p["attention"] + p["shared_experts"] + p["dense_mlp"] + p["embedding"] + p["lm_head"]
    ) + 4 * (p["routers"] + p["norms"])
    kv_bytes = 4096 * 61 * (512 + 64) * 2  # MLA caches the latent and the shared rope key, bf16
    assert expert_bytes == 183_911_841_792 and dense_bytes == 34_450_200_576 and kv_bytes == 287_834_112
    assert r["expert_bytes"] == expert_bytes
    assert r["dense_bytes"] == dense_bytes
    assert r["total_bytes"] == expert_bytes + dense_bytes == 218_362_042_368
    assert r["kv_cache_bytes"] == kv_bytes
    assert r["needed_bytes"] == 218_649_876_480
    assert r["fits"] is False
    assert r["memory_bytes"] == 96 * GB
    assert r["shortfall_bytes"] == 218_649_876_480 - 96 * GB == 122_649_876_480
    assert r["gpu_bytes"] == 32 * GB  # dense + KV (34.7 GB) alone overflow the GPU
    assert r["gpu_bytes"] + r["ram_bytes"] + r["disk_bytes"] == r["needed_bytes"]
    assert r["experts"]["gpu"] == 0
    per_expert = 3 * 7168 * 2048 * 9 // 32
    ram_left = 96 * GB - (dense_bytes + kv_bytes)
    assert r["experts"]["ram"] == ram_left // per_expert == 4945
    assert r["experts"]["disk"] == 58 * 256 - 4945
    assert r["verdict"].startswith(
        "does not fit: needs 218.6 GB (218,649,876,480 bytes) at int2/g128 (2.250 bits"
    )
    assert "GPU 32.0 GB + RAM 64.0 GB = 96.0 GB; 122.6 GB short (122,649,876,480 bytes)" in r["verdict"]
    assert any("exceed the GPU" in w for w in r["warnings"])
    # uniform routing: each expert is read by 8/256 of tokens, so the disk serves 9,903 x 12,386,304 / 32 bytes
    assert r["read_bytes_per_token"]["disk"] == 9903 * per_expert // 32 == 3_833_174_016
    assert r["tokens_per_second_ceiling"] < 1 / (3_833_174_016 / 5e9)
    assert any(
        w.startswith("9,903 of 14,848 experts stay on disk: 3.8 GB of each token's reads")
        for w in r["warnings"]
    )


def test_qwen3_fits_and_its_kv_cache(plans):
    r = plans["qwen3-30b-a3b"]
    assert r["kv_cache_bytes"] == 4096 * 48 * 2 * 4 * 128 * 2
    assert r["fits"] and r["ram_bytes"] == 0 and r["experts"]["gpu"] == 48 * 128
    assert r["verdict"].startswith("fits entirely in GPU memory")


def test_gpt_oss_group_overhead_and_sliding_window_reads():
    r = plan(CONFIGS / "gpt-oss-120b.json", 2, 1000 * GB, 0)
    # 2880 inputs = 22.5 groups of 128 -> 23 groups: a row is 720 B of 2-bit codes + 23 x (scale, zero) fp16
    row = 2880 * 2 // 8 + 23 * 2 * 2
    expert = (2 * 2880 + 2880) * row + (2 * 2880 + 2880) * 2  # gate_up and down rows; bf16 biases
    assert r["expert_bytes"] == 36 * 128 * expert
    assert r["assumptions"]["expert_bits_per_weight"] == 8 * expert / (3 * 2880 * 2880 + 3 * 2880)
    per_layer = 2 * 8 * 64 * 2  # K and V, 8 kv heads of 64, bf16
    assert r["kv_cache_bytes"] == 4096 * 36 * per_layer
    # all on the GPU: every dense byte but the embedding (one row of 201088), 4 experts x 36 layers, and the
    # KV cache: 18 full layers read 4096 tokens, 18 sliding layers only their 128
    dense = r["dense_bytes"] - r["class_bytes"]["embedding"] + r["class_bytes"]["embedding"] / 201088
    kv_read = 18 * per_layer * 4096 + 18 * per_layer * 128
    assert r["read_bytes_per_token"]["gpu"] == round(dense + 4 * 36 * expert + kv_read)


# -- the independent arithmetic count and the family code agree -----------------------------------------------------
@pytest.mark.parametrize("model_type, name", [("deepseek_v3", "deepseek-v3"), ("gpt_oss", "gpt-oss-120b")])
def test_arithmetic_count_matches_hand_counts(model_type, name):
    config = json.loads((CONFIGS / f"{name}.json").read_text())
    inv = inventory(ARITHMETIC[model_type](config), Storage(WeightFormat(2)))
    hand, total, _ = MODELS[name]
    assert {k: inv.params[k] for k in hand()} == hand()
    assert sum(inv.params.values()) == total


@pytest.mark.parametrize("model_type, name", [("deepseek_v3", "deepseek-v3"), ("gpt_oss", "gpt-oss-120b")])
def test_meta_device_count_agrees_with_arithmetic(model_type, name):
    config = json.loads((CONFIGS / f"{name}.json").read_text())
    storage = Storage(WeightFormat(3, 64), "int8")
    meta = model_shape.shape_from_meta(config)
    arith = ARITHMETIC[model_type](config)
    a, b = inventory(meta, storage), inventory(arith, storage)
    assert a.params == b.params and a.class_bytes == b.class_bytes and a.active_params == b.active_params
    assert a.kv_layers == b.kv_layers
    assert meta.method.startswith("meta-device")


# -- placement and speed on a model small enough to work by hand -----------------------------------------
TINY = {
    "model_type": "mixtral",
    "vocab_size": 1000,
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_local_experts": 4,
    "num_experts_per_tok": 2,
    "tie_word_embeddings": False,
}
EXPERT = 3 * (512 * 128 + 2 * 512 * 2 * 2)  # int4/g128: gate, up [512,256] and down [256,512] = 69,632 B each
EMBED = 1000 * 256 * 2
RESIDENT = (
    EMBED + 2 * (256 * 256 + 128 * 256) * 2 * 2 + 4 * (2 * 2 * 256 + 256) + 4 * (2 * 4 * 256)
)  # LM head,
KV_PER_TOKEN = 2 * 2 * 2 * 64 * 2  # attention, norms, routers; 2 layers x (K, V) x 2 kv heads x 64 x bf16


@pytest.fixture
def tiny_config(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(TINY))
    return tmp_path


def test_placement_and_decode_ceiling_by_hand(tiny_config):
    assert EXPERT == 208_896 and RESIDENT == 1_311_744 and KV_PER_TOKEN == 1024
    gpu = 100 * KV_PER_TOKEN + RESIDENT + EMBED + 3 * EXPERT + 1000  # room for 3 experts, not 4
    ram = 2 * EXPERT + 10
    r = plan(tiny_config, 4, gpu, ram, context=100)
    assert r["class_bytes"]["routed_experts"] == 8 * EXPERT
    assert r["experts"] == {"gpu": 3, "ram": 2, "disk": 3, "total": 8}
    # uniform routing: each expert serves top_k / E = 1/2 of tokens
    gpu_read = 100 * KV_PER_TOKEN + RESIDENT + EMBED / 1000 + 3 * 0.5 * EXPERT
    ram_read, disk_read = 2 * 0.5 * EXPERT, 3 * 0.5 * EXPERT
    assert r["read_bytes_per_token"] == {"gpu": 1_728_000, "ram": 208_896, "disk": 313_344}
    assert gpu_read == 1_728_000
    serial = gpu_read / 1000e9 + ram_read / 25e9 + disk_read / 5e9  # RAM and disk reach the GPU over PCIe
    assert r["tokens_per_second_ceiling"] == pytest.approx(1 / serial)
    assert r["tokens_per_second_ceiling"] == pytest.approx(13745.2, abs=0.1)
    busiest = max(gpu_read / 1000e9, (ram_read + disk_read) / 25e9, ram_read / 60e9, disk_read / 5e9)
    assert r["tokens_per_second_overlap_ceiling"] == pytest.approx(1 / busiest)
    assert r["bottleneck"] == "disk"
    needed = RESIDENT + EMBED + 8 * EXPERT + 100 * KV_PER_TOKEN
    assert r["fits"] is False and r["shortfall_bytes"] == needed - gpu - ram == 625_678


def test_cpu_only_machine_reads_ram_at_ram_bandwidth(tiny_config):
    r = plan(tiny_config, 4, 0, 10 * GB, context=100)
    assert [t["name"] for t in r["tiers"]] == ["ram", "disk"]
    assert r["fits"] and r["verdict"].startswith("fits in RAM")
    read = 100 * KV_PER_TOKEN + RESIDENT + EMBED / 1000 + 4 * EXPERT  # 2 layers x top-2
    assert r["tokens_per_second_ceiling"] == pytest.approx(60e9 / read)


def test_dense_policy_changes_dense_bytes_only(tiny_config):
    bf16 = plan(tiny_config, 4, 0, GB)
    int8 = plan(tiny_config, 4, 0, GB, dense="int8")
    same = plan(tiny_config, 4, 0, GB, dense="same")
    assert bf16["class_bytes"]["attention"] == 2 * (256 * 256 + 128 * 256) * 2 * 2
    # int8/g128: q and o [256,256] -> 256*256 + 2 * 256*2*2 B; k and v [128,256] -> 128*256 + 2 * 128*2*2 B
    assert int8["class_bytes"]["attention"] == 2 * 2 * ((256 * 256 + 2048) + (128 * 256 + 1024))
    assert same["class_bytes"]["attention"] == 2 * 2 * ((256 * 128 + 2048) + (128 * 128 + 1024))
    assert int8["class_bytes"]["routers"] == bf16["class_bytes"]["routers"] == 4 * 2 * 4 * 256
    assert int8["expert_bytes"] == bf16["expert_bytes"] == 8 * EXPERT
    assert (
        "attention, shared experts, dense MLP layers, embedding and LM head int8/g128"
        in int8["assumptions"]["storage"]
    )


def test_routing_skew_is_capped_and_sums_to_top_k():
    assert routing_frequencies(4, 2) == [0.5] * 4
    # zipf 1: weights 1, 1/2, 1/3, 1/4 (sum 25/12); two picks -> 24/25, 12/25, 8/25, 6/25
    assert routing_frequencies(4, 2, 1.0) == pytest.approx([24 / 25, 12 / 25, 8 / 25, 6 / 25])
    # zipf 2: 2 x 144/205 > 1, so the hottest serves every token; the other pick splits 1/4 : 1/9 : 1/16
    assert routing_frequencies(4, 2, 2.0) == pytest.approx([1, 36 / 61, 16 / 61, 9 / 61])


def test_skew_moves_reads_to_the_gpu(tiny_config):
    gpu = 100 * KV_PER_TOKEN + RESIDENT + EMBED + 2 * EXPERT
    uniform = plan(tiny_config, 4, gpu, 10 * GB, context=100)
    skewed = plan(tiny_config, 4, gpu, 10 * GB, context=100, zipf=1.0)
    # the GPU holds the hottest expert of each layer: 1/2 of its layer's reads, or 24/25 under zipf 1
    assert (
        uniform["read_bytes_per_token"]["gpu"] - (100 * KV_PER_TOKEN + RESIDENT + EMBED / 1000)
        == 2 * 0.5 * EXPERT
    )
    assert skewed["read_bytes_per_token"]["gpu"] - (100 * KV_PER_TOKEN + RESIDENT + EMBED / 1000) == round(
        2 * 24 / 25 * EXPERT
    )
    assert skewed["tokens_per_second_ceiling"] > uniform["tokens_per_second_ceiling"]


def test_bad_inputs_name_the_value(tmp_path):
    with pytest.raises(ConfigError, match="nowhere.json"):
        plan(tmp_path / "nowhere.json", 2, GB, GB)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(ConfigError, match="'llama'"):
        plan(tmp_path, 2, GB, GB)
    with pytest.raises(BudgetError, match="--context 0"):
        plan(CONFIGS / "mixtral-8x7b.json", 2, GB, GB, context=0)
    with pytest.raises(BudgetError, match="--disk-bandwidth"):
        Machine(GB, GB, disk_bandwidth=0)


# -- the command line ----------------------------------------------------------------------------------------
def test_cli_json_and_table():
    from typer.testing import CliRunner

    from prism_convert.cli.app import app

    runner = CliRunner()
    args = ["plan", str(CONFIGS / "deepseek-v3.json"), "--bits", "2", "--gpu", "32GB", "--ram", "64GB"]
    out = runner.invoke(app, [*args, "--json", "--disk-bandwidth", "7GB/s"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert data["fits"] is False and data["shortfall_bytes"] == 122_649_876_480
    assert data["assumptions"]["bandwidths_bytes_per_second"]["disk"] == 7e9
    assert {"total_bytes", "gpu_bytes", "ram_bytes", "class_bytes", "tokens_per_second_ceiling"} <= set(data)
    table = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert table.exit_code == 0, table.output
    assert "122.6 GB short" in table.output and "routed experts" in table.output


# -- a .prism container: its real bytes and calibration frequencies -----------------------------------------
HAS_CONTAINER = (Path(__file__).parents[1] / "prism_load" / "container" / "format.py").is_file()


@pytest.mark.skipif(not HAS_CONTAINER, reason="prism_load/container/format.py has not landed yet")
def test_container_plan_uses_stored_bytes_and_routing_frequencies(tmp_path):
    from containers import TINY_CONFIG, write_tiny

    from prism_load.container.format import Encoding

    folder = write_tiny(tmp_path / "tiny.prism")
    m = json.loads((folder / "manifest.json").read_text())
    encodings = [Encoding.from_dict(e) for e in m["encodings"]]
    dense = {name: encodings[r["encoding"]].nbytes() for name, r in m["dense"].items()}
    experts = {(r["layer"], r["expert"]): (r["length"], r["frequency"]) for r in m["experts"]}
    # the writer recorded frequency 0.5 / (e + 1): per layer 0.5, 0.25, 1/6, 0.125; top-2 scales them to sum to 2
    total_freq = sum(f for (layer, _), (_, f) in experts.items() if layer == 0)
    share = {key: 2 * f / total_freq for key, (_, f) in experts.items()}
    kv = 16 * 2 * 2 * 2 * 8 * 2  # 16 tokens x 2 layers x (K, V) x 2 kv heads x head dim 8 x bf16
    hottest = [(0, 0), (1, 0)]
    ram = sum(dense.values()) + kv + sum(experts[x][0] for x in hottest)
    r = plan(folder, None, 0, ram, context=16)
    assert r["dense_bytes"] == sum(dense.values())
    assert r["class_bytes"]["embedding"] == dense["embed_tokens.weight"]
    assert r["expert_bytes"] == sum(n for n, _ in experts.values())
    assert r["experts"] == {"ram": 2, "disk": 6, "total": 8}
    dense_read = sum(dense.values()) - dense["embed_tokens.weight"] + dense["embed_tokens.weight"] / 64
    assert r["read_bytes_per_token"] == {
        "ram": round(dense_read + kv + sum(share[x] * experts[x][0] for x in hottest)),
        "disk": round(sum(share[x] * experts[x][0] for x in experts if x not in hottest)),
    }
    assert r["fits"] is False and r["shortfall_bytes"] == r["needed_bytes"] - ram
    assert r["container"]["hot_bytes"] == sum(x["length"] for x in m["experts"] if x["tier"] == "hot")
    # parameters come from the embedded config, exactly as for the config alone
    (tmp_path / "config.json").write_text(json.dumps(TINY_CONFIG))
    assert r["parameters"] == plan(tmp_path, 16, 0, ram)["parameters"]
    with pytest.raises(BudgetError, match="is a .prism container"):
        plan(folder, 2, 0, ram)
    with pytest.raises(BudgetError, match="give --bits"):
        plan(tmp_path, None, 0, ram)

"""attention_decode.c: a decode token's attention in one native call (fused qkv on an integer kernel, rotary,
KV append, grouped-query attention, o projection) gives the torch path's logits to fp32 rounding over many
steps (the cache growing past its first capacity), writes the same cache, and is used only where it applies.
The decoder layer's own native step (decode_layer.c, tests/test_decode_layer.py) calls the same C function; here
it is switched off so the attention's step is what runs."""

from __future__ import annotations

import pytest
import torch
from containers import TINY_CONFIG, random_model, rtn

from prism_load.container.format import Encoding
from prism_load.models import layers
from prism_load.native import attention_decode as ad

CONFIG = dict(TINY_CONFIG, hidden_size=128, intermediate_size=128, num_local_experts=4, num_attention_heads=4,
              num_key_value_heads=2)
QWEN = dict(model_type="qwen2_moe", vocab_size=64, hidden_size=128, intermediate_size=128, moe_intermediate_size=64,
            shared_expert_intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            num_experts=4, num_experts_per_tok=2, norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[],
            tie_word_embeddings=False, max_position_embeddings=128, rms_norm_eps=1e-6, rope_theta=10000.0)

pytestmark = pytest.mark.usefixtures("per_layer_decode")  # the per-layer steps, not the whole-token call


def packed_model(requested="native-int16", bits=8, config=CONFIG):
    """A random fp32 model whose attention projections are int-packed, q, k and v fused (as load() leaves them)."""
    from prism_load.packed import fuse_qkv, swap_dense

    model = random_model(config)
    names = [f"layers.{i}.self_attn.{p}.weight" for i in range(config["num_hidden_layers"])
             for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
    dense = {}
    for n in names:
        w = model.get_parameter(n).detach()
        dense[n] = (Encoding("int", tuple(w.shape), bits=bits, group_size=64), rtn(w, bits, 64))
    swap_dense(model, dense, set(names), requested)
    assert fuse_qkv(model) == config["num_hidden_layers"]
    return model.eval()


def decode_logits(model, steps: int):
    ids = torch.randint(0, CONFIG["vocab_size"], (1, 6), generator=torch.Generator().manual_seed(0))
    nxt = torch.randint(0, CONFIG["vocab_size"], (1, steps), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cache = model.new_cache()
        model(ids, cache=cache)
        out = [model(nxt[:, i:i + 1], cache=cache) for i in range(steps)]
    return torch.cat(out, 1), cache


WINDOWED = dict(CONFIG, sliding_window=16)


@pytest.mark.parametrize("requested, config", [("native-int16", CONFIG), ("native-int8", CONFIG),
                                               ("native-int16", QWEN), ("native-int16", WINDOWED)],
                         ids=["int16", "int8", "qwen2-moe-qkv-bias", "sliding-window-16"])
def test_native_step_gives_the_torch_paths_logits_and_cache(q8, requested, config, monkeypatch):
    """Mixtral's attention, Qwen2-MoE's with its q/k/v bias (added in the native step as torch adds it), and a
    sliding window of 16 positions over 76 (the native step attends to the window's slots only)."""
    monkeypatch.setattr(layers.DecoderLayer, "_native_decode", lambda self, x, ctx: None)
    model = packed_model(requested, config=config)
    if config is QWEN:
        assert model.layers[0].self_attn.qkv_proj.bias is not None
    calls = []
    real = layers.attention_decode
    monkeypatch.setattr(layers, "attention_decode", lambda *a: calls.append(1) or real(*a))
    fast, fast_cache = decode_logits(model, 70)  # 6 + 70 positions: the cache grows past its 64 slots
    assert len(calls) == 70 * config["num_hidden_layers"]
    monkeypatch.setattr(layers.Attention, "_native_decode", lambda self, x, ctx: None)
    slow, slow_cache = decode_logits(model, 70)
    # the attention's fp32 sums are ordered unlike torch's SDPA; where that moves its output across a rounding
    # step of the o projection's int16 (int8) x, the logits move by about one such step
    tol = {"native-int16": 2e-4, "native-int8": 2e-3}[requested] * slow.abs().max().item()
    assert (fast - slow).abs().max() <= tol
    assert (fast.argmax(-1) == slow.argmax(-1)).float().mean() >= 0.97
    # layer 0 sees the same inputs either way: its cache (rotary phases, appended k and v) is the same bits
    assert fast_cache.lengths == slow_cache.lengths == [76] * config["num_hidden_layers"]
    assert torch.equal(fast_cache.keys[0][:, :, :76], slow_cache.keys[0][:, :, :76])
    assert torch.equal(fast_cache.values[0][:, :, :76], slow_cache.values[0][:, :, :76])
    for layer in range(1, config["num_hidden_layers"]):
        for a, b in ((fast_cache.keys, slow_cache.keys), (fast_cache.values, slow_cache.values)):
            assert torch.allclose(a[layer][:, :, :76], b[layer][:, :, :76], rtol=1e-3, atol=1e-3)


def test_used_only_where_it_applies(q8, monkeypatch):
    """Either native step (the attention's or the whole layer's): never for two rows or padded ones."""
    calls = []
    for name in ("attention_decode", "decode_layer"):
        real = getattr(layers, name)
        monkeypatch.setattr(layers, name, lambda *a, real=real: calls.append(1) or real(*a))
    exact = packed_model("native")  # the exact kernel (fp32 x): no integer-kernel operators to hand over
    decode_logits(exact, 2)
    assert calls == [] and exact.layers[0].self_attn._native_ops() is False
    model = packed_model()
    ids = torch.randint(0, CONFIG["vocab_size"], (2, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        cache = model.new_cache()
        model(ids, cache=cache)
        model(ids[:, :1], cache=cache)  # two rows decoding: the torch path
        assert calls == []
        cache = model.new_cache()
        model(ids[:1], cache=cache, attention_mask=torch.tensor([[0, 1, 1, 1, 1]]))  # padded: the torch path
        model(ids[:1, :1], cache=cache)
        assert calls == []
        cache = model.new_cache()
        model(ids[:1], cache=cache)
        model(ids[:1, :1], cache=cache)
    assert len(calls) == CONFIG["num_hidden_layers"]


def test_refuses_shapes_and_caches_it_cannot_take(q8):
    model = packed_model()
    attn = model.layers[0].self_attn
    ops = attn._native_ops()
    assert ops
    spec = attn.spec
    assert ad.attention_ops(attn.qkv_proj.op, attn.o_proj.op, spec.num_heads + 1, spec.num_kv_heads,
                            spec.head_dim) is None  # the fused rows do not fit these heads
    keys = torch.zeros(1, spec.num_kv_heads, 4, spec.head_dim)
    cos = torch.ones(spec.head_dim)
    with pytest.raises(ValueError, match="free slot at 4"):
        ad.attention_decode(torch.zeros(CONFIG["hidden_size"]), ops, cos, cos, keys, keys.clone(), 4,
                            spec.num_heads, spec.num_kv_heads, spec.head_dim, attn.scaling)
    with pytest.raises(ValueError, match="fp32 contiguous x"):
        ad.attention_decode(torch.zeros(CONFIG["hidden_size"]).bfloat16(), ops, cos, cos, keys, keys.clone(), 0,
                            spec.num_heads, spec.num_kv_heads, spec.head_dim, attn.scaling)


def test_rows_of_a_batch_get_each_rows_bits(q8):
    """attention_rows on three rows (two of them left-padded: they attend from their first real slot) gives each
    row what attention_decode gives that row alone over its real slots (the same bits), and writes each row's k
    and v at the new slot as that call does."""
    model = packed_model()
    attn = model.layers[0].self_attn
    ops, spec = attn._native_ops(), attn.spec
    g, d, hidden, n, cap = spec.num_kv_heads, spec.head_dim, CONFIG["hidden_size"], 9, 16
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, hidden, generator=gen)
    cos, sin = torch.rand(3, d, generator=gen), torch.rand(3, d, generator=gen)
    keys, values = torch.randn(3, g, cap, d, generator=gen), torch.randn(3, g, cap, d, generator=gen)
    first = torch.tensor([0, 4, 1])
    k_rows, v_rows = keys.clone(), values.clone()
    out = ad.attention_rows(x, ops, cos, sin, k_rows, v_rows, n, spec.num_heads, g, d, attn.scaling, first=first)
    for b in range(3):
        f = int(first[b])
        k1 = keys[b : b + 1, :, f:].clone().contiguous()  # the row's real slots, from slot 0
        v1 = values[b : b + 1, :, f:].clone().contiguous()
        alone = ad.attention_decode(x[b].contiguous(), ops, cos[b].contiguous(), sin[b].contiguous(), k1, v1, n - f,
                                    spec.num_heads, g, d, attn.scaling)
        assert torch.equal(out[b], alone), f"row {b}"
        assert torch.equal(k_rows[b, :, n], k1[0, :, n - f]) and torch.equal(v_rows[b, :, n], v1[0, :, n - f])
    with pytest.raises(ValueError, match="first must be int64"):
        ad.attention_rows(x, ops, cos, sin, keys, values, n, spec.num_heads, g, d, attn.scaling,
                          first=torch.tensor([0, n + 1, 0]))
    with pytest.raises(ValueError, match=r"cos \[3, 32\]"):
        ad.attention_rows(x, ops, cos[:2], sin, keys, values, n, spec.num_heads, g, d, attn.scaling)


@pytest.mark.parametrize("padded", [False, True])
def test_a_batchs_native_step_gives_the_torch_paths_logits(q8, monkeypatch, padded):
    """Two rows decoding (left-padded or not) through attention_rows: the torch path's logits to fp32 rounding
    (as the single-row step), the same greedy tokens, and each row's real cache slots of layer 0 the same bits."""
    model = packed_model()
    ids = torch.randint(0, CONFIG["vocab_size"], (2, 6), generator=torch.Generator().manual_seed(4))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]) if padded else None
    nxt = torch.randint(0, CONFIG["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(5))
    calls = []
    real = layers.attention_rows
    monkeypatch.setattr(layers, "attention_rows", lambda *a, **k: calls.append(1) or real(*a, **k))

    def run():
        with torch.no_grad():
            cache = model.new_cache()
            model(ids, cache=cache, attention_mask=mask)
            out = [model(nxt[:, i : i + 1], cache=cache) for i in range(40)]
        return torch.cat(out, 1), cache

    fast, fast_cache = run()
    assert len(calls) == 40 * CONFIG["num_hidden_layers"]
    monkeypatch.setattr(layers.Attention, "_native_rows", lambda self, x, ctx: None)
    slow, slow_cache = run()
    assert len(calls) == 40 * CONFIG["num_hidden_layers"]
    assert (fast - slow).abs().max() <= 2e-4 * slow.abs().max().item()
    assert (fast.argmax(-1) == slow.argmax(-1)).float().mean() >= 0.97
    real_from = 2 if padded else 0
    assert torch.equal(fast_cache.keys[0][0, :, real_from:46], slow_cache.keys[0][0, :, real_from:46])
    assert torch.equal(fast_cache.values[0][1, :, :46], slow_cache.values[0][1, :, :46])

"""decode_layer.c: a decode token through a decoder layer's norms, attention step, residual add and router in
one native call. It calls the same C functions with the same arguments as the separate native steps, so the
logits, caches and routes must be the same bits as those steps give (not merely close), for every layer kind
it takes: routed MoE layers, Qwen2-MoE's shared expert, a dense MLP layer (no router), a sliding window."""

from __future__ import annotations

import pytest
import torch
from test_attention_decode import CONFIG, QWEN, WINDOWED, decode_logits, packed_model

from prism_load import native
from prism_load.models import layers
from prism_load.native import attention_decode as ad
from prism_load.native import decode_layer as dl

QWEN_DENSE_FIRST = dict(QWEN, mlp_only_layers=[0])  # layer 0's MLP is a dense SwiGLU: no router to run natively

pytestmark = pytest.mark.usefixtures("per_layer_decode")  # the per-layer steps, not the whole-token call


def count_layer_steps(monkeypatch) -> list:
    calls = []
    real = layers.decode_layer
    monkeypatch.setattr(layers, "decode_layer", lambda *a: calls.append(1) or real(*a))
    return calls


@pytest.mark.parametrize("requested, config", [("native-int16", CONFIG), ("native-int8", CONFIG),
                                               ("native-int16", QWEN), ("native-int16", QWEN_DENSE_FIRST),
                                               ("native-int16", WINDOWED)],
                         ids=["int16", "int8", "qwen2-moe-shared-expert", "dense-mlp-layer", "sliding-window-16"])
def test_layer_step_gives_the_separate_steps_bits(q8, requested, config, monkeypatch):
    model = packed_model(requested, config=config)
    routed = [layer._native_step().router is not None for layer in model.layers]
    assert routed == [i not in config.get("mlp_only_layers", []) for i in range(config["num_hidden_layers"])]
    calls = count_layer_steps(monkeypatch)
    fast, fast_cache = decode_logits(model, 70)  # the cache grows past its first 64 slots
    assert len(calls) == 70 * config["num_hidden_layers"]
    monkeypatch.setattr(layers.DecoderLayer, "_native_decode", lambda self, x, ctx: None)
    separate, separate_cache = decode_logits(model, 70)
    assert len(calls) == 70 * config["num_hidden_layers"]  # the second run stepped through each layer's modules
    assert torch.equal(fast, separate)
    assert fast_cache.lengths == separate_cache.lengths
    for a, b in zip(fast_cache.keys + fast_cache.values, separate_cache.keys + separate_cache.values):
        assert torch.equal(a[:, :, :76], b[:, :, :76])


def test_one_call_equals_its_five_steps(q8):
    """y = x + attention(norm1(x)), h = norm2(y) and the route, against rms_norm, attention_decode, an add,
    rms_norm and router_topk called one by one on copies of the same cache."""
    model = packed_model()
    layer = model.layers[1]
    step = layer._native_step()
    attn, spec = layer.self_attn, layer.self_attn.spec
    g = torch.Generator().manual_seed(3)
    x = torch.randn(CONFIG["hidden_size"], generator=g)
    keys = torch.randn(1, spec.num_kv_heads, 64, spec.head_dim, generator=g)
    values = torch.randn(keys.shape, generator=g)
    cos, sin = torch.rand(spec.head_dim, generator=g), torch.rand(spec.head_dim, generator=g)
    k1, v1 = keys.clone(), values.clone()
    y, h, (logits, indices, weights) = dl.decode_layer(x, step, cos, sin, k1, v1, 9)
    norm1, norm2 = layer.input_layernorm, layer.post_attention_layernorm
    a = ad.attention_decode(native.rms_norm(x, norm1.weight.detach(), norm1.eps), attn._native_ops(), cos, sin,
                            keys, values, 9, spec.num_heads, spec.num_kv_heads, spec.head_dim, attn.scaling)
    y2 = x + a
    h2 = native.rms_norm(y2, norm2.weight.detach(), norm2.eps)
    router = layer.mlp.router
    logits2, indices2, weights2 = native.router_topk(h2.view(1, -1), router.weight.detach(), router.top_k, True)
    assert torch.equal(y, y2) and torch.equal(h, h2)
    assert torch.equal(logits, logits2) and torch.equal(indices, indices2) and torch.equal(weights, weights2)
    assert torch.equal(k1, keys) and torch.equal(v1, values)  # slot 9 written the same, the rest untouched


def test_observers_see_the_same_routes(q8, monkeypatch):
    """An observer (prism profile's) on the MoE blocks sees the routes and expert inputs the modules' path gives."""
    model = packed_model()

    class Log:
        def __init__(self):
            self.seen = []

        def on_route(self, layer_index, x, route):
            self.seen.append((layer_index, x.clone(), route.indices.clone(), route.weights.clone()))

        def on_expert(self, layer_index, expert, x, h, weight):
            self.seen.append((layer_index, expert, h.clone()))

    def observed():
        log = Log()
        for _, block in model.moe_blocks():
            block.observer = log
        decode_logits(model, 4)
        return log.seen

    calls = count_layer_steps(monkeypatch)
    fast = observed()
    assert calls
    monkeypatch.setattr(layers.DecoderLayer, "_native_decode", lambda self, x, ctx: None)
    separate = observed()
    assert len(fast) == len(separate) > 0
    for a, b in zip(fast, separate):
        assert all(torch.equal(u, v) if isinstance(u, torch.Tensor) else u == v for u, v in zip(a, b))


def test_refusals(q8):
    model = packed_model()
    layer = model.layers[0]
    step = layer._native_step()
    attn, spec = layer.self_attn, layer.self_attn.spec
    ops, hidden = attn._native_ops(), CONFIG["hidden_size"]
    fp32 = torch.ones(hidden)
    args = (ops, spec.num_heads, spec.num_kv_heads, spec.head_dim, attn.scaling, None)
    assert dl.layer_step(*args, fp32.bfloat16(), 1e-6, fp32, 1e-6) is None  # a bf16 norm weight
    assert dl.layer_step(*args, fp32, 1e-6, fp32, 1e-6, torch.ones(4, hidden + 1), 2) is None  # router's width
    assert dl.layer_step(*args, fp32, 1e-6, fp32, 1e-6, torch.ones(4, hidden), 5) is None  # top-5 of 4 experts
    assert dl.layer_step(*args, fp32, 1e-6, fp32, 1e-6).router is None
    keys = torch.zeros(1, spec.num_kv_heads, 4, spec.head_dim)
    cos = torch.ones(spec.head_dim)
    with pytest.raises(ValueError, match="fp32 contiguous x of 128"):
        dl.decode_layer(fp32.bfloat16(), step, cos, cos, keys, keys.clone(), 0)
    with pytest.raises(ValueError, match="free slot at 4"):
        dl.decode_layer(fp32, step, cos, cos, keys, keys.clone(), 4)
    exact = packed_model("native")  # the exact kernel: no integer operators, so no native step either
    assert exact.layers[0]._native_step() is False

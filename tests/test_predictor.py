"""The fitted prefetch predictor: the fit, its held-back score in the profile, its trip through compress and
pack into the container (format, validation, damage), and its use by the runtime's prefetcher."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from containers import random_model, write_tiny
from runtime_fixtures import INT_MIX, RUNTIME_CONFIG, greedy, load_cached, prompts

import prism_load
from prism_convert.bitplan import Budget
from prism_convert.compress import run_compress
from prism_convert.pipeline import pack_work
from prism_convert.predictor import VALIDATION_SHARE, fit_predictor, recall
from prism_convert.profile import run_profile
from prism_convert.profile_schema import Profile
from prism_convert.recipe import Recipe
from prism_load.container_reader import Container
from prism_load.container_verify import verify_container
from prism_load.errors import ContainerError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAMILIES = ["mixtral", "qwen2_moe", "olmoe", "deepseek_v2_group_limited", "deepseek_v3", "gpt_oss"]


# -- the routers' own rule ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FAMILIES)
def test_router_select_reproduces_the_routers_choice(tiny_checkpoint, name):
    """select(logits) is the rule the router applies to its logits (bias correction and group limits
    included), so a predictor's logits pick experts exactly as the router would pick from them."""
    folder, _ = tiny_checkpoint(name)
    model = prism_load.load(folder)
    x = torch.randn(64, model.embed_tokens.weight.shape[1], generator=torch.Generator().manual_seed(3))
    for _, block in model.moe_blocks():
        route = block.router(x)
        assert torch.equal(block.router.select(route.logits), route.indices)


# -- the fit -----------------------------------------------------------------------------------------------
def test_fit_recovers_an_exact_linear_map():
    """Logits that are an affine function of the input are fitted (nearly) exactly: held-back recall 1,
    while a 'shadow' that always guesses experts 0 and 1 scores what it scores."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 16, generator=g)
    a, c = torch.randn(8, 16, generator=g), torch.randn(8, generator=g)
    logits = x @ a.T + c
    actual = torch.topk(logits, 2).indices
    shadow = torch.tensor([[0, 1]]).expand(500, 2)
    fit = fit_predictor(x, logits, actual, shadow, lambda z: torch.topk(z, 2).indices)
    assert fit.validation_tokens == round(500 * VALIDATION_SHARE)
    assert fit.recall == 1.0
    assert fit.shadow_recall == pytest.approx(recall(shadow[-100:], actual[-100:]))
    assert fit.beats_shadow
    torch.testing.assert_close(fit.weight, a, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(fit.bias, c, atol=1e-3, rtol=1e-3)


def test_fit_needs_tokens_to_score():
    x = torch.randn(2, 4)
    assert fit_predictor(x, torch.randn(2, 3), torch.zeros(2, 1, dtype=torch.long),
                         torch.zeros(2, 1, dtype=torch.long), lambda z: torch.topk(z, 1).indices) is None


# -- the profile -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def profiled(tiny_checkpoint, tmp_path_factory):
    folder, ref = tiny_checkpoint("mixtral")
    tokens = torch.randint(0, ref.config.vocab_size, (40, 16), generator=torch.Generator().manual_seed(2))
    out = tmp_path_factory.mktemp("predictor") / "profile"
    run_profile(folder, tokens, out, {"spec": "random"}, min_tokens=4)
    return folder, ref, tokens, Profile.load(out)


def test_profile_scores_the_shadow_router_on_the_held_back_tokens(profiled):
    """predictor_shadow_recall is the shadow router's recall on the last fifth of the tokens, recomputed here
    from transformers' own hidden states and routing."""
    _, ref, tokens, prof = profiled
    hidden, inputs = {}, {}
    hooks = [layer.register_forward_hook(lambda m, a, o, i=i: hidden.__setitem__(i, o[0] if isinstance(o, tuple) else o))
             for i, layer in enumerate(ref.model.layers)]
    hooks += [layer.mlp.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0]))
              for i, layer in enumerate(ref.model.layers)]
    with torch.no_grad():
        ref(tokens)
    for h in hooks:
        h.remove()
    k, tail = prof.top_k, round(tokens.numel() * VALIDATION_SHARE)
    for entry in prof.layers[:-1]:
        i, j = entry["layer"], entry["next_layer"]
        nxt = ref.model.layers[j]
        with torch.no_grad():
            guess = nxt.mlp.gate(nxt.post_attention_layernorm(hidden[i]).reshape(-1, hidden[i].shape[-1]))[0]
            actual = nxt.mlp.gate(inputs[j].reshape(-1, inputs[j].shape[-1]))[2]
        pred = torch.topk(guess, k).indices
        assert entry["predictor_validation_tokens"] == tail
        assert entry["predictor_shadow_recall"] == pytest.approx(recall(pred[-tail:], actual[-tail:]))
        assert 0.0 <= entry["predictor_recall"] <= 1.0
        assert prof.tensor(f"layers.{j}.predictor_weight").shape == (ref.config.num_local_experts, ref.config.hidden_size)
    assert prof.layers[-1]["predictor_recall"] is None


def test_profile_offers_a_predictor_only_where_it_beats_the_shadow_router(profiled, tmp_path):
    _, _, _, prof = profiled
    j = prof.layers[0]["next_layer"]
    copy = tmp_path / "p"
    shutil.copytree(prof.folder, copy)
    data = json.loads((copy / "profile.json").read_text())
    data["layers"][0]["predictor_recall"], data["layers"][0]["predictor_shadow_recall"] = 0.9, 0.8
    (copy / "profile.json").write_text(json.dumps(data))
    got = Profile.load(copy).predictor(j)
    assert got["from_layer"] == prof.layers[0]["layer"] and got["recall"] == 0.9
    assert torch.equal(got["weight"], prof.tensor(f"layers.{j}.predictor_weight"))
    data["layers"][0]["predictor_recall"] = 0.8  # a tie is not a win
    (copy / "profile.json").write_text(json.dumps(data))
    assert Profile.load(copy).predictor(j) is None


# -- compress -> pack -> container ---------------------------------------------------------------------------
RECIPE = {"quantization": {"group_size": 16, "max_tokens_per_expert": 64},
          "candidates": {"int_bits": [4, 8], "int_lowrank": []}, "limits": {"max_bits": 12.0}}


def test_pack_stores_the_predictors_that_beat_the_shadow_router(profiled, tmp_path):
    folder, _, tokens, prof = profiled
    run_compress(folder, prof.folder, Recipe.from_dict(RECIPE), tmp_path / "work")
    pack_work([tmp_path / "work"], tmp_path / "m.prism", Budget(bits=8.0), shard_size_bytes=1 << 20)
    winners = {x["next_layer"] for x in prof.layers if x["predictor_recall"] is not None
               and x["predictor_recall"] > x["predictor_shadow_recall"]}
    assert winners, "the fixture's profile should have a predictor that beats the shadow router"
    with Container(tmp_path / "m.prism") as c:
        assert [x.layer for x in c.manifest.predictor.layers] == sorted(winners)
        stored = c.predictor_tensors(verify_checksum=True)
    for j in winners:
        assert torch.equal(stored[j][0], prof.tensor(f"layers.{j}.predictor_weight"))
        assert torch.equal(stored[j][1], prof.tensor(f"layers.{j}.predictor_bias"))
    assert verify_container(tmp_path / "m.prism") == []
    model = prism_load.load(tmp_path / "m.prism", expert_cache="50%")
    assert model.stats()["predictor_layers"] == sorted(winners)
    model.runtime.close()


def biased_predictor(config, favourite: list[int], from_layer: int) -> dict:
    """A predictor that ignores its input and always names `favourite` (weight 0, a large bias on them)."""
    bias = torch.zeros(config["num_local_experts"])
    bias[favourite] = 10.0
    return {"from_layer": from_layer, "recall": 0.9, "shadow_recall": 0.8,
            "weight": torch.zeros(config["num_local_experts"], config["hidden_size"]), "bias": bias}


@pytest.fixture(scope="module")
def with_predictor(tmp_path_factory):
    path = tmp_path_factory.mktemp("pred") / "m.prism"
    return write_tiny(path, model=random_model(RUNTIME_CONFIG, seed=4), config=RUNTIME_CONFIG, mix=INT_MIX,
                      predictor={2: biased_predictor(RUNTIME_CONFIG, [5, 6], from_layer=1)})


def test_manifest_and_file_round_trip(with_predictor):
    with Container(with_predictor) as c:
        (layer,) = c.manifest.predictor.layers
        assert (layer.layer, layer.from_layer, layer.recall, layer.shadow_recall) == (2, 1, 0.9, 0.8)
        weight, bias = c.predictor_tensors(verify_checksum=True)[2]
    assert weight.dtype == torch.float32 and not weight.any() and bias[[5, 6]].tolist() == [10.0, 10.0]
    text = (with_predictor / "manifest.json").read_text()
    assert '"predictor":{"file":{"name":"predictor.safetensors"' in text


def test_a_container_without_predictors_has_no_key(tmp_path):
    path = write_tiny(tmp_path / "m.prism", config=RUNTIME_CONFIG, mix=INT_MIX)
    assert "predictor" not in json.loads((path / "manifest.json").read_text())
    assert not (path / "predictor.safetensors").exists()
    with Container(path) as c:
        assert c.predictor_tensors() == {}


@pytest.mark.parametrize("change, message", [
    (lambda p: p["layers"][0].update(from_layer=0), "predicted from the MoE layer before it, 1"),
    (lambda p: p["layers"][0].update(layer=0), "not a MoE layer after the first"),
    (lambda p: p["layers"].append(dict(p["layers"][0])), "listed twice or out of order"),
    (lambda p: p["layers"][0].update(recall=1.5), "outside"),
    (lambda p: p["layers"][0].update(extra=1), "extra"),
    (lambda p: p["file"].update(name="../x"), "name"),
    (lambda p: p.update(layers=[]), "empty"),
])
def test_bad_predictor_records_are_refused(with_predictor, tmp_path, change, message):
    copy = tmp_path / "m.prism"
    shutil.copytree(with_predictor, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    change(manifest["predictor"])
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ContainerError, match=message):
        Container(copy)


def test_damaged_or_mismatched_predictor_file_is_named(with_predictor, tmp_path):
    copy = tmp_path / "m.prism"
    shutil.copytree(with_predictor, copy)
    path = copy / "predictor.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # a flipped bit in the last bias value: same size, other checksum
    path.write_bytes(bytes(data))
    with Container(copy) as c, pytest.raises(ContainerError, match="predictor.safetensors: checksum"):
        c.predictor_tensors(verify_checksum=True)
    assert any("predictor.safetensors: checksum" in p for p in verify_container(copy))
    with pytest.raises(ContainerError, match="predictor.safetensors: checksum"):
        prism_load.load(copy, expert_cache="50%")
    path.write_bytes(b"\0" * 7)
    with pytest.raises(ContainerError, match="predictor.safetensors: 7 bytes on disk"):
        Container(copy)


def test_write_refuses_a_predictor_of_the_wrong_shape(tmp_path):
    bad = biased_predictor(RUNTIME_CONFIG, [1], from_layer=1)
    bad["weight"] = bad["weight"][:, :-1]
    with pytest.raises(ContainerError, match="predictor of layer 2: weight"):
        write_tiny(tmp_path / "m.prism", config=RUNTIME_CONFIG, mix=INT_MIX, predictor={2: bad})
    assert not (tmp_path / "m.prism").exists()


# -- the runtime -------------------------------------------------------------------------------------------
def test_runtime_predicts_with_the_predictor_after_its_layer_only(with_predictor):
    """After layer 1 the prefetcher asks for the predictor's experts (5, 6) for layer 2; after layer 0, for
    layer 1, it keeps the shadow router; predictor=False keeps the shadow router everywhere."""
    model = load_cached(with_predictor, "50%", True)
    shadow = model.runtime.shadow
    x = torch.randn(1, RUNTIME_CONFIG["hidden_size"], generator=torch.Generator().manual_seed(1))
    assert sorted(shadow.predict(2, x, after=1)) == [5, 6]
    layer = model.layers[2]
    router_pick = layer.mlp.router(layer.post_attention_layernorm(x)).indices.flatten().tolist()
    assert sorted(shadow.predict(2, x, after=0)) == sorted(router_pick)
    plain = load_cached(with_predictor, "50%", True, predictor=False)
    assert plain.stats()["predictor_layers"] == [] and model.stats()["predictor_layers"] == [2]
    assert sorted(plain.runtime.shadow.predict(2, x, after=1)) == sorted(router_pick)
    for m in (model, plain):
        m.runtime.close()


def test_a_wrong_predictor_costs_hits_never_correctness(with_predictor):
    """The runtime trusts a stored predictor for what to fetch, never for what to compute: output is exact."""
    resident = prism_load.load(with_predictor)
    model = load_cached(with_predictor, "25%", True)
    for ids in prompts(3, RUNTIME_CONFIG["vocab_size"], seed=8):
        with torch.no_grad():
            torch.testing.assert_close(model(ids), resident(ids), rtol=0, atol=0)
        assert torch.equal(greedy(model, ids, 8), greedy(resident, ids, 8))
    stats = model.stats()
    assert stats["hits"] + stats["misses"] == stats["uses"]
    model.runtime.close()

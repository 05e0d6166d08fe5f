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
from prism_convert.allocation.bit_plan import Budget
from prism_convert.compression.compress_layers import run_compress
from prism_convert.pipeline import pack_work
from prism_convert.profiling.predictor_fit import RIDGE, VALIDATION_SHARE, fit_predictor, recall
from prism_convert.profiling.profiler import run_profile
from prism_convert.recipe import Recipe
from prism_convert.tools.inspect_container import inspect_container
from prism_load.container.reader import Container
from prism_load.container.verify import verify_container
from prism_load.errors import ContainerError
from prism_load.profile_format import Profile

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAMILIES = ["mixtral", "qwen2_moe", "olmoe", "deepseek_v2_group_limited", "deepseek_v3", "gpt_oss"]


# -- the routers' own rule ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FAMILIES)
def test_router_select_reproduces_the_routers_choice(tiny_checkpoint, name):
    """select(logits) is the rule the router applies to its logits (bias correction and group limits
    included), so a predictor's logits pick experts exactly as the router would pick from them."""
    folder, _ = tiny_checkpoint(name)
    model = prism_load.load(folder, dtype=torch.float32)
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


def ridge_recall(x, logits, actual, head: int, k: int) -> float:
    """The fitted predictor's held-back recall, computed independently: fp64 ridge on the first `head` rows."""
    xb = torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.double)], 1)
    gram = xb[:head].T @ xb[:head]
    ridge = RIDGE * float(gram.diagonal().mean())
    m = torch.linalg.solve(gram + ridge * torch.eye(len(gram), dtype=torch.double), xb[:head].T @ logits[:head].double())
    return recall(torch.topk(xb[head:] @ m, k).indices, actual[head:])


def test_profile_scores_the_shadow_router_on_the_held_back_tokens(profiled):
    """Each fitted predictor's recall and shadow_recall are those on the last fifth of the sequences (next
    layer and two ahead), the predictor fitted on the first four fifths only: both recomputed here from
    transformers' own hidden states and routing."""
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
    pairs = [(x["layer"], p["layer"], p["distance"]) for x in prof.layers for p in x["predictors"]]
    assert pairs == [(0, 1, 1), (0, 2, 2), (1, 2, 1)]  # three MoE layers: next, and two ahead
    for i, j, _ in pairs:
        p = next(p for p in prof.layer(i)["predictors"] if p["layer"] == j)
        nxt = ref.model.layers[j]
        with torch.no_grad():
            x = nxt.post_attention_layernorm(hidden[i]).reshape(-1, hidden[i].shape[-1])
            guess = nxt.mlp.gate(x)[0]
            logits, _, actual = nxt.mlp.gate(inputs[j].reshape(-1, inputs[j].shape[-1]))
        pred = torch.topk(guess, k).indices
        assert p["validation_tokens"] == tail
        assert p["shadow_recall"] == pytest.approx(recall(pred[-tail:], actual[-tail:]))
        # a leak of held-back tokens into the fit would raise it; one token's choices of slack for rounding
        assert p["recall"] == pytest.approx(ridge_recall(x, logits, actual, len(x) - tail, k), abs=k / (tail * k))
        shape = (ref.config.num_local_experts, ref.config.hidden_size)
        assert prof.tensor(f"layers.{j}.predictor.{i}.weight").shape == shape


def test_profile_offers_a_predictor_only_where_it_beats_the_shadow_router(profiled, tmp_path):
    _, _, _, prof = profiled
    copy = tmp_path / "p"
    shutil.copytree(prof.folder, copy)
    data = json.loads((copy / "profile.json").read_text())
    for x in data["layers"]:
        for p in x["predictors"]:
            p["recall"], p["shadow_recall"] = 0.9, 0.8
    data["layers"][1]["predictors"][0]["recall"] = 0.8  # layer 2 from layer 1: a tie is not a win
    (copy / "profile.json").write_text(json.dumps(data))
    got = Profile.load(copy).predictors_for(2)
    assert [(p["from_layer"], p["recall"]) for p in got] == [(0, 0.9)]
    assert torch.equal(got[0]["weight"], prof.tensor("layers.2.predictor.0.weight"))
    assert [p["from_layer"] for p in Profile.load(copy).predictors_for(1)] == [0]


# -- compress -> pack -> container ---------------------------------------------------------------------------
RECIPE = {"quantization": {"group_size": 16, "max_tokens_per_expert": 64},
          "candidates": {"int_bits": [4, 8], "int_lowrank": []}, "limits": {"max_bits": 12.0}}


def test_pack_stores_the_predictors_that_beat_the_shadow_router(profiled, tmp_path):
    folder, _, tokens, prof = profiled
    run_compress(folder, prof.folder, Recipe.from_dict(RECIPE), tmp_path / "work")
    pack_work([tmp_path / "work"], tmp_path / "m.prism", Budget(bits=8.0), shard_size_bytes=1 << 20)
    winners = {(p["layer"], x["layer"]) for x in prof.layers for p in x["predictors"] if p["recall"] > p["shadow_recall"]}
    assert winners, "the fixture's profile should have a predictor that beats the shadow router"
    with Container(tmp_path / "m.prism") as c:
        assert [(x.layer, x.from_layer) for x in c.manifest.predictor.layers] == sorted(winners)
        stored = c.predictor_tensors(verify_checksum=True)
    for j, i in winners:
        assert torch.equal(stored[(j, i)][0], prof.tensor(f"layers.{j}.predictor.{i}.weight"))
        assert torch.equal(stored[(j, i)][1], prof.tensor(f"layers.{j}.predictor.{i}.bias"))
    assert verify_container(tmp_path / "m.prism") == []
    for lookahead in (1, 2):
        model = prism_load.load(tmp_path / "m.prism", expert_cache="50%", lookahead=lookahead, prefetch=True)
        used = sorted([j, i] for j, i in winners if j - i <= lookahead)  # every layer of this model is MoE
        assert model.stats()["predictor_layers"] == used
        model.runtime.close()


def biased_predictor(config, favourite: list[int]) -> dict:
    """A predictor that ignores its input and always names `favourite` (weight 0, a large bias on them)."""
    bias = torch.zeros(config["num_local_experts"])
    bias[favourite] = 10.0
    return {"recall": 0.9, "shadow_recall": 0.8,
            "weight": torch.zeros(config["num_local_experts"], config["hidden_size"]), "bias": bias}


@pytest.fixture(scope="module")
def with_predictor(tmp_path_factory):
    path = tmp_path_factory.mktemp("pred") / "m.prism"
    return write_tiny(path, model=random_model(RUNTIME_CONFIG, seed=4), config=RUNTIME_CONFIG, mix=INT_MIX,
                      predictor={(2, 1): biased_predictor(RUNTIME_CONFIG, [5, 6]),
                                 (2, 0): biased_predictor(RUNTIME_CONFIG, [3, 4])})


def test_manifest_and_file_round_trip(with_predictor):
    with Container(with_predictor) as c:
        assert [(x.layer, x.from_layer, x.recall, x.shadow_recall) for x in c.manifest.predictor.layers] == [
            (2, 0, 0.9, 0.8), (2, 1, 0.9, 0.8)]
        weight, bias = c.predictor_tensors(verify_checksum=True)[(2, 1)]
    assert weight.dtype == torch.float32 and not weight.any() and bias[[5, 6]].tolist() == [10.0, 10.0]
    text = (with_predictor / "manifest.json").read_text()
    assert '"predictor":{"file":{"name":"predictor.safetensors"' in text
    summary = inspect_container(with_predictor)
    assert summary["predictor"] == [{"layer": 2, "from_layer": i, "recall": 0.9, "shadow_recall": 0.8} for i in (0, 1)]
    assert summary["bytes"]["predictor"] == (with_predictor / "predictor.safetensors").stat().st_size


def test_a_container_without_predictors_has_no_key(tmp_path):
    path = write_tiny(tmp_path / "m.prism", config=RUNTIME_CONFIG, mix=INT_MIX)
    assert "predictor" not in json.loads((path / "manifest.json").read_text())
    assert not (path / "predictor.safetensors").exists()
    with Container(path) as c:
        assert c.predictor_tensors() == {}


@pytest.mark.parametrize("change, message", [
    (lambda p: p["layers"][0].update(from_layer=2), r"predicted from one of the MoE layers \[0, 1\]"),
    (lambda p: p["layers"][0].update(layer=0), "not a MoE layer after the first"),
    (lambda p: p["layers"].append(dict(p["layers"][0])), "listed twice or out of order"),
    (lambda p: p["layers"].reverse(), "listed twice or out of order"),
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
        prism_load.load(copy, expert_cache="50%", prefetch=True)
    path.write_bytes(b"\0" * 7)
    with pytest.raises(ContainerError, match="predictor.safetensors: 7 bytes on disk"):
        Container(copy)


def test_write_refuses_a_predictor_of_the_wrong_shape(tmp_path):
    bad = biased_predictor(RUNTIME_CONFIG, [1])
    bad["weight"] = bad["weight"][:, :-1]
    with pytest.raises(ContainerError, match="predictor of layer 2 from layer 1: weight"):
        write_tiny(tmp_path / "m.prism", config=RUNTIME_CONFIG, mix=INT_MIX, predictor={(2, 1): bad})
    assert not (tmp_path / "m.prism").exists()


# -- the runtime -------------------------------------------------------------------------------------------
def test_runtime_predicts_with_the_predictor_of_the_layer_it_runs_after(with_predictor):
    """Layer 2 is predicted with the predictor fitted on the output of the layer the hook runs after: after
    layer 1 experts (5, 6), after layer 0 (lookahead 2) experts (3, 4); with lookahead 1 layer 2 is not
    predicted after layer 0, so that predictor is not kept; predictor=False keeps the shadow router."""
    x = torch.randn(1, RUNTIME_CONFIG["hidden_size"], generator=torch.Generator().manual_seed(1))
    model = load_cached(with_predictor, "50%", True, dtype=torch.float32)
    layer = model.layers[2]
    router_pick = sorted(layer.mlp.router(layer.post_attention_layernorm(x)).indices.flatten().tolist())
    assert sorted(model.runtime.shadow.predict(2, x, after=1)) == [5, 6]
    assert sorted(model.runtime.shadow.predict(2, x, after=0)) == router_pick
    assert model.stats()["predictor_layers"] == [[2, 1]]
    ahead = load_cached(with_predictor, "50%", True, lookahead=2)
    assert ahead.stats()["predictor_layers"] == [[2, 0], [2, 1]]
    assert sorted(ahead.runtime.shadow.predict(2, x, after=0)) == [3, 4]
    plain = load_cached(with_predictor, "50%", True, predictor=False)
    assert plain.stats()["predictor_layers"] == []
    assert sorted(plain.runtime.shadow.predict(2, x, after=1)) == router_pick
    for m in (model, ahead, plain):
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


def test_a_checkpoint_prefetches_with_its_profiles_predictors(profiled):
    """A Hugging Face checkpoint loaded with profile= uses the profile's winning predictors, and its output
    stays the original model's."""
    folder, ref, tokens, prof = profiled
    winners = sorted([p["layer"], x["layer"]] for x in prof.layers for p in x["predictors"]
                     if p["recall"] > p["shadow_recall"] and p["distance"] == 1)
    model = prism_load.load(folder, expert_cache="50%", profile=prof.folder, dtype=torch.float32, prefetch=True)
    assert model.stats()["predictor_layers"] == winners and winners
    with torch.no_grad():
        torch.testing.assert_close(model(tokens[:2]), ref(tokens[:2]).logits, rtol=1e-4, atol=1e-4)
    model.runtime.close()


@pytest.mark.parametrize("flags, shown", [
    ([], "fitted: 1→2; shadow router elsewhere"),
    (["--lookahead", "2"], "fitted: 0→2, 1→2; shadow router elsewhere"),
    (["--no-predictor"], "the shadow router"),
])
def test_prism_run_names_the_predictors_it_uses(tmp_path, flags, shown):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from typer.testing import CliRunner

    from prism_convert.cli.app import app

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(RUNTIME_CONFIG["vocab_size"])}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    path = write_tiny(tmp_path / "m.prism", model=random_model(RUNTIME_CONFIG, seed=4), config=RUNTIME_CONFIG,
                      mix=INT_MIX, tokenizer_files=[tmp_path / "tokenizer.json"],
                      predictor={(2, 1): biased_predictor(RUNTIME_CONFIG, [5, 6]),
                                 (2, 0): biased_predictor(RUNTIME_CONFIG, [3, 4])})
    result = CliRunner().invoke(app, ["run", str(path), "-p", "w1 w2", "-n", "4", "--cache", "30%", "--prefetch", *flags],
                                terminal_width=200)
    assert result.exit_code == 0, result.output
    assert shown in result.output


def test_a_profile_of_another_model_or_a_damaged_one_is_refused_at_load(profiled, tiny_checkpoint, tmp_path):
    """Its frequencies and predictors describe another model: refused before any decode, and named."""
    from prism_load.errors import ProfileError

    _, _, _, prof = profiled
    other, _ = tiny_checkpoint("qwen3_moe")
    with pytest.raises(ProfileError, match="recorded on another model"):
        prism_load.load(other, expert_cache="50%", profile=prof.folder, prefetch=True)
    folder, _, _, _ = profiled
    copy = tmp_path / "p"
    shutil.copytree(prof.folder, copy)
    (copy / "stats.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(ProfileError, match="stats.safetensors: cannot read the predictors"):
        prism_load.load(folder, expert_cache="50%", profile=copy, prefetch=True)
    from safetensors.torch import load_file, save_file

    stats = load_file(prof.folder / "stats.safetensors")
    stats["layers.1.predictor.0.weight"] = stats["layers.1.predictor.0.weight"][:, :-1].contiguous()
    save_file(stats, copy / "stats.safetensors")
    data = json.loads((copy / "profile.json").read_text())
    data["layers"][0]["predictors"][0]["recall"] = 1.0  # make sure it is offered
    (copy / "profile.json").write_text(json.dumps(data))
    with pytest.raises(ProfileError, match=r"the predictor of layer 1 from layer 0 is \[5, 47\]"):
        prism_load.load(folder, expert_cache="50%", profile=copy, prefetch=True)
    del stats["layers.1.predictor.0.weight"]
    save_file(stats, copy / "stats.safetensors")
    with pytest.raises(ProfileError, match="recorded in profile.json but"):
        prism_load.load(folder, expert_cache="50%", profile=copy, prefetch=True)


def test_a_null_predictor_key_is_refused(with_predictor, tmp_path):
    copy = tmp_path / "m.prism"
    shutil.copytree(with_predictor, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["predictor"] = None
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ContainerError, match="predictor: expected an object"):
        Container(copy)


def test_pairs_skip_dense_layers_between_moe_layers(tiny_checkpoint, tmp_path):
    """Qwen2-MoE with layer 1 dense: MoE layers 0, 2, 3. Layer 2 is predicted from layer 0 (its previous MoE
    layer), layer 3 from 2 and from 0; the prefetcher uses (2, 0) after layer 0, and after the dense layer 1
    the shadow router predicts layer 2 again."""
    from prism_load.runtime.predictor import FittedPredictor
    from prism_load.runtime.prefetch import ShadowRouter

    folder, ref = tiny_checkpoint("qwen2_moe")
    tokens = torch.randint(0, ref.config.vocab_size, (10, 8), generator=torch.Generator().manual_seed(3))
    run_profile(folder, tokens, tmp_path / "p", {"spec": "random"}, min_tokens=4)
    prof = Profile.load(tmp_path / "p")
    assert [(x["layer"], p["layer"], p["distance"]) for x in prof.layers for p in x["predictors"]] == [
        (0, 2, 1), (0, 3, 2), (2, 3, 1)]
    model = prism_load.load(folder, expert_cache="50%", prefetch=True)
    e, h = ref.config.num_experts, ref.config.hidden_size
    fitted = {key: FittedPredictor(key[1], torch.zeros(e, h), torch.zeros(e)) for key in ((2, 0), (3, 0), (3, 2))}
    for lookahead, kept in ((1, [(2, 0), (3, 2)]), (2, [(2, 0), (3, 0), (3, 2)])):
        router = ShadowRouter(model, model.runtime.cache, lookahead=lookahead, predictors=fitted)
        assert sorted(router.predictors) == kept
        assert router.next_moe[1] == [2, 3][:lookahead]  # after the dense layer: the shadow router (no (2, 1))
    model.runtime.close()


def test_the_folded_norm_predicts_what_norm_then_predictor_predicts(tmp_path):
    """With an RMSNorm the prefetcher folds the norm's weight into the predictor (one matmul and a row
    scale); its picks equal those of the norm module followed by the stored predictor."""
    n, h = RUNTIME_CONFIG["num_local_experts"], RUNTIME_CONFIG["hidden_size"]
    g = torch.Generator().manual_seed(0)
    fitted = {"recall": 0.9, "shadow_recall": 0.8, "weight": torch.randn(n, h, generator=g), "bias": torch.randn(n, generator=g)}
    path = write_tiny(tmp_path / "m.prism", model=random_model(RUNTIME_CONFIG, seed=2), config=RUNTIME_CONFIG,
                      mix=INT_MIX, predictor={(2, 1): fitted})
    model = load_cached(path, "50%", True)
    shadow, norm = model.runtime.shadow, model.layers[2].post_attention_layernorm
    assert shadow.folded[(2, 1)] is not None
    for row in torch.randn(40, h, generator=g):
        x = row[None] * 3.0
        want = model.layers[2].mlp.router.select(torch.nn.functional.linear(norm(x), fitted["weight"], fitted["bias"]))
        assert sorted(shadow.predict(2, x, after=1)) == sorted(want.flatten().tolist())
    model.runtime.close()

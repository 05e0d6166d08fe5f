"""prism profile: conservation, equality with an independent full forward pass, determinism, atomicity."""

import json

import pytest
import torch

from prism_convert.profiling.profiler import run_profile
from prism_load.errors import ProfileError
from prism_load.profile_format import PROFILE_JSON, Profile, RoutingProfile


@pytest.fixture(scope="module")
def profiled(tiny_checkpoint, tmp_path_factory):
    """Profiles of two families (Qwen2-MoE has a dense layer in the middle and a shared expert)."""
    out = {}
    for name in ("mixtral", "qwen2_moe"):
        folder, ref = tiny_checkpoint(name)
        gen = torch.Generator().manual_seed(1)
        tokens = torch.randint(0, ref.config.vocab_size, (6, 12), generator=gen)
        prof_dir = tmp_path_factory.mktemp(f"prof_{name}") / "p"
        run_profile(folder, tokens, prof_dir, {"spec": "random"}, min_tokens=4)
        out[name] = (folder, ref, tokens, Profile.load(prof_dir))
    return out


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_conservation(profiled, name):
    _, ref, tokens, prof = profiled[name]
    k = prof.top_k
    for entry in prof.layers:
        assert sum(x["tokens"] for x in entry["experts"]) == tokens.numel() * k
        assert sum(x["gate_mass"] for x in entry["experts"]) == pytest.approx(entry["applied_weight"], rel=1e-9)
        coact = prof.tensor(f"layers.{entry['layer']}.coactivation")
        assert coact.diagonal().tolist() == [x["tokens"] for x in entry["experts"]]
        assert coact.sum().item() == tokens.numel() * k * k


def _reference_routing(ref, tokens):
    """Per MoE layer: (inputs to the MoE block, top-k indices, applied weights), from transformers itself."""
    captured = {}
    hooks = []
    for i, layer in enumerate(ref.model.layers):
        if hasattr(layer.mlp, "gate"):
            hooks.append(layer.mlp.register_forward_pre_hook(
                lambda m, a, i=i: captured.__setitem__(i, a[0].reshape(-1, a[0].shape[-1]).clone())))
    with torch.no_grad():
        ref(tokens)
    for h in hooks:
        h.remove()
    routing = {}
    for i, x in captured.items():
        _, weights, indices = ref.model.layers[i].mlp.gate(x)
        routing[i] = (x, indices, weights)
    return routing


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_statistics_equal_an_independent_full_forward(profiled, name):
    _, ref, tokens, prof = profiled[name]
    routing = _reference_routing(ref, tokens)
    assert [e["layer"] for e in prof.layers] == sorted(routing)
    for entry in prof.layers:
        i = entry["layer"]
        x, indices, weights = routing[i]
        counts = torch.bincount(indices.flatten(), minlength=len(entry["experts"]))
        assert [e["tokens"] for e in entry["experts"]] == counts.tolist()
        mass = torch.zeros(len(entry["experts"]), dtype=torch.float64).index_add_(
            0, indices.flatten(), weights.double().flatten())
        assert [e["gate_mass"] for e in entry["experts"]] == pytest.approx(mass.tolist(), rel=1e-5)
        input_sq = prof.tensor(f"layers.{i}.input_sq")
        for e in range(len(entry["experts"])):
            routed = x[(indices == e).any(-1)]
            if len(routed):
                torch.testing.assert_close(input_sq[e], routed.pow(2).mean(0), rtol=1e-4, atol=1e-6)


def test_next_layer_recall_matches_shadow_router(profiled):
    """Recall = overlap of the next layer's router applied to this layer's output with its real top-k."""
    _, ref, tokens, prof = profiled["mixtral"]
    routing = _reference_routing(ref, tokens)
    hidden = {}
    hooks = [layer.register_forward_hook(lambda m, a, o, i=i: hidden.__setitem__(i, (o[0] if isinstance(o, tuple) else o)))
             for i, layer in enumerate(ref.model.layers)]
    with torch.no_grad():
        ref(tokens)
    for h in hooks:
        h.remove()
    first = prof.layers[0]
    nxt = ref.model.layers[1]
    k = prof.top_k
    with torch.no_grad():
        logits = nxt.mlp.gate(nxt.post_attention_layernorm(hidden[0]).reshape(-1, hidden[0].shape[-1]))[0]
    pred = torch.topk(logits, k, dim=-1).indices
    actual = routing[1][1]
    overlap = (pred[:, :, None] == actual[:, None, :]).any(1).sum().item()
    assert first["next_layer"] == 1
    assert first["next_layer_recall"] == pytest.approx(overlap / actual.numel())
    assert prof.layers[-1]["next_layer_recall"] is None


def test_deterministic(profiled, tmp_path):
    folder, _, tokens, prof = profiled["mixtral"]
    run_profile(folder, tokens, tmp_path / "again", {"spec": "random"}, min_tokens=4)
    again = Profile.load(tmp_path / "again")
    strip = lambda d: {k: v for k, v in d.items() if k not in ("seconds", "tokens_per_second", "peak_rss_bytes")}
    assert strip(again.data) | {"model": None} == strip(prof.data) | {"model": None}
    for entry in prof.layers:
        name = f"layers.{entry['layer']}.input_sq"
        assert torch.equal(again.tensor(name), prof.tensor(name))


def test_rare_experts_get_neutral_prior(profiled):
    _, _, _, prof = profiled["qwen2_moe"]
    entry = prof.layers[0]
    weights = prof.channel_weights(entry["layer"])
    raw = prof.tensor(f"layers.{entry['layer']}.input_sq")
    for e, x in enumerate(entry["experts"]):
        if x["tokens"] >= prof.data["min_tokens"]:
            assert torch.equal(weights[e], raw[e])
    prof.data["min_tokens"] = 10**9  # every expert rare -> all equal the pooled mean
    pooled = prof.channel_weights(entry["layer"])
    assert torch.allclose(pooled, pooled[0].expand_as(pooled))


def test_profile_of_another_model_is_refused(profiled):
    _, _, _, prof = profiled["mixtral"]
    other = json.loads((profiled["qwen2_moe"][0] / "config.json").read_text())
    with pytest.raises(ProfileError, match="recorded on another model"):
        prof.check_model(other)


def test_interrupted_profile_leaves_nothing_that_looks_complete(profiled, tmp_path, monkeypatch):
    folder, _, tokens, _ = profiled["mixtral"]
    import prism_convert.profiling.profiler as profile_module

    def boom(*a, **k):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(profile_module, "layer_entry", boom)
    with pytest.raises(RuntimeError):
        run_profile(folder, tokens, tmp_path / "p", {"spec": "random"})
    assert not (tmp_path / "p").exists()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ProfileError, match="no profile.json"):
        Profile.load(tmp_path / "p")


def test_the_runtime_record_reads_what_the_profiler_wrote(profiled):
    """RoutingProfile (what the runtime reads) carries profile.json's routing: frequencies of each layer sum to
    top_k, the predictors are those recorded, and the model identity is checked as the converter's is."""
    folder, _, tokens, prof = profiled["qwen2_moe"]
    record = RoutingProfile.read(prof.folder)
    assert record.tokens == tokens.numel() and record.config_sha256 == prof.data["model"]["config_sha256"]
    assert [x.layer for x in record.layers] == [x["layer"] for x in prof.layers]
    freq = record.frequencies()
    for entry in record.layers:
        assert sum(freq[(entry.layer, x.expert)] for x in entry.experts) == pytest.approx(prof.top_k)
        assert [x.gate_mass for x in entry.experts] == [x["gate_mass"] for x in prof.layer(entry.layer)["experts"]]
    assert [(p.from_layer, p.layer) for x in record.layers for p in x.predictors] == \
        [(x["layer"], p["layer"]) for x in prof.layers for p in x["predictors"]]
    record.check_model(json.loads((folder / "config.json").read_text()))
    other = json.loads((profiled["mixtral"][0] / "config.json").read_text())
    with pytest.raises(ProfileError, match="recorded on another model"):
        record.check_model(other)


@pytest.mark.parametrize(("damage", "message"), [
    (lambda d: d["layers"][1]["experts"][2].__setitem__("tokens", "many"),
     r"profile.json: `layers\[1\].experts\[2\].tokens` is 'many', expected an integer >= 0"),
    (lambda d: d["model"].pop("config_sha256"), r"profile.json: `model.config_sha256` is missing"),
    (lambda d: d.__setitem__("tokens", 0), r"profile.json: `tokens` is 0, expected an integer >= 1"),
    (lambda d: d["layers"][0]["predictors"].append({"layer": 2, "recall": None, "shadow_recall": 0.5}),
     r"`layers\[0\].predictors\[\d\].recall` is None, expected a number"),
    (lambda d: d.__setitem__("version", 2), r"profile.json: format 'prism-profile' version 2, expected"),
])
def test_the_runtime_record_names_the_file_and_field_that_is_wrong(profiled, tmp_path, damage, message):
    import shutil

    _, _, _, prof = profiled["qwen2_moe"]
    copy = tmp_path / "p"
    shutil.copytree(prof.folder, copy)
    data = json.loads((copy / PROFILE_JSON).read_text())
    damage(data)
    (copy / PROFILE_JSON).write_text(json.dumps(data))
    with pytest.raises(ProfileError, match=message):
        RoutingProfile.read(copy)


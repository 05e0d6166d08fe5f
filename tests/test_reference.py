"""The reference MoE: deterministic training, a standard HF checkpoint that prism and transformers load
with the same logits, learned routing, the BPE tokenizer, the cache, and the `prism reference` command."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

import prism_load
from prism_convert.cli.app import app
from prism_load.errors import PrismError
from prism_load.models.moe import RouterOutput
from prism_reference import train as reference
from prism_reference.bpe_tokenizer import END_OF_TEXT
from prism_reference.train import PRESETS, load_balancing_loss, lr_at, reference_model, train_reference


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """The tiny preset trained twice with seed 0: once through the CLI, once through the library."""
    root = tmp_path_factory.mktemp("reference")
    result = CliRunner().invoke(app, ["reference", "-o", str(root / "cli"), "--preset", "tiny", "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert "tiny preset, seed 0" in result.output and "heldout loss" in result.output
    train_reference(root / "lib", "tiny", seed=0, threads=1)
    return root / "cli", root / "lib"


def _tensors(folder) -> dict[str, torch.Tensor]:
    with safe_open(folder / "model.safetensors", "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_same_seed_gives_identical_weights_and_tokenizer(tiny_pair):
    a, b = tiny_pair
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    for name in ta:
        assert torch.equal(ta[name], tb[name]), name
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    assert (a / "config.json").read_bytes() == (b / "config.json").read_bytes()
    ra, rb = (json.loads((f / "training.json").read_text()) for f in (a, b))
    assert ra["curve"] == rb["curve"] and ra["loss"] == rb["loss"]


def test_checkpoint_uses_the_hub_mixtral_layout(tiny_pair):
    folder = tiny_pair[0]
    preset = PRESETS["tiny"]
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "mixtral" and config["architectures"] == ["MixtralForCausalLM"]
    assert config["num_local_experts"] == preset.experts and config["num_hidden_layers"] == preset.layers
    tensors = _tensors(folder)
    h, inter, vocab = preset.hidden_size, preset.expert_intermediate, config["vocab_size"]
    for e in range(preset.experts):
        prefix = f"model.layers.{preset.layers - 1}.block_sparse_moe.experts.{e}"
        assert tensors[f"{prefix}.w1.weight"].shape == (inter, h)
        assert tensors[f"{prefix}.w3.weight"].shape == (inter, h)
        assert tensors[f"{prefix}.w2.weight"].shape == (h, inter)
    assert tensors["model.layers.0.block_sparse_moe.gate.weight"].shape == (preset.experts, h)
    assert tensors["model.embed_tokens.weight"].shape == (vocab, h)
    assert tensors["lm_head.weight"].shape == (vocab, h)
    assert "model.norm.weight" in tensors and "model.layers.1.self_attn.q_proj.weight" in tensors
    assert not any(".mlp." in name for name in tensors)
    experts = sum(t.numel() for n, t in tensors.items() if ".experts." in n)
    report = json.loads((folder / "training.json").read_text())
    assert report["parameters"] == {"total": sum(t.numel() for t in tensors.values()), "experts": experts}


def test_prism_and_transformers_load_it_with_the_same_logits(tiny_pair):
    transformers = pytest.importorskip("transformers")
    folder = tiny_pair[0]
    model = prism_load.load(folder, dtype=torch.float32)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    text = "def mean(values):\n    return sum(values) / len(values)\n\nThe mean of a list is its sum over its length."
    ids = torch.tensor([model.tokenizer.encode(text).ids])
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    assert ours.shape == theirs.shape == (1, ids.shape[1], hf.config.vocab_size)
    assert ((ours - theirs).abs().max() / theirs.abs().max()).item() < 1e-4
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    assert tok.eos_token == tok.bos_token == END_OF_TEXT
    assert tok.eos_token_id == hf.config.eos_token_id == model.tokenizer.token_to_id(END_OF_TEXT)
    assert tok(text).input_ids == ids[0].tolist()


def test_training_lowers_the_loss_and_learns_routing(tiny_pair):
    report = json.loads((tiny_pair[0] / "training.json").read_text())
    curve = report["curve"]["loss"]
    assert len(curve) == PRESETS["tiny"].steps
    first, last = sum(curve[:5]) / 5, sum(curve[-5:]) / 5
    vocab = json.loads((tiny_pair[0] / "config.json").read_text())["vocab_size"]
    assert first > math.log(vocab) - 0.3  # starts near uniform over the vocabulary
    assert last < first - 0.8
    for split in ("train", "heldout"):
        for domain in ("prose", "code"):
            assert report["loss"][split][domain] < math.log(vocab) - 0.5, (split, domain)
    balance = report["curve"]["balance"]
    assert all(0.99 < b < 2.0 for b in balance)  # E x sum f P: 1 when even, E/K when collapsed
    routing = report["routing_heldout"]
    assert set(routing["domains"]) == {"prose", "code"}
    for layer in routing["domains"]["code"]:
        assert abs(sum(layer["shares"]) - 1) < 1e-3 and 0 < layer["usage_entropy"] <= 1


def test_tokenizer_round_trips_text(tiny_pair):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tiny_pair[0] / "tokenizer.json"))
    assert tok.get_vocab_size() == PRESETS["tiny"].vocab_size
    for text in ("class Node:\n\tdef __init__(self):\n        self.next = None  # ✓\n",
                 "Naïve café — 日本語 text, emoji 🙂 and\r\nCRLF, trailing spaces   ",
                 'The "with" statement is used to wrap the execution of a block.'):
        ids = tok.encode(text).ids
        assert tok.decode(ids) == text
    # Merges were learned: common text is far shorter than its bytes.
    prose = "The following is a description of how the interpreter handles the statement."
    assert len(tok.encode(prose).ids) < len(prose.encode()) / 2
    assert tok.token_to_id(END_OF_TEXT) == 0


def test_load_balancing_loss_is_one_when_even_and_grows_when_skewed():
    n, e, k = 64, 4, 2
    even_logits = torch.zeros(n, e, requires_grad=True)
    indices = torch.stack([torch.arange(n) % e, (torch.arange(n) + 1) % e], dim=1)
    even = load_balancing_loss([RouterOutput(even_logits, indices, torch.full((n, k), 0.5))], e, k)
    assert even.item() == pytest.approx(1.0)
    skewed_logits = torch.tensor([[4.0, 3.0, 0.0, 0.0]]).repeat(n, 1).requires_grad_()
    collapsed = torch.tensor([[0, 1]]).repeat(n, 1)
    skewed = load_balancing_loss([RouterOutput(skewed_logits, collapsed, torch.full((n, k), 0.5))], e, k)
    assert skewed.item() > 1.5
    skewed.backward()
    assert skewed_logits.grad[:, :2].sum() > 0 > skewed_logits.grad[:, 2:].sum()  # pushes mass off the hot pair


def test_learning_rate_schedule():
    p = PRESETS["quick"]
    assert lr_at(0, p) == pytest.approx(p.lr / p.warmup_steps)
    assert lr_at(p.warmup_steps - 1, p) == pytest.approx(p.lr)
    assert lr_at(p.warmup_steps, p) == pytest.approx(p.lr)
    assert lr_at(p.steps, p) == pytest.approx(0.1 * p.lr)
    values = [lr_at(s, p) for s in range(p.warmup_steps, p.steps)]
    assert values == sorted(values, reverse=True)


def test_cache_trains_once_and_reuses(tmp_path, monkeypatch, tiny_pair):
    import shutil

    calls = []

    def fake_train(out, preset, seed, progress=None, threads=None):
        calls.append((preset, seed))
        shutil.copytree(tiny_pair[0], out)

    monkeypatch.setattr(reference, "train_reference", fake_train)
    monkeypatch.setenv("PRISM_CACHE", str(tmp_path))
    first = reference_model("tiny", seed=0)
    second = reference_model("tiny", seed=0)
    assert first == second and calls == [("tiny", 0)]
    assert first.parent == tmp_path / "reference" and first.name.startswith("tiny-seed0-threads1-v")
    assert (first / "training.json").is_file()
    assert reference_model("tiny", seed=1) != first and calls[-1] == ("tiny", 1)
    assert reference_model("tiny", seed=0, threads=2) != first and len(calls) == 3  # other threads, other bits


def test_failed_training_leaves_no_folder(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(reference, "save_mixtral", broken)
    monkeypatch.setattr(reference, "PRESETS", {**PRESETS, "tiny": PRESETS["tiny"].__class__(
        **{**PRESETS["tiny"].__dict__, "steps": 2, "code_chars": 20_000, "tokenizer_code_chars": 10_000})})
    with pytest.raises(RuntimeError, match="disk full"):
        train_reference(tmp_path / "out", "tiny", threads=1)
    assert list(tmp_path.iterdir()) == []


def test_bad_preset_and_foreign_output_folder(tmp_path):
    with pytest.raises(PrismError, match=r"unknown reference preset 'huge' \(presets: tiny, quick, full\)"):
        train_reference(tmp_path / "x", "huge")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(PrismError, match="mine: exists and is not a reference model folder"):
        train_reference(tmp_path / "mine", "tiny")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


@pytest.mark.slow
def test_demo_runs_end_to_end_and_a_new_reference_model_never_collides_with_old_work(tiny_pair, tmp_path,
                                                                                      monkeypatch):
    """`prism demo` (the README's main job) on the tiny preset: it converts, loads and generates; its work
    folder is per reference model and the folder that model lives in, so work left by another model (here, a
    stale job in the old shared layout) or by the same model under another PRISM_CACHE never makes it fail."""
    import shutil

    monkeypatch.setenv("PRISM_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "cache" / "reference" / reference.cache_key("tiny", 0)
    shutil.copytree(tiny_pair[0], folder)  # the cached reference model, as `prism reference` leaves it
    stale = tmp_path / ".demo.prism.work" / "compress"
    stale.mkdir(parents=True)
    (stale / "job.json").write_text(json.dumps({"model": "another model"}))
    runner = CliRunner()
    for cache in ("cache", "cache", "another cache"):  # the second run resumes its own finished work; the third's
        # reference model is the same one in another PRISM_CACHE (its path differs: another job's work)
        monkeypatch.setenv("PRISM_CACHE", str(tmp_path / cache))
        if not (tmp_path / cache / "reference").is_dir():
            shutil.copytree(tmp_path / "cache" / "reference", tmp_path / cache / "reference")
        result = runner.invoke(app, ["demo", "--preset", "tiny", "-o", str(tmp_path / "demo.prism")],
                               terminal_width=200)
        assert result.exit_code == 0, result.output
        out = result.output
        assert "bits per expert weight" in out and "KL(original || packed)" in out and "decode" in out
    works = sorted(p.name for p in (tmp_path / ".demo.prism.work").iterdir() if p.name.startswith(folder.name))
    assert len(works) == 2 and all((tmp_path / ".demo.prism.work" / w / "compress" / "job.json").is_file() for w in works)
    assert json.loads((stale / "job.json").read_text()) == {"model": "another model"}  # left alone

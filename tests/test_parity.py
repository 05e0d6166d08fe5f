"""prism's slim model code must reproduce transformers exactly: logits and greedy continuations."""

import json

import pytest
import torch
from numerics import rel_max_error
from tiny import CASES, prefill_then_steps

import prism_load


@pytest.mark.parametrize("name", sorted(CASES))
def test_logits_match_transformers(name, tiny_checkpoint):
    folder, ref = tiny_checkpoint(name)
    assert len(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]) > 0
    model = prism_load.load(folder, dtype=torch.float32)
    ids = torch.randint(0, ref.config.vocab_size, (2, 13))
    with torch.no_grad():
        ours, theirs = model(ids), ref(ids).logits
    assert ours.shape == theirs.shape == (2, 13, ref.config.vocab_size)
    assert rel_max_error(ours, theirs) < 1e-4


@pytest.mark.parametrize("name", sorted(CASES))
def test_greedy_continuation_matches_transformers(name, tiny_checkpoint):
    folder, ref = tiny_checkpoint(name)
    model = prism_load.load(folder, dtype=torch.float32)
    prompt = torch.randint(0, ref.config.vocab_size, (1, 7))
    ours = model.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=[])
    # no stopping on either side: an eos id outside the vocabulary (min_new_tokens would mask the real eos
    # out of transformers' argmax instead, and the continuations would differ wherever eos wins)
    theirs = ref.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=ref.config.vocab_size)
    assert ours.tolist() == theirs.tolist()


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
def test_incremental_decode_matches_full_forward(name, tiny_checkpoint):
    """Logits from prefill + one-token decode steps equal those of one forward over the whole sequence."""
    folder, ref = tiny_checkpoint(name)
    model = prism_load.load(folder, dtype=torch.float32)
    stepped, full, _ = prefill_then_steps(model, torch.randint(0, ref.config.vocab_size, (2, 10)), 6)
    assert rel_max_error(stepped, full) < 1e-5


def test_generate_stops_at_eos(tiny_checkpoint):
    folder, ref = tiny_checkpoint("mixtral")
    model = prism_load.load(folder, dtype=torch.float32)
    prompt = torch.randint(0, ref.config.vocab_size, (1, 5))
    free = model.generate(prompt, max_new_tokens=8, eos_token_id=[])
    first = int(free[0, 5])
    stopped = model.generate(prompt, max_new_tokens=8, eos_token_id=first)
    assert stopped.tolist() == free[:, :6].tolist()

"""Batched generation with left padding (every family, the expert cache too), the text-level API with stop
strings and streaming, generation_config.json defaults and overrides, and the errors bad input gets."""

import json
import shutil

import pytest
import torch
from containers import random_model, write_tiny
from numerics import rel_max_error
from runtime_fixtures import INT_MIX, RUNTIME_CONFIG, load_cached
from tiny import CASES

import prism_load
from prism_load.errors import ConfigError, GenerationError

PAD = 7  # a real token id: only the mask may hide the padding


def random_prompts(vocab: int, lengths: list[int], seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=gen) for n in lengths]


def left_pad(prompts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
    return ids, mask


def word_tokenizer(vocab: int):
    """Token i is the word "wi", words joined by spaces: every id of a tiny vocabulary decodes to text."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


class TokenCounter:
    """MoE observer: tokens routed per layer (padding and finished rows must not reach the experts)."""

    def __init__(self, model):
        self.tokens = {}
        for _, block in model.moe_blocks():
            block.observer = self

    def on_route(self, layer_index, x, route):
        self.tokens[layer_index] = self.tokens.get(layer_index, 0) + x.shape[0]

    def on_expert(self, *args):
        pass


def assert_rows_match_alone(model, prompts, new_tokens=6):
    """Logits of the padded prefill and of one cached decode step, and greedy continuations, row by row."""
    ids, mask = left_pad(prompts)
    width = ids.shape[1]
    with torch.no_grad():
        cache = model.new_cache()
        batch = model(ids, cache=cache, attention_mask=mask)
        assert torch.isfinite(batch).all()  # padding queries too
        nxt = batch[:, -1].argmax(-1)
        step = model(nxt[:, None], cache=cache)[:, -1]
        for i, p in enumerate(prompts):
            alone = model(torch.cat([p, nxt[i : i + 1]])[None])[0]
            assert rel_max_error(batch[i, width - len(p):], alone[:-1]) < 1e-5
            assert rel_max_error(step[i], alone[-1]) < 1e-5
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, eos_token_id=[])
    assert out[:, :width].tolist() == ids.tolist()
    for i, p in enumerate(prompts):
        alone = model.generate(p[None], max_new_tokens=new_tokens, eos_token_id=[])[0, len(p):]
        assert out[i, width:].tolist() == alone.tolist(), f"row {i}"


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_row_of_a_padded_batch_equals_its_prompt_alone(name, tiny_checkpoint):
    """Lengths 3, 8, 5: GPT-OSS's window (4) is crossed, and every row has a different amount of padding."""
    folder, ref = tiny_checkpoint(name)
    model = prism_load.load(folder, dtype=torch.float32)
    assert_rows_match_alone(model, random_prompts(ref.config.vocab_size, [3, 8, 5]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logits_to_keep_gives_the_last_positions_logits(tiny_checkpoint, dtype):
    """model(ids, logits_to_keep=n) is model(ids)[:, -n:] (the LM head over n positions only; one row may take
    the native decode kernel, so equal to fp32 rounding), with the cache filled alike."""
    folder, ref = tiny_checkpoint("mixtral")
    model = prism_load.load(folder, dtype=dtype)
    ids = torch.randint(0, ref.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        cache_all, cache_last = model.new_cache(), model.new_cache()
        full = model(ids, cache=cache_all)
        for n in (1, 3):
            kept = model(ids, logits_to_keep=n)
            assert kept.shape == (2, n, ref.config.vocab_size)
            assert rel_max_error(kept, full[:, -n:]) < 1e-5
        last = model(ids, cache=cache_last, logits_to_keep=1)
        step = torch.tensor([[3], [4]])
        assert rel_max_error(model(step, cache=cache_last), model(step, cache=cache_all)) < 1e-5
    assert rel_max_error(last[:, -1], full[:, -1]) < 1e-5


def test_logits_to_keep_runs_the_last_layers_mlp_for_the_kept_positions_only(tiny_checkpoint):
    """The last layer's MLP (its router, its experts) sees only the positions whose logits are asked for, as
    llama.cpp does; every other layer, and the last layer's cached keys and values, see every position."""
    folder, ref = tiny_checkpoint("mixtral")
    model = prism_load.load(folder, dtype=torch.float32)
    rows = {}

    class Rows:
        def on_route(self, layer_index, x, route):
            rows.setdefault(layer_index, []).append(x.shape[0])

        def on_expert(self, *args):
            pass

    for _, block in model.moe_blocks():
        block.observer = Rows()
    ids = torch.randint(0, ref.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        cache_all, cache_kept = model.new_cache(), model.new_cache()
        full = model(ids, cache=cache_all)
        kept = model(ids, cache=cache_kept, logits_to_keep=2)
    last = len(model.layers) - 1
    assert rows == {i: [14, 14 if i != last else 4] for i in range(len(model.layers))}
    assert rel_max_error(kept, full[:, -2:]) < 1e-5
    for layer in range(len(model.layers)):
        assert torch.equal(cache_kept.keys[layer][:, :, :7], cache_all.keys[layer][:, :, :7])
        assert torch.equal(cache_kept.values[layer][:, :, :7], cache_all.values[layer][:, :, :7])


def test_a_padded_row_counts_positions_from_its_first_token(tiny_checkpoint):
    """Rotary attention only sees position differences, so a shifted row would still pass the tests above; the
    phases follow transformers' cumsum(attention_mask) - 1 all the same (long-context rope scaling is not
    shift-invariant in general)."""
    model = prism_load.load(tiny_checkpoint("mixtral")[0], dtype=torch.float32)
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    ctx = model.context(2, 4, None, "cpu", torch.float32, mask)
    cos, _ = model.rotary(torch.tensor([[0, 0, 0, 1], [0, 1, 2, 3]]), torch.float32)
    assert torch.equal(ctx.cos, cos[:, None]) and ctx.token_valid.tolist() == mask.bool().tolist()
    assert model.context(2, 4, None, "cpu", torch.float32, torch.ones(2, 4)).key_valid is None  # fast path


@pytest.mark.parametrize("name", ["qwen2_moe", "gpt_oss", "deepseek_v3"])
def test_a_padded_batch_matches_transformers(name, tiny_checkpoint):
    """transformers' own batched forward and generate with the same attention_mask (left padding)."""
    folder, ref = tiny_checkpoint(name)
    model = prism_load.load(folder, dtype=torch.float32)
    vocab = ref.config.vocab_size
    prompts = random_prompts(vocab, [6, 2, 4], seed=1)
    ids, mask = left_pad(prompts)
    with torch.no_grad():
        ours, theirs = model(ids, attention_mask=mask), ref(ids, attention_mask=mask).logits
    real = mask.bool()
    assert rel_max_error(ours[real], theirs[real]) < 1e-4
    out = model.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[])
    expected = ref.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=vocab,
                            pad_token_id=PAD)
    assert out.tolist() == expected.tolist()


def test_rows_finish_independently_and_finished_rows_leave_the_experts(tiny_checkpoint):
    folder, ref = tiny_checkpoint("mixtral")
    model = prism_load.load(folder, dtype=torch.float32)
    prompts = random_prompts(ref.config.vocab_size, [4, 6], seed=2)
    free = [model.generate(p[None], max_new_tokens=8, eos_token_id=[])[0, len(p):].tolist() for p in prompts]
    eos = next(t for t in free[0][:3] if t not in free[1])  # ends row 0 early, never row 1
    ids, mask = left_pad(prompts)
    counter = TokenCounter(model)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=eos)[:, ids.shape[1]:].tolist()
    stop = free[0].index(eos)
    assert out[0] == free[0][: stop + 1] + [eos] * (7 - stop)  # finished: filled with eos
    assert out[1] == free[1]
    # prefill: the real tokens only; then one token per unfinished row per decode step (7 steps)
    expected = sum(len(p) for p in prompts) + sum(1 + (s < stop) for s in range(7))
    assert all(n == expected for n in counter.tokens.values()) and expected < 10 + 2 * 7


@pytest.mark.parametrize("do_sample", [False, True])
def test_the_cpu_loop_steps_as_the_device_loop(tiny_checkpoint, do_sample):
    """decode_steps on a CPU keeps the rows' tokens and states as Python values (sampling.next_tokens, draws in
    blocks); off the CPU they stay tensors (_device_steps). Run on the same CPU model, both give the same tokens
    step by step: greedy and seeded sampling (top-k, top-p), a padded batch, a row ended early by eos (then
    filled) and one by the caller's stop rule."""
    from prism_load.generation import _device_steps, decode_steps, settings

    folder, ref = tiny_checkpoint("mixtral")
    model = prism_load.load(folder, dtype=torch.float32)
    ids, mask = left_pad(random_prompts(ref.config.vocab_size, [4, 7, 5], seed=3))
    free = model.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=[], do_sample=do_sample,
                          top_k=20, top_p=0.9, seed=5)[:, ids.shape[1]:]
    eos = int(free[0, 2])  # row 0 ends at its third token; row 2 at the caller's rule after its fourth
    config = settings(model, max_new_tokens=10, eos_token_id=eos, do_sample=do_sample, top_k=20, top_p=0.9)
    count = [0]

    def stop(tokens):
        count[0] += 1
        return torch.tensor([False, False, count[0] % 10 == 4])

    cpu = [t.tolist() for t in decode_steps(model, ids, mask, config, seed=5, stop=stop)]
    count[0] = 0
    generator = torch.Generator().manual_seed(5)
    device = [t.tolist() for t in _device_steps(model, ids, mask.bool(), config, generator, (eos,), eos, stop)]
    assert cpu == device and len(cpu) == 10
    assert [row[0] for row in cpu[2:]] == [eos] * 8 and [row[2] for row in cpu[4:]] == [eos] * 6


def test_a_padded_batch_through_the_expert_cache(tmp_path):
    """Through the runtime's cache (30%: misses and evictions), each row equals its prompt alone, and the
    experts (so the cache and its statistics) never see a padding token."""
    path = write_tiny(tmp_path / "m.prism", model=random_model(RUNTIME_CONFIG, seed=3), config=RUNTIME_CONFIG,
                      mix=INT_MIX)
    model = load_cached(path, "30%", dtype=torch.float32)
    prompts = random_prompts(RUNTIME_CONFIG["vocab_size"], [2, 7, 4], seed=3)
    assert_rows_match_alone(model, prompts)
    ids, mask = left_pad(prompts)
    counter = TokenCounter(model)
    model.reset_stats()
    with torch.no_grad():
        model(ids, attention_mask=mask)
    assert set(counter.tokens.values()) == {13}
    assert model.stats()["uses"] > 0
    resident = prism_load.load(path, dtype=torch.float32)
    with torch.no_grad():
        assert rel_max_error(model(ids, attention_mask=mask)[mask.bool()],
                             resident(ids, attention_mask=mask)[mask.bool()]) < 1e-5
    model.runtime.close()


# -- text in, text out ---------------------------------------------------------------------------------------
@pytest.fixture
def text_model(tiny_checkpoint):
    folder, ref = tiny_checkpoint("qwen3_moe")
    model = prism_load.load(folder, dtype=torch.float32)
    model.tokenizer = word_tokenizer(ref.config.vocab_size)
    return model


def continuation(model, prompt: str, n: int, **kwargs) -> str:
    ids = torch.tensor([model.tokenizer.encode(prompt).ids])
    return model.tokenizer.decode(model.generate(ids, max_new_tokens=n, **kwargs)[0, ids.shape[1]:].tolist())


def test_text_generation_of_one_prompt_and_of_a_batch(text_model):
    prompts = ["w5 w9 w14", "w3", "w40 w41 w42 w43 w44"]
    alone = [continuation(text_model, p, 6, eos_token_id=[]) for p in prompts]
    assert prism_load.generate(text_model, prompts[0], max_new_tokens=6, eos_token_id=[]) == alone[0]
    assert prism_load.generate(text_model, prompts, max_new_tokens=6, eos_token_id=[]) == alone
    assert len(alone[0].split()) == 6
    streamed = list(prism_load.generate(text_model, prompts[0], max_new_tokens=6, stream=True, eos_token_id=[]))
    assert len(streamed) == 6 and "".join(streamed) == alone[0]
    rows = list(prism_load.generate(text_model, prompts, max_new_tokens=6, stream=True, eos_token_id=[]))
    assert all(isinstance(r, list) and len(r) == 3 for r in rows)
    assert ["".join(parts) for parts in zip(*rows)] == alone


def test_text_stops_at_eos_and_at_stop_strings(text_model):
    free = prism_load.generate(text_model, ["w5 w9", "w3 w8 w1"], max_new_tokens=8, eos_token_id=[])
    words = free[0].split()
    # eos: the row ends before the eos token's text; the other row runs on
    eos = text_model.tokenizer.token_to_id(words[3])
    ended = prism_load.generate(text_model, ["w5 w9", "w3 w8 w1"], max_new_tokens=8, eos_token_id=eos)
    assert ended[0] == " ".join(words[: words.index(words[3])])
    # a stop string across two tokens: cut before it, in the result and in the stream
    stop = f"{words[2]} {words[3][:2]}"
    expected = free[0][: free[0].find(stop)]
    assert prism_load.generate(text_model, "w5 w9", max_new_tokens=8, stop=stop, eos_token_id=[]) == expected
    pieces = list(prism_load.generate(text_model, "w5 w9", max_new_tokens=8, stop=[stop, "zzz"], stream=True,
                                      eos_token_id=[]))
    assert "".join(pieces) == expected  # nothing streamed is taken back
    batch = prism_load.generate(text_model, ["w5 w9", "w3 w8 w1"], max_new_tokens=8, stop=stop, eos_token_id=[])
    assert batch[0] == expected and batch[1] == (free[1][: free[1].find(stop)] if stop in free[1] else free[1])


# -- generation_config.json ------------------------------------------------------------------------------------
def with_generation_config(src, dst, config: dict):
    shutil.copytree(src, dst)
    (dst / "generation_config.json").write_text(json.dumps(config))
    return dst


def test_generation_config_defaults_are_honoured_and_overridable(tiny_checkpoint, tmp_path):
    folder, ref = tiny_checkpoint("mixtral")
    plain = prism_load.load(folder, dtype=torch.float32)
    prompt = random_prompts(ref.config.vocab_size, [5])[0][None]
    greedy = plain.generate(prompt, max_new_tokens=6, eos_token_id=[])
    eos = int(greedy[0, 7])
    sampling = {"do_sample": True, "temperature": 3.0, "top_k": 20, "max_new_tokens": 4, "eos_token_id": [eos]}
    model = prism_load.load(with_generation_config(folder, tmp_path / "m", sampling), dtype=torch.float32)
    assert model.generation_config.max_new_tokens == 4 and model.generation_config.eos_token_id == (eos,)
    sampled = model.generate(prompt, seed=5)
    assert sampled.tolist() == plain.generate(prompt, max_new_tokens=4, do_sample=True, temperature=3.0, top_k=20,
                                              eos_token_id=eos, seed=5).tolist()
    samples = {tuple(model.generate(prompt, seed=s, eos_token_id=[])[0].tolist()) for s in range(4)}
    assert len(samples) > 1  # it samples
    assert model.generate(prompt, do_sample=False, max_new_tokens=6).tolist() == greedy[:, :8].tolist()  # stopped at eos
    assert model.generate(prompt, do_sample=False, max_new_tokens=6, eos_token_id=[]).tolist() == greedy.tolist()
    model.tokenizer = word_tokenizer(ref.config.vocab_size)
    assert len(prism_load.generate(model, "w4 w5", eos_token_id=[], do_sample=False).split()) == 4


def test_a_container_carries_generation_config(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({"max_new_tokens": 3, "eos_token_id": []}))
    path = write_tiny(tmp_path / "m.prism", tokenizer_files=[tmp_path / "generation_config.json"])
    prompt = torch.tensor([[1, 2, 3]])
    for model in (prism_load.load(path, dtype=torch.float32), load_cached(path, "50%", dtype=torch.float32)):
        assert model.generation_config.max_new_tokens == 3 and model.generation_config.eos_token_id == ()
        assert model.generate(prompt).shape == (1, 6)
        assert model.generate(prompt, max_new_tokens=5).shape == (1, 8)


def test_a_bad_generation_config_is_named(tiny_checkpoint, tmp_path):
    folder, _ = tiny_checkpoint("mixtral")
    bad = with_generation_config(folder, tmp_path / "m", {})
    (bad / "generation_config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="generation_config.json: not valid JSON"):
        prism_load.load(bad)
    (bad / "generation_config.json").write_text(json.dumps({"top_k": "many"}))
    with pytest.raises(ConfigError, match="generation_config.json: a field has a bad value"):
        prism_load.load(bad)


# -- bad input -------------------------------------------------------------------------------------------------
def test_bad_input_gets_an_error_naming_the_argument(text_model):
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    cases = [
        (dict(attention_mask=torch.tensor([[1, 1, 0], [1, 1, 1]])), r"attention_mask: row 0 is right-padded"),
        (dict(attention_mask=torch.ones(2, 4)), r"attention_mask: shape \(2, 4\) does not match input_ids"),
        (dict(attention_mask=torch.tensor([[0, 0, 0], [1, 1, 1]])), r"attention_mask: row 0 has no tokens"),
        (dict(attention_mask=torch.tensor([[2, 1, 1], [1, 1, 1]])), r"attention_mask: expected only 0"),
        (dict(max_new_tokens=0), r"max_new_tokens: expected at least 1"),
    ]
    for kwargs, message in cases:
        with pytest.raises(GenerationError, match=message):
            text_model.generate(ids, **kwargs)
    with pytest.raises(GenerationError, match=r"input_ids: empty prompt"):
        text_model.generate(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(GenerationError, match=r"attention_mask: shape \(2, 2\) does not match"):
        text_model(ids, attention_mask=torch.ones(2, 2))
    with pytest.raises(GenerationError, match=r"prompt: prompt 1 is empty"):
        prism_load.generate(text_model, ["w1", ""])
    with pytest.raises(GenerationError, match=r"prompt: expected a string or a non-empty list"):
        prism_load.generate(text_model, [])
    with pytest.raises(GenerationError, match=r"stop: expected non-empty strings"):
        prism_load.generate(text_model, "w1", stop="")
    assert isinstance(GenerationError("x"), ValueError)

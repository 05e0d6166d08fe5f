"""Prefetch: the shadow router predicts what the next layer routes to; fetches no longer wanted are cancelled
(queued) or dropped before their decode (started); a prefetched expert never used goes first; and under
concurrency (threads, random fetch delays, tiny budgets) nothing deadlocks and every output is exact."""

from __future__ import annotations

import queue
import random
import threading
import time
from pathlib import Path

import pytest
import torch
from containers import random_model, write_tiny
from runtime_fixtures import INT_MIX, RUNTIME_CONFIG, expert_bytes, greedy, load_cached, prompts

import prism_load
from prism_load.models.moe import ExpertWeights
from prism_load.runtime import ExpertCache, MemoryStore
from prism_load.runtime.cache import footprint
from prism_load.runtime.prefetch import FetchWorker

TIMEOUT = 30  # seconds: a thread still running after this is deadlocked


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# -- a store whose fetches a test can hold --------------------------------------------------------------
class Gates:
    """fetch_hook for MemoryStore: records each fetch as it starts; fetches of `held` keys wait for release()."""

    def __init__(self, held=()):
        self.started: queue.Queue = queue.Queue()
        self.events = {k: threading.Event() for k in held}

    def __call__(self, key):
        self.started.put(key)
        if key in self.events:
            assert self.events[key].wait(TIMEOUT), f"fetch {key} never released"

    def wait_started(self, key):
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            try:
                if self.started.get(timeout=0.1) == key:
                    return
            except queue.Empty:
                pass
        raise AssertionError(f"fetch {key} never started")

    def release(self, key):
        self.events[key].set()


def constant_store(layers=(0,), num_experts=4, hook=None, **kwargs) -> MemoryStore:
    """Expert (i, e) is filled with 10 * i + e, so a wrong expert shows in its values."""
    experts = {(i, e): ExpertWeights(torch.full((2, 4), float(10 * i + e)), torch.full((4, 1), float(10 * i + e)))
               for i in layers for e in range(num_experts)}
    return MemoryStore(experts, num_experts=num_experts, top_k=1, fetch_hook=hook, **kwargs)


def slots(store, n: int) -> int:
    return n * footprint(store.nbytes(0, 0))


def settle(cache, timeout=TIMEOUT):
    """Wait until the worker has nothing queued or loading."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with cache._lock:
            if not cache.worker.queued() and all(e.ready for e in cache._entries.values()):
                return
        time.sleep(0.005)
    raise AssertionError("fetch worker never settled")


def step(cache, layer, ids):
    """One layer step as the MoE block does it: acquire, read every expert, then the layer hook's release."""
    got = cache.acquire(layer, ids)
    values = {e: float(got[e].gate_up[0, 0]) for e in ids}
    cache.release_thread()
    return values


# -- cancellation, supersession, deprioritisation -------------------------------------------------------
def test_routing_disagrees_cancels_queued_and_drops_started():
    gates = Gates(held=[(0, 1)])
    store = constant_store(hook=gates)
    cache = ExpertCache(store, slots(store, 4), pin_hot=False)
    worker = FetchWorker(cache)
    try:
        cache.prefetch(0, [1, 2])
        gates.wait_started((0, 1))  # the worker holds (0, 1) in its read; (0, 2) waits in the queue
        assert step(cache, 0, [3]) == {3: 3.0}  # the real routing picks neither
        assert cache.stats.prefetch_cancelled == 1  # (0, 2), never started
        gates.release((0, 1))
        settle(cache)
        s = cache.stats
        assert s.prefetch_aborted == 1 and s.wasted_bytes == store.stored_nbytes(0, 1)  # read, never decoded
        assert cache.resident_keys() == {(0, 3)}
        assert (0, 2) not in store.fetched
        assert s.layer(0).predicted == 2 and s.layer(0).correct == 0 and s.layer(0).actual == 1
        cache.check()
    finally:
        worker.close()


def test_newer_prediction_supersedes_older():
    gates = Gates(held=[(0, 1)])
    store = constant_store(hook=gates)
    cache = ExpertCache(store, slots(store, 4), pin_hot=False)
    worker = FetchWorker(cache)
    try:
        cache.prefetch(0, [1, 2])
        gates.wait_started((0, 1))
        cache.prefetch(0, [3])  # a newer guess for the same layer step
        assert cache.stats.prefetch_cancelled == 1
        gates.release((0, 1))
        settle(cache)
        assert cache.stats.prefetch_aborted == 1
        assert cache.resident_keys() == {(0, 3)}
        assert step(cache, 0, [3]) == {3: 3.0}
        s = cache.stats
        assert s.hits == 1 and s.misses == 0 and s.prefetch_used == 1
        assert s.layer(0).predicted == 1 and s.layer(0).correct == 1  # only the newest prediction is scored
    finally:
        worker.close()


def test_unused_prefetch_is_evicted_first():
    """Room for 2. Expert 2 is used, then 1 is prefetched (more recent), then the step routes to 3: plain LRU
    would evict 2; the prefetch the routing did not confirm goes instead, and its bytes count as wasted."""
    store = constant_store()
    cache = ExpertCache(store, slots(store, 2), pin_hot=False, eviction="lru")
    worker = FetchWorker(cache)
    try:
        step(cache, 0, [2])
        cache.prefetch(0, [1])
        settle(cache)
        assert cache.resident_keys() == {(0, 1), (0, 2)}
        step(cache, 0, [3])
        assert cache.resident_keys() == {(0, 2), (0, 3)}
        assert cache.stats.wasted_bytes == store.stored_nbytes(0, 1)
        assert cache.stats.prefetch_used == 0
    finally:
        worker.close()


def test_step_loads_its_other_missing_experts_ahead():
    """Two experts missing in one step: the compute thread loads the first while the worker loads the second."""
    ahead_started = threading.Event()

    def hook(key):
        if key == (0, 2):
            ahead_started.set()
        if key == (0, 1):  # keep the compute thread's load going until the worker has taken (0, 2)
            assert ahead_started.wait(TIMEOUT)

    store = constant_store(hook=hook)
    cache = ExpertCache(store, slots(store, 4), pin_hot=False)
    worker = FetchWorker(cache)
    try:
        assert step(cache, 0, [1, 2]) == {1: 1.0, 2: 2.0}
        s = cache.stats
        assert s.ahead_loads == 1 and s.demand_loads == 1 and s.loads == 2
        assert sorted(store.fetched) == [(0, 1), (0, 2)]
        assert s.uses == 2 and s.misses >= 1  # the worker's expert is a hit when it landed before its turn
    finally:
        worker.close()


def test_prefetch_never_evicts_an_expected_expert():
    """Room for 1, holding an expert predicted again for the next step: the other prediction finds no room."""
    store = constant_store()
    cache = ExpertCache(store, slots(store, 1), pin_hot=False)
    worker = FetchWorker(cache)
    try:
        step(cache, 0, [2])
        cache.prefetch(0, [2, 3])
        settle(cache)
        assert cache.resident_keys() == {(0, 2)}
        s = cache.stats
        assert s.prefetch_skipped == 1 and s.prefetch_no_room == 1 and s.prefetch_loads == 0
    finally:
        worker.close()


# -- concurrency --------------------------------------------------------------------------------------
def run_threads(targets) -> None:
    errors = []

    def guard(fn):
        try:
            torch.set_num_threads(1)
            fn()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=guard, args=(fn,), daemon=True) for fn in targets]
    for t in threads:
        t.start()
    deadline = time.monotonic() + TIMEOUT
    for t in threads:
        t.join(timeout=max(deadline - time.monotonic(), 0.1))
    assert not any(t.is_alive() for t in threads), "deadlock: a thread is still running"
    if errors:
        raise errors[0]


@pytest.mark.parametrize("budget_experts", [1, 2, 3])
def test_random_steps_under_concurrency_use_the_right_expert(budget_experts):
    """Four threads take random layer steps while predicting random experts; fetches sleep at random.
    Every expert handed out holds its own values; the counters add up; the budget holds throughout."""
    rng = random.Random(budget_experts)

    def jitter(key):
        if rng.random() < 0.5:
            time.sleep(rng.random() * 0.002)

    store = constant_store(layers=(0, 1, 2), num_experts=6, hook=jitter)
    cache = ExpertCache(store, slots(store, budget_experts), pin_hot=False)
    worker = FetchWorker(cache, threads=2)
    used = [0] * 4

    def walker(n):
        r = random.Random(100 + n)
        for _ in range(150):
            layer = r.randrange(3)
            ids = r.sample(range(6), r.choice([1, 2]))
            if r.random() < 0.7:
                cache.prefetch(r.randrange(3), r.sample(range(6), 2))
            got = step(cache, layer, ids)
            assert got == {e: float(10 * layer + e) for e in ids}, (layer, ids, got)
            used[n] += len(ids)
            cache.check()

    try:
        run_threads([lambda n=n: walker(n) for n in range(4)])
    finally:
        worker.close()
    s = cache.stats
    assert s.uses == sum(used) and s.hits + s.misses == s.uses
    assert s.loads == s.demand_loads + s.prefetch_loads + s.ahead_loads == len(store.fetched)
    assert s.bytes_fetched == sum(store.stored_nbytes(*k) for k in store.fetched)
    assert s.wasted_bytes <= s.bytes_fetched and s.prefetch_used <= s.prefetch_loads
    cache.check()


# -- on a model -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def container(tmp_path_factory):
    model = random_model(RUNTIME_CONFIG, seed=3)
    return write_tiny(tmp_path_factory.mktemp("prefetch") / "m.prism", model=model, config=RUNTIME_CONFIG, mix=INT_MIX)


@pytest.fixture(scope="module")
def resident(container):
    torch.set_num_threads(1)
    return prism_load.load(container)


@pytest.mark.parametrize("options", [dict(lookahead=2), dict(prefetch_extra=2), dict(lookahead=2, prefetch_extra=1)])
def test_prefetch_variants_match_resident(container, resident, options):
    """Budget below one layer's experts, prefetch further ahead or wider: the same logits and tokens."""
    model = load_cached(container, largest(container) * 2, True, **options)
    for ids in prompts(2, RUNTIME_CONFIG["vocab_size"], seed=5):
        assert torch.equal(model(ids), resident(ids))
        assert torch.equal(greedy(model, ids, 8), greedy(resident, ids, 8))
    s = model.stats()
    assert s["prefetch_requested"] > 0 and s["misses"] > 0
    model.runtime.cache.check()


def largest(container) -> int:
    """Bytes the largest expert reserves in the cache."""
    from prism_load.container.reader import Container, model_args
    from prism_load.runtime.container_store import ContainerStore

    with Container(container) as c:
        return expert_bytes(ContainerStore(c, model_args(c.config)[1]))[-1]


def test_concurrent_generation_with_slow_fetches_matches_resident(container, resident):
    """Three threads generate different prompts through one cache that holds 3 experts, prefetching two
    layers ahead, with fetches that sleep at random: every sequence equals the resident model's."""
    model = load_cached(container, largest(container) * 3, True, lookahead=2)
    store = model.runtime.cache.store
    fetch, rng, lock = store.fetch, random.Random(7), threading.Lock()

    def slow_fetch(layer, expert):
        with lock:
            delay = rng.random() * 0.003
        time.sleep(delay)
        return fetch(layer, expert)

    store.fetch = slow_fetch
    batches = [prompts(2, RUNTIME_CONFIG["vocab_size"], seed=20 + n) for n in range(3)]
    expected = [[greedy(resident, ids, 8) for ids in batch] for batch in batches]
    results = [[None] * 2 for _ in batches]

    def generate(n):
        for k, ids in enumerate(batches[n]):
            results[n][k] = greedy(model, ids, 8)

    run_threads([lambda n=n: generate(n) for n in range(3)])
    for got, want in zip(results, expected):
        assert all(torch.equal(g, w) for g, w in zip(got, want))
    model.runtime.cache.check()


def test_shadow_router_is_exact_when_the_next_attention_adds_nothing(tmp_path):
    """With o_proj = 0 in layers 1 and 2, the hidden state leaving layer i is exactly what layer i+1's
    post-attention norm sees, so the shadow router must predict layers 1 and 2 perfectly (recall and
    precision 1). Layer 0 is never predicted, and neither is a prefill."""
    model = random_model(RUNTIME_CONFIG, seed=4)
    with torch.no_grad():
        for layer in model.layers[1:]:
            layer.self_attn.o_proj.weight.zero_()
    path = write_tiny(tmp_path / "m.prism", model=model, config=RUNTIME_CONFIG, mix=INT_MIX)
    cached = load_cached(path, "50%", True)
    ids = prompts(1, RUNTIME_CONFIG["vocab_size"], seed=6, length=(6, 7))[0]
    cached(ids)
    assert all(x["predicted_steps"] == 0 for x in cached.stats()["layers"].values())  # a prefill: no guesses
    greedy(cached, ids, 10)
    layers = cached.stats()["layers"]
    assert layers[0]["predicted_steps"] == 0
    for i in (1, 2):
        assert layers[i]["predicted_steps"] == 10 - 1  # every decode step (the prompt's prefill is not one)
        assert layers[i]["recall"] == layers[i]["precision"] == 1.0


def test_shadow_router_skips_layers_already_resident(tmp_path):
    """A layer whose every expert is resident or loading is not predicted (a guess could fetch nothing, and
    the prediction costs the compute thread); the other layers still are, and the cache's per-layer counts
    follow its entries."""
    path = write_tiny(tmp_path / "m.prism", model=random_model(RUNTIME_CONFIG, seed=4), config=RUNTIME_CONFIG,
                      mix=INT_MIX)
    per_layer = sum(sorted(expert_bytes(load_cached(path, "100%", False)))[-RUNTIME_CONFIG["num_local_experts"]:])
    cached = load_cached(path, per_layer + 2 * max(expert_bytes(load_cached(path, "100%", False))), True,
                         pin_hot=False)
    cache = cached.runtime.cache
    for e in range(RUNTIME_CONFIG["num_local_experts"]):  # all of layer 2 in, pinned for good by our thread
        cache.use(2, e)
        cache._pins.pop(threading.get_ident())  # keep them pinned: no eviction of layer 2 below
    assert cache.layer_entries[2] == RUNTIME_CONFIG["num_local_experts"]
    greedy(cached, prompts(1, RUNTIME_CONFIG["vocab_size"], seed=6, length=(6, 7))[0], 6)
    layers = cached.stats()["layers"]
    assert layers[2]["predicted_steps"] == 0 and layers[1]["predicted_steps"] == 6 - 1
    cached.runtime.close()
    cache.check()


# -- prism run ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flag, codes", [("--prefetch", False), ("--no-prefetch", False), ("--prefetch", True),
                                         (None, False)])
def test_prism_run_streams_then_prints_stats(tmp_path, flag, codes):
    """prism run with a cache streams its text, then the cache's table, and prefetch's rows where it prefetched:
    with --prefetch, and not by default on a CPU (prefetch "auto")."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from typer.testing import CliRunner

    from prism_convert.cli.app import app

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(RUNTIME_CONFIG["vocab_size"])}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    path = write_tiny(tmp_path / "m.prism", model=random_model(RUNTIME_CONFIG, seed=1), config=RUNTIME_CONFIG,
                      mix=INT_MIX, tokenizer_files=[tmp_path / "tokenizer.json"])
    args = ["run", str(path), "--prompt", "w1 w2 w3", "-n", "6", "--cache", "30%"]
    extra = ([] if flag is None else [flag]) + (["--codes"] if codes else [])
    prefetch = flag == "--prefetch"
    result = CliRunner().invoke(app, args + extra, terminal_width=200)
    assert result.exit_code == 0, result.output
    out = result.output
    if codes:  # the same tokens as the decoded form: the weights are bit-identical
        plain = CliRunner().invoke(app, args + ["--form", "decoded"], terminal_width=200)
        assert out.splitlines()[0] == plain.output.splitlines()[0]
    assert "hits / misses" in out and "per MoE layer" in out
    assert ("prefetch recall / precision" in out) is prefetch
    assert ("the shadow router" in out) is prefetch  # this container has no fitted predictors
    assert "prefill 3 tokens" in out and "decode 5 tokens" in out


def run_container(tmp_path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(RUNTIME_CONFIG["vocab_size"])}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    return write_tiny(tmp_path / "m.prism", model=random_model(RUNTIME_CONFIG, seed=1), config=RUNTIME_CONFIG,
                      mix=INT_MIX, tokenizer_files=[tmp_path / "tokenizer.json"])


def test_prism_run_generates_a_prompts_file_as_one_batch(tmp_path):
    """Each printed continuation is the text API's for that prompt alone; tokens/s count every row."""
    from typer.testing import CliRunner

    from prism_convert.cli.app import app

    path = run_container(tmp_path)
    prompts = ["w1 w2 w3", "w9", "w4 w5"]
    (tmp_path / "prompts.txt").write_text("\n".join([prompts[0], "", *prompts[1:]]) + "\n")
    result = CliRunner().invoke(app, ["run", str(path), "--prompts-file", str(tmp_path / "prompts.txt"), "-n", "5",
                                      "--cache", "50%"], terminal_width=200)
    assert result.exit_code == 0, result.output
    model = prism_load.load(path)
    for i, p in enumerate(prompts):
        assert f"[{i}] {p}{prism_load.generate(model, p, max_new_tokens=5)}" in result.output
    assert "prefill 6 tokens" in result.output and "decode 12 tokens" in result.output  # 3 rows x 4 steps
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    result = CliRunner().invoke(app, ["run", str(path), "--prompts-file", str(empty)])
    assert "--prompts-file" in str(result.exception) and "no prompts" in str(result.exception)


def test_prism_run_samples_with_temperature_top_p_and_seed(tmp_path):
    from typer.testing import CliRunner

    from prism_convert.cli.app import app

    path = run_container(tmp_path)
    base = ["run", str(path), "-p", "w1 w2", "-n", "8"]

    def first_line(*flags):
        result = CliRunner().invoke(app, [*base, *flags], terminal_width=200)
        assert result.exit_code == 0, result.output
        return result.output.splitlines()[0]

    greedy = first_line()
    assert first_line("--temperature", "0") == greedy
    sampled = {first_line("--temperature", "2.0", "--top-p", "0.95", "--seed", str(s)) for s in range(3)}
    assert first_line("--temperature", "2.0", "--top-p", "0.95", "--seed", "1") in sampled
    assert len(sampled | {greedy}) > 1
    model = prism_load.load(path)
    expected = prism_load.generate(model, "w1 w2", max_new_tokens=8, do_sample=True, temperature=2.0, top_p=0.95,
                                   seed=1)
    assert first_line("--temperature", "2.0", "--top-p", "0.95", "--seed", "1") == f"w1 w2{expected}"
    result = CliRunner().invoke(app, [*base, "--top-p", "1.5"])
    assert "--top-p 1.5: expected a probability" in str(result.exception)


def test_run_speed_splits_prefill_and_decode():
    from prism_convert.tools.generate import speed

    s = speed(prompt_tokens=8, start=10.0, times=[10.5, 11.0, 11.25, 12.5], printing_seconds=0.5)
    assert s["prefill_seconds"] == 0.5 and s["prefill_tokens_per_second"] == 16.0
    assert s["decode_tokens"] == 3 and s["decode_seconds"] == 1.5 and s["decode_tokens_per_second"] == 2.0

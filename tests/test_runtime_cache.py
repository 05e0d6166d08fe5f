"""The budgeted expert cache: exact outputs under tiny budgets, statistics that add up, the budget kept,
eviction informed by frequencies, the hot tier pinned, every store behind one protocol."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import warnings

import pytest
import torch
from containers import FACTORED_MIX
from runtime_fixtures import (
    RUNTIME_CONFIG,
    CountingFetches,
    RouteCounter,
    expert_bytes,
    greedy,
    load_cached,
    prompts,
    write_runtime_container,
)

import prism_load
from prism_load.errors import BudgetError
from prism_load.models.moe import ExpertWeights
from prism_load.runtime import ExpertCache, MemoryStore, parse_budget
from prism_load.runtime.cache import footprint
from prism_load.runtime.container_store import ContainerStore
from prism_load.runtime.stores import load, weights_nbytes

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def container(tmp_path_factory):
    return write_runtime_container(tmp_path_factory.mktemp("runtime") / "model.prism")


@pytest.fixture(scope="module")
def resident(container):
    return prism_load.load(container)


@pytest.fixture(scope="module")
def resident_fp32(container):
    """The decoded fp32 reference: what the decoded and codes forms equal bit for bit."""
    return prism_load.load(container, dtype=torch.float32, expert_form="decoded")


@pytest.mark.parametrize("prefetch", [False, True])
@pytest.mark.parametrize("experts_in_budget", [1, 2])
@pytest.mark.parametrize("form", ["packed", "decoded", "codes"])
def test_tiny_budget_matches_resident(container, resident, resident_fp32, prefetch, experts_in_budget, form):
    """A cache holding 1 or 2 of a layer's 8 experts gives the resident model's logits and greedy tokens,
    with experts packed (against the packed resident model, bf16), decoded or kept as codes (against the
    decoded fp32 one); the mix has int4/g16, int3/g8 and bf16 tensors, so some experts mix forms."""
    options = {} if form == "packed" else {"dtype": torch.float32}
    reference = resident if form == "packed" else resident_fp32
    budget = expert_bytes(resident_store(container, form, **options))[-1] * experts_in_budget
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load_cached(container, budget, prefetch, expert_form=form, **options)
    # the cache warns where the budget holds fewer than one layer step's experts (top-2 here), and only there
    said = [str(w.message) for w in caught if "fewer than one layer step's experts" in str(w.message)]
    assert len(said) == (experts_in_budget < 2), said
    for ids in prompts(3, RUNTIME_CONFIG["vocab_size"], seed=1):
        assert torch.equal(model(ids), reference(ids))
        assert torch.equal(greedy(model, ids), greedy(reference, ids))
    s = model.stats()
    assert s["misses"] > 0 and s["residency"]["reserved_bytes"] <= budget
    model.runtime.cache.check()


def resident_store(container, form: str = "packed", dtype=torch.bfloat16):
    """The store a cached load of `container` gets (prism_load.load's defaults: packed, bf16)."""
    from prism_load.container.reader import Container, model_args

    c = Container(container)
    return ContainerStore(c, model_args(c.config)[1], dtype, form=form)


def test_checkpoint_store_matches_resident(tiny_checkpoint):
    folder, _ = tiny_checkpoint("mixtral")
    resident = prism_load.load(folder)
    model = prism_load.load(folder, expert_cache="30%", prefetch=True)
    ids = prompts(1, 50, seed=2)[0]
    assert torch.equal(model(ids), resident(ids))
    assert torch.equal(greedy(model, ids, 8), greedy(resident, ids, 8))
    assert model.stats()["uses"] > 0


def test_budget_errors(container):
    with pytest.raises(BudgetError, match=r"smaller than the largest expert \([\d,]+ bytes, \d+\.\d% of every "
                                          r"expert's\); it must hold at least one, and a layer step's 2 to run them"):
        load_cached(container, 100)
    for bad in ("0%", "150%", "lots", "-3MB", True, 0):
        with pytest.raises(BudgetError):
            parse_budget(bad, 1000)
    assert parse_budget("50%", 1000) == 500
    assert parse_budget("2MB", 0) == 2_000_000 and parse_budget("1.5GiB", 0) == 3 * 2**29
    assert parse_budget(1234, 0) == 1234


@pytest.mark.parametrize("prefetch", [False, True])
def test_statistics_add_up(container, prefetch):
    budget = expert_bytes(resident_store(container))[-1] * 3
    model = load_cached(container, budget, prefetch)
    fetches = CountingFetches(model.runtime.cache.store)
    counter = RouteCounter().attach(model)
    for ids in prompts(4, RUNTIME_CONFIG["vocab_size"], seed=3):
        greedy(model, ids, 10)
    model.runtime.close()  # no fetch may land between the two snapshots below
    s = model.stats()
    assert s["uses"] == sum(counter.uses.values()) > 0
    assert s["hits"] + s["misses"] == s["uses"]
    assert all(s["layers"][i]["uses"] == counter.uses[i] for i in counter.uses)
    assert sum(layer["hits"] + layer["misses"] for layer in s["layers"].values()) == s["uses"]
    assert s["loads"] == s["demand_loads"] + s["prefetch_loads"] + s["ahead_loads"] == len(fetches.calls)
    assert s["bytes_fetched"] == fetches.bytes() > 0
    assert s["stall_seconds"] >= sum(layer["stall_seconds"] for layer in s["layers"].values()) - 1e-9
    if not prefetch:
        assert s["prefetch_recall"] is None and s["prefetch_loads"] == s["ahead_loads"] == 0
        assert s["wasted_bytes"] == 0
        return
    layers = s["layers"].values()
    assert s["prefetch_correct"] == sum(x["correct"] for x in layers)
    assert s["prefetch_recall"] == pytest.approx(s["prefetch_correct"] / s["prefetch_actual"])
    assert s["prefetch_precision"] == pytest.approx(s["prefetch_correct"] / s["prefetch_predicted"])
    assert s["layers"][0]["predicted_steps"] == 0  # nothing runs before layer 0 to predict it
    assert all(x["predicted_steps"] > 0 and 0 <= x["recall"] <= 1 for i, x in s["layers"].items() if i > 0)
    assert s["prefetch_used"] <= s["prefetch_loads"]
    assert s["wasted_bytes"] <= s["bytes_fetched"]
    model.reset_stats()
    assert model.stats()["uses"] == 0


def test_decoded_bytes_never_exceed_budget(container, resident):
    """A sampler thread measures the decoded tensors the cache holds while four threads generate."""
    budget = expert_bytes(resident_store(container))[-1] * 2
    model = load_cached(container, budget, True)
    cache = model.runtime.cache
    samples, stop = [], threading.Event()

    def sample():
        while not stop.wait(0.001):
            samples.append(cache.decoded_bytes())
            cache.check()

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    workers = [threading.Thread(target=lambda p=p: greedy(model, p, 8), daemon=True)
               for p in prompts(4, RUNTIME_CONFIG["vocab_size"], seed=4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=60)
    stop.set()
    sampler.join(timeout=10)
    assert not any(w.is_alive() for w in workers)
    assert len(samples) > 10 and max(samples) <= budget
    assert max(samples) > 0


def _memory_store(sizes: int = 4, layers=(0,), frequencies=None, hot=()):
    experts = {(i, e): ExpertWeights(torch.full((2, sizes), float(10 * i + e)), torch.full((sizes, 1), float(e)))
               for i in layers for e in range(4)}
    return MemoryStore(experts, num_experts=4, top_k=1, frequencies=frequencies, hot=hot)


def _touch(cache, layer, e):
    """One layer step routed to expert e, as MoEBlock does it: acquire, look the expert up, release."""
    w = cache.acquire(layer, [e])[e]
    cache.release_thread()
    return w


@pytest.mark.parametrize("eviction, survivor", [("lru", False), ("frequency", True), ("next-use", True)])
def test_frequent_experts_stay_unless_lru(eviction, survivor):
    """Room for 2 of 4 experts. Expert 0 (frequency 0.9) used, then 1 and 2: LRU evicts 0, the policies that
    weigh routing frequency keep it and evict 1."""
    store = _memory_store(frequencies={(0, 0): 0.9, (0, 1): 0.03, (0, 2): 0.03, (0, 3): 0.04})
    cache = ExpertCache(store, 2 * footprint(store.nbytes(0, 0)), eviction=eviction)
    for e in (0, 1, 2):
        _touch(cache, 0, e)
    assert ((0, 0) in cache.resident_keys()) is survivor
    assert ((0, 1) in cache.resident_keys()) is not survivor
    assert cache.stats.evictions == 1


@pytest.mark.parametrize("eviction", ["frequency", "next-use"])
def test_frequent_entries_still_age_out(eviction):
    """Not LFU: the frequent expert 0, no longer used while 1, 2, 3 take turns, is evicted eventually
    (GreedyDual's clock L rises with every eviction; both policies' estimate of its routing falls)."""
    store = _memory_store(frequencies={(0, 0): 0.9, (0, 1): 0.03, (0, 2): 0.03, (0, 3): 0.04})
    cache = ExpertCache(store, 2 * footprint(store.nbytes(0, 0)), eviction=eviction, pin_hot=False)
    _touch(cache, 0, 0)
    for step in range(300):
        _touch(cache, 0, 1 + step % 3)
        if (0, 0) not in cache.resident_keys():
            break
    assert (0, 0) not in cache.resident_keys() and step > 3  # survived a while, then aged out
    assert cache.stats.hits + cache.stats.misses == cache.stats.uses == step + 2


def test_hot_tier_pinned_when_it_fits():
    store = _memory_store(layers=(0, 1), hot=[(0, 3), (1, 2)])
    size = footprint(store.nbytes(0, 0))
    cache = ExpertCache(store, 4 * size, pin_hot=True)  # room: 4 - 2 (two steps of top-1) = 2 hot experts
    assert set(cache.pinned_keys) == {(0, 3), (1, 2)} and cache.warm_keys == []
    for layer, e in [(0, 0), (0, 1), (1, 0), (1, 1), (0, 2)] * 3:
        assert torch.equal(_touch(cache, layer, e).gate_up, store.experts[(layer, e)].gate_up)
    assert {(0, 3), (1, 2)} <= cache.resident_keys()
    assert cache.stats.hits + cache.stats.misses == cache.stats.uses == 15
    small = ExpertCache(_memory_store(layers=(0, 1), hot=[(0, 3), (1, 2)]), 3 * size, pin_hot=True)
    assert len(small.pinned_keys) == 1  # only what leaves room for the working set


def test_hot_tier_warm_by_default_then_evictable():
    store = _memory_store(layers=(0, 1), hot=[(0, 3), (1, 2)])
    cache = ExpertCache(store, 4 * footprint(store.nbytes(0, 0)))
    assert set(cache.warm_keys) == {(0, 3), (1, 2)} == cache.resident_keys() and cache.pinned_keys == []
    cache.reset_stats()
    _touch(cache, 0, 3)
    assert cache.stats.hits == 1  # loaded at construction
    for layer, e in [(0, 0), (0, 1), (1, 0), (1, 1)]:
        _touch(cache, layer, e)
    assert not {(0, 3), (1, 2)} <= cache.resident_keys()  # not pinned: evicted when not used
    with pytest.raises(BudgetError, match="pin_hot"):
        ExpertCache(store, 4 * footprint(store.nbytes(0, 0)), pin_hot="always")


def test_waiting_thread_gets_room_after_unpin():
    """Budget of one expert: thread B needs room while thread A holds the only expert pinned."""
    store = _memory_store()
    cache = ExpertCache(store, footprint(store.nbytes(0, 0)))
    _ = cache.acquire(0, [0])[0]  # this thread pins expert 0
    got = []
    t = threading.Thread(target=lambda: got.append(_touch(cache, 0, 1)), daemon=True)
    t.start()
    t.join(timeout=0.3)
    assert t.is_alive()  # waiting for room
    cache.release_thread()
    t.join(timeout=10)
    assert not t.is_alive() and torch.equal(got[0].gate_up, store.experts[(0, 1)].gate_up)


def test_dead_thread_pin_is_dropped():
    store = _memory_store()
    cache = ExpertCache(store, footprint(store.nbytes(0, 0)))
    t = threading.Thread(target=lambda: cache.acquire(0, [0])[0])
    t.start()
    t.join()
    assert torch.equal(_touch(cache, 0, 2).gate_up, store.experts[(0, 2)].gate_up)


def test_failed_load_raises_and_frees_its_room():
    store = _memory_store()

    def fail(key):
        if key == (0, 1):
            raise OSError("disk gone")

    store.fetch_hook = fail
    cache = ExpertCache(store, footprint(store.nbytes(0, 0)))
    with pytest.raises(OSError, match="disk gone"):
        _touch(cache, 0, 1)
    cache.check()
    assert cache.used_bytes == 0
    assert torch.equal(_touch(cache, 0, 2).gate_up, store.experts[(0, 2)].gate_up)


def test_container_store_nbytes_is_exact(tmp_path):
    """decoded_nbytes from the encodings equals the decoded tensors, factored low-rank experts included."""
    path = write_runtime_container(tmp_path / "f.prism", mix=FACTORED_MIX)
    store = resident_store(path)
    factored = 0
    for i in store.moe_layers:
        for e in range(store.num_experts):
            w = load(store, i, e)
            factored += not isinstance(w.gate_up, torch.Tensor) or not isinstance(w.down, torch.Tensor)
            assert weights_nbytes(w) == store.nbytes(i, e)
    assert factored > 0
    model, resident = load_cached(path, "25%", True), prism_load.load(path)
    ids = prompts(1, RUNTIME_CONFIG["vocab_size"])[0]
    assert torch.equal(greedy(model, ids, 6), greedy(resident, ids, 6))


RSS_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    import prism_load
    def rss():
        return int(open("/proc/self/statm").read().split()[1]) * 4096
    path, budget = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    ids = torch.randint(0, 64, (1, 8))
    before = rss()
    model = prism_load.load(path, expert_cache=None if budget == "none" else budget, prefetch=True)
    loaded = rss()
    peak = loaded
    for n in range(3):
        model.generate((ids + n) % 64, max_new_tokens=16, eos_token_id=[])
        peak = max(peak, rss())
    cache = model.runtime.cache if budget != "none" else None
    held = cache.decoded_bytes() if cache else None
    store = cache.store if cache else None
    all_experts = sum(store.nbytes(i, e) for i in store.moe_layers for e in range(store.num_experts)) if cache else None
    print(json.dumps({"before": before, "loaded": loaded, "peak": peak, "held": held, "all_experts": all_experts}))
""")


@pytest.mark.slow
def test_resident_set_stays_within_budget(tmp_path):
    """RSS in fresh processes (about 100 MiB of int8 experts, held packed as stored): a cache holds at most its
    budget; doubling the budget adds about the added bytes; and a 25% cache saves what it does not hold, less a
    stated overhead (32 MiB: the decode temporaries glibc keeps per thread, imports of the runtime)."""
    config = dict(RUNTIME_CONFIG, hidden_size=512, intermediate_size=2048, num_local_experts=8, num_hidden_layers=4)
    path = write_runtime_container(tmp_path / "big.prism", config=config,
                                   mix=[dict(kind="int", bits=8, group_size=128)])

    def run(budget):
        # A fixed mmap threshold: glibc's sliding one moves 1 MiB decode temporaries into the heap after the
        # first frees, where fragmentation adds 0-15 MiB of RSS run to run. This test checks the cache's
        # accounting; bench/bench_runtime.py measures RSS under the default allocator settings.
        env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_=str(128 * 1024))
        out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(path), budget], capture_output=True,
                             text=True, check=True, timeout=300, env=env)
        return json.loads(out.stdout.strip().splitlines()[-1])

    quarter, half, resident = run("25%"), run("50%"), run("none")
    all_experts = quarter["all_experts"]
    assert all_experts > 96 * 2**20  # the packed int8 experts, big enough to see in RSS
    assert quarter["held"] <= all_experts // 4 and half["held"] <= all_experts // 2
    assert half["peak"] - quarter["peak"] <= all_experts // 4 + 12 * 2**20
    assert quarter["peak"] <= resident["peak"] - (all_experts - all_experts // 4) + 32 * 2**20


@pytest.mark.parametrize("eviction", ["next-use", "frequency", "lru"])
def test_a_step_served_at_acquire_counts_and_evicts_as_its_accesses_would(eviction):
    """Without a fetch worker, acquire serves a holding lease's misses at once (ExpertCache._serve_now): the
    lease it returns already holds every expert, and the uses, loads, evictions and what stays resident are those
    of the same steps served by accessing the lease expert by expert."""
    steps = [[0, 1], [2, 3], [1, 2], [0, 3], [3, 1], [2, 0], [1, 3]] * 3
    states = []
    for at_acquire in (True, False):
        store = _memory_store(frequencies={(0, e): f for e, f in enumerate((0.4, 0.3, 0.2, 0.1))})
        store.top_k = 2
        cache = ExpertCache(store, 3 * footprint(store.nbytes(0, 0)), eviction=eviction, pin_hot=False)
        if not at_acquire:
            cache._serve_now = lambda lease: None  # the lease serves each expert on access, as before
        for ids in steps:
            got = cache.acquire(0, ids)
            if at_acquire:  # every expert resident (a dict), or served by acquire already (a lease holding them)
                assert isinstance(got, dict) or set(got._served) == set(ids), ids
            for e in ids:
                assert torch.equal(got[e].gate_up, store.experts[(0, e)].gate_up)
            cache.check()
        s = cache.stats
        states.append((s.uses, s.hits, s.misses, s.loads, s.evictions, s.demand_loads, cache.resident_keys()))
    assert states[0] == states[1] and states[0][2] > 0


def test_two_threads_missing_one_expert_load_it_once():
    """B misses while A is loading the same expert: B waits for A's load (one cold read, two misses), and
    that wait is not counted as a late prefetch."""
    store = _memory_store()
    started, release = threading.Event(), threading.Event()

    def slow(key):
        started.set()
        assert release.wait(10)

    store.fetch_hook = slow
    cache = ExpertCache(store, 2 * footprint(store.nbytes(0, 0)), pin_hot=False)
    got = []
    a = threading.Thread(target=lambda: got.append(_touch(cache, 0, 1)), daemon=True)
    b = threading.Thread(target=lambda: got.append(_touch(cache, 0, 1)), daemon=True)
    a.start()
    assert started.wait(10)
    b.start()
    b.join(timeout=0.2)
    assert b.is_alive()  # waiting on A's load
    release.set()
    a.join(timeout=10)
    b.join(timeout=10)
    assert len(got) == 2 and all(torch.equal(w.gate_up, store.experts[(0, 1)].gate_up) for w in got)
    assert store.fetched == [(0, 1)] and cache.stats.misses == 2 and cache.stats.late_prefetches == 0


# -- experts kept as unpacked codes in the fast tier ---------------------------------------------------------
def test_codes_form_nbytes_is_exact_and_about_a_byte_per_weight(tmp_path):
    from prism_load.container.codecs import CodesLinear

    path = write_runtime_container(tmp_path / "f.prism", mix=[dict(kind="int", bits=3, group_size=8)])
    codes, dense = resident_store(path, "codes", torch.float32), resident_store(path, "decoded", torch.float32)
    for i in codes.moe_layers:
        for e in range(codes.num_experts):
            w = load(codes, i, e)
            assert isinstance(w.gate_up, CodesLinear) and isinstance(w.down, CodesLinear)
            assert weights_nbytes(w) == codes.nbytes(i, e)
            weights = sum(x.numel() for x in (load(dense, i, e).gate_up, load(dense, i, e).down))
            groups = weights // 8  # one fp16 scale and one fp16 zero per group of 8
            assert codes.nbytes(i, e) == weights + 4 * groups == dense.nbytes(i, e) // 4 + 4 * groups


def test_expert_form_errors(container, tiny_checkpoint):
    with pytest.raises(BudgetError, match=r"expert_form='unpacked': expected one of packed, decoded, codes"):
        load_cached(container, "50%", expert_form="unpacked")
    folder, _ = tiny_checkpoint("mixtral")
    for form in ("codes", "packed"):
        with pytest.raises(BudgetError, match=rf"expert_form='{form}' needs a \.prism container \(a checkpoint's"):
            load_cached(folder, "50%", expert_form=form)


# -- RuntimeConfig: load's options as one typed record ----------------------------------------------------
def test_runtime_config_loads_as_its_keywords_do(container, resident):
    from prism_load.runtime import RuntimeConfig

    ids = torch.tensor([[1, 5, 9, 3]])
    by_config = prism_load.load(container, config=RuntimeConfig(expert_cache="50%", prefetch=False))
    by_keywords = prism_load.load(container, expert_cache="50%", prefetch=False)
    assert torch.equal(by_config(ids), by_keywords(ids))
    assert by_config.stats()["prefetch"] is False and hasattr(by_config, "runtime")
    assert not hasattr(resident, "runtime") and not hasattr(resident, "stats")  # declared, absent without a cache
    resident_again = prism_load.load(container, config=RuntimeConfig(verify_checksums=False))
    assert torch.equal(resident_again(ids), resident(ids))


def test_runtime_config_names_what_does_not_apply(container):
    from prism_load.runtime import RuntimeConfig

    with pytest.raises(TypeError, match=r"unknown container options \['lookahead'\]"):
        prism_load.load(container, lookahead=2)
    with pytest.raises(TypeError, match=r"unknown container options \['lookahead'\]"):
        prism_load.load(container, config=RuntimeConfig(lookahead=2))
    with pytest.raises(TypeError, match="numa applies to models loaded with an expert_cache"):
        prism_load.load(container, config=RuntimeConfig(numa=True))
    with pytest.raises(TypeError, match=r"unknown options \['colour'\]"):
        prism_load.load(container, expert_cache="50%", colour="blue")
    with pytest.raises(TypeError, match="set them in the RuntimeConfig"):
        prism_load.load(container, config=RuntimeConfig(), expert_cache="50%")
    with pytest.raises(BudgetError, match="lookahead=3"):
        prism_load.load(container, config=RuntimeConfig(expert_cache="50%", lookahead=3))


def test_prefetch_is_on_demand_by_default_on_a_cpu_and_on_for_cuda(container):
    """prefetch="auto" (the default) prefetches on a CUDA device only: on a CPU every measured configuration
    decoded faster on demand (bench/results/runtime_packed.md, runtime_peer.md). True turns it on anywhere; a
    prefetch option where prefetch is off, or a value that is none of True, False, "auto", is refused."""
    from prism_load.runtime.config import prefetch_on

    default = prism_load.load(container, expert_cache="50%")
    assert default.runtime.worker is None and default.runtime.shadow is None and default.stats()["prefetch"] is False
    assert default.layer_hook is not None  # still unpins each layer's experts
    on = prism_load.load(container, expert_cache="50%", prefetch=True)
    assert on.runtime.worker is not None and on.stats()["prefetch"] is True
    on.runtime.close()
    assert prefetch_on("auto", torch.device("cuda", 0)) and not prefetch_on("auto", torch.device("cpu"))
    assert prefetch_on(True, torch.device("cpu"), lookahead=2) and not prefetch_on(False, "cuda")
    with pytest.raises(ValueError, match=r"lookahead=2 / prefetch_extra=0 need prefetch; prefetch='auto' on a CPU"):
        prism_load.load(container, expert_cache="50%", lookahead=2)
    with pytest.raises(ValueError, match=r"prefetch_extra=1 need prefetch; prefetch=False"):
        prism_load.load(container, expert_cache="50%", prefetch=False, prefetch_extra=1)
    for bad in ("yes", 1, None):
        with pytest.raises(ValueError, match=r"prefetch=.*: expected True, False or 'auto'"):
            prism_load.load(container, expert_cache="50%", prefetch=bad)


@pytest.mark.parametrize("budget", ["50%", "30%"])
def test_a_step_run_one_expert_at_a_time_counts_each_expert_once(tmp_path, budget):
    """Experts that are no native blocks of one rounding (a 3-bit expert beside 4- and 8-bit ones) make the block
    path fall back to one at a time, asking the lease for each expert again: still one use each (the recorded
    routing's), hits and misses adding up, and the resident model's tokens."""
    from containers import random_model, write_tiny
    from test_packed import KERNEL_CONFIG

    mix = [dict(kind="int", bits=b, group_size=g) for b, g in ((4, 32), (2, 16), (8, 32), (3, 32))]
    path = write_tiny(tmp_path / "m.prism", model=random_model(KERNEL_CONFIG), config=KERNEL_CONFIG, mix=mix)
    ids = torch.tensor([[3, 17, 5, 9, 30, 2, 11, 4]])
    model = prism_load.load(path, expert_cache=budget, prefetch=False)
    cache = model.runtime.cache
    cache.route_log = []
    model.reset_stats()
    out = model.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=[])
    s = model.stats()
    assert s["uses"] == sum(len(experts) for _, experts in cache.route_log) > 0
    assert s["hits"] + s["misses"] == s["uses"] and s["misses"] > 0
    assert torch.equal(out, prism_load.load(path).generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=[]))
    cache.check()


@pytest.mark.parametrize("verify", [True, "always", False])
def test_checksums_are_checked_on_an_experts_first_read_or_on_every_read(tmp_path, verify):
    """verify_checksums=True checks an expert's bytes on its first read (as a resident load does), not on a cache's
    reloads of the same range; "always" checks every read; False none. Shown with a byte damaged between reads."""
    from prism_load.container.reader import Container, model_args
    from prism_load.errors import ContainerError
    from prism_load.runtime.tiers import Slab

    path = write_runtime_container(tmp_path / "m.prism", mix=[dict(kind="int", bits=4, group_size=32)])
    c = Container(path)
    store = ContainerStore(c, model_args(c.config)[1], torch.bfloat16, verify, form="packed")
    layer, expert = next((i, e) for i in store.moe_layers for e in range(store.num_experts) if store.reads_into(i, e))
    record = c.record(layer, expert)
    store.read_into(layer, expert, lambda n: Slab(torch.empty(n, dtype=torch.uint8)))  # the first read: fine
    shard = path / c.manifest.expert_shards[record.shard].name
    data = bytearray(shard.read_bytes())
    data[record.offset + 7] ^= 0xFF
    shard.write_bytes(bytes(data))
    for read in (lambda: store.read_into(layer, expert, lambda n: Slab(torch.empty(n, dtype=torch.uint8))),
                 lambda: store.fetch(layer, expert)):
        if verify == "always":
            with pytest.raises(ContainerError, match=rf"layer {layer} expert {expert}: checksum [0-9a-f]{{16}} != "):
                read()
        else:
            read()  # the damaged range is read unchecked: the first read checked it (True), or nothing is (False)
    # an expert not read before is checked on its first read, except with False
    other = c.record(layer, (expert + 1) % store.num_experts)
    data = bytearray((path / c.manifest.expert_shards[other.shard].name).read_bytes())
    data[other.offset] ^= 0xFF
    (path / c.manifest.expert_shards[other.shard].name).write_bytes(bytes(data))
    if verify is False:
        store.fetch(other.layer, other.expert)
    else:
        with pytest.raises(ContainerError, match=rf"layer {other.layer} expert {other.expert}: checksum"):
            store.fetch(other.layer, other.expert)
    c.close()


def test_verify_checksums_takes_true_always_or_false(container):
    with pytest.raises(ValueError, match=r"verify_checksums='first': expected True .*'always' \(every read\) or False"):
        prism_load.load(container, expert_cache="50%", verify_checksums="first")

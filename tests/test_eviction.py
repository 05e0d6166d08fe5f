"""Eviction orders (prism_load/runtime/eviction.py): NextUse's choice of victim by the layer cycle, the routing
estimate and the bytes, the candidates it may not take, the cycle where LRU never hits, the option's errors."""

from __future__ import annotations

import math

import pytest
import torch

from prism_load.errors import BudgetError
from prism_load.models.moe import ExpertWeights
from prism_load.runtime import ExpertCache, MemoryStore
from prism_load.runtime.eviction import NextUse, eviction_policy
from prism_load.runtime.tiers import Entry, footprint

LAYERS = (0, 1, 2)


def _policy(prior=None, experts: int = 4, nbytes=None):
    """A NextUse over ready entries of every (layer, expert), all touched; prior {key: frequency} (0.25 else)."""
    prior = {(i, e): 0.25 for i in LAYERS for e in range(experts)} | (prior or {})
    entries = {}
    for key in prior:
        entries[key] = Entry(key, (nbytes or {}).get(key, 1000), 1000)
        entries[key].ready = True
    policy = NextUse(entries, prior, LAYERS, experts)
    for entry in entries.values():
        policy.touch(entry)
    return policy, entries


def test_the_layer_that_ran_is_needed_last():
    """Equal estimates and bytes: right after layer 1's step the victim is one of layer 1's experts (its layer
    comes back after the whole cycle), then layer 0's, and layer 2's (running next) go last."""
    policy, entries = _policy()
    policy.observe(1, [0])
    entries[(1, 0)].pins = 1  # the step's expert is in use
    order = []
    while (v := policy.victim(demand=True)) is not None:
        order.append(v.key[0])
        policy.evicted(v)
        del entries[v.key]
    assert order == [1] * 3 + [0] * 4 + [2] * 4


def test_often_routed_experts_stay_and_bytes_weigh():
    """Within a layer the expert routed least often goes first; at equal estimates, the one of more bytes."""
    policy, entries = _policy(prior={(0, 0): 0.9, (0, 1): 0.05}, nbytes={(0, 2): 5000})
    policy.observe(2, [0])  # layer 0 runs next: its experts are compared on estimate and bytes alone
    for key in entries:
        entries[key].pins = int(key[0] != 0)
    order = []
    while (v := policy.victim(demand=True)) is not None:
        order.append(v.key)
        policy.evicted(v)
        del entries[v.key]
    # (0, 1): 0.05 -> (1 - p) / p = 19 cycles; (0, 2) at 0.25 with 5x the bytes beats (0, 3) at 0.25
    assert order == [(0, 1), (0, 2), (0, 3), (0, 0)]


def test_observed_routing_overrides_the_prior():
    """The profile's favourite, no longer routed to while another expert of its layer is, loses its place."""
    policy, entries = _policy(prior={(0, 0): 0.9, (0, 1): 0.05})
    for _ in range(40):
        for layer in LAYERS:
            policy.observe(layer, [1])
    for key in entries:
        entries[key].pins = int(key not in ((0, 0), (0, 1)))
    assert policy.victim(demand=True).key == (0, 0)


def test_demoted_first_pinned_never_expected_only_on_demand():
    policy, entries = _policy()
    policy.observe(0, [0])
    for entry in entries.values():
        entry.pins = 1
    entries[(2, 3)].pins = 0
    entries[(2, 3)].expected = True
    assert policy.victim(demand=False) is None  # a prefetch may not take an expected expert
    assert policy.victim(demand=True) is entries[(2, 3)]
    entries[(1, 1)].pins = 0
    policy.demote(entries[(1, 1)])  # a prefetch the routing did not confirm: first, whatever its estimate
    assert policy.victim(demand=False) is entries[(1, 1)]
    entries[(1, 1)].ready = False  # gone from the candidates until touched again
    assert policy.victim(demand=False) is None
    entries[(1, 1)].ready = True
    assert policy.victim(demand=False) is None
    policy.touch(entries[(1, 1)])
    assert policy.victim(demand=False) is entries[(1, 1)]


def _cycle_hits(eviction: str) -> tuple[int, int]:
    """Three layers, room for two experts, every token routes every layer to its expert 0: a cycle of three
    experts through a cache of two. Returns (hits, uses) after the first two tokens."""
    experts = {(i, e): ExpertWeights(torch.full((2, 4), float(e)), torch.full((4, 1), 1.0))
               for i in LAYERS for e in range(4)}
    store = MemoryStore(experts, num_experts=4, top_k=1)
    cache = ExpertCache(store, 2 * footprint(store.nbytes(0, 0)), eviction=eviction, pin_hot=False)
    for t in range(40):
        if t == 2:
            cache.reset_stats()
        for layer in LAYERS:
            cache.acquire(layer, [0])[0]
            cache.release_thread()
        cache.check()
    return cache.stats.hits, cache.stats.uses


def test_next_use_hits_where_lru_never_does():
    lru_hits, uses = _cycle_hits("lru")
    next_hits, next_uses = _cycle_hits("next-use")
    assert uses == next_uses == 38 * 3
    assert lru_hits == 0  # LRU evicts exactly the expert the next layer needs
    assert next_hits == uses // 2  # as Belady's rule: one of the two held is always the one needed next


def test_eviction_option_errors():
    with pytest.raises(BudgetError, match=r"eviction='mru': expected one of 'next-use', 'frequency', 'lru'"):
        eviction_policy("mru", {}, {}, LAYERS, 4)
    with pytest.raises(BudgetError, match=r"frequency_weight=0\.0 applies to eviction='frequency'.*eviction='lru' "
                                          r"is plain LRU"):
        eviction_policy("next-use", {}, {}, LAYERS, 4, frequency_weight=0.0)


def test_estimate_is_the_decaying_average_of_routing(monkeypatch):
    """The scaled levels give p <- decay * p + (1 - decay) * routed a step (ROUTING_DECAY), through a rescale."""
    from prism_load.runtime import eviction
    from prism_load.runtime.eviction import ROUTING_DECAY

    monkeypatch.setattr(eviction, "RESCALE_BELOW", ROUTING_DECAY ** 2.5)  # layer 0's third step rescales

    policy, _ = _policy(prior={(1, 3): 0.6})
    steps = [(0, [1, 2]), (1, [3, 0]), (0, [1, 3]), (2, [2, 1]), (0, [0, 1]), (1, [3, 2])]
    expected = policy.routing.copy()
    for layer, ids in steps:
        policy.observe(layer, ids)
        row = expected[LAYERS.index(layer)]
        row *= ROUTING_DECAY
        row[ids] += 1 - ROUTING_DECAY
    assert torch.allclose(torch.from_numpy(policy.routing), torch.from_numpy(expected), rtol=1e-12, atol=0)
    assert policy.current == LAYERS.index(1)


@pytest.fixture(scope="module")
def container(tmp_path_factory):
    from containers import random_model, write_tiny
    from test_packed import INT4_G32, KERNEL_CONFIG

    return write_tiny(tmp_path_factory.mktemp("eviction") / "m.prism", random_model(KERNEL_CONFIG), config=KERNEL_CONFIG,
                      mix=INT4_G32)


def _prism_run(*args: str):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "prism_convert.cli", "run", *args, "-n", "4"], capture_output=True,
                          text=True)


def test_every_eviction_order_gives_the_resident_logits(container):
    """Eviction decides what is resident, never what is computed: a tight cache's logits equal the resident ones."""
    import prism_load

    ids = torch.tensor([[3, 17, 5, 9, 30, 2, 11, 4, 8, 21]])
    reference = prism_load.load(container)(ids)
    for eviction in ("next-use", "frequency", "lru"):
        model = prism_load.load(container, expert_cache="30%", eviction=eviction)
        assert torch.equal(model(ids), reference), eviction
        assert model.stats()["evictions"] > 0 and model.stats()["eviction"] == eviction
        model.runtime.cache.check()


def test_prism_run_takes_the_eviction_order(container, tmp_path):
    from tiny import save_char_tokenizer

    tokenizer = str(save_char_tokenizer(tmp_path / "tokenizer.json"))
    done = _prism_run(str(container), "--cache", "40%", "--eviction", "lru", "-p", "hi", "--tokenizer", tokenizer)
    assert done.returncode == 0, done.stderr
    assert "(order: lru)" in done.stdout  # the statistics table's evictions row
    done = _prism_run(str(container), "--eviction", "lru")
    assert done.returncode == 2 and "--eviction lru orders the expert cache's evictions: pass --cache too" in done.stderr
    done = _prism_run(str(container), "--cache", "40%", "--eviction", "mru")
    assert done.returncode == 2 and "eviction='mru': expected one of 'next-use', 'frequency', 'lru'" in done.stderr
    assert "Traceback" not in done.stderr


def _fewest_misses(trace, capacity: int, resident: frozenset) -> int:
    """The fewest misses any demand eviction order achieves on `trace` with room for `capacity` equal experts
    (every choice of victim tried)."""
    states = {resident: 0}
    for layer, ids in trace:
        step = {(layer, e) for e in ids}
        for e in ids:
            key, following = (layer, e), {}
            for held, misses in states.items():
                if key in held:
                    options = [held]
                elif len(held) < capacity:
                    options, misses = [held | {key}], misses + 1
                else:
                    options, misses = [held - {v} | {key} for v in held if v not in step], misses + 1
                for option in options:
                    following[option] = min(following.get(option, math.inf), misses)
            states = following
    return min(states.values())


def test_the_oracle_is_belady_optimal_for_equal_experts():
    """bench/eviction_oracle.belady_misses against an exhaustive search over every eviction choice."""
    import random
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent.parent / "bench"))
    from eviction_oracle import belady_misses, belady_misses_by_layer

    rng = random.Random(0)
    for _ in range(30):
        trace = [(rng.randrange(2), tuple(rng.sample(range(3), rng.choice((1, 2))))) for _ in range(12)]
        capacity = rng.choice((2, 3))
        keys = {(i, e) for i in range(2) for e in range(3)}
        start = frozenset(rng.sample(sorted(keys), 1))
        got = belady_misses(trace, dict.fromkeys(keys, 10), 10 * capacity, set(start))
        assert got == _fewest_misses(trace, capacity, start), (trace, capacity, start)
    # bytes count: room for 30 bytes holds the two small experts or the large one
    sizes = {(0, 0): 10, (0, 1): 10, (0, 2): 30}
    assert belady_misses([(0, (0,)), (0, (1,)), (0, (2,)), (0, (0,)), (0, (1,))], sizes, 30, set()) == 5
    # by layer: a cache of two starting with layer 1's expert, used again at steps 2 and 5, which stays; layer 0's
    # three experts share the other place: four misses, all layer 0's
    trace = [(0, (0,)), (0, (1,)), (1, (0,)), (0, (2,)), (0, (0,)), (1, (0,))]
    by_layer = belady_misses_by_layer(trace, dict.fromkeys({(0, 0), (0, 1), (0, 2), (1, 0)}, 10), 20, {(1, 0)})
    assert dict(by_layer) == {0: 4} and sum(by_layer.values()) == belady_misses(
        trace, dict.fromkeys({(0, 0), (0, 1), (0, 2), (1, 0)}, 10), 20, {(1, 0)})


def test_prism_run_prints_the_library_warnings_as_one_line(container, tmp_path):
    """A budget below one layer step's experts warns (ExpertCache); the CLI shows the message, not the source."""
    from tiny import save_char_tokenizer

    tokenizer = str(save_char_tokenizer(tmp_path / "tokenizer.json"))
    done = _prism_run(str(container), "--cache", "15%", "-p", "hi", "--tokenizer", tokenizer)
    assert done.returncode == 0, done.stderr
    assert "warning: expert cache budget" in done.stderr and "holds fewer than one layer step's experts" in done.stderr
    assert "RuntimeWarning" not in done.stderr and "attach_runtime(" not in done.stderr


def test_the_oracle_table_names_the_layer_with_most_savable_misses_also_from_its_json():
    """bench_runtime.headroom_where: the same sentence from the result in memory (int layer keys) and read
    back from its JSON file (string keys)."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent.parent / "bench"))
    from bench_runtime import headroom_where

    h = {"budget": "50%", "eviction": "next-use", "layers": {0: [286, 97], 1: [87, 82], 2: [94, 83]}}
    said = headroom_where(h)
    assert said == ("Where the misses an order could save are, at 50% (next-use): 92% of them in MoE layer 0 "
                    "(286 misses against the oracle's 97).")
    assert headroom_where(json.loads(json.dumps(h))) == said
    even = dict(h, layers={0: [5, 5]})
    assert headroom_where(even) == "At 50% (next-use) the order missed no more often than the oracle."


@pytest.mark.parametrize("budget", ["40%", "30%"])
def test_the_replay_reproduces_the_live_caches_misses(container, budget):
    """bench/eviction_replay.replay of a recorded decode with the default order gives exactly the live cache's
    misses (what lets it compare orders on the same routing); where the budget leaves a choice, the oracle misses
    no more than any order."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent.parent / "bench"))
    from eviction_replay import compare, record, replay
    from test_packed import KERNEL_CONFIG

    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, KERNEL_CONFIG["vocab_size"], (1, 6), generator=gen) for _ in range(3)]
    rec = record(container, budget, prompts, tokens=12)
    assert rec.live_misses > 0 and len(rec.trace) > 0
    assert sum(replay(rec).values()) == rec.live_misses
    rows = compare(rec)
    assert rows[2]["order"] == "next-use, decay 0.85 (the default)" and rows[2]["misses"] == rec.live_misses
    if budget == "40%":  # room for a choice beyond one step's two experts: the oracle's choices are the best
        assert all(rows[-1]["misses"] <= r["misses"] for r in rows)

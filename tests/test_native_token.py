"""models/native_token.py: a decode token of a plain model through every layer in one native call
(decode_layer.c): experts from tables where all are resident native blocks, else served between layers by
Python callbacks (an expert cache, resident experts in other forms). The same C functions and the same Python run
in the same order as the per-layer steps, so the logits, caches and cache statistics must be the same; an
observer must take the per-layer path instead, a replaced expert source must be noticed, and an exception in a
callback must come out of the forward."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from containers import TINY_CONFIG, encode, make_encoding, random_model

import prism_load
from prism_convert.packing.container_writer import ExpertInput, write_container
from prism_load.models import layers, native_token
from prism_load.native.decode_layer import TokenLayers
from prism_load.native.expert_block import LowRankBound

CONFIG = dict(TINY_CONFIG, hidden_size=128, intermediate_size=128, num_local_experts=4, num_attention_heads=4,
              num_key_value_heads=2, num_hidden_layers=3)


def write_plain(folder, config=CONFIG, mixed=False, expert_spec=None, hot=lambda e: True, name=None):
    """A container as the built-in recipes store one: attention int8, experts int4, routers and norms fp32,
    embeddings and head bf16; mixed: every odd expert's gate bf16 (no native block takes that expert).
    expert_spec(layer, expert, tensor name): each expert tensor's encoding spec instead; hot(expert): its tier
    (a cold expert's profile frequency 0.2, a hot one's 0.5); name: the container's file name."""
    if expert_spec is None:
        def expert_spec(layer, e, tensor):
            return dict(kind="bf16") if mixed and e % 2 and tensor == "gate_proj" else \
                dict(kind="int", bits=4, group_size=32)
    model = random_model(config)
    dense = {}
    for key, t in model.state_dict().items():  # not `name`: the container's file name below
        if ".mlp.experts." in key:
            continue
        if t.dim() == 1 or key.endswith("mlp.router.weight"):
            spec = dict(kind="fp32")
        elif ".self_attn." in key:
            spec = dict(kind="int", bits=8, group_size=64)
        else:
            spec = dict(kind="bf16")
        enc = make_encoding(spec, tuple(t.shape))
        dense[key] = (enc, encode(t, enc))
    experts, inter = [], model.args.moe_intermediate_size
    for layer, block in model.moe_blocks():
        gate_up, down = block.experts.gate_up_proj.detach(), block.experts.down_proj.detach()
        for e in range(model.args.num_experts):
            tensors = {"gate_proj": gate_up[e, :inter], "up_proj": gate_up[e, inter:], "down_proj": down[e]}
            encoded = {}
            for tensor, w in tensors.items():
                enc = make_encoding(expert_spec(layer, e, tensor), tuple(w.shape))
                encoded[tensor] = (enc, encode(w, enc))
            experts.append(ExpertInput(layer, e, "hot" if hot(e) else "cold", 0.5 if hot(e) else 0.2, 0.25, "fast",
                                       encoded))
    name = name or ("mixed.prism" if mixed else "plain.prism")
    return write_container(folder / name, config=config, source={"model_id": "test/plain", "revision": "r"},
                           dense=dense, experts=experts, recipe={"name": "test"}, budget={"bits": 4.0},
                           shard_size_bytes=1 << 20, tokenizer_files=[])


def decode(model, steps: int = 70):
    ids = torch.randint(0, CONFIG["vocab_size"], (1, 5), generator=torch.Generator().manual_seed(0))
    nxt = torch.randint(0, CONFIG["vocab_size"], (1, steps), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        cache = model.new_cache()
        model(ids, cache=cache)
        out = torch.cat([model(nxt[:, i:i + 1], cache=cache) for i in range(steps)], 1)
    return out, cache


def count(monkeypatch, module, name) -> list:
    calls = []
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, real=real: calls.append(1) or real(*a))
    return calls


def count_runs(monkeypatch, served: bool) -> list:
    """TokenLayers.run calls of plans whose experts are served (True) or in tables (False)."""
    calls = []
    real = TokenLayers.run

    def run(self, *args, **kwargs):
        if self.served == served:
            calls.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(TokenLayers, "run", run)
    return calls


def lowrank_downs(layer, e, tensor):
    """Every odd expert's down projection int + low-rank (a composite native projection, expert_block.h)."""
    if e % 2 and tensor == "down_proj":
        return dict(kind="int+lowrank", bits=4, group_size=32, rank=8, factor_bits=8)
    return dict(kind="int", bits=4, group_size=32)


@pytest.mark.parametrize("spec", [None, lowrank_downs], ids=["int4", "int4-and-int+lowrank"])
def test_one_call_gives_the_per_layer_steps_bits(q8, tmp_path, monkeypatch, spec):
    """Resident experts all native blocks (int+lowrank ones included: no callback) run in one native call a token
    with the bits of the per-layer steps and of the modules around the attention's own step."""
    model = prism_load.load(write_plain(tmp_path, expert_spec=spec), expert_kernel="native-int16")
    if spec is not None:
        experts = model.layers[0].mlp.experts
        odd = experts.acquire(0, [1])[1].block()
        assert isinstance(odd.keep[2], LowRankBound)
    runs, steps = count_runs(monkeypatch, served=False), count(monkeypatch, layers, "decode_layer")
    whole, whole_cache = decode(model)  # 5 + 70 positions: the caches grow past their first 64 slots
    assert isinstance(model.__dict__["_token_layers"][0], TokenLayers)
    assert len(runs) == 70 and steps == []
    monkeypatch.setattr(native_token, "run", lambda *a: None)
    per_layer, per_layer_cache = decode(model)
    assert len(steps) == 70 * CONFIG["num_hidden_layers"]
    monkeypatch.setattr(layers.DecoderLayer, "_native_decode", lambda self, x, ctx: None)
    separate, _ = decode(model)  # the attention's own native step, the modules around it
    assert torch.equal(whole, per_layer) and torch.equal(whole, separate)
    assert whole_cache.lengths == per_layer_cache.lengths == [75] * CONFIG["num_hidden_layers"]
    for a, b in zip(whole_cache.keys + whole_cache.values, per_layer_cache.keys + per_layer_cache.values):
        assert torch.equal(a[:, :, :75], b[:, :, :75])


def test_int_plus_lowrank_experts_through_a_memory_map_and_in_a_batch(q8, tmp_path):
    """Composite experts built over a memory map of the container (load(mmap=True)) are native blocks with the
    resident load's logits; a batch of three greedy prompts gives each row the tokens it gets alone (expert_rows
    runs the composites for the batch's rows)."""
    path = write_plain(tmp_path, expert_spec=lowrank_downs)
    resident = prism_load.load(path, expert_kernel="native-int16")
    mapped = prism_load.load(path, expert_kernel="native-int16", mmap=True)
    for model in (resident, mapped):
        assert isinstance(model.layers[0].mlp.experts.acquire(0, [1])[1].block().keep[2], LowRankBound)
    assert torch.equal(decode(resident, 10)[0], decode(mapped, 10)[0])
    ids = torch.randint(0, CONFIG["vocab_size"], (3, 6), generator=torch.Generator().manual_seed(3))
    batch = resident.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=[])
    for i in range(3):
        assert torch.equal(batch[i], resident.generate(ids[i : i + 1], max_new_tokens=8, do_sample=False,
                                                       eos_token_id=[])[0]), f"row {i}"


def test_cache_buffers_are_checked_when_they_change_and_not_kept_alive(q8, tmp_path):
    """TokenLayers checks a layer's KV buffers when new ones come (the cache grew them: the 75 positions of
    test_one_call_gives_the_per_layer_steps_bits) and only the slot while the same come back; a slot outside
    known buffers, or new buffers of the wrong form, still raise; and the plan holds the buffers by
    weak reference, so a finished generation's KV cache is freed."""
    model = prism_load.load(write_plain(tmp_path), expert_kernel="native-int16")
    _, cache = decode(model, 3)
    plan = model.__dict__["_token_layers"][0]
    keys = weakref.ref(cache.keys[0])
    assert plan._caches[0][0]() is cache.keys[0]
    with torch.inference_mode():
        cache.lengths[0] = -1  # a slot outside the known buffers (their checks skipped, the slot's not)
        with pytest.raises(ValueError, match="free slot at -1"):
            model(torch.tensor([[1]]), cache=cache)
        cache.lengths[0] = 8
        k = cache.keys[1]
        cache.keys[1] = torch.zeros(1, k.shape[1] + 1, *k.shape[2:])  # new buffers of another shape: checked
        with pytest.raises(ValueError, match="fp32 contiguous caches"):
            model(torch.tensor([[1]]), cache=cache)
    del cache, k
    gc.collect()
    assert keys() is None


def test_steps_aside_for_observers_and_hooks(q8, tmp_path, monkeypatch):
    model = prism_load.load(write_plain(tmp_path), expert_kernel="native-int16")
    runs = count_runs(monkeypatch, served=False)
    reference, _ = decode(model, 3)
    assert len(runs) == 3

    seen = []
    model.layer_hook = lambda i, x: seen.append(i)  # a hook on a table model: the per-layer path calls it
    hooked, _ = decode(model, 3)
    model.layer_hook = None
    assert len(runs) == 3 and seen == list(range(CONFIG["num_hidden_layers"])) * 4 and torch.equal(hooked, reference)

    class Routes:
        def __init__(self):
            self.layers = []

        def on_route(self, layer_index, x, route):
            self.layers.append(layer_index)

        def on_expert(self, *args):
            pass

    routes = Routes()
    model.layers[1].mlp.observer = routes
    observed, _ = decode(model, 3)
    model.layers[1].mlp.observer = None
    assert len(runs) == 3 and routes.layers == [1] * 4 and torch.equal(observed, reference)


@pytest.mark.parametrize("how", ["cache-50%", "cache-50%-prefetch", "resident-mixed-forms"])
def test_served_experts_give_the_per_layer_paths_logits_and_statistics(q8, tmp_path, monkeypatch, how):
    """Experts an expert cache serves (with and without prefetch's hook) and resident experts some of which no
    native block takes: the loop calls back for them; the logits, caches and the cache's counts equal the
    per-layer path's."""
    path = write_plain(tmp_path, mixed=how == "resident-mixed-forms")
    options = {"resident-mixed-forms": {}, "cache-50%": dict(expert_cache="50%", prefetch=False),
               "cache-50%-prefetch": dict(expert_cache="50%", prefetch=True)}[how]
    served = count_runs(monkeypatch, served=True)

    def run(model):
        out, cache = decode(model, 40)
        return out, cache, (model.stats() if hasattr(model, "stats") else None)

    whole, whole_cache, whole_stats = run(prism_load.load(path, expert_kernel="native-int16", **options))
    assert len(served) == 40
    monkeypatch.setattr(native_token, "run", lambda *a: None)
    per_layer, per_layer_cache, per_layer_stats = run(prism_load.load(path, expert_kernel="native-int16", **options))
    assert len(served) == 40
    assert torch.equal(whole, per_layer)
    for a, b in zip(whole_cache.keys + whole_cache.values, per_layer_cache.keys + per_layer_cache.values):
        assert torch.equal(a[:, :, :45], b[:, :, :45])
    if how == "cache-50%":  # no prefetch thread: the counts are deterministic
        keys = ("uses", "hits", "misses", "evictions", "bytes_fetched")
        assert {k: whole_stats[k] for k in keys} == {k: per_layer_stats[k] for k in keys}
        assert whole_stats["misses"] > 0
    if how == "resident-mixed-forms":
        resident = prism_load.load(path, expert_kernel="native-int16")
        assert resident.layers[0].mlp.experts.native_blocks() is None  # the odd experts' bf16 gates


def test_resident_experts_in_other_forms_call_back_only_for_their_steps(q8, tmp_path, monkeypatch):
    """Resident experts some of which no native block takes (the odd ones: bf16 gates): the others sit in a
    resident table per layer, so the loop calls back only for a step routed to an odd expert, with the per-layer
    path's logits (test above)."""
    model = prism_load.load(write_plain(tmp_path, mixed=True), expert_kernel="native-int16")
    decode(model, 1)
    tables = model.__dict__["_token_layers"][0].resident
    assert all(sorted(t.blocks) == [0, 2] for t in tables)  # the even experts: native blocks of one rounding
    routed = []
    real = model.__dict__["_token_layers"][2].route

    def route(at, h, indices, weights, moe):
        routed.append(indices[: model.layers[at].mlp.router.top_k].tolist())
        return real(at, h, indices, weights, moe)

    model.__dict__["_token_layers"][2].route = route
    decode(model, 30)
    assert routed and all(any(e % 2 for e in ids) for ids in routed)  # a callback only for an odd expert's step
    assert len(routed) < 30 * CONFIG["num_hidden_layers"]


def test_a_replaced_source_is_noticed_and_a_callbacks_error_comes_out(q8, tmp_path, monkeypatch):
    path = write_plain(tmp_path)
    model = prism_load.load(path, expert_kernel="native-int16")
    decode(model, 1)
    assert not model.__dict__["_token_layers"][0].served
    cached = prism_load.load(path, expert_kernel="native-int16", expert_cache="50%", prefetch=False)
    model.layers[2].mlp.experts = cached.layers[2].mlp.experts  # a replaced expert source: worked out again
    # the resident layers without their tables: each of their steps calls back into Python (route), where the
    # broken acquire below raises
    monkeypatch.setattr(type(model.layers[1].mlp.experts), "resident_table", lambda self, layer: None)
    decode(model, 1)
    assert model.__dict__["_token_layers"][0].served

    class Broken(RuntimeError):
        pass

    def acquire(*args):
        raise Broken("the cold tier is gone")

    ids = torch.tensor([[1, 2, 3]])
    with torch.inference_mode():
        cache = model.new_cache()
        model(ids, cache=cache)
        monkeypatch.setattr(model.layers[1].mlp.experts, "acquire", acquire)
        with pytest.raises(Broken, match="cold tier"):
            model(ids[:, :1], cache=cache)  # decode: raised in a callback, carried out of the native loop
    assert cache.lengths == [3] * CONFIG["num_hidden_layers"]  # the failed token counted in no layer


def test_not_taken_where_a_layer_does_not_qualify(q8, tmp_path, monkeypatch):
    model = prism_load.load(write_plain(tmp_path), expert_kernel="native")  # the exact kernel: no integer operators
    runs = count_runs(monkeypatch, served=False)
    decode(model, 2)
    assert runs == [] and model.__dict__["_token_layers"][0] is False


def served_routes(model) -> list:
    """Route callbacks of the model's served plan from now on (the plan is made at its first decode token)."""
    server = model.__dict__["_token_layers"][2]
    calls, real = [], server.route
    server.route = lambda *a: calls.append(a[0]) or real(*a)
    return calls


@pytest.mark.parametrize("budget", ["100%", "50%"])
def test_cached_hits_run_from_resident_tables_without_callbacks(q8, tmp_path, monkeypatch, budget):
    """A layer whose routed experts are all ready in the cache runs from its resident table: no callback into
    Python; the hits are logged and counted as acquire counts them. The tables hold exactly the ready native
    experts through every eviction (check()), pins go at the end of each token, and the logits equal the
    resident model's. Misses call back here (tests/test_native_misses.py serves them in the loop)."""
    monkeypatch.setenv("PRISM_NATIVE_MISSES", "0")
    path = write_plain(tmp_path)
    cached = prism_load.load(path, expert_kernel="native-int16", expert_cache=budget, prefetch=False)
    cache = cached.runtime.cache
    decode(cached, 1)
    routes = served_routes(cached)
    hooks = []
    real_hook = cached.layer_hook
    cached.layer_hook = lambda *a: hooks.append(a[0]) or real_hook(*a)  # not the runtime's: called between layers
    decode(cached, 2)
    assert len(hooks) == 2 * CONFIG["num_hidden_layers"] + CONFIG["num_hidden_layers"]  # + the prefill's layers
    cached.layer_hook = real_hook
    cached.reset_stats()
    routes.clear()
    out, _ = decode(cached, 30)
    cache.check()
    stats = cached.stats()
    assert stats["uses"] == stats["hits"] + stats["misses"]
    assert sum(s["hits"] for s in stats["layers"].values()) == stats["hits"]
    layers_run = 30 * CONFIG["num_hidden_layers"]
    if budget == "100%":  # every expert ready after the first tokens: no decode layer calls back
        assert routes == [] and stats["misses"] == 0
    else:
        assert 0 < len(routes) < layers_run and stats["misses"] > 0 and stats["evictions"] > 0
    assert not any(cache._pins.values())  # the token's pins released once after it (nothing predicts)
    resident, _ = decode(prism_load.load(path, expert_kernel="native-int16"), 30)
    assert torch.equal(out, resident)
    tables = [cache.resident_table(i) for i in cache.store.moe_layers]
    assert all(t is not None and t.blocks for t in tables)


def test_a_loop_leaves_other_loops_busy_marks_up(q8, tmp_path):
    """busy counts the loops running a table's experts: a token run while another loop is in every layer (its mark
    set by hand) raises and lowers its own mark only, so a remover still waits for the other loop (a flag that the
    first loop to finish cleared would let an expert's slab be reused under the second)."""
    path = write_plain(tmp_path)
    cached = prism_load.load(path, expert_kernel="native-int16", expert_cache="100%", prefetch=False)
    cache = cached.runtime.cache
    decode(cached, 4)  # every expert ready: a token's layers all run from the tables, with no eviction
    tables = [cache.resident_table(i) for i in cache.store.moe_layers]
    assert all(t is not None and t.blocks for t in tables)
    routes = served_routes(cached)

    def mark(value: int) -> None:
        with torch.inference_mode():  # the tables were made there
            for t in tables:
                t.table[1] = value

    mark(1)
    try:
        out, _ = decode(cached, 3)
        assert routes == []  # the layers ran from the tables: each loop raised and lowered busy
        assert [int(t.table[1]) for t in tables] == [1] * len(tables)
    finally:
        mark(0)
    resident, _ = decode(prism_load.load(path, expert_kernel="native-int16"), 3)
    assert torch.equal(out, resident)


@pytest.mark.parametrize("eviction", ["next-use", "frequency"])
def test_resident_tables_keep_counts_and_eviction_order_of_the_callbacks(q8, tmp_path, monkeypatch, eviction):
    """The same decode with and without resident tables: the same hits, misses, evictions and per-layer counts
    (hits are counted, and touched in the eviction order, before any later acquire decides an eviction: GreedyDual
    sets a touched expert's priority from its clock, so a hit touched late or not at all changes its victims)."""
    path = write_plain(tmp_path)

    def run(tables: bool):
        model = prism_load.load(path, expert_kernel="native-int16", expert_cache="50%", prefetch=False,
                                eviction=eviction)
        if not tables:
            monkeypatch.setattr(model.runtime.cache, "resident_table", lambda layer: None)
        out, _ = decode(model, 40)
        return out, model.stats()

    with_tables, stats = run(True)
    without, reference = run(False)
    assert torch.equal(with_tables, without)
    keys = ("uses", "hits", "misses", "evictions", "bytes_fetched")
    assert {k: stats[k] for k in keys} == {k: reference[k] for k in keys}
    def counts(layers: dict) -> dict:
        return {i: {k: v for k, v in s.items() if k != "stall_seconds"} for i, s in layers.items()}

    assert counts(stats["layers"]) == counts(reference["layers"])


def test_prefetch_keeps_every_layer_called_back(q8, tmp_path):
    """With a fetch worker, predictions are settled at each acquire: no resident tables, the hook between layers."""
    model = prism_load.load(write_plain(tmp_path), expert_kernel="native-int16", expert_cache="50%", prefetch=True)
    assert model.runtime.cache.resident_table(0) is None and model.runtime.predicts
    assert native_token.layer_hook_between_layers(model)
    model.runtime.close()


def test_taking_an_expert_out_waits_for_a_loop_running_its_layer(q8):
    """decode_layer.c's handshake, driven by hand: while the loop's busy flag is up, drop() clears the expert's
    pointers at once but does not return; it returns when the flag goes down. put() refuses another rounding."""
    import threading
    from types import SimpleNamespace

    from prism_load.native.decode_layer import ResidentTable

    table = ResidentTable(4)
    a = SimpleNamespace(addresses=(11, 12, 13), wide=1)
    assert table.put(2, a) and table.pointers(2) == (11, 12, 13) and int(table.table[0]) == 1
    assert not table.put(3, SimpleNamespace(addresses=(1, 2, 3), wide=0))  # another rounding: stays served
    assert table.pointers(3) == (0, 0, 0)
    table.table[1] = 1  # a loop is running this layer's experts
    done = threading.Event()
    worker = threading.Thread(target=lambda: (table.drop(2), done.set()))
    worker.start()
    assert not done.wait(0.2)
    assert table.pointers(2) == (0, 0, 0)  # cleared first: a loop starting now sees it gone
    table.table[1] = 0
    assert done.wait(5)
    worker.join()
    assert 2 not in table.blocks
    table.drop(2)  # not in: nothing to wait for


@pytest.mark.parametrize("budget", ["30%", "25%"])
@pytest.mark.parametrize("path", ["one call", "per layer"])
def test_tight_budgets_keep_a_steps_experts_valid_together(q8, tmp_path, monkeypatch, budget, path):
    """A budget of a few experts: a layer step's missing experts are handed out by a lease that keeps them all
    pinned while the budget holds them together, so the native expert block that runs them at once never reads
    an expert whose memory a later one of the same step reused (before, these budgets gave other logits)."""
    model_path = write_plain(tmp_path)
    if path == "per layer":
        monkeypatch.setattr(native_token, "run", lambda *a: None)
    resident, _ = decode(prism_load.load(model_path, expert_kernel="native-int16"), 30)
    cached = prism_load.load(model_path, expert_kernel="native-int16", expert_cache=budget, prefetch=False)
    out, _ = decode(cached, 30)
    assert torch.equal(out, resident)
    stats = cached.stats()
    assert stats["evictions"] > 0 and stats["uses"] == stats["hits"] + stats["misses"]
    cached.runtime.cache.check()



def test_threads_sharing_a_tight_cache_read_the_right_experts(q8, tmp_path):
    """Four threads decoding at once through one 30% cache (each its own KV cache): no thread reads another
    expert's memory (before the lease fix these logits were off by whole units). Where the threads contend for
    room a lease lets go of its pins and its step runs one expert at a time (decode_sum), whose fp32 sums round
    differently from the fused native block: equal to the resident logits within that rounding, not bit for
    bit (README, limits)."""
    import threading

    model_path = write_plain(tmp_path)
    resident = prism_load.load(model_path, expert_kernel="native-int16")
    cached = prism_load.load(model_path, expert_kernel="native-int16", expert_cache="30%", prefetch=False)

    def run(model, seed: int, out: dict) -> None:
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, CONFIG["vocab_size"], (1, 4), generator=g)
        nxt = torch.randint(0, CONFIG["vocab_size"], (1, 40), generator=g)
        with torch.inference_mode():
            cache = model.new_cache()
            model(ids, cache=cache)
            out[seed] = torch.cat([model(nxt[:, i : i + 1], cache=cache) for i in range(40)], 1)

    expected, got = {}, {}
    for seed in range(4):
        run(resident, seed, expected)
    threads = [threading.Thread(target=run, args=(cached, seed, got)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    for seed in range(4):
        scale = float(expected[seed].abs().max())
        assert float((got[seed] - expected[seed]).abs().max()) <= 1e-3 * scale
    cached.runtime.cache.check()

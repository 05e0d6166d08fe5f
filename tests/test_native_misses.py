"""runtime/native_misses.py and native/expert_miss.c: an expert cache's misses served inside the native decode loop
and replayed into the cache afterwards. They must do exactly what the Python path (ExpertCache._serve_now) does:
the same victims (the same floating-point scores of the eviction order), the same counts, the same experts held,
the same logits; fall back to the Python path where they cannot; and leave the cache consistent when a read
fails."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from containers import TINY_CONFIG
from rich.console import Console
from test_native_token import write_plain

import prism_load
from prism_convert.cli.render import stats_table
from prism_load.runtime import native_misses

CONFIG = dict(TINY_CONFIG, hidden_size=128, intermediate_size=128, num_local_experts=6, num_attention_heads=4,
              num_key_value_heads=2, num_hidden_layers=3)
FORMS = ((4, 32), (8, 32), (4, 64), (8, 64))  # (bits, group size): four slab sizes, all native blocks here


LOWRANK = dict(kind="int+lowrank", bits=4, group_size=32, rank=8, factor_bits=8)
LOWRANK_ONLY = dict(kind="lowrank", rank=8, factor_bits=8, group_size=32)


def write_mixed(folder, bf16_gates: bool = False, lowrank: bool = False):
    """Experts in the four FORMS in turn (slabs of four sizes, each read as stored, each a native block of one
    rounding of x), two a layer hot; bf16_gates: expert 5 of each layer stores its gate bf16, which no native
    block takes, so its steps call back into Python; lowrank: experts 3 and 4 of each layer store their gate
    and down projections int + low-rank, expert 2 its up projection low-rank alone (native blocks too:
    expert_block.h's composites)."""

    def spec(layer, e, tensor):
        bits, group = FORMS[(layer + e) % len(FORMS)]
        if lowrank and (e, tensor) in ((3, "gate_proj"), (4, "down_proj")):
            return LOWRANK
        if lowrank and (e, tensor) == (2, "up_proj"):
            return LOWRANK_ONLY
        return dict(kind="bf16") if bf16_gates and e == 5 and tensor == "gate_proj" else \
            dict(kind="int", bits=bits, group_size=group)

    return write_plain(folder, CONFIG, expert_spec=spec, hot=lambda e: e < 2, name="mixed.prism")


def tokens(steps: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, CONFIG["vocab_size"], (1, steps), generator=torch.Generator().manual_seed(seed))


def cache_view(model) -> dict:
    """Everything about a cache the two paths must agree on."""
    cache = model.runtime.cache
    stats = cache.snapshot()
    layers = {i: {k: v for k, v in s.items() if k != "stall_seconds"} for i, s in stats.pop("layers").items()}
    stats = {k: v for k, v in stats.items() if k not in ("stall_seconds", "residency", "native_loads")}
    policy = cache.policy
    return {"stats": stats, "layers": layers, "keys": sorted(cache.resident_keys()), "used": cache.used_bytes,
            "level": policy.level.copy(), "scale": policy.scale.copy(), "weight": policy.weight.copy(),
            "current": policy.current}


def assert_same(a: dict, b: dict, where: str) -> None:
    for k in a:
        if isinstance(a[k], np.ndarray):
            assert np.array_equal(a[k], b[k]), f"{where}: {k} differs"
        else:
            assert a[k] == b[k], f"{where}: {k}: {a[k]} != {b[k]}"


def count_native_loads(monkeypatch) -> list:
    loads = []
    real = native_misses.NativeMisses._loaded
    monkeypatch.setattr(native_misses.NativeMisses, "_loaded", lambda self, *a: loads.append(a[:2]) or real(self, *a))
    return loads


@pytest.mark.parametrize("budget,bf16_gates,pin_hot,lowrank", [("50%", False, "warm", False), ("35%", False, "warm", False),
                                                               ("50%", True, "warm", False), ("35%", True, "warm", False),
                                                               ("50%", False, "pin", False), ("35%", False, "warm", True)])
def test_served_in_the_loop_as_the_python_path_serves_them(q8, tmp_path, monkeypatch, budget, bf16_gates, pin_hot,
                                                          lowrank):
    """The same tokens through two caches, one served in the loop, one by Python callbacks: after every token the
    same statistics, experts held, bytes reserved and eviction-order state (the doubles themselves), and the same
    logits; most misses served in the loop (each expert's first read goes through Python). pin_hot="pin": the hot
    tier stays for good, never a victim (the loop skips permanent experts as NextUse does). lowrank: experts with
    int + low-rank projections are served in the loop too (their blocks moved to the slab, factors included)."""
    path = write_mixed(tmp_path, bf16_gates, lowrank)
    native = prism_load.load(path, expert_kernel="native-int16", expert_cache=budget, prefetch=False, pin_hot=pin_hot)
    python = prism_load.load(path, expert_kernel="native-int16", expert_cache=budget, prefetch=False, pin_hot=pin_hot)
    python.runtime.cache._native_checked = True  # never made: every miss calls back
    loads = count_native_loads(monkeypatch)
    prompt, nxt = tokens(5, seed=0), tokens(60)
    with torch.inference_mode():
        caches = [m.new_cache() for m in (native, python)]
        outs = [m(prompt, cache=c) for m, c in zip((native, python), caches)]
        assert torch.equal(outs[0], outs[1])
        for i in range(nxt.shape[1]):
            a, b = (m(nxt[:, i : i + 1], cache=c) for m, c in zip((native, python), caches))
            assert torch.equal(a, b), f"token {i}: logits differ"
            native.runtime.cache.check()
            python.runtime.cache.check()
            assert_same(cache_view(native), cache_view(python), f"token {i}")
            if i == 29:
                half = (native.stats()["misses"], len(loads))
    assert native.runtime.cache._native is not None and python.runtime.cache._native is None
    stats = native.stats()
    assert stats["evictions"] > 0 and stats["misses"] > 0
    assert stats["native_loads"] == len(loads) and python.stats()["native_loads"] == 0
    console = Console(width=200, record=True)
    console.print(stats_table(stats))
    assert f"{stats['native_loads']:,} of {stats['demand_loads']:,} demand loads" in console.export_text()
    misses, served = stats["misses"] - half[0], len(loads) - half[1]  # the last 30 tokens: every expert read once
    assert served >= (0.5 if bf16_gates else 0.9) * misses, f"{served} of {misses} misses served in the loop"
    if bf16_gates:  # the bf16-gated experts are no native blocks: always read through Python
        assert all(e != 5 for _, e in loads)
    if lowrank:
        assert {2, 3, 4} <= {e for _, e in loads}
    pinned = native.runtime.cache.pinned_keys
    assert (len(pinned) > 0) == (pin_hot == "pin") and set(pinned) <= native.runtime.cache.resident_keys()


def test_the_loop_serves_only_what_python_has_read_once(q8, tmp_path, monkeypatch):
    """An expert's first read goes through Python (its checksum checked, its view plan and block template made);
    with verify_checksums='always' (every read checked) no miss is served in the loop."""
    path = write_mixed(tmp_path)
    model = prism_load.load(path, expert_kernel="native-int16", expert_cache="35%", prefetch=False)
    store = model.runtime.cache.store
    verified_before = []
    real = native_misses.NativeMisses._loaded

    def loaded(self, layer, e, *rest):
        verified_before.append((layer, e) in store._verified)
        return real(self, layer, e, *rest)

    monkeypatch.setattr(native_misses.NativeMisses, "_loaded", loaded)
    with torch.inference_mode():
        cache = model.new_cache()
        model(tokens(5, seed=0), cache=cache)
        for i in range(40):
            model(tokens(40)[:, i : i + 1], cache=cache)
    assert verified_before and all(verified_before)
    always = prism_load.load(path, expert_kernel="native-int16", expert_cache="35%", prefetch=False,
                             verify_checksums="always")
    with torch.inference_mode():
        always(tokens(5, seed=0), cache=always.new_cache())
        c = always.new_cache()
        for i in range(10):
            always(tokens(10)[:, i : i + 1], cache=c)
    assert always.runtime.cache._native is None


def test_off_by_environment(q8, tmp_path, monkeypatch):
    monkeypatch.setenv("PRISM_NATIVE_MISSES", "0")
    model = prism_load.load(write_mixed(tmp_path), expert_kernel="native-int16", expert_cache="35%", prefetch=False)
    with torch.inference_mode():
        c = model.new_cache()
        model(tokens(3), cache=c)
        model(tokens(1), cache=c)
    assert model.runtime.cache.native_misses() is None


def test_a_failed_read_in_the_loop_is_an_oserror_and_leaves_the_cache_whole(q8, tmp_path):
    """A shard cut short after the experts were first read: the loop's read comes up short, the forward raises
    OSError naming the expert, and what the loop did before it (evictions, other loads) is in the cache, whose
    accounting still adds up."""
    path = write_mixed(tmp_path)
    model = prism_load.load(path, expert_kernel="native-int16", expert_cache="35%", prefetch=False)
    cache = model.runtime.cache
    with torch.inference_mode():
        c = model.new_cache()
        model(tokens(5, seed=0), cache=c)
        for i in range(30):  # every expert read once through Python, most since in the loop
            model(tokens(30)[:, i : i + 1], cache=c)
        assert cache._native is not None and cache._native.length.all()
        for shard in path.glob("experts-*.safetensors"):
            os.truncate(shard, 4096)
        with pytest.raises(OSError, match="reading layer .* expert .* into the expert cache"):
            for i in range(30):
                model(tokens(30, seed=2)[:, i : i + 1], cache=c)
    cache.check()


def test_a_hook_between_layers_keeps_every_miss_on_the_python_path(q8, tmp_path, monkeypatch):
    """A layer hook that must see every layer (not the runtime's unpinning) runs the token without the cache's
    lock held: nothing is served in the loop then (a callback's experts stay pinned until the loop has run
    them), and the logits are still the resident model's."""
    path = write_mixed(tmp_path)
    model = prism_load.load(path, expert_kernel="native-int16", expert_cache="35%", prefetch=False)
    resident = prism_load.load(path, expert_kernel="native-int16")
    loads = count_native_loads(monkeypatch)
    seen = []
    runtime_hook = model.layer_hook
    model.layer_hook = lambda index, h: seen.append(index) or runtime_hook(index, h)
    nxt = tokens(20)
    with torch.inference_mode():
        outs = []
        for m in (model, resident):
            c = m.new_cache()
            m(tokens(5, seed=0), cache=c)
            outs.append(torch.cat([m(nxt[:, i : i + 1], cache=c) for i in range(20)], 1))
    assert torch.equal(outs[0], outs[1])
    assert loads == [] and len(seen) >= 20 * CONFIG["num_hidden_layers"]
    assert model.stats()["misses"] > 0
    model.runtime.cache.check()


def test_out_of_descriptors_keeps_misses_on_the_python_path(q8, tmp_path, monkeypatch):
    """Where the loop cannot hold a descriptor of its own for a shard (os.dup fails: EMFILE), that shard's experts
    stay on the Python path: nothing raises, no miss is served in the loop, the cache adds up and the logits are
    those of a cache that serves every miss in Python."""
    path = write_mixed(tmp_path)

    def run(native: bool):
        model = prism_load.load(path, expert_kernel="native-int16", expert_cache="35%", prefetch=False)
        model.runtime.cache.native_allowed = native
        with torch.inference_mode():
            c = model.new_cache()
            out = [model(tokens(5, seed=0), cache=c)]
            out += [model(tokens(30)[:, i : i + 1], cache=c) for i in range(30)]
        model.runtime.cache.check()
        return torch.cat([o[:, -1] for o in out]), model

    def no_descriptors(fd):
        raise OSError(24, os.strerror(24))

    monkeypatch.setattr(native_misses.os, "dup", no_descriptors)
    loads = count_native_loads(monkeypatch)
    out, model = run(True)
    assert model.stats()["misses"] > 0 and loads == [] and model.stats()["native_loads"] == 0
    reference, _ = run(False)
    assert torch.equal(out, reference)


@pytest.fixture
def frees(monkeypatch):
    """Every address the native library frees, freeing it too (prism_slab_free)."""
    from prism_load.native import _kernel

    kernel, seen = _kernel(), []
    real = kernel.slab_free
    monkeypatch.setattr(kernel, "slab_free", lambda address: seen.append(address) or real(address))
    return kernel, seen


def test_a_native_slab_frees_its_memory_once_whoever_holds_it_last(q8, frees):
    """A slab the loop allocated is freed when its NativeSlab goes, where Python never made it a tensor; once it
    has, the memory outlives the NativeSlab for as long as any view of it lives, and is freed once."""
    kernel, seen = frees
    n = 4096
    address = kernel.slab_alloc(n, 1)
    slab = native_misses.NativeSlab(address, n)
    assert (slab.address, slab.nbytes) == (address, n)
    del slab
    assert seen == [address]

    address = kernel.slab_alloc(n, 1)
    slab = native_misses.NativeSlab(address, n)
    view = slab.buf[100:200]
    assert slab.buf.data_ptr() == address and slab.buf.numel() == n and view.data_ptr() == address + 100
    view.fill_(7)
    del slab
    assert seen == [seen[0]]  # the view keeps it
    assert int(view.sum()) == 700
    del view
    assert seen[1:] == [address]


def test_the_slab_pool_finds_free_slabs_by_address_and_says_which_is_missing():
    from prism_load.runtime.tiers import Slab, SlabPool

    pool = SlabPool(budget_bytes=1 << 20)
    a, b, c = pool.take(4096), pool.take(4096), pool.take(8192)
    assert pool.total_bytes == 16384 and (a.address, a.nbytes) == (a.buf.data_ptr(), 4096)
    for slab in (a, b, c):
        pool.give(slab)
    assert sorted(pool.free_slabs()) == sorted([(a.address, 4096), (b.address, 4096), (c.address, 8192)])
    assert pool.drop_free(a.address, 4096) is a
    with pytest.raises(KeyError, match=f"no free slab of 4096 bytes at {a.address:#x}"):
        pool.drop_free(a.address, 4096)
    with pytest.raises(KeyError, match="no free slab of 8192 bytes"):
        pool.drop_free(b.address, 8192)  # the right address, the wrong size
    assert pool.take(4096) is b and pool.take(8192) is c  # reused, not new memory
    assert pool.total_bytes == 16384
    pool.give(b)
    pool.adopt_free(Slab(torch.empty(4096, dtype=torch.uint8)))  # the last given is the first taken
    assert pool.take(4096) is not b

"""Models and helpers shared by the runtime tests (cache, prefetch, NUMA, GPU)."""

from __future__ import annotations

import threading
from collections import Counter

import torch
from containers import TINY_CONFIG, random_model, write_tiny

import prism_load
from prism_load.runtime.cache import footprint

# 3 layers x 8 experts, top-2: enough experts per layer for eviction, prefetch misses and cancellations
RUNTIME_CONFIG = dict(TINY_CONFIG, num_hidden_layers=3, num_local_experts=8)
INT_MIX = [dict(kind="int", bits=4, group_size=16), dict(kind="int", bits=3, group_size=8), dict(kind="bf16")]


def write_runtime_container(folder, config=RUNTIME_CONFIG, mix=INT_MIX, seed: int = 0):
    model = random_model(config, seed=seed)
    return write_tiny(folder, model=model, config=config, mix=mix)


def expert_bytes(model_or_store) -> list[int]:
    """Sorted bytes each expert reserves in the cache (decoded bytes plus slab alignment)."""
    store = model_or_store.runtime.cache.store if hasattr(model_or_store, "runtime") else model_or_store
    return sorted(footprint(store.nbytes(i, e)) for i in store.moe_layers for e in range(store.num_experts))


def load_cached(path, budget, prefetch=True, **kwargs):
    return prism_load.load(path, expert_cache=budget, prefetch=prefetch, **kwargs)


class RouteCounter:
    """MoE observer counting expert uses as the cache sees them: distinct experts per block call."""

    def __init__(self):
        self.uses = Counter()
        self.lock = threading.Lock()

    def on_route(self, layer_index, x, route):
        with self.lock:
            self.uses[layer_index] += len(set(route.indices.flatten().tolist()))

    def on_expert(self, *args):
        pass

    def attach(self, model):
        for _, block in model.moe_blocks():
            block.observer = self
        return self


class CountingFetches:
    """Wraps a store's fetch to record every cold read (key, stored bytes)."""

    def __init__(self, store):
        self.store, self.calls = store, []
        self._fetch, self._read_into = store.fetch, getattr(store, "read_into", None)
        store.fetch = self
        if self._read_into is not None:  # packed experts read straight into their slab: also a cold read
            store.read_into = self.read_into

    def __call__(self, layer, expert):
        self.calls.append((layer, expert))
        return self._fetch(layer, expert)

    def read_into(self, layer, expert, take_buffer, threads=1):
        self.calls.append((layer, expert))
        return self._read_into(layer, expert, take_buffer, threads=threads)

    def bytes(self) -> int:
        return sum(self.store.stored_nbytes(*k) for k in self.calls)


def greedy(model, ids, n=12):
    torch.set_num_threads(1)
    return model.generate(ids, max_new_tokens=n, eos_token_id=[])


def prompts(count: int, vocab: int, seed: int = 0, length=(3, 10)) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (1, int(torch.randint(length[0], length[1], (1,), generator=gen))), generator=gen)
            for _ in range(count)]

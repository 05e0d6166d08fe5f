"""The memory of the cache's tiers: an entry's footprint, the CPU fast tier's slabs, the CUDA host tier.

Every entry, loaded or loading, reserves its footprint (exact decoded bytes plus alignment slack) against
the budget before its load starts, so the decoded bytes held never exceed the budget. On the CPU the decoded
experts live in slabs reused across evictions (SlabPool), so the tier's resident memory is the budget, not
the budget plus what the C allocator keeps after frees. Everything here is used under the cache's lock.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from ..hugepages import huge_buffer
from ..models.moe import ExpertWeights
from .stores import TENSOR_ALIGNMENT, ExpertStore, Key

MAX_EXPERT_TENSORS = 32  # packed int+low-rank projections (3 stored tensors per part), plus two biases


def footprint(nbytes: int) -> int:
    """Bytes an expert of `nbytes` decoded bytes reserves: its tensors, each 64-byte aligned in one slab."""
    return nbytes + MAX_EXPERT_TENSORS * TENSOR_ALIGNMENT


def total_footprint(store: ExpertStore) -> int:
    """What a cache holding every expert reserves: the total that budgets like "50%" are shares of."""
    return sum(footprint(store.nbytes(i, e)) for i in store.moe_layers for e in range(store.num_experts))


class Entry:
    """One expert in the fast tier (ready) or on its way there (loading); its bytes are reserved either way."""

    __slots__ = ("key", "nbytes", "decoded_nbytes", "stored_nbytes", "weights", "slab", "event", "ready",
                 "permanent", "prefetched", "by_worker", "cold", "used", "expected", "unwanted", "pins", "priority",
                 "version")

    def __init__(self, key: Key, decoded_nbytes: int, stored_nbytes: int, prefetched: bool = False):
        self.key, self.decoded_nbytes, self.stored_nbytes = key, decoded_nbytes, stored_nbytes
        self.nbytes = footprint(decoded_nbytes)  # what it reserves against the budget
        self.weights: ExpertWeights | None = None
        self.slab: Slab | None = None  # the SlabPool buffer its weights view (CPU fast tier)
        self.event = None  # CUDA event: the copy and decode on the side stream are done
        self.ready, self.permanent = False, False
        self.prefetched, self.used, self.cold = prefetched, False, False  # cold: read from the cold tier
        self.by_worker = False  # loaded by the fetch worker (a prediction or an ahead load)
        self.expected = prefetched  # predicted or routed for an upcoming use: prefetches may not evict it
        self.unwanted = False  # a prefetch the real routing disagreed with: dropped before its decode
        self.pins, self.priority, self.version = 0, 0.0, 0


class HostTier:
    """Pinned stored bytes of experts (CUDA only), least recently used out first; used under the cache lock."""

    def __init__(self, budget_bytes: int):
        self.budget_bytes, self.used_bytes = budget_bytes, 0
        self.entries: OrderedDict[Key, tuple[object, int]] = OrderedDict()

    def get(self, key: Key):
        item = self.entries.get(key)
        if item is None:
            return None
        self.entries.move_to_end(key)
        return item[0]

    def put(self, key: Key, raw, nbytes: int) -> None:
        if nbytes > self.budget_bytes or key in self.entries:
            return
        while self.used_bytes + nbytes > self.budget_bytes:
            _, (_, n) = self.entries.popitem(last=False)
            self.used_bytes -= n
        self.entries[key] = (raw, nbytes)
        self.used_bytes += nbytes


class Slab:
    """One fast-tier buffer and the expert operators last built over it, by layout (ContainerStore.read_into).
    Why: an expert read into a slab that held one of the same layout gets the same views and the same bound
    kernel arguments (their pointers are the slab's), so a miss reuses them instead of building them again:
    on small experts building them cost more than the read. `address` and `nbytes` are plain ints, so the pool's
    bookkeeping never touches the tensor (the native miss path's slabs make theirs only when Python needs it)."""

    __slots__ = ("_buf", "address", "nbytes", "built")

    def __init__(self, buf: torch.Tensor):
        self._buf, self.address, self.nbytes = buf, buf.data_ptr(), buf.numel()
        self.built: dict = {}  # layout -> ExpertWeights viewing buf

    @property
    def buf(self) -> torch.Tensor:
        return self._buf


class SlabPool:
    """Buffers of the CPU fast tier, reused across evictions (under the cache lock). glibc keeps freed
    expert-sized blocks in its heaps (its mmap threshold rises with each such free), so without slabs the
    resident set grows to about twice the budget; with them the tier's memory is the budget. Free slabs of
    other sizes are released when a new size would not fit. Slabs are huge_buffer()s (prism_load/hugepages.py):
    a cached expert streams from 2 MiB pages as a resident one does; those made by the native miss path
    (runtime/native_misses.py) are its memory, advised the same way. `version` counts take and give, so the
    native path knows when its copy of the free list is out of date; its own changes, replayed here through
    adopt_free, drop_free and total_bytes, leave it."""

    def __init__(self, budget_bytes: int):
        self.budget_bytes, self.total_bytes = budget_bytes, 0
        self.free: dict[int, dict[int, Slab]] = {}  # bytes -> {address: slab}, the last given first out
        self.version = 0

    def take(self, nbytes: int) -> Slab:
        self.version += 1
        spare = self.free.get(nbytes)
        if spare:
            return spare.popitem()[1]
        for size in list(self.free):
            while self.free[size] and self.total_bytes + nbytes > self.budget_bytes:
                self.free[size].popitem()
                self.total_bytes -= size
        self.total_bytes += nbytes
        return Slab(huge_buffer(nbytes))

    def give(self, slab: Slab) -> None:
        self.version += 1
        self.adopt_free(slab)

    def adopt_free(self, slab: Slab) -> None:
        self.free.setdefault(slab.nbytes, {})[slab.address] = slab

    def drop_free(self, address: int, nbytes: int) -> Slab:
        """The free slab at `address` (of nbytes), taken off the free list (KeyError where it is not on it)."""
        slab = self.free.get(nbytes, {}).pop(address, None)
        if slab is None:
            raise KeyError(f"no free slab of {nbytes} bytes at {address:#x}")
        return slab

    def free_slabs(self) -> list[tuple[int, int]]:
        """(address, bytes) of every free slab."""
        return [(address, size) for size, spare in self.free.items() for address in spare]

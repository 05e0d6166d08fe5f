"""An expert cache's misses served inside the native decode loop (native/expert_miss.c), replayed here.

Why: with the decode loop native, a miss was the one thing left that called back into Python, and on small experts
the Python around the read cost about five times the read itself (bench/results/miss_profile_xeon.md: a miss
added 141 us to a token, its read 24). The loop now serves a step with misses itself: it observes the routing,
chooses victims by the default eviction order (NextUse, whose arrays it shares), evicts them from the resident
table, takes a slab (a free one of the size, or new memory), reads the expert into it, moves its layout's native
block there and runs it. It logs what it did; `replay` applies the log to the cache's Python side (entries,
statistics, slabs), in order, before anything else looks at the cache: after the token, or before a callback.

The decoding thread holds the cache's lock for the whole token (`token`), so nothing else changes the cache
under the loop; another thread's loop may still run hits from the resident tables, and an eviction waits for it
as the Python path's does (decode_layer.c's handshake). The loop serves a step only where it can serve it whole
and exactly as ExpertCache._serve_now would: every routed expert ready, or absent with its read known
(ContainerStore.native_read: the expert was read through Python once, its checksum checked); nothing pinned by
another thread, nothing predicted or expected, no route log, no fetch worker, eviction by next use. Elsewhere it
calls back as before, and from then until the token ends every step does. The first read of every expert takes
the Python path, so a cache serves natively only once it has seen an expert.

Exactness: the same victims, the same floating-point scores, the same counts; tests/test_native_misses.py
decodes with and without this and compares the caches after every token. PRISM_NATIVE_MISSES=0 turns it off
(bench A/B runs), read once, when the cache first decodes (ExpertCache.native_misses): not in open(), where an
environment lookup a token cost microseconds.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import struct
import threading
import weakref

import numpy as np
import torch

from ..native import _ARGS, _kernel
from ..native.expert_block import PROJECTION_WORDS
from .eviction import MIN_ROUTING, RESCALE_BELOW, NextUse
from .tiers import Entry, Slab, footprint

# expert_miss.h's fields, in order
FIELDS = ("on", "positions", "experts", "room", "pool_total", "pool_budget", "free_count", "free_cap", "free_addr",
          "free_size", "log", "log_count", "log_cap", "level", "scale", "weight", "offset", "current", "decay",
          "min_routing", "rescale_below", "state", "slab", "slab_size", "footprint", "length", "file_offset", "fd",
          "template", "wide", "blocks", "tables", "position_layer", "loop_position", "scratch", "huge", "threads",
          "split_bytes", "error", "error_key", "drop")
F = {name: i for i, name in enumerate(FIELDS)}
ON, LOOP_POSITION, FREE_COUNT, ROOM, POOL_TOTAL, POOL_BUDGET, DECAY, CURRENT, THREADS, DROP, SPLIT_BYTES, LOG_COUNT = (
    F[name] for name in ("on", "loop_position", "free_count", "room", "pool_total", "pool_budget", "decay", "current",
                         "threads", "drop", "split_bytes", "log_count"))
ABSENT, READY, LOADING, PERMANENT = 0, 1, 2, 4
# a miss's read from this size up is split across the compute's OpenMP threads (read_range.c). Lower than the
# Python path's 1 MiB (read_range.PARALLEL_READ_BYTES): served in the loop, the reference model's 60-230 KB misses
# decoded faster split on 2 threads (bench_runtime.py --threads 2: the "reads split from 1 MiB" row against the
# default), where through the Python callbacks splitting from 128 KiB had been slower
NATIVE_SPLIT_BYTES = 64 << 10
EV_HIT, EV_STEP, EV_SERVED, EV_EVICT, EV_RELEASE, EV_ALLOC, EV_LOAD = range(1, 8)


def _bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", x))[0]


def enabled() -> bool:
    return os.environ.get("PRISM_NATIVE_MISSES", "1") != "0"


@functools.cache
def _owned(nbytes: int) -> type:
    """A ctypes byte array type whose instance frees its memory (prism_slab_free) when the last tensor viewing it
    goes: torch.frombuffer keeps the array alive for as long as any view of it lives."""
    return type(f"NativeSlab{nbytes}", (ctypes.c_uint8 * nbytes,), {"__del__": _free})


def _free(mem) -> None:
    _free_address(ctypes.addressof(mem))


def _free_address(address: int) -> None:
    # try/except, not contextlib.suppress: a replay frees a slab on most misses, and suppress's two Python calls ran
    # cold there
    try:  # noqa: SIM105
        _kernel().slab_free(address)
    except Exception:  # noqa: BLE001, S110 - at interpreter exit the library may be gone already
        pass


def native_buffer(address: int, nbytes: int) -> torch.Tensor:
    """A uint8 tensor over memory prism_slab_alloc made, which it frees once nothing views it."""
    return torch.frombuffer(_owned(nbytes).from_address(address), dtype=torch.uint8)


class NativeSlab(Slab):
    """A slab the loop allocated (prism_slab_alloc), its tensor made only when Python needs it (an operator's
    views, the Python path reading into it). Why: the replay of a miss made and dropped a tensor per slab the loop
    took or gave up, touching torch's objects cold after the layers, for slabs Python mostly never looks into.
    Until then this frees the memory when it goes; after, the tensor's buffer does (native_buffer)."""

    __slots__ = ()

    def __init__(self, address: int, nbytes: int):
        self._buf, self.address, self.nbytes, self.built = None, address, nbytes, {}

    @property
    def buf(self) -> torch.Tensor:
        if self._buf is None:
            self._buf = native_buffer(self.address, self.nbytes)
        return self._buf

    def __del__(self):
        if self._buf is None:
            _free_address(self.address)


def _close_all(fds: dict) -> None:
    for fd in fds.values():
        with contextlib.suppress(OSError):
            os.close(fd)


class NativeMisses:
    """expert_miss.c's state for one ExpertCache, and the replay of its log. Made by ExpertCache.native_misses()
    where the cache qualifies; the cache keeps `state` and the slab arrays up to date as its Python path loads and
    evicts (mark, gone)."""

    def __init__(self, cache):
        fn = _kernel()
        if fn.expert_miss_fields() != len(FIELDS) or fn.expert_miss_args() != _ARGS:
            raise RuntimeError(f"expert_miss.c has {fn.expert_miss_fields()} fields of {fn.expert_miss_args()}-word "
                               f"operators, native_misses.py {len(FIELDS)} of {_ARGS}")
        self.cache = cache
        policy, store = cache.policy, cache.store
        n, E = len(policy.layers), store.num_experts
        self.n, self.E = n, E
        self.index = {(layer, e): i * E + e for i, layer in enumerate(policy.layers) for e in range(E)}
        keys = n * E
        self.state = np.zeros(keys, np.int8)
        self.slab = np.zeros(keys, np.int64)
        self.slab_size = np.zeros(keys, np.int64)
        self.footprint = np.array([footprint(store.nbytes(layer, e)) for layer in policy.layers for e in range(E)],
                                  np.int64)
        self.length = np.zeros(keys, np.int64)
        self.file_offset = np.zeros(keys, np.int64)
        self.fd = np.full(keys, -1, np.int64)
        self.template = np.zeros(keys, np.int64)
        self.wide = np.zeros(keys, np.int64)
        self.blocks = np.zeros(keys * 3 * PROJECTION_WORDS, np.int64)  # expert_miss.c's NM_BLOCK_WORDS a key
        self.tables = np.zeros(n, np.int64)
        self.position_layer = np.array(policy.layers, np.int64)
        self.scratch = np.zeros(keys, np.float64)
        self.free_cap = 2 * keys + 64
        self.free_addr = np.zeros(self.free_cap, np.int64)
        self.free_size = np.zeros(self.free_cap, np.int64)
        k = store.top_k
        worst_step = 3 + k + 9 * k + 3 * keys + 3 * (self.free_cap + keys)  # expert_miss.c's bound
        self.log = np.zeros(4 * worst_step + 1024, np.int64)
        self._templates: dict[int, object] = {}  # key index -> its BlockTemplate (alive while the block is used)
        self._loads: dict[int, tuple] = {}  # key index -> (key, decoded bytes, stored bytes, read length)
        self._fds: dict[int, int] = {}  # shard -> our duplicate of its descriptor
        self._fresh: dict[int, Slab] = {}  # slabs the loop made, between their ALLOC and LOAD records
        weakref.finalize(self, _close_all, self._fds)
        self._decay = None  # the decay h holds
        self._exported = None  # the slab pool's version the loop's free list copies
        self._holder = None  # the thread whose token holds the cache's lock (token)
        self.h = np.zeros(len(FIELDS), np.int64)
        h = self.h
        h[F["positions"]], h[F["experts"]] = n, E
        for name in ("free_addr", "free_size", "log", "state", "slab", "slab_size", "footprint", "length",
                     "file_offset", "fd", "template", "wide", "blocks", "tables", "position_layer", "scratch"):
            h[F[name]] = getattr(self, name).ctypes.data
        self._blocks_address, self.address = int(h[F["blocks"]]), h.ctypes.data  # (.ctypes costs microseconds)
        # the fields and the log as Python ints: a numpy scalar per field read or written cost a replay and an
        # open microseconds each, run cold after the layers (bench/miss_profile.py)
        self.hv, self.log_view = memoryview(h), memoryview(self.log)
        h[F["free_cap"]], h[F["log_cap"]] = self.free_cap, len(self.log)
        h[F["level"]], h[F["scale"]] = policy.level.ctypes.data, policy.scale.ctypes.data
        h[F["weight"]], h[F["offset"]] = policy.weight.ctypes.data, policy.offset.ctypes.data
        h[F["min_routing"]], h[F["rescale_below"]] = _bits(MIN_ROUTING), _bits(RESCALE_BELOW)
        h[F["huge"]] = int(os.environ.get("PRISM_HUGEPAGES", "1") != "0")
        for table_layer, table in cache._tables.items():
            self.set_table(table_layer, table)
        for entry in cache._entries.values():  # what the cache holds already
            self.mark(entry)

    # -- the cache's Python path keeps these up to date ----------------------------------------------------
    def set_table(self, layer: int, table) -> None:
        self.tables[self.cache.policy.position[layer]] = table.table.data_ptr()

    def mark(self, entry: Entry) -> None:
        """An entry as it is now (reserved and loading, or ready), where the Python path changed it."""
        i = self.index[entry.key]
        if not entry.ready:
            self.state[i] = LOADING
            return
        self.state[i] = READY | (PERMANENT if entry.permanent else 0)
        slab = entry.slab
        self.slab[i], self.slab_size[i] = (slab.address, slab.nbytes) if slab is not None else (0, 0)
        if not self.length[i]:
            self._learn(entry.key, i)

    def gone(self, key) -> None:
        i = self.index[key]
        self.state[i] = ABSENT
        self.slab[i] = self.slab_size[i] = 0

    def _learn(self, key, i: int) -> None:
        """The expert's read, where the store can say it now (after its first read through Python)."""
        read = getattr(self.cache.store, "native_read", None)
        found = read(*key) if read is not None else None
        if found is None:
            return
        shard, offset, length, template = found
        fd = self._fds.get(shard)
        if fd is None:
            try:
                with self.cache.store.container.shard_fd(shard) as shared:
                    fd = self._fds[shard] = os.dup(shared)  # ours: open while this is, whatever the container closes
            except OSError:  # out of descriptors (EMFILE): the expert stays on the Python path, which reads it
                return
        self._templates[i] = template
        store = self.cache.store
        self._loads[i] = (key, store.nbytes(*key), store.stored_nbytes(*key), length)  # what a LOAD record needs
        self.template[i] = ctypes.addressof(template.arguments)
        self.wide[i], self.file_offset[i], self.fd[i] = template.wide, offset, fd
        self.length[i] = length

    def check(self) -> None:
        """Under the cache's lock (ExpertCache.check): the loop's view of every expert is the cache's."""
        for key, i in self.index.items():
            entry = self.cache._entries.get(key)
            state = ABSENT if entry is None else LOADING if not entry.ready else \
                READY | (PERMANENT if entry.permanent else 0)
            slab = entry.slab.address if entry is not None and entry.ready and entry.slab is not None else 0
            if self.state[i] != state or self.slab[i] != slab:
                raise AssertionError(f"native miss state of layer {key[0]} expert {key[1]}: {self.state[i]} at "
                                     f"{self.slab[i]:#x}, the cache's {state} at {slab:#x}")

    # -- a token -----------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def token(self, loop_positions: int):
        """Hold the cache's lock for a decode token; yields the state's address for decode_layers, on where the
        cache can be served natively now (open). The log is replayed by the loop's server (ExpertServer.flush_hits)."""
        cache = self.cache
        with cache._lock:
            self._holder = threading.get_ident()
            try:
                self.open(loop_positions)
                yield self.address
            finally:
                self._holder = None
                self.hv[ON] = 0

    def resume(self, loop_positions: int) -> None:
        """After a callback served a step: open again, where this thread's token holds the lock (a token not
        served natively, with a hook between its layers, keeps its pins: nothing holds the lock for it)."""
        if self._holder == threading.get_ident():
            self.open(loop_positions)

    def open(self, loop_positions: int) -> bool:
        """Under the cache's lock: hand the loop what may have changed since it last served (the room, the free
        slabs, the eviction order's position), and turn it on where it can serve exactly as the Python path: at a
        token's start, and after a callback served a step (ExpertServer._route), whose experts this unpins: the
        loop runs them before anything else can evict, as the Python path's next acquire unpins them first."""
        cache, h = self.cache, self.hv
        h[ON] = 0
        h[LOOP_POSITION] = loop_positions  # the address of the loop's int64 [L]
        cache._release_locked()
        policy, pool = cache.policy, cache.slabs
        if (any(cache._pins.values()) or cache._predictions or any(cache._expected.values()) or cache.route_log is not None
                or cache.worker is not None or type(policy) is not NextUse or not cache.native_allowed):
            return False
        if pool.version != self._exported:
            free = pool.free_slabs()
            if len(free) > self.free_cap - self.n * self.E:
                return False
            h[FREE_COUNT] = len(free)
            for j, (address, size) in enumerate(free):
                self.free_addr[j], self.free_size[j] = address, size
            self._exported = pool.version
        h[ROOM] = cache.budget_bytes - cache.used_bytes
        h[POOL_TOTAL], h[POOL_BUDGET] = pool.total_bytes, pool.budget_bytes
        if policy.decay != self._decay:
            self._decay = policy.decay
            h[DECAY] = _bits(policy.decay)
        h[CURRENT], h[THREADS] = policy.current, torch.get_num_threads()
        h[DROP], h[SPLIT_BYTES] = int(cache.drop_read_pages), cache.native_split_bytes
        h[ON] = 1
        return True

    def error(self, rc: int) -> BaseException:
        """The exception for decode_layers' -6 (no victim) or -7 (a failed read)."""
        if rc == -7:
            key = next(k for k, i in self.index.items() if i == int(self.h[F["error_key"]]))
            code = int(self.h[F["error"]])
            return OSError(code, f"reading layer {key[0]} expert {key[1]} into the expert cache: {os.strerror(code)}")
        return RuntimeError("expert cache: a miss served in the decode loop found every expert pinned")

    # -- the log -----------------------------------------------------------------------------------------
    def replay(self) -> None:
        """Apply the loop's log to the cache (under its lock, which the token holds), in order, and empty it."""
        h, cache = self.hv, self.cache
        with cache._lock:  # the count read and emptied under it too: a token of another plan may flush hits
            count = h[LOG_COUNT]
            if not count:
                return
            words = self.log_view[:count].tolist()
            h[LOG_COUNT] = 0
            cache.policy.current = h[CURRENT]  # the loop observed last: nothing has since
            self._apply(words)
            # what the loop left: its copy of the free list is the pool's again, whatever the order
            cache.slabs.total_bytes = h[POOL_TOTAL]

    def _apply(self, words: list[int]) -> None:
        """The records in order. Written for speed: it runs after every token with misses, touching Python objects
        the layers have pushed out of the caches, so the common records are handled inline."""
        cache = self.cache
        st, entries, pool, fresh, layer_stats = cache.stats, cache._entries, cache.slabs, self._fresh, None
        layer, at, end = None, 0, len(words)
        while at < end:
            kind = words[at]
            if kind in (EV_HIT, EV_STEP):
                layer, k = words[at + 1], words[at + 2]
                layer_stats = st.layer(layer)
                layer_stats.unpredicted_steps += 1
                if kind == EV_HIT:  # ExpertCache._count_hits, and each expert used
                    st.uses += k
                    st.hits += k
                    layer_stats.uses += k
                    layer_stats.hits += k
                    for e in words[at + 3 : at + 3 + k]:
                        entry = entries.get((layer, e))
                        if entry is not None and (not entry.used or entry.unwanted or entry.expected):
                            self._used(entry)
                at += 3 + k
            elif kind == EV_SERVED:
                st.uses += 1
                st.hits += 1
                layer_stats.uses += 1
                layer_stats.hits += 1
                entry = entries.get((layer, words[at + 1]))
                if entry is not None and (not entry.used or entry.unwanted or entry.expected):
                    self._used(entry)
                at += 2
            elif kind == EV_EVICT:
                self._evicted(words[at + 1], words[at + 2])
                at += 3
            elif kind == EV_RELEASE:
                if fresh.pop(words[at + 1], None) is None:
                    pool.drop_free(words[at + 1], words[at + 2])
                at += 3
            elif kind == EV_ALLOC:
                fresh[words[at + 1]] = NativeSlab(words[at + 1], words[at + 2])
                at += 3
            elif kind == EV_LOAD:
                self._loaded(layer, words[at + 1], words[at + 2], words[at + 3], layer_stats)
                at += 4
            else:
                raise RuntimeError(f"expert_miss.c's log: unknown record {kind} at {at}")

    def _used(self, entry: Entry) -> None:
        """As _plain_hits and _serve_now: used, no longer unwanted or expected (a no-op for an entry used already
        and neither: the replay skips the call then)."""
        entry.unwanted = False
        self.cache._mark_used(entry)

    def _evicted(self, layer: int, e: int) -> None:
        """ExpertCache._evict's Python side: the loop took the expert out of its table, gave its room back and
        put its slab on the free list."""
        cache = self.cache
        entry = cache._entries.pop((layer, e))
        cache.layer_entries[layer] -= 1
        cache.used_bytes -= entry.nbytes
        table = cache._tables.get(layer)
        if table is not None:
            table.blocks.pop(e, None)
        entry.weights = None
        if entry.slab is not None:
            cache.slabs.adopt_free(entry.slab)
            entry.slab = None
        st = cache.stats
        st.evictions += 1
        if entry.prefetched and not entry.used and entry.cold:
            st.wasted_bytes += entry.stored_nbytes

    def _loaded(self, layer: int, e: int, address: int, nanoseconds: int, ls) -> None:
        """_serve_now's reservation, _load_demand and _finish for an expert the loop read into the slab at address
        (ls: the layer's statistics)."""
        cache = self.cache
        i = self.index[(layer, e)]
        key, decoded, stored, length = self._loads[i]
        slab = self._fresh.pop(address, None)
        if slab is None:
            slab = cache.slabs.drop_free(address, length)
        entry = Entry(key, decoded, stored)
        cache._entries[key] = entry
        cache.layer_entries[layer] += 1
        cache.used_bytes += entry.nbytes
        block = self._templates[i].placed(self._blocks_address + 8 * 3 * PROJECTION_WORDS * i, (self.blocks, slab))
        entry.slab, entry.cold, entry.ready = slab, True, True
        entry.weights = cache.store.native_weights(layer, e, slab, block)
        cache._tables[layer].blocks[e] = block
        st = cache.stats
        seconds = nanoseconds * 1e-9
        st.uses, ls.uses, st.misses, ls.misses = st.uses + 1, ls.uses + 1, st.misses + 1, ls.misses + 1
        st.demand_loads += 1
        st.native_loads += 1
        st.loads += 1
        st.bytes_fetched += stored
        st.bytes_decoded += decoded
        st.stall_seconds += seconds
        ls.stall_seconds += seconds
        cache._mark_used(entry)

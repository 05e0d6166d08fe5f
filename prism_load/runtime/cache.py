"""The budgeted expert cache: an ExpertSource that keeps decoded experts within a byte budget.

Tiers: fast (decoded weights in RAM on a CPU-only machine, GPU memory on CUDA) <- host (pinned RAM holding
the stored, encoded bytes; CUDA only) <- cold (the store: the container read with one pread per expert, or
a checkpoint). A miss stalls the layer until the expert is loaded; the stall is counted.

Eviction (eviction.py): by default the expert expected to be needed last (the MoE layers' cycle and a decaying
estimate of routing, bytes weighted); GreedyDual with frequencies or plain LRU on request.

Memory (tiers.py): every entry reserves its footprint before its load starts, so the decoded bytes held
never exceed the budget; on the CPU the decoded experts live in slabs reused across evictions. The
container's hot tier is loaded at construction, hottest first, while it leaves room for two layer steps'
experts: by default as ordinary entries ("warm": their profile frequency gives them a head start, use
decides after), or pinned for good (pin_hot=True). Warm is the default because pinning measured a lower
hit rate (bench/results/runtime.md and runtime_packed.md: the "hot tier pinned" rows against the plain
ones): a sequence's experts are a subset that drifts away from the calibration-wide hot set, which pinned
entries cannot follow.

Locking: one lock (`_lock`) guards all state here and in the fetch worker (entries, heap, pins, counters,
job queue); two conditions share it: `_changed` (an entry became ready or went away, a pin was released:
what demand loads wait for; notified only while someone waits) and the worker's `_work`. Reads, decodes
and copies run outside the lock. An expert in use is pinned by the thread using it: `acquire` pins a
step's experts when all are resident (the hit path: one lock round trip per layer); otherwise it returns a
lease that, where the budget holds the whole step, keeps each pinned until the thread's next acquire (a native
expert block runs them together): without a fetch worker acquire has served them all already (_serve_now),
with one it loads them on access while the worker loads the others; where the budget does not hold the step
(or a wait for room makes the lease let go), it pins one at a time and the block runs them one by one, so a
budget smaller than one step's experts still works. A thread's pins are released by its next `acquire` (or
`use` outside a holding lease) or by `release_thread` (the model's layer hook, after every layer), so a thread
waiting for room holds no pin and a pinned expert is never evicted under a matmul.
Waiting for room re-checks pins of threads that have died, so a thread that ends without releasing cannot
block the others. The worker never waits for room: a prefetch without room is dropped.

Misses in the native decode loop (native_misses.py, default where the cache qualifies: native_misses()): a
decode token holds the lock (reentrant) from start to end and the loop serves a step's misses itself, as
_serve_now would, logging what it did; the log is replayed here before anything else reads the cache. The
Python side keeps the loop's view of each expert (state, slab) up to date where it loads or evicts (_add_entry,
_finish, _remove).
"""

from __future__ import annotations

import threading
import time
import warnings
from collections import Counter
from collections.abc import Mapping

import torch
from torch import nn

from ..errors import BudgetError
from ..models.moe import ExpertWeights
from ..native.decode_layer import ResidentTable
from .eviction import NextUse, eviction_policy
from .native_misses import NATIVE_SPLIT_BYTES
from .stats import RuntimeStats
from .stores import ExpertStore, Key, pack_into, packed_nbytes, prior_frequency, raw_nbytes, weights_nbytes
from .tiers import Entry, HostTier, Slab, SlabPool, footprint, total_footprint  # noqa: F401 - re-exported

ROOM_POLL_SECONDS = 0.05  # a thread waiting for room re-checks for dead threads' pins this often


def _never(layer: int, expert: int) -> bool:
    return False


class ExpertCache:
    """Decoded experts of every MoE layer within `budget_bytes` of the fast tier."""

    def __init__(self, store: ExpertStore, budget_bytes: int, device="cpu", *, eviction: str = "next-use",
                 frequency_weight: float = 1.0, pin_hot: bool | str = "warm", host_budget_bytes: int = 0,
                 placement=None, decode_on: str = "device"):
        self.store, self.device = store, torch.device(device)
        self.budget_bytes, self.frequency_weight = int(budget_bytes), float(frequency_weight)
        self.placement = placement  # NumaPlacement (CPU fast tier) or None
        self.keys = [(i, e) for i in store.moe_layers for e in range(store.num_experts)]
        self.largest_bytes = footprint(max(store.nbytes(*k) for k in self.keys))
        if self.budget_bytes < self.largest_bytes:
            share = self.largest_bytes / total_footprint(store)
            raise BudgetError(f"expert cache budget {self.budget_bytes:,} bytes is smaller than the largest expert "
                              f"({self.largest_bytes:,} bytes, {share:.1%} of every expert's); it must hold at least "
                              f"one, and a layer step's {store.top_k} to run them together")
        step_bytes = store.top_k * self.largest_bytes
        if self.budget_bytes < step_bytes:
            warnings.warn(f"expert cache budget {self.budget_bytes:,} bytes holds fewer than one layer step's experts "
                          f"(top_k {store.top_k} x the largest expert, {step_bytes:,} bytes): where a step's experts do "
                          f"not fit together they run one at a time, and most steps load some of them again: "
                          f"exact, but slow",
                          RuntimeWarning, stacklevel=3)
        # reentrant: a decode token served by the native miss path holds it throughout (native_misses.py), and its
        # callbacks take it again
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._waiting = 0  # threads waiting on _changed
        self._entries: dict[Key, Entry] = {}
        self.layer_entries = Counter()  # layer -> its experts resident or loading (the prefetcher skips full layers)
        self.used_bytes = 0
        self._pins: dict[int, list[Entry]] = {}  # thread ident -> the entries that thread is using
        self._prior = {k: prior_frequency(store, *k) for k in self.keys}
        self.eviction = eviction
        self.policy = eviction_policy(eviction, self._entries, self._prior, tuple(store.moe_layers), store.num_experts,
                                      frequency_weight)
        self._predictions: dict[int, set[int]] = {}  # layer -> experts predicted for its next step
        self._expected: dict[int, set[int]] = {}  # layer -> experts flagged expected
        self.worker = None  # FetchWorker (prefetch.py), when prefetching
        self.transfer = None
        if self.device.type == "cuda":
            from .cuda import CudaTransfer

            self.transfer = CudaTransfer(self.device, decode_on)
        self.host = HostTier(host_budget_bytes) if self.transfer is not None and host_budget_bytes > 0 else None
        self.slabs = SlabPool(self.budget_bytes) if self.transfer is None and placement is None else None
        self.stats = RuntimeStats()
        self._tables: dict[int, ResidentTable] = {}  # layer -> its ready native experts (resident_table)
        self._native = None  # NativeMisses, once native_misses() has made it
        self._native_checked = False
        self.native_allowed = True  # False: every miss on the Python path (A/B runs; PRISM_NATIVE_MISSES=0 too)
        self.drop_read_pages = False  # benchmarks of disk reads: the native path's reads leave the page cache
        self.native_split_bytes = NATIVE_SPLIT_BYTES  # the native path's reads from this size up: every thread
        # a list to have every layer step's real routing appended, (layer, experts), in the order the cache saw
        # them (bench/bench_runtime.py replays it against an oracle); None: not recorded
        self.route_log: list[tuple[int, tuple[int, ...]]] | None = None
        if pin_hot not in (True, False, "pin", "warm", "off"):
            raise BudgetError(f"pin_hot={pin_hot!r}: expected 'warm', True / 'pin', or False / 'off'")
        permanent = pin_hot in (True, "pin")
        hot = self._load_hot(permanent) if pin_hot not in (False, "off") else []
        self.pinned_keys: list[Key] = hot if permanent else []  # never evicted
        self.warm_keys: list[Key] = [] if permanent else hot  # loaded at construction, evictable
        self.reset_stats()

    # -- the ExpertSource side -------------------------------------------------------------------------
    def acquire(self, layer: int, expert_ids: list[int]) -> Mapping[int, ExpertWeights]:
        """The real routing of one layer step: settles predictions, then returns {expert: weights}: a plain
        dict with every expert pinned when all are resident, else a lease that loads each on access (without a
        fetch worker, a lease that holds the step has loaded them by then)."""
        with self._lock:
            self._release_locked()
            self._route_arrived(layer, expert_ids)
            found = [self._entries.get((layer, e)) for e in expert_ids]
            if all(entry is not None and entry.ready for entry in found):
                pins = self._pins.setdefault(threading.get_ident(), [])
                self._count_hits(layer, len(found))
                for entry in found:
                    entry.pins += 1
                    pins.append(entry)
                    self._mark_used(entry)
                    self.policy.touch(entry)
                out = {e: entry.weights for e, entry in zip(expert_ids, found)}
            else:
                out = None
                if self.worker is not None:  # the worker loads the rest while this thread loads the first
                    missing = [e for e, entry in zip(expert_ids, found) if entry is None]
                    if len(missing) > 1:
                        self.worker.submit(layer, missing[1:], predicted=False)
        if out is None:
            # the lease keeps every expert it hands out pinned until this thread's next acquire where the budget
            # holds them all at once (a native expert block runs them together); else one at a time
            lease = ExpertLease(self, layer, expert_ids, len(expert_ids) * self.largest_bytes <= self.budget_bytes)
            if lease.holds and self.worker is None:
                self._serve_now(lease)
            return lease
        if self.transfer is not None:
            for entry in found:
                if entry.event is not None:
                    self.transfer.ready_for_compute(entry.weights, entry.event)
        return out

    def resident_table(self, layer: int) -> ResidentTable | None:
        """The layer's ready experts as a resident table the native decode loop reads (decode_layer.c: a layer whose
        routed experts are all in it runs without a callback into Python; its hits are logged and counted by
        record_hits). None where the loop must call back for every layer: a fetch worker (prefetch, whose
        predictions are settled at each acquire), a CUDA tier, or no native kernels."""
        if self.worker is not None or self.transfer is not None or self.device.type != "cpu":
            return None
        from ..native import available

        if not available():
            return None
        with self._lock:
            table = self._tables.get(layer)
            if table is None:
                table = self._tables[layer] = ResidentTable(self.store.num_experts)
                for (i, _), entry in self._entries.items():
                    if i == layer and entry.ready:
                        self._publish(entry)
                if self._native is not None:
                    self._native.set_table(layer, table)
            return table

    def native_misses(self):
        """The native miss path's state (runtime/native_misses.py) where this cache qualifies, else None: resident
        tables (resident_table), CPU slabs, eviction by next use, a store that reads experts straight into slabs
        (ContainerStore.native_read), checksums not checked on every read, a budget that holds a layer step's
        experts beside the permanent ones, and PRISM_NATIVE_MISSES not 0. Made once."""
        from .native_misses import NativeMisses, enabled

        with self._lock:
            if not self._native_checked:
                self._native_checked = True
                permanent = sum(e.nbytes for e in self._entries.values() if e.permanent)
                if (self.worker is None and self.transfer is None and self.device.type == "cpu" and self.slabs is not None
                        and type(self.policy) is NextUse and hasattr(self.store, "native_read")
                        and getattr(self.store, "verify_checksums", True) != "always"
                        and self.store.top_k * self.largest_bytes <= self.budget_bytes - permanent and enabled()):
                    from ..native import available

                    if available():
                        self._native = NativeMisses(self)
            return self._native

    def record_hits(self, records: list[tuple[int, list[int]]]) -> None:
        """Count layer steps the native loop ran from resident tables, as acquire counts hits: the routing arrived,
        every expert used and touched (eviction order), but no pins (the loop is done with them)."""
        with self._lock:
            plain = self.route_log is None and self.worker is None
            for layer, ids in records:
                if plain and layer not in self._predictions and not self._expected.get(layer):
                    self._plain_hits(layer, ids)
                    continue
                self._route_arrived(layer, ids)
                self._count_hits(layer, len(ids))
                for e in ids:
                    entry = self._entries.get((layer, e))
                    if entry is not None:  # evicted since by another thread: nothing to touch
                        self._mark_used(entry)
                        self.policy.touch(entry)

    def _plain_hits(self, layer: int, ids: list[int]) -> None:
        """Under the lock: record_hits for a step with no prediction or expectation to settle, nothing recording
        routes and no fetch worker (what it does every token without prefetch): the same counts, estimate and
        eviction order as the general path, in fewer steps (it runs for most layers of every token). An expert
        marked expected and used in the same step, as _route_arrived then _mark_used do, ends unexpected."""
        self._count_hits(layer, len(ids))
        self.stats.layer(layer).unpredicted_steps += 1
        self.policy.observe(layer, ids)
        for e in ids:
            entry = self._entries.get((layer, e))
            if entry is not None:  # evicted since by another thread: nothing to touch
                entry.unwanted = False
                self._mark_used(entry)
                self.policy.touch(entry)

    def _count_hits(self, layer: int, n: int) -> None:
        """Under the lock: n uses of the layer's experts, every one a hit (a step whose experts were all ready)."""
        ls = self.stats.layer(layer)
        self.stats.uses += n
        self.stats.hits += n
        ls.uses += n
        ls.hits += n

    def _publish(self, entry: Entry) -> None:
        """Under the lock: a ready expert into its layer's resident table, where there is one and the expert is a
        native block of the table's rounding of x."""
        table = self._tables.get(entry.key[0])
        if table is not None and entry.weights is not None:
            block = entry.weights.block()
            if block is not None:
                table.put(entry.key[1], block)

    def use(self, layer: int, expert: int, lease: ExpertLease | None = None, count: bool = True) -> ExpertWeights:
        """The weights of one expert, pinned to this thread until its next acquire/use or release_thread(); for
        a lease that holds its experts (ExpertLease.holds), until its next acquire or release_thread(), so the
        experts it handed out before stay valid beside this one. count=False: the step's use of it is counted
        already (a lease asked again after letting go of it): it is loaded again if it has gone, uncounted."""
        key = (layer, expert)
        with self._lock:
            if lease is None or not lease.holds:
                self._release_locked()
            st, ls = self.stats, self.stats.layer(layer)
            st.uses += count
            ls.uses += count
            entry = self._entries.get(key)
            if entry is not None and entry.ready:
                st.hits += count
                ls.hits += count
                self._pin_and_touch(entry)
            else:
                st.misses += count
                ls.misses += count
                start = time.perf_counter()
                entry = self._wait_or_reserve(key, lease)
                if entry.ready:
                    self._stalled(ls, start)
        if not entry.ready:  # this thread reserved it: load it now
            self._load_demand(entry, ls, start)
        if entry.event is not None:
            self.transfer.ready_for_compute(entry.weights, entry.event)
        return entry.weights

    def _serve_now(self, lease: ExpertLease) -> None:
        """Serve a holding lease's experts now, in routing order, as its accesses would (the same uses, loads and
        eviction choices, each pinned until this thread's next acquire), in fewer steps: a miss is its reservation
        under one lock, then the demand load every miss takes (_load_demand). Stops at an expert that would wait
        (loading elsewhere, or no room until someone unpins): the lease's accesses serve the rest. Only without
        a fetch worker: with one, the lease loads on access while the worker loads the step's other misses."""
        layer, served = lease._layer, lease._served
        st, ls = self.stats, self.stats.layer(layer)
        for e in lease._ids:
            key = (layer, e)
            with self._lock:
                entry = self._entries.get(key)
                if entry is None:
                    nbytes = self.store.nbytes(layer, e)
                    if not self._make_room(footprint(nbytes), demand=True):
                        return
                    entry = self._add_entry(key, nbytes, prefetched=False)
                    self._pin(entry)
                    st.uses, ls.uses, st.misses, ls.misses = st.uses + 1, ls.uses + 1, st.misses + 1, ls.misses + 1
                    st.demand_loads += 1
                elif entry.ready:
                    self._count_hits(layer, 1)
                    self._pin_and_touch(entry)
                    served[e] = entry.weights
                    continue
                else:
                    return
            self._load_demand(entry, ls, time.perf_counter())
            served[e] = entry.weights

    def release_thread(self) -> None:
        """Unpin the experts this thread used last (the model calls it after every layer)."""
        with self._lock:
            self._release_locked()

    # -- demand path -----------------------------------------------------------------------------------
    def _wait_or_reserve(self, key: Key, lease: ExpertLease | None = None) -> Entry:
        """Under the lock: wait for a load under way, or reserve room and return a loading entry we own. A
        holding lease that must wait for room lets go of its experts first (it stops holding: the caller then
        takes them one at a time), so threads waiting for room never wait on each other's pins."""
        late_counted = False
        while True:
            entry = self._entries.get(key)
            if entry is not None and entry.ready:
                self._pin_and_touch(entry)
                return entry
            if entry is not None:  # the worker or another thread is loading it: wait for it
                if not late_counted and entry.by_worker:
                    self.stats.late_prefetches += 1
                    late_counted = True
                entry.unwanted, entry.expected = False, True
                self._wait()
                continue
            if self.worker is not None:
                self.worker.cancel(key)  # queued but not started: cheaper to load it here than to wait
            nbytes = self.store.nbytes(*key)
            if self._make_room(footprint(nbytes), demand=True):
                entry = self._add_entry(key, nbytes, prefetched=False)
                self._pin(entry)
                self.stats.demand_loads += 1
                return entry
            if lease is not None and lease.holds:
                lease.holds = False
                self._release_locked()
                continue
            self._wait(ROOM_POLL_SECONDS)  # every byte is pinned or loading: wait for an unpin
            self._drop_dead_pins()

    def _wait(self, timeout: float | None = None) -> None:
        self._waiting += 1
        try:
            self._changed.wait(timeout)
        finally:
            self._waiting -= 1

    def _notify(self) -> None:
        if self._waiting:
            self._changed.notify_all()

    def _load_demand(self, entry: Entry, ls, start: float) -> None:
        """Load an entry this thread reserved, then make it ready, used, and the time since `start` a stall of
        its layer (`ls`, the layer's statistics), under one lock; a failed load frees its room and raises."""
        try:
            weights, event, host_hit = self._load(entry)
        except BaseException:
            with self._lock:
                self._remove(entry)
                self._notify()
            raise
        with self._lock:
            self._finish(entry, weights, event, host_hit)
            self._mark_used(entry)
            self._stalled(ls, start)

    def _stalled(self, ls, start: float) -> None:
        seconds = time.perf_counter() - start
        self.stats.stall_seconds += seconds
        ls.stall_seconds += seconds

    # -- loading (outside the lock) --------------------------------------------------------------------
    def _load(self, entry: Entry, prefetch: bool = False) -> tuple[ExpertWeights | None, object, bool]:
        """Host tier or cold read, then decode (+ NUMA placement on the CPU; + pinning, side-stream copy and
        decode on CUDA). A prefetch marked unwanted by then returns (None, None, False) instead of decoding."""
        layer, expert = entry.key
        if self.slabs is not None and getattr(self.store, "reads_into", _never)(layer, expert):  # a read is the load
            # a demand load reads with the compute's threads (it runs on the thread that waits for it, between
            # parallel regions); the fetch worker's reads stay on its own thread, beside the compute
            weights = self.store.read_into(layer, expert, lambda nbytes: self._take_slab(entry, nbytes),
                                           threads=1 if prefetch else torch.get_num_threads())
            with self._lock:
                entry.cold = True
                self.stats.loads += 1
                self.stats.bytes_fetched += entry.stored_nbytes
            self._check_size(entry, weights)
            return weights, None, False
        raw = None
        if self.host is not None:
            with self._lock:
                raw = self.host.get(entry.key)
        host_hit = raw is not None
        if raw is None:
            raw = self.store.fetch(layer, expert)
        with self._lock:
            if not host_hit:
                entry.cold = True
                self.stats.loads += 1
                self.stats.bytes_fetched += entry.stored_nbytes
            if prefetch and entry.unwanted:
                return None, None, False
        event = None
        if self.transfer is not None:
            if not host_hit:
                raw = self.transfer.pin(raw)
                if self.host is not None:
                    with self._lock:
                        self.host.put(entry.key, raw, raw_nbytes(raw))
            weights, event = self.transfer.load(self.store, layer, expert, raw)
        elif self.slabs is not None and hasattr(self.store, "decode_into"):  # decoded straight into its slab
            weights = self.store.decode_into(layer, expert, raw, lambda nbytes: self._take_slab(entry, nbytes).buf)
            self._check_size(entry, weights)
            return weights, event, host_hit
        else:
            weights = self.store.decode(layer, expert, raw)
        del raw
        self._check_size(entry, weights)
        if self.placement is not None and self.transfer is None:
            weights = self.placement.place(entry.key, weights)
        elif self.slabs is not None:
            weights = pack_into(self._take_slab(entry, packed_nbytes(weights)).buf, weights)
        return weights, event, host_hit

    def _take_slab(self, entry: Entry, nbytes: int) -> Slab:
        with self._lock:
            entry.slab = self.slabs.take(nbytes)
        return entry.slab

    def _check_size(self, entry: Entry, weights: ExpertWeights) -> None:
        if weights_nbytes(weights) != entry.decoded_nbytes:
            layer, expert = entry.key
            raise RuntimeError(f"store {type(self.store).__name__}: layer {layer} expert {expert} decodes to "
                               f"{weights_nbytes(weights)} bytes, its nbytes() said {entry.decoded_nbytes}")

    def _finish(self, entry: Entry, weights, event, host_hit: bool) -> None:
        """Under the lock: a load is done; make the entry ready and wake every waiter."""
        entry.weights, entry.event, entry.ready = weights, event, True
        self._publish(entry)
        if self._native is not None:
            self._native.mark(entry)
        self.stats.bytes_decoded += entry.decoded_nbytes
        self.stats.host_hits += host_hit
        if entry.unwanted:  # the real routing disagreed while it loaded: first in line for eviction
            entry.expected = False
            self.policy.demote(entry)
        else:
            self.policy.touch(entry)
        self._notify()

    # -- prefetch hooks (the fetch worker calls these) -------------------------------------------------
    def _start_prefetch(self, key: Key, predicted: bool) -> Entry | None:
        """Under the lock: reserve room for a worker load, or None. A prediction may not evict an expected
        expert; a load of the current step (predicted=False) may, as a demand load would."""
        if key in self._entries:
            self.stats.prefetch_skipped += 1
            return None
        nbytes = self.store.nbytes(*key)
        if not self._make_room(footprint(nbytes), demand=not predicted):
            self.stats.prefetch_no_room += 1
            return None
        if predicted:
            self.stats.prefetch_loads += 1
        else:
            self.stats.ahead_loads += 1
        entry = self._add_entry(key, nbytes, prefetched=predicted)
        entry.expected = entry.by_worker = True
        return entry

    def _run_prefetch(self, entry: Entry) -> None:
        """Outside the lock: load a reserved entry; drop it if it became unwanted after its read."""
        try:
            weights, event, host_hit = self._load(entry, prefetch=True)
        except Exception:  # noqa: BLE001 - a failed prefetch is not an error; a demand load will raise it
            weights = None
        with self._lock:
            if weights is None:
                if entry.unwanted:
                    self.stats.prefetch_aborted += 1
                    self.stats.wasted_bytes += entry.stored_nbytes if entry.cold else 0
                self._remove(entry)
                self._notify()
                return
            self._finish(entry, weights, event, host_hit)

    def prefetch(self, layer: int, expert_ids: list[int]) -> None:
        """Predicted experts of `layer`'s next step, most likely first: fetched in the background. A newer
        prediction supersedes the layer's older one (queued fetches cancelled, others deprioritised)."""
        with self._lock:
            self._release_locked()
            ids = set(expert_ids)
            self._predictions[layer] = ids
            for e in list(self._expected.get(layer, ())):
                if e not in ids:
                    self._unexpect(layer, e)
            for e in expert_ids:
                self._expect(layer, e)
            if self.worker is not None:
                self.worker.submit(layer, expert_ids, predicted=True)

    # -- routing bookkeeping ---------------------------------------------------------------------------
    def _route_arrived(self, layer: int, expert_ids: list[int]) -> None:
        if self.route_log is not None:
            self.route_log.append((layer, tuple(expert_ids)))
        ids = set(expert_ids)
        ls = self.stats.layer(layer)
        predicted = self._predictions.pop(layer, None)
        if predicted is None:
            ls.unpredicted_steps += 1
        else:
            ls.predicted_steps += 1
            ls.predicted += len(predicted)
            ls.actual += len(ids)
            ls.correct += len(predicted & ids)
        if self.worker is not None:
            self.worker.retain(layer, ids)
        for e in list(self._expected.get(layer, ())):
            if e not in ids:
                self._unexpect(layer, e)
        for e in ids:
            self._expect(layer, e)
        self.policy.observe(layer, ids)

    def _expect(self, layer: int, e: int) -> None:
        self._expected.setdefault(layer, set()).add(e)
        entry = self._entries.get((layer, e))
        if entry is not None:
            entry.expected, entry.unwanted = True, False

    def _unexpect(self, layer: int, e: int) -> None:
        self._expected[layer].discard(e)
        entry = self._entries.get((layer, e))
        if entry is None or not entry.expected:
            return
        entry.expected = False
        if entry.prefetched and not entry.used:
            if entry.ready:
                self.policy.demote(entry)  # never used: first in line for eviction
            else:
                entry.unwanted = True

    # -- entries, pins, priorities ---------------------------------------------------------------------
    def _add_entry(self, key: Key, nbytes: int, prefetched: bool) -> Entry:
        entry = Entry(key, nbytes, self.store.stored_nbytes(*key), prefetched)
        self._entries[key] = entry
        self.layer_entries[key[0]] += 1
        self.used_bytes += entry.nbytes
        if self._native is not None:
            self._native.mark(entry)
        return entry

    def _remove(self, entry: Entry) -> None:
        """Under the lock. Its slab goes back to the pool: nobody holds its weights (an entry is only removed
        unpinned, and weights handed to a thread are valid until its next acquire/use or release_thread)."""
        if self._entries.get(entry.key) is entry:
            del self._entries[entry.key]
            self.layer_entries[entry.key[0]] -= 1
            self.used_bytes -= entry.nbytes
            table = self._tables.get(entry.key[0])
            if table is not None:  # out of the decode loop's reach before its memory can be reused
                table.drop(entry.key[1])
            if self._native is not None:
                self._native.gone(entry.key)
        entry.weights = None
        if entry.slab is not None:
            self.slabs.give(entry.slab)
            entry.slab = None

    def _pin(self, entry: Entry) -> None:
        self._pins.setdefault(threading.get_ident(), []).append(entry)
        entry.pins += 1

    def _pin_and_touch(self, entry: Entry) -> None:
        self._pin(entry)
        self._mark_used(entry)
        self.policy.touch(entry)

    def _mark_used(self, entry: Entry) -> None:
        if entry.prefetched and not entry.used:
            self.stats.prefetch_used += 1
        entry.used, entry.expected = True, False
        expected = self._expected.get(entry.key[0])
        if expected:
            expected.discard(entry.key[1])

    def _release_locked(self) -> None:
        pins = self._pins.pop(threading.get_ident(), None)
        if pins:
            for entry in pins:
                entry.pins -= 1
            self._notify()

    def _drop_dead_pins(self) -> None:
        alive = {t.ident for t in threading.enumerate()}
        for ident in [i for i in self._pins if i not in alive]:
            for entry in self._pins.pop(ident):
                entry.pins -= 1

    def _make_room(self, nbytes: int, demand: bool) -> bool:
        """Under the lock: evict until nbytes more fit. A prefetch may not evict an expected expert; a demand
        load evicts expected ones only when nothing else is free."""
        while self.used_bytes + nbytes > self.budget_bytes:
            victim = self.policy.victim(demand)
            if victim is None:
                return False
            self._evict(victim)
        return True

    def _evict(self, entry: Entry) -> None:
        self._remove(entry)
        self.policy.evicted(entry)
        self.stats.evictions += 1
        if entry.prefetched and not entry.used and entry.cold:
            self.stats.wasted_bytes += entry.stored_nbytes

    def _load_hot(self, permanent: bool) -> list[Key]:
        """Load the hot tier (hottest first) while it leaves room for two layer steps' experts."""
        hot = sorted((k for k in self.keys if self.store.hot(*k)), key=lambda k: -self._prior[k])
        room = self.budget_bytes - 2 * self.store.top_k * self.largest_bytes
        pinned = []
        for key in hot:
            nbytes = self.store.nbytes(*key)
            if self.used_bytes + footprint(nbytes) > room:
                break
            entry = self._add_entry(key, nbytes, prefetched=False)
            weights, event, _ = self._load(entry)
            entry.weights, entry.event, entry.ready, entry.permanent = weights, event, True, permanent
            self._publish(entry)
            self.policy.touch(entry)
            pinned.append(key)
        return pinned

    # -- reporting -------------------------------------------------------------------------------------
    def decoded_bytes(self) -> int:
        """Bytes of expert weights the cache holds right now, in the form the tier keeps them (packed by default;
        measured on the tensors themselves)."""
        with self._lock:
            return sum(weights_nbytes(e.weights) for e in self._entries.values() if e.weights is not None)

    def residency(self) -> dict:
        with self._lock:
            return self._residency()

    def _residency(self) -> dict:
        ready = [e for e in self._entries.values() if e.ready]
        out = {
            "budget_bytes": self.budget_bytes,
            "fast_bytes": sum(e.nbytes for e in ready),
            "fast_experts": len(ready),
            "pinned_experts": sum(e.permanent for e in ready),
            "loading_experts": len(self._entries) - len(ready),
            "reserved_bytes": self.used_bytes,
            "cold_experts": len(self.keys) - len(ready),
        }
        if self.host is not None:
            out |= {"host_bytes": self.host.used_bytes, "host_experts": len(self.host.entries),
                    "host_budget_bytes": self.host.budget_bytes}
        return out

    def resident_keys(self) -> set[Key]:
        with self._lock:
            return {k for k, e in self._entries.items() if e.ready}

    def snapshot(self) -> dict:
        with self._lock:
            return self.stats.to_dict() | {"residency": self._residency(), "eviction": self.eviction}

    def reset_stats(self) -> None:
        with self._lock:
            self.stats = RuntimeStats()
            for i in self.store.moe_layers:
                self.stats.layer(i)

    def check(self) -> None:
        """Invariants (tests call it): reserved bytes add up and stay within the budget."""
        with self._lock:
            total = sum(e.nbytes for e in self._entries.values())
            if total != self.used_bytes or self.used_bytes > self.budget_bytes:
                raise AssertionError(f"cache accounting: entries {total}, used {self.used_bytes}, "
                                     f"budget {self.budget_bytes}")
            if Counter(k[0] for k in self._entries) != +self.layer_entries:
                raise AssertionError(f"cache per-layer counts {dict(self.layer_entries)} do not match its entries")
            for layer, table in self._tables.items():  # the native loop's view: exactly the ready native experts
                for e in range(table.num_experts):
                    entry, block = self._entries.get((layer, e)), table.blocks.get(e)
                    ready = entry is not None and entry.ready and entry.weights is not None
                    should = ready and entry.weights.block() is not None and \
                        entry.weights.block().wide == int(table.table[0])
                    held = table.pointers(e)
                    if (block is not None) != should or (block is not None and (
                            block is not entry.weights.block() or held != block.addresses)) or \
                            (block is None and any(held)):
                        raise AssertionError(f"resident table of layer {layer}: expert {e} is "
                                             f"{'in' if block is not None else 'out'} (pointers {held}), "
                                             f"its entry {'ready' if ready else 'not ready'}")
            if self.slabs is not None:  # every slab is an entry's or free
                held = sum(e.slab.nbytes for e in self._entries.values() if e.slab is not None)
                free = sum(size * len(spare) for size, spare in self.slabs.free.items())
                if held + free != self.slabs.total_bytes:
                    raise AssertionError(f"slab pool: {self.slabs.total_bytes:,} bytes, entries hold {held:,} and "
                                         f"{free:,} are free")
            if self._native is not None:
                self._native.check()


class ExpertLease(Mapping):
    """What acquire returns when an expert is missing: {expert: weights}, each loaded (and pinned) on access.
    holds: every expert handed out stays pinned until the thread's next acquire (the budget holds them all
    at once), so they may be used together; False (a budget below the step's experts, or given up to make
    room): only the last one handed out is pinned, so each must be used before the next is asked for
    (MoEBlock.native_blocks checks, and takes the one-at-a-time path)."""

    __slots__ = ("_cache", "_layer", "_ids", "holds", "_served")

    def __init__(self, cache: ExpertCache, layer: int, ids: list[int], holds: bool = False):
        self._cache, self._layer, self._ids, self.holds = cache, layer, ids, holds
        # expert -> its weights while this lease holds them pinned, None once let go: asked for again (a block
        # path that falls back to running them one at a time), an expert is one use of the step, not two
        self._served: dict[int, ExpertWeights | None] = {}

    def __getitem__(self, expert: int) -> ExpertWeights:
        if expert not in self._ids:
            raise KeyError(expert)
        served = self._served.get(expert)
        if served is not None and self.holds:
            return served
        weights = self._cache.use(self._layer, expert, self, count=expert not in self._served)
        if not self.holds:  # let go (now or before): what it handed out is no longer pinned
            self._served = dict.fromkeys(self._served)
        self._served[expert] = weights if self.holds else None
        return weights

    def __iter__(self):
        return iter(self._ids)

    def __len__(self) -> int:
        return len(self._ids)


class CachedExperts(nn.Module):
    """The ExpertSource a MoEBlock gets: its layer's view of the shared cache."""

    def __init__(self, cache: ExpertCache, num_experts: int):
        super().__init__()
        self.cache, self.num_experts = cache, num_experts

    def acquire(self, layer_index: int, expert_ids: list[int]) -> Mapping[int, ExpertWeights]:
        return self.cache.acquire(layer_index, expert_ids)

    def resident_table(self, layer_index: int):
        return self.cache.resident_table(layer_index)

    def record_hits(self, records: list[tuple[int, list[int]]]) -> None:
        self.cache.record_hits(records)

"""Eviction order of the expert cache: GreedyDual with frequencies (GDSF, Cherkasova 1998).

Each entry has a priority H = L + w * F, set when it is used; the victim is the unpinned entry with the
smallest H, and L (the "clock") rises to the victim's H, so entries not used for a while age out. F is the
expert's expected uses per layer step: the profile's routing frequency, updated by the uses seen so far (a
prior worth PRIOR_STEPS steps). With w = 0 this is LRU; a larger w keeps often-routed experts longer than
rarely routed ones used as recently. It needs one heap, no per-step decay over all experts, and the profile
only enters as F. A prefetched expert that the real routing did not pick is demoted to H = -inf (below
every L + w * F, ties included), so it goes first. w > 0 is the default because it beat plain LRU on the
reference model's hit rate (bench/results/runtime.md and runtime_packed.md: the "plain LRU" rows against
the default cache rows).

Used under the cache's lock; it reads the cache's entries (pins, expected, ready, permanent) but never
changes them.
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter

from .stores import Key
from .tiers import Entry

PRIOR_STEPS = 32  # layer steps the profile's frequency is worth against observed uses


class GreedyDualFrequency:
    def __init__(self, entries: dict[Key, Entry], prior: dict[Key, float], weight: float):
        self.entries, self.prior, self.weight = entries, prior, float(weight)
        self.clock = 0.0  # GreedyDual's L
        self._heap: list[tuple[float, int, Key, int]] = []  # (priority, tie-break, key, entry version)
        self._seq = itertools.count()
        self._layer_steps: Counter[int] = Counter()
        self._key_uses: Counter[Key] = Counter()

    def observe(self, layer: int, expert_ids) -> None:
        """One layer step's real routing (for F)."""
        self._layer_steps[layer] += 1
        for e in expert_ids:
            self._key_uses[(layer, e)] += 1

    def frequency(self, key: Key) -> float:
        """Expected uses per layer step: the prior, updated by the uses seen (PRIOR_STEPS pseudo-steps)."""
        return (self.prior[key] * PRIOR_STEPS + self._key_uses[key]) / (PRIOR_STEPS + self._layer_steps[key[0]])

    def touch(self, entry: Entry) -> None:
        self._set(entry, self.clock + self.weight * self.frequency(entry.key))

    def demote(self, entry: Entry) -> None:
        self._set(entry, float("-inf"))

    def _set(self, entry: Entry, priority: float) -> None:
        if entry.permanent:
            return
        entry.priority, entry.version = priority, entry.version + 1
        heapq.heappush(self._heap, (priority, next(self._seq), entry.key, entry.version))
        if len(self._heap) > 4 * len(self.entries) + 64:  # drop stale heap items now and then
            self._heap = [(e.priority, next(self._seq), e.key, e.version) for e in self.entries.values()
                          if e.ready and not e.permanent]
            heapq.heapify(self._heap)

    def victim(self, demand: bool) -> Entry | None:
        """The unpinned ready entry with the smallest H, taken off the heap. A prefetch (demand=False) may not
        take an expected expert; a demand load takes one only when nothing else is free."""
        skipped, expected = [], None
        victim = None
        while self._heap:
            item = heapq.heappop(self._heap)
            entry = self.entries.get(item[2])
            if entry is None or entry.version != item[3] or not entry.ready or entry.permanent:
                continue  # stale
            if entry.pins:
                skipped.append(item)
            elif entry.expected:
                skipped.append(item)
                if expected is None:
                    expected = entry
            else:
                victim = entry
                break
        if victim is None and demand and expected is not None:
            victim = expected
        for item in skipped:
            if victim is None or item[2] != victim.key:
                heapq.heappush(self._heap, item)
        return victim

    def evicted(self, entry: Entry) -> None:
        self.clock = max(self.clock, entry.priority)

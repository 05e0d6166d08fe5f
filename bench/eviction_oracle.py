"""How far an eviction order is from the oracle: Belady's rule replayed on a cache's recorded routing.

The runtime cannot know the future; replaying what it saw (ExpertCache.route_log) with the future known says how
many of its misses any eviction order could have saved (bench_runtime.py's "eviction against the oracle" table).
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections import Counter, defaultdict

Key = tuple[int, int]


def belady_misses(trace: list[tuple[int, tuple[int, ...]]], nbytes: dict[Key, int], budget: int,
                  resident: set[Key]) -> int:
    """Misses over `trace` of Belady's rule (belady_misses_by_layer, summed)."""
    return sum(belady_misses_by_layer(trace, nbytes, budget, resident).values())


def belady_misses_by_layer(trace: list[tuple[int, tuple[int, ...]]], nbytes: dict[Key, int], budget: int,
                           resident: set[Key]) -> Counter:
    """Misses over `trace` (layer steps: (layer, routed experts)) of a cache of `budget` bytes that starts holding
    `resident` and, on a miss, evicts the expert whose next use is furthest ahead (the larger first among equals):
    Belady's rule, optimal where every expert has the same size. A step's experts stay until the step is over,
    as the runtime's pins keep them, unless the budget cannot hold them all (a prefill step routes to most of
    a layer's experts): then, as the runtime does, they are used one at a time."""
    uses: dict[Key, list[int]] = defaultdict(list)
    for i, (layer, ids) in enumerate(trace):
        for e in ids:
            uses[(layer, e)].append(i)

    def next_use(key: Key, step: int) -> float:
        later = uses[key]
        j = bisect_right(later, step)
        return later[j] if j < len(later) else math.inf

    held = set(resident)
    used = sum(nbytes[k] for k in held)
    misses: Counter = Counter()  # layer -> misses
    for i, (layer, ids) in enumerate(trace):
        step = {(layer, e) for e in ids}
        for e in ids:
            key = (layer, e)
            if key in held:
                continue
            misses[layer] += 1
            while used + nbytes[key] > budget:
                others = [k for k in held if k not in step] or [k for k in held if k != key]
                victim = max(others, key=lambda k: (next_use(k, i), nbytes[k]))
                held.remove(victim)
                used -= nbytes[victim]
            held.add(key)
            used += nbytes[key]
    return misses

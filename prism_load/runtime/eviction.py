"""Eviction orders of the expert cache: the next use (the default), or GreedyDual with frequencies.

NextUse evicts the expert expected to be needed last, bytes weighted. A decode token visits the MoE layers in
a fixed cycle, so an expert's next use is at least its layer's distance ahead in that cycle, plus a whole cycle
for every visit on which it is not routed to; recency alone (LRU and its variants) gets the cycle backwards:
right after a layer runs, the least recently used experts are those of the layer that runs next. Belady's rule
(evict the block used furthest in the future) on an estimate of that future; the estimate of how often an
expert is routed is a decaying average of its layer's steps (recent tokens route alike), started from the
profile's frequency. On the reference model's decode it missed a quarter less often than GreedyDual at a 50%
budget and a sixth at 25%, and on the 583 M model under a 200 MiB memory cap (misses read from disk) decoded 8%
faster (bench/results/runtime_eviction_xeon.md, peer_cap200_eviction_xeon.md; README, "Eviction by next use").
The estimate has no memory of loops (a random model's greedy continuation routes in a cycle of tokens), where
GreedyDual's long memory does as well.

GreedyDualFrequency (GDSF, Cherkasova 1998; eviction="frequency", and "lru" with weight 0): each entry has a
priority H = L + w * F, set when it is used; the victim is the unpinned entry with the smallest H, and L (the
"clock") rises to the victim's H, so entries not used for a while age out. F is the expert's expected uses per
layer step: the profile's routing frequency, updated by the uses seen so far (a prior worth PRIOR_STEPS steps).
With w = 0 this is LRU; a larger w keeps often-routed experts longer than rarely routed ones used as recently
(every H is a multiple of w, so any w > 0 orders entries alike: the weight is a switch between LRU and GDSF). It
needs one heap, no per-step decay over all experts, and the profile only enters as F. A prefetched expert that the
real routing did not pick is demoted to H = -inf (below every L + w * F, ties included), so it goes first.

Both policies are used under the cache's lock; they read the cache's entries (pins, expected, ready, permanent)
but never change them. The interface: observe (a layer step's real routing), touch (an entry used or loaded),
demote (a prefetch the routing did not confirm: evicted first), victim, evicted.
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter

import numpy as np

from ..errors import BudgetError
from .stores import Key
from .tiers import Entry

PRIOR_STEPS = 32  # layer steps the profile's frequency is worth against observed uses
POLICIES = ("next-use", "frequency", "lru")
ROUTING_DECAY = 0.85  # NextUse: the routing estimate's weight on the past per layer step (about seven tokens)
MIN_ROUTING = 1e-3  # NextUse: an expert never routed to is still expected back, after 1 / MIN_ROUTING cycles
RESCALE_BELOW = 1e-200  # NextUse: a layer's scale is folded into its levels before it underflows


def eviction_policy(name: str, entries: dict[Key, Entry], prior: dict[Key, float], layers: tuple[int, ...],
                    num_experts: int, frequency_weight: float = 1.0):
    """The cache's eviction order by name (POLICIES); BudgetError naming the choices for another, or for a
    frequency_weight given to a policy that has none (only 'frequency' weighs frequencies)."""
    if frequency_weight != 1.0 and name != "frequency":
        raise BudgetError(f"frequency_weight={frequency_weight!r} applies to eviction='frequency' (GreedyDual with "
                          f"frequencies), not eviction={name!r}; eviction='lru' is plain LRU")
    if name == "next-use":
        return NextUse(entries, prior, layers, num_experts)
    if name in ("frequency", "lru"):
        return GreedyDualFrequency(entries, prior, frequency_weight if name == "frequency" else 0.0)
    raise BudgetError(f"eviction={name!r}: expected one of {', '.join(repr(p) for p in POLICIES)}")


class NextUse:
    """Belady's rule on an estimate (see the module's docstring): the victim maximises
    bytes * (d + n * (1 - p) / p), the expected layer steps until the expert's next use times what evicting it
    frees, where n is the number of MoE layers, d the steps until its layer runs again (n for the layer running
    now) and p the estimated share of its layer's steps that route to it."""

    def __init__(self, entries: dict[Key, Entry], prior: dict[Key, float], layers: tuple[int, ...], num_experts: int):
        self.entries = entries
        self.position = {layer: i for i, layer in enumerate(layers)}
        self.layers, n = tuple(layers), len(layers)
        # the routing estimate p of each expert is level * scale of its layer: a step decays its layer's row by
        # multiplying one scale, and adds to its routed experts' levels (a few scalar writes, no array operation)
        prior_rows = [[prior[(layer, e)] for e in range(num_experts)] for layer in layers]
        self.level = np.clip(np.array(prior_rows, dtype=np.float64), MIN_ROUTING, 1.0)
        self.scale = np.ones((n, 1))
        # per expert: its bytes while it is a candidate (touched, not evicted since), -1 while it is not (a score
        # below every candidate's), inf while demoted (first whatever its estimate)
        self.weight = np.full((n, num_experts), -1.0)
        # offset[i]: d - n for every layer position after a step of layer position i, [n, 1] (d + n (1 - p) / p is
        # d - n + n / p)
        ahead = (np.arange(n)[None, :] - np.arange(n)[:, None]) % n
        self.offset = (np.where(ahead == 0, n, ahead) - n).astype(np.float64)[:, :, None]
        self.current = n - 1  # position of the layer stepped last: before the first step, the first is next
        self.decay = ROUTING_DECAY  # the estimate's weight on the past per layer step (bench/eviction_replay.py varies it)

    @property
    def routing(self) -> np.ndarray:
        """[layer position, expert]: the estimated share of its layer's steps that route to each expert."""
        return self.level * self.scale

    def observe(self, layer: int, expert_ids) -> None:
        """One layer step's real routing: p <- decay * p + (1 - decay) * routed, for the layer's experts."""
        i = self.position[layer]
        self.current = i
        scale = float(self.scale[i, 0]) * self.decay
        if scale < RESCALE_BELOW:  # fold the scale into the levels before it underflows
            self.level[i] *= scale
            scale = 1.0
        self.scale[i, 0] = scale
        add = (1.0 - self.decay) / scale
        level = self.level[i]
        for e in expert_ids:
            level[e] += add

    def touch(self, entry: Entry) -> None:
        if not entry.permanent:
            self.weight[self.position[entry.key[0]], entry.key[1]] = entry.nbytes

    def demote(self, entry: Entry) -> None:
        if not entry.permanent:
            self.weight[self.position[entry.key[0]], entry.key[1]] = np.inf

    def expected_steps(self) -> np.ndarray:
        """[layer position, expert]: the expected layer steps until each expert's next use, from now."""
        steps = self.level * self.scale  # p: at most 1 (a decaying average of 0s and 1s from a prior clipped to 1)
        np.maximum(steps, MIN_ROUTING, out=steps)
        np.divide(len(self.layers), steps, out=steps)
        steps += self.offset[self.current]
        return steps

    def victim(self, demand: bool) -> Entry | None:
        """The candidate with the largest bytes-weighted expected steps to its next use (demoted ones first)
        that is ready, unpinned and not expected; a demand load takes an expected one only when nothing else is
        free (as GreedyDualFrequency.victim)."""
        score = self.expected_steps()
        score *= self.weight
        flat = score.ravel()  # taken largest first (argmax: the first of equals), each struck off when looked at:
        expected = None  # usually the first is free, so this is one pass over the experts, not a sort
        while True:
            best = int(flat.argmax())
            if flat[best] < 0:  # no candidate left
                break
            flat[best] = -1.0
            i, e = divmod(best, self.weight.shape[1])
            entry = self.entries.get((self.layers[i], e))
            if entry is None or not entry.ready or entry.permanent:
                self.weight[i, e] = -1.0  # gone, or not a candidate: touch puts it back
                continue
            if entry.pins:
                continue
            if entry.expected:
                if expected is None:
                    expected = entry
                continue
            return entry
        return expected if demand else None

    def evicted(self, entry: Entry) -> None:
        self.weight[self.position[entry.key[0]], entry.key[1]] = -1.0


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

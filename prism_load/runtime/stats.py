"""Runtime counters: cache hits and misses, stalls, prefetch quality, bytes moved.

Every counter is changed under the cache's lock, so a snapshot taken under it adds up:
hits + misses == uses (an expert use is one expert of one layer step, as the router picked it);
on the CPU loads == demand_loads + prefetch_loads + ahead_loads, and bytes_fetched is the sum of the stored
bytes of every load that read the cold tier (on CUDA, host-tier hits read no cold bytes). Prefetch quality is
counted per layer step that had a prediction: precision = correct / predicted, recall = correct / actual.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class LayerStats:
    uses: int = 0
    hits: int = 0
    misses: int = 0
    stall_seconds: float = 0.0
    predicted_steps: int = 0  # layer steps that had a prediction when the real routing arrived
    unpredicted_steps: int = 0
    predicted: int = 0  # experts predicted over those steps
    actual: int = 0  # experts used over those steps
    correct: int = 0  # predicted and used

    @property
    def precision(self) -> float | None:
        return self.correct / self.predicted if self.predicted else None

    @property
    def recall(self) -> float | None:
        return self.correct / self.actual if self.actual else None


@dataclass
class RuntimeStats:
    uses: int = 0
    hits: int = 0
    misses: int = 0
    host_hits: int = 0  # fast-tier misses served from the host tier (CUDA)
    late_prefetches: int = 0  # misses that waited on a load the fetch worker had under way
    stall_seconds: float = 0.0  # time the compute waited for experts (misses)
    loads: int = 0  # reads of the cold tier
    demand_loads: int = 0  # loads started by a miss, on the compute thread
    native_loads: int = 0  # of those, served inside the native decode loop (runtime/native_misses.py)
    prefetch_loads: int = 0  # loads of predicted experts, on the fetch worker
    ahead_loads: int = 0  # a step's other missing experts, loaded by the worker while the compute loads one
    bytes_fetched: int = 0  # stored bytes read from the cold tier
    bytes_decoded: int = 0  # decoded bytes put in the fast tier
    evictions: int = 0
    prefetch_requested: int = 0  # experts submitted to the fetch worker
    prefetch_cancelled: int = 0  # dropped before they started (superseded, or the real routing disagreed)
    prefetch_aborted: int = 0  # started, then dropped between read and decode
    prefetch_skipped: int = 0  # already resident or loading when requested
    prefetch_no_room: int = 0  # no victim the prefetch was allowed to evict
    prefetch_used: int = 0  # prefetched experts used at least once
    wasted_bytes: int = 0  # stored bytes of prefetches never used (evicted or aborted unused)
    layers: dict[int, LayerStats] = field(default_factory=dict)

    def layer(self, index: int) -> LayerStats:
        s = self.layers.get(index)
        if s is None:
            s = self.layers[index] = LayerStats()
        return s

    def to_dict(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k != "layers"}
        predicted = sum(s.predicted for s in self.layers.values())
        actual = sum(s.actual for s in self.layers.values())
        correct = sum(s.correct for s in self.layers.values())
        out["hit_rate"] = self.hits / self.uses if self.uses else None
        out["prefetch_predicted"], out["prefetch_actual"], out["prefetch_correct"] = predicted, actual, correct
        out["prefetch_precision"] = correct / predicted if predicted else None
        out["prefetch_recall"] = correct / actual if actual else None
        out["layers"] = {
            i: {**asdict(s), "precision": s.precision, "recall": s.recall}
            for i, s in sorted(self.layers.items())
        }
        return out

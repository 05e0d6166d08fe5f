"""Prefetch: guess the next MoE layer's experts from the current hidden state and load them in the background.

The shadow router (the speculative prefetch of mixtral-offloading, Eliseev & Mazur 2023, there described
but not shipped): after layer i, layer j's router (j the next MoE layer) is applied to layer j's
post-attention norm of the hidden state leaving layer i. The residual stream changes little across one
layer, so its top-k is a good guess of the experts layer j will pick; `extra` adds the next most likely.
Only decode steps (at most `max_tokens` token rows) are predicted: a prefill routes to nearly every expert.

A fetch is cancelled while it waits in the queue when a newer prediction for its layer drops it or the
layer's real routing disagrees; once started it is marked unwanted instead, dropped after its read (before
the decode), or, if already decoded, put first in line for eviction. Its bytes count as wasted.

Prefetch pays where a miss can run beside the compute: a GPU (copy and decode on a side stream), a cold
tier that waits on a disk, or a spare CPU core. On a CPU the worker's decode is one TorchScript kernel call
per expert (prism_load/kernels.py), which runs without the interpreter lock, so the compute thread keeps
most of its speed while the worker decodes; its remaining cost is the Python around each load (read,
bookkeeping). bench/results/runtime.md measures prefetch against on-demand loads, and the overlap probe
measures what a decoding thread and a decoding process cost the compute.
"""

from __future__ import annotations

import math
import threading
from collections import deque

import torch
import torch.nn.functional as F

from .stores import Key


class FetchJob:
    __slots__ = ("key", "predicted", "state")

    def __init__(self, key: Key, predicted: bool):
        self.key, self.predicted, self.state = key, predicted, "queued"  # queued -> running | cancelled


class FetchWorker:
    """Background thread(s) loading experts into the cache: predicted experts (back of the queue) and the
    current step's other missing experts (front of the queue). The queue lives under the cache's lock, with
    its own condition: every method but close() is called with the lock held (from acquire, use, prefetch)."""

    def __init__(self, cache, threads: int = 1, cpus: set[int] | None = None):
        self.cache = cache
        self._work = threading.Condition(cache._lock)
        self.cpus = cpus  # run the worker on these CPUs (NUMA: the compute node, so first touches land there)
        self._queue: deque[FetchJob] = deque()
        self._queued: dict[Key, FetchJob] = {}
        self._closed = False
        cache.worker = self
        self._threads = [threading.Thread(target=self._loop, name=f"prism-fetch-{n}", daemon=True)
                         for n in range(threads)]
        for t in self._threads:
            t.start()

    # -- called with the cache lock held ---------------------------------------------------------------
    def submit(self, layer: int, expert_ids: list[int], predicted: bool) -> None:
        """Queue experts of one layer (most likely first). A prediction supersedes the layer's queued ones."""
        if self._closed:
            return
        if predicted:
            self.retain(layer, set(expert_ids))
        stats = self.cache.stats
        ahead = []
        for e in expert_ids:
            key = (layer, e)
            stats.prefetch_requested += 1
            if key in self._queued or key in self.cache._entries:
                stats.prefetch_skipped += 1
                continue
            job = self._queued[key] = FetchJob(key, predicted)
            if predicted:
                self._queue.append(job)
            else:
                ahead.append(job)
        self._queue.extendleft(reversed(ahead))  # needed now: before any prediction
        self._work.notify(len(self._threads))

    def cancel(self, key: Key) -> None:
        job = self._queued.pop(key, None)
        if job is not None:
            job.state = "cancelled"
            self.cache.stats.prefetch_cancelled += 1

    def retain(self, layer: int, keep: set[int]) -> None:
        """Cancel the layer's queued predictions for experts not in `keep`."""
        for key, job in list(self._queued.items()):
            if key[0] == layer and key[1] not in keep and job.predicted:
                self.cancel(key)

    def queued(self) -> int:
        return len(self._queued)

    # -- the worker thread -----------------------------------------------------------------------------
    def _loop(self) -> None:
        torch.set_num_threads(1)  # this thread's decodes use one core; the compute keeps its own threads
        if self.cpus:
            from .numa import bind_thread

            bind_thread(self.cpus)
        while True:
            with self._work:
                while not self._closed and not self._queue:
                    self._work.wait()
                if self._closed:
                    return
                job = self._queue.popleft()
                if job.state != "queued":
                    continue
                del self._queued[job.key]
                job.state = "running"
                entry = self.cache._start_prefetch(job.key, job.predicted)
            if entry is not None:
                self.cache._run_prefetch(entry)

    def close(self) -> None:
        with self._work:
            self._closed = True
            for job in self._queued.values():
                job.state = "cancelled"
            self._queued.clear()
            self._queue.clear()
            self._work.notify_all()
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout=10)


class ShadowRouter:
    """model.layer_hook part: after layer i, predict the next MoE layer's experts (and, with lookahead 2, the
    one after: more time to fetch, a worse guess, superseded by the next layer's own prediction).

    For softmax-top-k routers behind an RMSNorm the prediction is one matmul: RMSNorm scales each row by a
    positive number and softmax keeps the order of the logits, so top-k(softmax(W (g * x / rms(x)))) ranks
    experts like (W * g) x, with W * g computed once. Other routers (sigmoid scores with a bias, group limits)
    are applied in full, after the layer's own norm.

    Where a fitted predictor of layer j from the layer the hook runs after exists (predictors: (j, i) ->
    FittedPredictor, runtime/predictor.py), it replaces the router's matrix: logits = P norm_j(x) + b, experts
    picked by the router's own rule (router.select)."""

    def __init__(self, model, cache, extra: int = 0, max_tokens: int = 1, lookahead: int = 1,
                 predictors: dict | None = None):
        self.cache, self.extra, self.max_tokens = cache, extra, max_tokens
        moe = [i for i, _ in model.moe_blocks()]
        self.layers = {layer.index: layer for layer in model.layers}
        self.next_moe = {layer.index: [j for j in moe if j > layer.index][:lookahead] for layer in model.layers}
        # the fitted predictors this lookahead uses: (j, i) with j among the layers predicted after layer i
        self.predictors = {(j, i): p for (j, i), p in (predictors or {}).items() if j in self.next_moe.get(i, ())}
        self.folded = {key: fold_norm(self.layers[key[0]], p) for key, p in self.predictors.items()}
        self.fused = {j: fused_router(self.layers[j]) for j in moe}  # j -> (W * g [E, H] fp32, top_k) or None
        self.num_experts = cache.store.num_experts

    def on_layer(self, index: int, hidden: torch.Tensor) -> bool:
        """Predict and prefetch; False when there is nothing to predict (prefill, last MoE layer, or every
        expert of the layers ahead resident or loading: a guess could not fetch anything)."""
        targets = [j for j in self.next_moe.get(index, ()) if self.cache.layer_entries[j] < self.num_experts]
        rows = hidden.numel() // hidden.shape[-1]
        if not targets or rows > self.max_tokens:
            return False
        x = hidden.reshape(rows, hidden.shape[-1])
        with torch.no_grad():
            for j in targets:  # the nearest layer first: its fetches queue ahead of the farther layer's
                self.cache.prefetch(j, self.predict(j, x, index))
        return True

    def predict(self, j: int, x: torch.Tensor, after: int | None = None) -> list[int]:
        """Experts layer j's router picks for x [N, H] (with layer j's norm), then the `extra` next by logit;
        `after` (the layer x leaves) selects the fitted predictor fitted on that layer's output."""
        fitted = self.predictors.get((j, after))
        fused = self.fused[j]
        if fitted is not None:
            layer = self.layers[j]
            folded = self.folded[(j, after)]
            if folded is not None and x.shape[0] == 1:  # RMSNorm folded in: b + (W * g) x / rms(x) in one addmm
                weight, eps = folded
                xf = x.float()
                scale = 1.0 / math.sqrt(float(torch.linalg.vector_norm(xf)) ** 2 / xf.shape[-1] + eps)
                logits = torch.addmm(fitted.bias, xf, weight.t(), alpha=scale)
            elif folded is not None:
                weight, eps = folded
                xf = x.float()
                logits = torch.addcmul(fitted.bias, F.linear(xf, weight), torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps))
            else:
                logits = F.linear(layer.post_attention_layernorm(x).float(), fitted.weight, fitted.bias)
            indices = layer.mlp.router.select(logits)
        elif fused is not None:
            weight, top_k = fused
            logits = F.linear(x.float(), weight)  # [N, E], each row a positive multiple of the router's logits
            indices = torch.topk(logits, top_k).indices
        else:
            layer = self.layers[j]
            route = layer.mlp.router(layer.post_attention_layernorm(x))
            logits, indices = route.logits, route.indices
        ids = list(dict.fromkeys(indices.flatten().tolist()))
        if self.extra:
            order = torch.argsort(logits.float().amax(0), descending=True).tolist()
            ids += [e for e in order if e not in ids][: self.extra]
        return ids


def fold_norm(layer, fitted) -> tuple[torch.Tensor, float] | None:
    """(predictor weight * norm weight, eps) when layer j's norm is an RMSNorm: the prediction then needs one
    matmul and a row scale instead of the norm module (a few fewer small ops per decode step)."""
    from ..models.layers import RMSNorm

    norm = layer.post_attention_layernorm
    if type(norm) is not RMSNorm:
        return None
    with torch.no_grad():
        return (fitted.weight * norm.weight.float()).contiguous(), float(norm.eps)


def fused_router(layer) -> tuple[torch.Tensor, int] | None:
    """(router weight * norm weight, top_k) where the shortcut ranks experts exactly as the router does."""
    from ..models.layers import RMSNorm
    from ..models.moe import SoftmaxTopKRouter

    router, norm = layer.mlp.router, layer.post_attention_layernorm
    if type(router) is not SoftmaxTopKRouter or type(norm) is not RMSNorm:
        return None
    with torch.no_grad():
        return (router.weight.float() * norm.weight.float()).contiguous(), router.top_k

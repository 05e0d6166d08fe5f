"""Wire the runtime into a model: the shared expert cache behind every MoE block, the fetch worker, the
shadow-router prefetcher on `model.layer_hook`, and `model.stats()` / `model.reset_stats()`."""

from __future__ import annotations

import re
import weakref

import torch

from ..errors import BudgetError
from .cache import CachedExperts, ExpertCache, total_footprint
from .memory import auto_budget, check_fits
from .numa import NumaPlacement, auto_placement
from .prefetch import FetchWorker, ShadowRouter
from .stores import ExpertStore

UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
DEFAULT_HOST_SHARE = 0.5  # CUDA: pinned host tier up to half the available RAM, when not given


def parse_budget(spec, total_bytes: int, what: str = "expert_cache") -> int:
    """Bytes from an int, "50%" (of total_bytes, all experts decoded) or a size like "512MB" / "1.5GiB"."""
    if isinstance(spec, bool):
        raise BudgetError(f"{what}={spec!r}: expected bytes, a percentage like '50%' or a size like '2GB'")
    if isinstance(spec, int):
        value = spec
    else:
        text = str(spec).strip().lower().replace(" ", "")
        if text.endswith("%"):
            try:
                share = float(text[:-1])
            except ValueError:
                share = -1.0
            if not 0 < share <= 100:
                raise BudgetError(f"{what}={spec!r}: a percentage must be in (0, 100]")
            value = int(total_bytes * share / 100)
        else:
            match = re.fullmatch(r"([0-9]*\.?[0-9]+)([a-z]*)", text)
            if match is None or match.group(2) not in UNITS:
                raise BudgetError(f"{what}={spec!r}: expected bytes, a percentage like '50%' or a size like '2GB'")
            value = int(float(match.group(1)) * UNITS[match.group(2)])
    if value <= 0:
        raise BudgetError(f"{what}={spec!r}: must be positive")
    return value


class Runtime:
    """What a model loaded with an expert cache carries as `model.runtime`."""

    def __init__(self, cache: ExpertCache, worker: FetchWorker | None, shadow: ShadowRouter | None,
                 total_expert_bytes: int):
        self.cache, self.worker, self.shadow = cache, worker, shadow
        self.total_expert_bytes = total_expert_bytes

    def on_layer(self, index: int, hidden: torch.Tensor) -> None:
        """model.layer_hook: predict the next MoE layer's experts; the layer's experts are done (unpinned)."""
        if self.shadow is None or not self.shadow.on_layer(index, hidden):  # a prediction also unpins
            self.cache.release_thread()

    @property
    def predicts(self) -> bool:
        """Whether on_layer predicts (prefetch): else it only unpins, which the next acquire does anyway."""
        return self.shadow is not None

    def after_token(self) -> None:
        """A native decode token that skipped on_layer between its layers (nothing predicts): unpin once."""
        self.cache.release_thread()

    def stats(self) -> dict:
        out = self.cache.snapshot()
        out["prefetch"] = self.shadow is not None
        # fitted predictors in use: [predicted MoE layer, the MoE layer it predicts from]
        out["predictor_layers"] = [list(k) for k in sorted(self.shadow.predictors)] if self.shadow is not None else []
        # their weights live beside the model on its device, outside the expert budget (4 E (H + 1) bytes a pair)
        out["predictor_bytes"] = sum(p.weight.nbytes + p.bias.nbytes for p in self.shadow.predictors.values()) \
            if self.shadow is not None else 0
        out["expert_bytes_total"] = self.total_expert_bytes
        placement = self.cache.placement
        if placement is not None:
            out["numa"] = {"compute_node": placement.compute, "local_experts": len(placement.local_keys),
                           "placed_bytes": dict(placement.placed_bytes)}
        return out

    def reset_stats(self) -> None:
        self.cache.reset_stats()

    def close(self) -> None:
        if self.worker is not None:
            self.worker.close()


def _placement(numa, store: ExpertStore, device) -> NumaPlacement | None:
    if numa is None or numa is False:
        return None
    if isinstance(numa, NumaPlacement):
        return numa if numa.active else None
    if numa is True or numa == "auto":
        return auto_placement(store, device)
    raise BudgetError(f"numa={numa!r}: expected None, True / 'auto', or a NumaPlacement")


def _host_budget(host_cache, store: ExpertStore, device: torch.device) -> int:
    """CUDA only: bytes of stored (encoded) experts the pinned host tier may hold."""
    if device.type != "cuda":
        return 0
    stored = sum(store.stored_nbytes(i, e) for i in store.moe_layers for e in range(store.num_experts))
    if host_cache is not None:
        return 0 if host_cache == 0 else parse_budget(host_cache, stored, "host_cache")
    import os

    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return min(stored, int(available * DEFAULT_HOST_SHARE))


def attach_runtime(model, store: ExpertStore, expert_cache="50%", device="cpu", *, prefetch: bool = True,
                   prefetch_extra: int = 0, lookahead: int = 1, numa=None, host_cache=None,
                   eviction: str = "next-use", frequency_weight: float = 1.0, pin_hot: bool | str = "warm",
                   decode_on: str = "device",
                   predictors: dict | None = None) -> Runtime:
    """Put every MoE block's experts behind one ExpertCache over `store`; returns model.runtime.
    expert_cache: the fast tier's budget (bytes, "50%" of all decoded expert bytes, "2GB", or "auto": what this
    process may still take on the device, less a reserve, runtime/memory.py); host_cache (CUDA):
    the pinned tier's budget of stored bytes ("100%" of the container's expert bytes by default, at most
    half the free RAM); lookahead: MoE layers predicted ahead (1 or 2); predictors: fitted predictors by (MoE
    layer, source MoE layer) (runtime/predictor.py), used instead of the shadow router right after the source."""
    device = torch.device(device)
    total = total_footprint(store)
    if lookahead not in (1, 2):
        raise BudgetError(f"lookahead={lookahead!r}: expected 1 or 2 layers")
    placement = _placement(numa, store, device)
    if expert_cache == "auto":  # what this process may still take (runtime/memory.py), less a reserve
        budget, how = auto_budget(device, total)
    else:
        budget, how = parse_budget(expert_cache, total), None
        check_fits(min(budget, total), device, f"expert_cache={expert_cache!r}: the cache",
                   "Give a smaller budget, or expert_cache='auto' (what is left, less a reserve).")
    container = getattr(store, "container", None)
    if container is not None:  # a cache's loads read experts in routing order: random accesses of the shards
        container.read_randomly()
    try:
        cache = ExpertCache(store, budget, device, eviction=eviction, frequency_weight=frequency_weight,
                            pin_hot=pin_hot,
                            host_budget_bytes=_host_budget(host_cache, store, device), placement=placement,
                            decode_on=decode_on)
    except BudgetError as e:
        if how is None:
            raise
        raise BudgetError(f"{how}: {e}") from None
    for _, block in model.moe_blocks():
        block.experts = CachedExperts(cache, store.num_experts)
    worker = shadow = None
    if prefetch:
        cpus = None
        if placement is not None:
            cpus = set(placement.topology.node(placement.compute).cpus)
        worker = FetchWorker(cache, cpus=cpus)
        shadow = ShadowRouter(model, cache, extra=prefetch_extra, lookahead=lookahead,
                              predictors={key: p.to(device) for key, p in (predictors or {}).items()})
        weakref.finalize(model, worker.close)
    runtime = Runtime(cache, worker, shadow, total)
    model.runtime = runtime  # MoEForCausalLM.runtime; model.stats() and model.reset_stats() are the runtime's
    model.layer_hook = runtime.on_layer
    return runtime


"""Expert stores: the cold tier behind the expert cache. A store reads one expert and decodes it.

The cache needs four things of a store (`ExpertStore`): the decoded size of an expert before it loads it
(to keep its byte budget), the stored size (bytes read from the cold tier), a prior of how often the expert is
routed to (the profile's frequency), and the two load phases. Loading is split in `fetch` (read the stored
bytes) and `decode` (turn them into ExpertWeights) so a prefetch that is no longer wanted can be dropped
between the two. Every store is safe to call from several threads at once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import torch

from ..container.codecs import CodesLinear, LowRankLinear
from ..container.format import aligned
from ..models.moe import ExpertWeights

Key = tuple[int, int]  # (layer index, expert index)


class ExpertStore(Protocol):
    num_experts: int
    top_k: int
    moe_layers: tuple[int, ...]
    dtype: torch.dtype

    def nbytes(self, layer: int, expert: int) -> int:
        """Exact bytes of the ExpertWeights in the form the fast tier holds them (what the expert costs there)."""

    def stored_nbytes(self, layer: int, expert: int) -> int:
        """Bytes one fetch reads from the cold tier."""

    def frequency(self, layer: int, expert: int) -> float | None:
        """Share of the layer's tokens routed to the expert in calibration (sums to top_k); None if unknown."""

    def hot(self, layer: int, expert: int) -> bool:
        """Whether the container puts the expert in its hot tier (loaded at load time, pinned with pin_hot=True)."""

    def fetch(self, layer: int, expert: int) -> Any:
        """Read the expert's stored form: tensors (a uint8 tensor, ExpertWeights or a dict of them) that the
        CUDA path may pin and copy to the device as they are."""

    def decode(self, layer: int, expert: int, raw: Any) -> ExpertWeights:
        """Decoded weights on raw's device, in fresh memory that nothing else references."""

    def load(self, layer: int, expert: int) -> ExpertWeights:
        """Both phases: the cold read, then the decode."""

    def reads_into(self, layer: int, expert: int) -> bool:
        """Whether read_into(layer, expert, take_buffer, threads=1) serves the expert: its fast-tier form is its
        stored bytes, read straight into the buffer the cache gives (by `threads` OpenMP threads where large)."""


def load(store: ExpertStore, layer: int, expert: int) -> ExpertWeights:
    """Both phases: the cold read, then the decode."""
    return store.decode(layer, expert, store.fetch(layer, expert))


class StoreBase:
    """`load` and `reads_into` for the stores below."""

    def load(self, layer: int, expert: int) -> ExpertWeights:
        return self.decode(layer, expert, self.fetch(layer, expert))

    def reads_into(self, layer: int, expert: int) -> bool:
        return False


# -- tensors inside ExpertWeights ----------------------------------------------------------------------
def leaf_ops(op) -> list:
    """The leaves of a linear operator, in order: tensors, PackedLinear (prism_load/packed.py) and CodesLinear
    operators, through LowRankLinear (a, b, base) and ConcatLinear (its ops)."""
    if op is None:
        return []
    if isinstance(op, torch.Tensor | CodesLinear) or hasattr(op, "with_tensors"):
        return [op]
    if isinstance(op, LowRankLinear):
        return [leaf for o in (op.a, op.b, op.base) for leaf in leaf_ops(o)]
    if hasattr(op, "ops"):  # ConcatLinear
        return [leaf for o in op.ops for leaf in leaf_ops(o)]
    raise TypeError(f"unknown linear operator {type(op).__name__}")


def op_tensors(op) -> list[torch.Tensor]:
    """Every tensor of a linear operator (a tensor, LowRankLinear, PackedLinear, CodesLinear, ConcatLinear)."""
    out = []
    for leaf in leaf_ops(op):
        if isinstance(leaf, torch.Tensor):
            out.append(leaf)
        elif isinstance(leaf, CodesLinear):
            out += [t for q, sz, _ in leaf.parts for t in (q, sz)]
        else:  # PackedLinear: its backend's tensors
            out += leaf.tensors
    return out


def packed_ops(op) -> list:
    """The PackedLinear operators (prism_load/packed.py) inside a linear operator."""
    return [leaf for leaf in leaf_ops(op) if hasattr(leaf, "with_tensors")]


def map_op(op, fn: Callable[[torch.Tensor], torch.Tensor]):
    """The same operator with every tensor replaced by fn(tensor)."""
    if op is None:
        return None
    if isinstance(op, torch.Tensor):
        return fn(op)
    if isinstance(op, LowRankLinear):
        return LowRankLinear(map_op(op.a, fn), map_op(op.b, fn), map_op(op.base, fn))
    if hasattr(op, "with_tensors"):
        return op.with_tensors(fn(t) for t in op.tensors)
    if isinstance(op, CodesLinear):
        return CodesLinear([(fn(q), fn(sz), g) for q, sz, g in op.parts], op.dtype)
    if hasattr(op, "ops"):
        return type(op)([map_op(o, fn) for o in op.ops])
    raise TypeError(f"unknown linear operator {type(op).__name__}")


def map_raw(raw, fn: Callable[[torch.Tensor], torch.Tensor]):
    """A store's fetched form with every tensor replaced by fn(tensor) (pinning, device copies)."""
    if isinstance(raw, torch.Tensor):
        return fn(raw)
    if isinstance(raw, ExpertWeights):
        return map_weights(raw, fn)
    if isinstance(raw, dict):
        return {k: map_raw(v, fn) for k, v in raw.items()}
    raise TypeError(f"unknown stored form {type(raw).__name__}")


def raw_nbytes(raw) -> int:
    sizes = []
    map_raw(raw, lambda t: sizes.append(t.numel() * t.element_size()) or t)
    return sum(sizes)


def weights_tensors(w: ExpertWeights) -> list[torch.Tensor]:
    return [t for op in (w.gate_up, w.down, w.gate_up_bias, w.down_bias) for t in op_tensors(op)]


def map_weights(w: ExpertWeights, fn: Callable[[torch.Tensor], torch.Tensor]) -> ExpertWeights:
    return ExpertWeights(map_op(w.gate_up, fn), map_op(w.down, fn), map_op(w.gate_up_bias, fn), map_op(w.down_bias, fn))


def weights_nbytes(w: ExpertWeights) -> int:
    if isinstance(w, DeferredViews):  # known from its layout, without building the views
        return w.tensor_nbytes
    return sum(t.numel() * t.element_size() for t in weights_tensors(w))


def _deferred(name: str) -> property:
    return property(lambda self: getattr(self.views(), name), doc=f"the built views' {name}")


class DeferredViews(ExpertWeights):
    """An expert read into a cache slab whose native block (expert_block.c's operators, moved to the slab) is
    ready and whose Python operators are built on first use. Why: the native decode loop runs the block and
    never looks at the operators; building them (a view per stored tensor, an operator per projection) cost a
    few percent of a decode token on the reference model at a 50% cache, for every miss, mostly for nothing.
    `build()` returns the ExpertWeights viewing the slab (with this block); they are built at most once."""

    __slots__ = ("_build", "_views", "tensor_nbytes")

    gate_up, down = _deferred("gate_up"), _deferred("down")
    gate_up_bias, down_bias = _deferred("gate_up_bias"), _deferred("down_bias")

    def __init__(self, build: Callable[[], ExpertWeights], block, tensor_nbytes: int):
        self._build, self._views, self._block, self.tensor_nbytes = build, None, block, tensor_nbytes

    def views(self) -> ExpertWeights:
        if self._views is None:
            self._views = self._build()
            self._views._block = self._block
            self._build = None
        return self._views


TENSOR_ALIGNMENT = 64  # bytes: CPU GEMM kernels round differently on misaligned inputs (see container.reader.owned)


def aligned_nbytes(t: torch.Tensor) -> int:
    return aligned(t.numel() * t.element_size(), TENSOR_ALIGNMENT)


def packed_nbytes(w: ExpertWeights) -> int:
    """Bytes of one buffer holding every tensor of an expert, each 64-byte aligned (pack_into)."""
    return sum(aligned_nbytes(t) for t in weights_tensors(w))


def pack_into(buf: torch.Tensor, w: ExpertWeights) -> ExpertWeights:
    """Copy an expert's tensors into one uint8 buffer (a slab, or NUMA-bound memory); returns views of it.
    copy_ writes the buffer in place: its pages stay where the buffer's allocator put them."""
    offset = 0

    def copy_into(t: torch.Tensor) -> torch.Tensor:
        nonlocal offset
        n = t.numel() * t.element_size()
        view = buf[offset : offset + n].view(t.dtype).view(t.shape)
        view.copy_(t)
        offset += aligned_nbytes(t)
        return view

    return map_weights(w, copy_into)


def _uniform(store) -> float:
    return store.top_k / store.num_experts


# -- stores --------------------------------------------------------------------------------------------
class MemoryStore(StoreBase):
    """Experts held in memory, copied on every load (tests and benchmarks: a cold tier with no I/O).
    `fetch_hook(key)` runs inside fetch (a test can slow it down or make it fail)."""

    def __init__(self, experts: dict[Key, ExpertWeights], num_experts: int, top_k: int,
                 frequencies: dict[Key, float] | None = None, hot: Iterable[Key] = (),
                 fetch_hook: Callable[[Key], None] | None = None):
        self.experts, self.num_experts, self.top_k = experts, num_experts, top_k
        self.moe_layers = tuple(sorted({layer for layer, _ in experts}))
        self.dtype = weights_tensors(next(iter(experts.values())))[0].dtype
        self.frequencies = frequencies or {}
        self.hot_keys = set(hot)
        self.fetch_hook = fetch_hook
        self.fetched: list[Key] = []  # every fetch, in order (list.append is atomic)

    @classmethod
    def from_model(cls, model, **kwargs) -> MemoryStore:
        """Copies of every expert of a resident model (its StackedExperts)."""
        experts = {}
        for i, block in model.moe_blocks():
            weights = block.experts.acquire(i, list(range(block.experts.num_experts)))
            experts.update({(i, e): map_weights(w, lambda t: t.detach().clone()) for e, w in weights.items()})
        return cls(experts, model.args.num_experts, model.args.num_experts_per_tok, **kwargs)

    def nbytes(self, layer, expert):
        return weights_nbytes(self.experts[(layer, expert)])

    def stored_nbytes(self, layer, expert):
        return self.nbytes(layer, expert)

    def frequency(self, layer, expert):
        return self.frequencies.get((layer, expert))

    def hot(self, layer, expert):
        return (layer, expert) in self.hot_keys

    def fetch(self, layer, expert):
        if self.fetch_hook is not None:
            self.fetch_hook((layer, expert))
        self.fetched.append((layer, expert))
        return self.experts[(layer, expert)]

    def decode(self, layer, expert, raw):
        return map_weights(raw, lambda t: t.clone())


class CheckpointStore(StoreBase):
    """Experts of a Hugging Face checkpoint folder, read through the family's `expert_tensors` (memory-mapped
    safetensors; the page cache is the cold tier). Frequencies come from an optional prism profile."""

    def __init__(self, ckpt, family, args, dtype: torch.dtype = torch.float32,
                 frequencies: dict[Key, float] | None = None):
        self.ckpt, self.family, self.args, self.dtype = ckpt, family, args, dtype
        self.num_experts, self.top_k = args.num_experts, args.num_experts_per_tok
        self.moe_layers = tuple(args.moe_layers)
        self.frequencies = frequencies or {}
        self._lock = threading.Lock()  # Checkpoint caches safe_open handles in a plain dict
        h, inter = args.hidden_size, args.moe_intermediate_size
        self._numel = 3 * h * inter + (2 * inter + h if self._has_bias() else 0)

    def _has_bias(self) -> bool:
        with torch.device("meta"):
            return hasattr(self.family.build_layer(self.args, self.moe_layers[0]).mlp.experts, "gate_up_bias")

    def nbytes(self, layer, expert):
        return self._numel * self.dtype.itemsize

    def stored_nbytes(self, layer, expert):
        return self.nbytes(layer, expert)

    def frequency(self, layer, expert):
        return self.frequencies.get((layer, expert))

    def hot(self, layer, expert):
        return False

    def fetch(self, layer, expert):
        with self._lock:
            return self.family.expert_tensors(self.args, layer, expert, self.ckpt, self.dtype)

    def decode(self, layer, expert, raw):
        bias = None
        if "gate_bias" in raw:
            bias = torch.cat([raw["gate_bias"], raw["up_bias"]])
        return ExpertWeights(torch.cat([raw["gate_proj"], raw["up_proj"]]), raw["down_proj"].clone(), bias,
                             raw["down_bias"].clone() if "down_bias" in raw else None)


def prior_frequency(store: ExpertStore, layer: int, expert: int) -> float:
    """The store's routing frequency, or the uniform top_k / num_experts where it has none."""
    f = store.frequency(layer, expert)
    return _uniform(store) if f is None else float(f)


def total_nbytes(store: ExpertStore) -> int:
    return sum(store.nbytes(i, e) for i in store.moe_layers for e in range(store.num_experts))

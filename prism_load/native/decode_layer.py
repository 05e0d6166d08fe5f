"""One native call for a decode token through a decoder layer's first half (decode_layer.c): input RMSNorm,
the attention step of attention_decode.c, the residual add, the post-attention RMSNorm and the softmax top-k
routing, leaving the MLP (the expert cache's business) to the caller.

Why: called one by one these are five native calls, each with its wrapper's checks, output allocations and
argument array, plus a torch add: about 90 microseconds a layer of Python on a Zen 4 core, a sixth of a decode
token on a Mixtral-shaped model of hidden 1024 (bench/results/decode_profile_zen4.md). The steps are the same C
functions with the same arguments, so the outputs are the same bits.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
import weakref

import torch

from . import _check_rc, _kernel, float_bits
from .attention_decode import (
    SLOT_CAPACITY,
    SLOT_COS,
    SLOT_KEYS,
    SLOT_N,
    SLOT_SIN,
    SLOT_THREADS,
    SLOT_VALUES,
    AttentionOps,
    attention_args,
    check_cache,
    check_rotary,
)
from .expert_block import MAX_EXPERTS as MAX_TOP_K
from .expert_block import BlockOps, op_table

ROUTER_MAX_EXPERTS = 4096  # router_topk.c's RT_MAX_EXPERTS


class LayerStep:
    """What decode_layer.c reads of one decoder layer, gathered once: the attention's operators and shape, the
    two norms' fp32 weights and epsilons, and the router's fp32 weight, top-k and renormalisation (router None:
    the layer's MLP routes itself, or has no router)."""

    __slots__ = ("attention", "heads", "kv_heads", "head_dim", "scaling", "window", "norm1", "eps1", "norm2", "eps2",
                 "router", "top_k", "renormalise", "hidden")

    def __init__(self, attention: AttentionOps, heads: int, kv_heads: int, head_dim: int, scaling: float,
                 window: int | None, norm1: torch.Tensor, eps1: float, norm2: torch.Tensor, eps2: float,
                 router: torch.Tensor | None = None, top_k: int = 0, renormalise: bool = False):
        self.attention, self.heads, self.kv_heads, self.head_dim = attention, heads, kv_heads, head_dim
        self.scaling, self.window = scaling, window
        self.norm1, self.eps1, self.norm2, self.eps2 = norm1, eps1, norm2, eps2
        self.router, self.top_k, self.renormalise = router, top_k, renormalise
        self.hidden = attention.hidden


def _fp32_weight(t, shape: tuple[int, ...]) -> bool:
    return (isinstance(t, torch.Tensor) and t.dtype is torch.float32 and t.is_cpu and t.is_contiguous()
            and tuple(t.shape) == shape)


def layer_step(attention: AttentionOps, heads: int, kv_heads: int, head_dim: int, scaling: float,
               window: int | None, norm1: torch.Tensor, eps1: float, norm2: torch.Tensor, eps2: float,
               router: torch.Tensor | None = None, top_k: int = 0, renormalise: bool = False) -> LayerStep | None:
    """A LayerStep where the norms' weights are fp32 vectors of the hidden size and the router (if any) an fp32
    [E, H] weight with 0 < top_k <= E <= ROUTER_MAX_EXPERTS; else None (the caller steps through the layer)."""
    h = attention.hidden
    if not (_fp32_weight(norm1, (h,)) and _fp32_weight(norm2, (h,))):
        return None
    if router is not None and not (router.dim() == 2 and _fp32_weight(router, (router.shape[0], h))
                                   and 0 < top_k <= router.shape[0] <= ROUTER_MAX_EXPERTS):
        return None
    return LayerStep(attention, heads, kv_heads, head_dim, scaling, window, norm1, eps1, norm2, eps2, router, top_k,
                     renormalise)


def decode_layer(x: torch.Tensor, step: LayerStep, cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor,
                 values: torch.Tensor, n: int):
    """One token of one sequence: x fp32 [H] (the layer's input); cos/sin fp32 [head_dim] for its position;
    keys/values the layer's fp32 caches [1, kv_heads, capacity, head_dim], this token's k and v written at slot
    n (the caller counts it). Returns (y, h, route): y = x + attention(norm1(x)) and h = norm2(y), fp32 [H];
    route = (logits fp32 [1, E], indices int64 [1, k], weights fp32 [1, k]) of the router, or None without one."""
    hidden = step.hidden
    if not (x.dtype is torch.float32 and x.is_contiguous() and x.numel() == hidden and x.is_cpu):
        raise ValueError(f"decode_layer: an fp32 contiguous x of {hidden} is needed, got {list(x.shape)} {x.dtype}")
    attention = attention_args(step.attention, cos, sin, keys, values, n, step.heads, step.kv_heads, step.head_dim,
                               step.scaling, step.window)
    yh = torch.empty(2, hidden, dtype=torch.float32)
    route = None
    if step.router is not None:
        route = (torch.empty(1, step.router.shape[0], dtype=torch.float32),
                 torch.empty(1, step.top_k, dtype=torch.int64), torch.empty(1, step.top_k, dtype=torch.float32))
    args = step_args(step, attention, x.data_ptr(), yh.data_ptr(), yh[1].data_ptr(),
                     *((0, 0, 0) if route is None else (t.data_ptr() for t in route)))
    _check_rc(_kernel().decode_layer(ctypes.addressof(args)), "decode_layer")
    return yh[0], yh[1], route


def step_args(step: LayerStep, attention: ctypes.Array, x: int = 0, y: int = 0, h: int = 0, logits: int = 0,
              indices: int = 0, weights: int = 0) -> ctypes.Array:
    """decode_layer.c's int64[16] arguments for a step with these attention arguments and addresses (0:
    prism_decode_layers fills them in)."""
    router = step.router
    routing = (0, 0, 0, 0) if router is None else (router.data_ptr(), router.shape[0], step.top_k,
                                                   int(step.renormalise))
    return (ctypes.c_int64 * 16)(x, y, h, step.norm1.data_ptr(), step.norm2.data_ptr(), float_bits(step.eps1),
                                 float_bits(step.eps2), ctypes.addressof(attention), *routing, logits, indices,
                                 weights, step.hidden)


LAYER_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_int64)  # decode_layer.c's dl_layer_fn
SCRATCH = ("y", "h", "moe", "logits", "weights", "indices", "ctl")  # prism_decode_layers' buffers, in hdr order


class ResidentTable:
    """A served layer's experts that are ready in an expert cache, as decode_layer.c's resident table: the loop
    runs a layer whose routed experts are all in it without calling back into Python (a hit costs no
    interpreter time: with a callback a layer, a cache holding every expert of the 583 M peer model decoded at
    0.84x the resident model, without 0.94x; bench/results/peer_cache_xeon_037f597.md and _d3e60db.md).
    The cache puts an expert in when it becomes ready and takes it out before its memory is reused, under its
    lock; take-out waits until no loop is running the layer's experts (decode_layer.c's handshake)."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self.table = torch.zeros(2 + 3 * num_experts, dtype=torch.int64)
        self.table[0] = -1  # no rounding of x yet: the first expert put sets it
        self.blocks: dict[int, BlockOps] = {}  # what is in: keeps the argument arrays its pointers address alive

    def put(self, expert: int, block: BlockOps) -> bool:
        """Put an expert's native block in; False where its rounding of x is not the table's (it stays served)."""
        ptrs = (ctypes.c_int64 * 3)(*block.addresses)
        if _kernel().resident_set(self.table.data_ptr(), self.num_experts, expert, block.wide, ptrs) != 0:
            return False
        self.blocks[expert] = block
        return True

    def drop(self, expert: int) -> None:
        """Take an expert out; returns once no decode loop can be running it."""
        if self.blocks.pop(expert, None) is not None:
            _check_rc(_kernel().resident_clear(self.table.data_ptr(), self.num_experts, expert), "resident_clear")

    def pointers(self, expert: int) -> tuple[int, int, int]:
        return tuple(int(v) for v in self.table[2 + 3 * expert : 5 + 3 * expert])


def _dead() -> None:
    """A weak reference to nothing (TokenLayers._caches before a layer's first check)."""
    return None


class TokenLayers:
    """Every decoder layer of a model in one native call a decode token (decode_layer.c's prism_decode_layers):
    each layer a routed LayerStep, and its experts either all resident native blocks (expert_block.BlockOps) of
    one rounding, read from a table, or served a layer at a time by an ExpertServer (an expert cache). Holds the
    argument arrays and the loop's scratch from one token to the next; a token changes only the rotary tables,
    the caches and their fill in them. One token at a time per model (a lock)."""

    def __init__(self, steps: list[LayerStep], experts: list[list[BlockOps]] | None = None,
                 resident: list[ResidentTable | None] | None = None):
        if not steps or any(s.router is None or s.hidden != steps[0].hidden or not 0 < s.top_k <= MAX_TOP_K
                            for s in steps):
            raise ValueError("TokenLayers: routed steps of one hidden size are needed")
        if experts is not None and (len(steps) != len(experts) or any(
                s.router.shape[0] != len(b) or len({x.wide for x in b}) != 1 or any(x.hidden != s.hidden for x in b)
                for s, b in zip(steps, experts))):
            raise ValueError("TokenLayers: every expert of each layer's router as native blocks of one rounding, "
                             "or none (served), is needed")
        if resident is not None and (experts is not None or len(resident) != len(steps) or any(
                t is not None and t.num_experts != s.router.shape[0] for s, t in zip(steps, resident))):
            raise ValueError("TokenLayers: resident tables belong to served layers, one per layer (or None), "
                             "each of its router's experts")
        self.steps, self.experts, self.hidden = steps, experts, steps[0].hidden
        self.tables = None if experts is None else [op_table(b) for b in experts]
        self.resident = resident if resident is not None and any(t is not None for t in resident) else None
        hidden, e, k = self.hidden, max(s.router.shape[0] for s in steps), max(s.top_k for s in steps)
        self.scratch = {name: torch.zeros(n, dtype=torch.float32) for name, n in
                        (("y", hidden), ("h", hidden), ("moe", hidden), ("logits", e), ("weights", k))}
        self.scratch |= {"indices": torch.zeros(k, dtype=torch.int64), "ctl": torch.zeros(1, dtype=torch.int64)}
        # the hit log: {count, stride, then per hit layer: its index, k, its k experts}; room for every layer
        self.hits = torch.zeros(2 + len(steps) * (2 + k), dtype=torch.int64)
        self.hits[1] = 2 + k
        # numpy views of the hit log and the loop's small buffers, for the Python between layers: an element read
        # or written through numpy costs a fraction of a torch index, and this runs for every callback
        self.hits_np = self.hits.numpy()
        self.scratch_np = {name: self.scratch[name].numpy() for name in ("indices", "ctl")}
        self.out = torch.zeros(hidden, dtype=torch.float32)
        self.attention: list[ctypes.Array] | None = None  # attention_args per layer, made at the first token
        # per layer (keys, values, capacity) checked last, the tensors by weak reference (a plan outlives a
        # generation; its KV buffers must not): their checks skipped while the same tensors come back (the KV cache
        # hands the same buffers out until it grows them)
        self._caches: list[tuple] = []
        self.args: list[ctypes.Array] = []
        self.records: ctypes.Array | None = None
        self._lock = threading.Lock()

    @property
    def served(self) -> bool:
        return self.tables is None

    def run(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
            slots: list[tuple[torch.Tensor, torch.Tensor, int]], server: ExpertServer | None = None,
            hooked: bool = False, native=None) -> torch.Tensor:
        """The last layer's output fp32 [H] for x fp32 [H] (the embedded token); cos/sin fp32 [head_dim] for its
        position; slots: each layer's (keys, values, n) as decode_layer takes them (the caller counts the token).
        Served layers need the server (its route, and with `hooked` its hook, called back between the layers on
        this thread; an exception raised in one is raised here); table layers take none. native: None, or what
        makes the context of a token served by the expert cache's native miss path (NativeMisses.token: the
        cache's lock, the address of its state), entered under this plan's lock: always this lock first, then
        the cache's (a callback waiting for room lets the cache's go, never this one)."""
        if (server is None) == self.served:
            raise ValueError("decode_layers: served layers need an ExpertServer, table layers take none")
        with self._lock, (native() if native is not None and server is not None else contextlib.nullcontext(0)) as nm:
            threads = self._prepare(x, cos, sin, slots)
            callbacks = (0, 0) if server is None else (
                ctypes.cast(server.route_fn, ctypes.c_void_p).value,
                ctypes.cast(server.hook_fn, ctypes.c_void_p).value if hooked else 0)
            hits = 0 if self.resident is None else self.hits.data_ptr()
            hdr = (ctypes.c_int64 * 16)(x.data_ptr(), self.out.data_ptr(), len(self.steps), self.hidden, threads,
                                        *callbacks, *(self.scratch[name].data_ptr() for name in SCRATCH), hits, nm)
            rc = _kernel().decode_layers(ctypes.addressof(hdr), ctypes.addressof(self.records))
            if server is not None:
                error, server.error, server.held = server.error, None, None
                server.flush_hits()  # the resident tables' hits of this token: counted before anything else runs
                if error is not None:
                    raise error
                if rc in (-6, -7) and server.native is not None:
                    raise server.native.error(rc)
            _check_rc(rc, "decode_layers")
            return self.out.clone()

    def take_hits(self) -> list[tuple[int, list[int]]]:
        """The hit log's records, (loop layer, routed experts) in loop order; empties it."""
        hits = self.hits_np
        count = int(hits[0])
        if not count:
            return []
        stride = int(hits[1])
        records = hits[2 : 2 + count * stride].reshape(count, stride).tolist()
        hits[0] = 0
        return [(r[0], r[2 : 2 + r[1]]) for r in records]

    def _prepare(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 slots: list[tuple[torch.Tensor, torch.Tensor, int]]) -> int:
        """Checks x and sets this token's fields of the argument arrays (laying them out at the first token);
        returns the thread count. Under the lock."""
        hidden = self.hidden
        if not (x.dtype is torch.float32 and x.is_contiguous() and x.numel() == hidden and x.is_cpu
                and len(slots) == len(self.steps)):
            raise ValueError(f"decode_layers: an fp32 contiguous x of {hidden} and {len(self.steps)} cache slots are "
                             f"needed, got {list(x.shape)} {x.dtype} and {len(slots)}")
        threads = torch.get_num_threads()
        if self.attention is None:  # the first token: every argument checked and laid out once
            self.attention = [attention_args(s.attention, cos, sin, k, v, n, s.heads, s.kv_heads, s.head_dim,
                                             s.scaling, s.window) for s, (k, v, n) in zip(self.steps, slots)]
            self.args = [step_args(s, a) for s, a in zip(self.steps, self.attention)]
            tables = self.tables or [None if t is None else t.table for t in self.resident or [None] * len(self.steps)]
            experts = self.experts or [None] * len(self.steps)
            self.records = (ctypes.c_int64 * (4 * len(self.steps)))(*(
                v for a, t, s, b in zip(self.args, tables, self.steps, experts)
                for v in (ctypes.addressof(a), 0 if t is None else t.data_ptr() if isinstance(t, torch.Tensor)
                          else ctypes.addressof(t), s.router.shape[0],
                          0 if b is None else b[0].wide)))
            return threads
        check_rotary(cos, sin, self.steps[0].head_dim, "decode_layers")
        checked = self._caches
        if len(checked) != len(slots):
            checked[:] = [(_dead, _dead, 0)] * len(slots)
        cos_at, sin_at = cos.data_ptr(), sin.data_ptr()
        for i, (a, s, (keys, values, n)) in enumerate(zip(self.attention, self.steps, slots)):
            known_keys, known_values, cap = checked[i]
            if keys is not known_keys() or values is not known_values():  # new buffers: checked, addresses set
                cap = check_cache(keys, values, n, s.kv_heads, s.head_dim, "decode_layers")
                checked[i] = (weakref.ref(keys), weakref.ref(values), cap)
                a[SLOT_KEYS], a[SLOT_VALUES], a[SLOT_CAPACITY] = keys.data_ptr(), values.data_ptr(), cap
            elif not 0 <= n < cap:
                check_cache(keys, values, n, s.kv_heads, s.head_dim, "decode_layers")  # raises, saying why
            a[SLOT_COS], a[SLOT_SIN], a[SLOT_N], a[SLOT_THREADS] = cos_at, sin_at, n, threads
        return threads


class ExpertServer:
    """What prism_decode_layers calls back between the layers of served TokenLayers: `route(l, h, indices,
    weights, moe)` returns a layer's routed experts as native blocks of one rounding (a list of BlockOps, kept
    alive until the native block has run), or writes their weighted sum into `moe` itself and returns None;
    `hook(l, out)` sees each layer's output. The tensors are the plan's scratch (TokenLayers.scratch, .out; the
    indices as a numpy view of theirs, TokenLayers.scratch_np); an exception in a callback stops the loop and is
    raised by TokenLayers.run."""

    def __init__(self, plan: TokenLayers, route, hook, hits=None, native=None, positions=None):
        self.plan, self.scratch, self.out = plan, plan.scratch, plan.out
        self.route, self.hook, self.hits = route, hook, hits
        # the expert cache's native miss path (runtime/native_misses.NativeMisses) and each loop layer's position
        # in it (int64 [L], -1: not its; handed over by address), or None
        self.native, self.positions = native, positions
        self.positions_address = positions.ctypes.data if positions is not None else 0
        self.error: BaseException | None = None
        self.held = None  # the last route's blocks and operator array: alive until the native block has run
        self.route_fn, self.hook_fn = LAYER_CALLBACK(self._route), LAYER_CALLBACK(self._hook)

    def flush_hits(self) -> None:
        """Hand the resident tables' logged hits to `hits` (the cache counts them as acquire would have), before
        a route acquires anything and after the loop: the cache sees every use in order."""
        if self.native is not None:  # logged before anything in the hit log: replayed first
            self.native.replay()
        if self.plan.resident is not None and self.hits is not None:
            records = self.plan.take_hits()
            if records:
                self.hits(records)

    def _route(self, layer: int) -> int:
        try:
            self.flush_hits()
            b, n = self.scratch, self.plan.scratch_np
            blocks = self.route(layer, b["h"], n["indices"], b["weights"], b["moe"])
            if self.native is not None:  # the loop turned it off for this callback
                self.native.resume(self.positions_address)
            if blocks is None:
                self.held = None
                return 0
            ops = op_table(blocks)
            self.held = (blocks, ops)
            n["ctl"][0] = blocks[0].wide
            return ctypes.addressof(ops)
        except BaseException as e:  # noqa: BLE001 - carried back across the native loop, raised by TokenLayers.run
            self.error = e
            return -1

    def _hook(self, layer: int) -> int:
        try:
            self.hook(layer, self.out)
            return 0
        except BaseException as e:  # noqa: BLE001 - as _route
            self.error = e
            return -1

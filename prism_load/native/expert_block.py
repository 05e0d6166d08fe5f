"""One native call for a decode token's routed experts (expert_block.c), where every expert is three packed
integer-kernel operators: gate, up and down of the same activation rounding (int16 or int8 x).

Why: called one by one, a token's experts cost two kernel calls each plus a SwiGLU, a scaling, a sum and two
dtype conversions in torch ops; on models with a hidden size around 1024 that Python and fork/join overhead is
of the order of the products. expert_block.c runs all of it in one OpenMP region.
"""

from __future__ import annotations

import ctypes

import numpy as np
import torch

from . import _ARGS, INTEGER_WIDE, BoundIntLinear, _check_rc, _kernel

MAX_EXPERTS = 64  # EB_MAX_EXPERTS
WEIGHT_POINTERS = slice(4, 7)  # qweight, scales, zeros in an int_linear argument array
CALL_SLOTS = (0, 2, 10, 12)  # x, its rows, out, threads: a call's own slots (expert_block.c never reads them)
LOWRANK = 1  # expert_block.h's EB_LOWRANK: the first word of a composite projection with a base
LOWRANK_ONLY = 2  # EB_LOWRANK_ONLY: of one without (a base array of its shape alone)
PROJECTION_WORDS = 3 * _ARGS  # EB_PROJECTION_WORDS: a projection's words where it may be a composite


class LowRankBound:
    """A projection stored low-rank, y = base(x) + a(b(x)) (int+lowrank) or y = a(b(x)) (lowrank: base None), as
    expert_block.c reads it: the bound operators' argument arrays one after another, the first word marking the
    composite (expert_block.h). The block runs the base through its integer tiles and adds the correction
    a(b(x)), each factor's product on the integer tiles where they take it (its input rounded for it, as a single
    call of the integer kernel rounds it) and on the exact kernel where they do not (a narrow a: K is the rank).
    Without a base its rounding of x is the block's (activations None)."""

    __slots__ = ("keep", "_args", "n", "k", "activations")

    def __init__(self, base: BoundIntLinear | None, b: BoundIntLinear, a: BoundIntLinear):
        n = a.n if base is None else base.n
        if not _chains(base, b, a):
            shape = "none" if base is None else f"[{base.n}, {base.k}]"
            raise ValueError(f"a low-rank projection's factors must chain: base {shape}, b [{b.n}, {b.k}], "
                             f"a [{a.n}, {a.k}]")
        self.keep = (base, b, a)  # the tensors the arrays point at
        if base is None:  # its shape alone: K at [3], N at [7]
            head = [LOWRANK_ONLY, 0, 0, b.k, 0, 0, 0, n] + [0] * (_ARGS - 8)
        else:
            head = [LOWRANK, *base._args[1:]]
        self._args = (ctypes.c_int64 * PROJECTION_WORDS)(*head, *b._args, *a._args)
        self.n, self.k = n, b.k
        self.activations = None if base is None else base.activations


def native_projection(op) -> BoundIntLinear | LowRankBound | None:
    """What expert_block.c reads for one operator: its bound kernel (`native_bound()`, as PackedLinear exposes
    it), a LowRankBound for a low-rank operator over native ones (`native_parts()` -> (base or None, b, a), as
    codecs.LowRankLinear exposes it), else None."""
    bound = getattr(op, "native_bound", None)
    if bound is not None:
        return bound()
    parts = getattr(op, "native_parts", None)
    if parts is None:
        return None
    base_op, b_op, a_op = parts()
    base, b, a = (None if p is None else native_projection(p) for p in (base_op, b_op, a_op))
    if not (isinstance(b, BoundIntLinear) and isinstance(a, BoundIntLinear)) or (
            base_op is not None and not isinstance(base, BoundIntLinear)):
        return None
    return LowRankBound(base, b, a) if _chains(base, b, a) else None


def _chains(base: BoundIntLinear | None, b: BoundIntLinear, a: BoundIntLinear) -> bool:
    """Whether b [R, K] and a [N, R] compose, and match the base [N, K] where there is one."""
    return a.k == b.n and (base is None or (b.k == base.k and a.n == base.n))


def _words(address: int) -> list[int]:
    """A projection's argument words, PROJECTION_WORDS of them (a plain one's array, then zeros)."""
    words = list((ctypes.c_int64 * _ARGS).from_address(address))
    if words[0] in (LOWRANK, LOWRANK_ONLY):
        return list((ctypes.c_int64 * PROJECTION_WORDS).from_address(address))
    return words + [0] * (PROJECTION_WORDS - _ARGS)


class BlockOps:
    """An expert's three bound operators as expert_block.c reads them: the addresses of their argument arrays
    (only the weight fields are read, so any thread may use them) and the rounding of x they share. An operator
    is a BoundIntLinear, or a LowRankBound (a composite of three)."""

    __slots__ = ("addresses", "wide", "hidden", "keep")

    def __init__(self, gate: BoundIntLinear | LowRankBound, up: BoundIntLinear | LowRankBound,
                 down: BoundIntLinear | LowRankBound, activations: str | None = None):
        self.keep = (gate, up, down)  # the argument arrays (and the tensors they point at) live as long as this
        self.addresses = tuple(ctypes.addressof(op._args) for op in self.keep)
        self.wide = INTEGER_WIDE[activations or gate.activations]  # the block's rounding of x
        self.hidden = down.n  # H: the width of x and of the output

    def arguments(self) -> np.ndarray:
        """The three projections' words, int64 [3, PROJECTION_WORDS] (a copy): a plain one's array followed by
        zeros, a composite's three arrays."""
        return np.array([_words(a) for a in self.addresses], dtype=np.int64)


class BlockTemplate:
    """An expert's BlockOps with its weight pointers relative to the buffer holding its tensors: `at(base)` is the
    same block for an expert of the same stored layout in another buffer: a copy of its argument words and an
    addition per weight pointer. Why: an expert read into a cache slab that last held another layout needed its
    three bound calls rebound (checked, copied), which on the reference model's small experts cost as much as the
    read. The words are three projections of PROJECTION_WORDS each (expert_block.h), as the native miss path
    (expert_miss.c) moves them too."""

    __slots__ = ("arguments", "wide", "hidden", "slots")

    def __init__(self, block: BlockOps, base: int):
        args = block.arguments().reshape(3, 3, _ARGS)  # projection, array (base, b, a), word
        marks = np.where(np.isin(args[:, 0, 0], (LOWRANK, LOWRANK_ONLY)), args[:, 0, 0], 0)
        args[:, :, CALL_SLOTS] = 0
        args[:, 0, 0] = marks
        # the arrays with weights: a plain projection's, a composite's base (where it has one) and factors
        arrays = [(j, part) for j in range(3) for part in range(3 if marks[j] else 1)
                  if not (part == 0 and marks[j] == LOWRANK_ONLY)]
        for j, part in arrays:
            args[j, part, WEIGHT_POINTERS] -= base
        # the flat positions of the weight pointers `at` moves
        self.slots = tuple(j * PROJECTION_WORDS + part * _ARGS + i for j, part in arrays for i in range(4, 7))
        self.arguments = (ctypes.c_int64 * (3 * PROJECTION_WORDS))(*args.ravel().tolist())
        self.wide, self.hidden = block.wide, block.hidden

    def at(self, base: int, keep) -> BlockOps:
        """The block for tensors at `base` (keep: what holds them, kept alive by the block)."""
        args = type(self.arguments).from_buffer_copy(self.arguments)
        for i in self.slots:
            args[i] += base
        return self.placed(ctypes.addressof(args), (args, keep))

    def placed(self, start: int, keep) -> BlockOps:
        """The block whose three projections, this template moved already, lie at `start` one after another
        (keep: what holds them and the tensors they point at, kept alive by the block). The native miss path
        moves them itself (expert_miss.c)."""
        b = object.__new__(BlockOps)
        b.keep, b.wide, b.hidden = keep, self.wide, self.hidden
        step = 8 * PROJECTION_WORDS
        b.addresses = (start, start + step, start + 2 * step)
        return b


def block_ops(gate, up, down) -> BlockOps | None:
    """BlockOps for three operators where they are native integer-kernel operators of one rounding with
    matching shapes (gate and up [I, H], down [H, I]); else None (the caller multiplies them one by one).
    Operators expose their BoundIntLinear as `native_bound()` (PackedLinear does), a low-rank one its parts as
    `native_parts()` (native_projection)."""
    bound = [native_projection(op) for op in (gate, up, down)]
    if any(b is None for b in bound):
        return None
    # the rounding of x: the projections' with a base; low-rank ones alone take the block's (all of them low-rank:
    # their first factor's kernel)
    acts = {b.activations for b in bound if b.activations is not None} or {bound[0].keep[1].activations}
    activations = acts.pop() if len(acts) == 1 else None
    g, u, d = bound
    if activations not in INTEGER_WIDE or g.k != u.k or g.n != u.n or d.k != g.n or d.n != g.k:
        return None
    return BlockOps(g, u, d, activations)


def one_rounding(blocks: list) -> list[BlockOps] | None:
    """blocks where there are some, none is None and all share one rounding of x (what one expert_block call
    takes); else None."""
    return blocks if blocks and all(blocks) and len({b.wide for b in blocks}) == 1 else None


def op_table(blocks: list[BlockOps]) -> ctypes.Array:
    """The 3E pointers expert_block.c reads: gate, up and down argument arrays of each block in turn."""
    return (ctypes.c_void_p * (3 * len(blocks)))(*(a for b in blocks for a in b.addresses))


def expert_block(x: torch.Tensor, experts: list[BlockOps], weights: torch.Tensor) -> torch.Tensor:
    """sum_e weights[e] * down_e(silu(gate_e(x)) * up_e(x)) for one token: x [1, H] (any float dtype),
    weights [1, E] or [E]; fp32 [1, H]. All experts must share the rounding of x (ValueError otherwise)."""
    e = len(experts)
    if not 0 < e <= MAX_EXPERTS or len({b.wide for b in experts}) != 1:
        raise ValueError(f"expert_block: 1 to {MAX_EXPERTS} experts of one activation rounding, got {e}")
    xf = x.reshape(-1)
    h = experts[0].hidden
    if xf.shape[0] != h or any(b.hidden != h for b in experts):
        raise ValueError(f"expert_block: x must be one row of {h}, got {list(x.shape)}")
    xf = xf.to(torch.float32).contiguous() if xf.dtype is not torch.float32 or not xf.is_contiguous() else xf
    w = weights.reshape(-1).to(torch.float32).contiguous()
    if w.shape[0] != e:
        raise ValueError(f"expert_block: {e} experts but {w.shape[0]} weights")
    out = torch.empty(1, h, dtype=torch.float32)
    ops = op_table(experts)
    hdr = (ctypes.c_int64 * 5)(xf.data_ptr(), out.data_ptr(), e, torch.get_num_threads(), experts[0].wide)
    _check_rc(_kernel().expert_block(ctypes.addressof(hdr), ctypes.addressof(ops), w.data_ptr()), "expert_block")
    return out


MAX_ROWS = 64  # EB_MAX_ROWS


def expert_rows(x: torch.Tensor, rows: list[list[BlockOps]], weights: torch.Tensor) -> torch.Tensor:
    """expert_block for each row of a decode batch in one call: x [B, H] (any float dtype), rows[b] the experts of
    row b in its route order (E each, one rounding of x across the batch), weights [B, E]; fp32 [B, H]. An expert
    several rows use is one product of those rows (its weights read once); each row's output has expert_block's
    bits for that row alone."""
    b = len(rows)
    e = len(rows[0]) if rows else 0
    if not 0 < b <= MAX_ROWS or not 0 < e <= MAX_EXPERTS or any(len(r) != e for r in rows):
        raise ValueError(f"expert_rows: 1 to {MAX_ROWS} rows of 1 to {MAX_EXPERTS} experts each, got "
                         f"{[len(r) for r in rows]}")
    if len({blk.wide for r in rows for blk in r}) != 1:
        raise ValueError("expert_rows: the experts must share one rounding of x")
    h = rows[0][0].hidden
    if tuple(x.shape) != (b, h) or any(blk.hidden != h for r in rows for blk in r):
        raise ValueError(f"expert_rows: x must be [{b}, {h}], got {list(x.shape)}")
    for r in rows:
        if len({blk.addresses[0] for blk in r}) != e:
            raise ValueError("expert_rows: an expert twice in one row")
    xf = x.to(torch.float32).contiguous()
    w = weights.to(torch.float32).contiguous()
    if tuple(w.shape) != (b, e):
        raise ValueError(f"expert_rows: weights must be [{b}, {e}], got {list(w.shape)}")
    out = torch.empty(b, h, dtype=torch.float32)
    ops = op_table([blk for r in rows for blk in r])
    hdr = (ctypes.c_int64 * 6)(xf.data_ptr(), out.data_ptr(), b, e, torch.get_num_threads(), rows[0][0].wide)
    _check_rc(_kernel().expert_rows(ctypes.addressof(hdr), ctypes.addressof(ops), w.data_ptr()), "expert_rows")
    return out

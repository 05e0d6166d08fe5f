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

from . import _ARGS, INTEGER_WIDE, BoundIntLinear, _check_rc, _kernel, bound_integer_ops

MAX_EXPERTS = 64  # EB_MAX_EXPERTS
WEIGHT_POINTERS = slice(4, 7)  # qweight, scales, zeros in an int_linear argument array
POINTER_SLOTS = tuple(op * _ARGS + i for op in range(3) for i in range(4, 7))  # theirs in a block's three arrays


class BlockOps:
    """An expert's three bound operators as expert_block.c reads them: the addresses of their argument arrays
    (only the weight fields are read, so any thread may use them) and the rounding of x they share."""

    __slots__ = ("addresses", "wide", "hidden", "keep")

    def __init__(self, gate: BoundIntLinear, up: BoundIntLinear, down: BoundIntLinear):
        self.keep = (gate, up, down)  # the argument arrays (and the tensors they point at) live as long as this
        self.addresses = tuple(ctypes.addressof(op._args) for op in self.keep)
        self.wide = INTEGER_WIDE[gate.activations]
        self.hidden = down.n  # H: the width of x and of the output

    def arguments(self) -> np.ndarray:
        """The three argument arrays, int64 [3, _ARGS] (a copy)."""
        return np.array([list((ctypes.c_int64 * _ARGS).from_address(a)) for a in self.addresses], dtype=np.int64)


class BlockTemplate:
    """An expert's BlockOps with its weight pointers relative to the buffer holding its tensors: `at(base)` is the
    same block for an expert of the same stored layout in another buffer: a copy of three argument arrays and
    nine additions. Why: an expert read into a cache slab that last held another layout needed its three bound
    calls rebound (checked, copied), which on the reference model's small experts cost as much as the read."""

    __slots__ = ("arguments", "wide", "hidden")

    def __init__(self, block: BlockOps, base: int):
        args = block.arguments()
        args[:, WEIGHT_POINTERS] -= base
        args[:, (0, 2, 10, 12)] = 0  # x, its rows, out, threads: a call's own slots (expert_block.c never reads them)
        self.arguments = (ctypes.c_int64 * (3 * _ARGS))(*args.ravel().tolist())
        self.wide, self.hidden = block.wide, block.hidden

    def at(self, base: int, keep) -> BlockOps:
        """The block for tensors at `base` (keep: what holds them, kept alive by the block)."""
        args = type(self.arguments).from_buffer_copy(self.arguments)
        for i in POINTER_SLOTS:
            args[i] += base
        return self.placed(ctypes.addressof(args), (args, keep))

    def placed(self, start: int, keep) -> BlockOps:
        """The block whose three argument arrays, this template moved already, lie at `start` one after another
        (keep: what holds them and the tensors they point at, kept alive by the block). The native miss path
        moves them itself (expert_miss.c)."""
        b = object.__new__(BlockOps)
        b.keep, b.wide, b.hidden = keep, self.wide, self.hidden
        b.addresses = (start, start + 8 * _ARGS, start + 16 * _ARGS)
        return b


def block_ops(gate, up, down) -> BlockOps | None:
    """BlockOps for three operators where they are native integer-kernel operators of one rounding with
    matching shapes (gate and up [I, H], down [H, I]); else None (the caller multiplies them one by one).
    Operators expose their BoundIntLinear as `native_bound()` (PackedLinear does)."""
    bound = bound_integer_ops(gate, up, down)
    if bound is None:
        return None
    g, u, d = bound
    if g.k != u.k or g.n != u.n or d.k != g.n or d.n != g.k:
        return None
    return BlockOps(g, u, d)


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

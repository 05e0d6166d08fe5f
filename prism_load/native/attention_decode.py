"""One native call for a decode token's attention (attention_decode.c): fused q/k/v projection, rotary phases,
KV-cache append, grouped-query attention and output projection, for one sequence in fp32, where both
projections are packed integer-kernel operators of one rounding (int16 or int8 x).

Why: in torch the same step is about 25 small ops a layer plus two kernel calls; at decode on a model of
hidden size ~1024 their dispatch costs more than the projections' weight reads (bench/results/
decode_profile_peer.md).
"""

from __future__ import annotations

import ctypes

import torch

from . import INTEGER_WIDE, _check_rc, _kernel, bound_integer_ops, float_bits

MAX_HEAD_DIM = 1024  # attention_decode.c's rotary scratch


class AttentionOps:
    """The bound operators of one attention (fused qkv and o, their fp32 biases or None) as attention_decode.c
    reads them."""

    __slots__ = ("qkv", "o", "qkv_bias", "o_bias", "wide", "hidden")

    def __init__(self, qkv, o, qkv_bias=None, o_bias=None):
        self.qkv, self.o = qkv, o  # BoundIntLinear: their argument arrays live as long as this
        self.qkv_bias, self.o_bias = qkv_bias, o_bias
        self.wide = INTEGER_WIDE[qkv.activations]
        self.hidden = qkv.k


def _fp32_vector(t, n: int) -> bool:
    return t is None or (isinstance(t, torch.Tensor) and t.dtype is torch.float32 and t.is_contiguous()
                         and t.shape == (n,) and t.is_cpu)


def attention_ops(qkv_op, o_op, heads: int, kv_heads: int, head_dim: int, qkv_bias=None,
                  o_bias=None) -> AttentionOps | None:
    """AttentionOps where both operators expose a native integer-kernel BoundIntLinear (`native_bound()`, as
    PackedLinear does) of one rounding, the shapes agree (qkv [(h + 2g) D, H], o [H, h D]) and the biases are
    fp32 vectors of the outputs' widths (or None); else None."""
    bound = bound_integer_ops(qkv_op, o_op)
    if bound is None:
        return None
    qkv, o = bound
    if (qkv.n != (heads + 2 * kv_heads) * head_dim or o.k != heads * head_dim
            or o.n != qkv.k or head_dim % 8 or head_dim > MAX_HEAD_DIM or heads % kv_heads
            or not _fp32_vector(qkv_bias, qkv.n) or not _fp32_vector(o_bias, o.n)):
        return None
    return AttentionOps(qkv, o, qkv_bias, o_bias)


def attention_decode(x: torch.Tensor, ops: AttentionOps, cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor,
                     values: torch.Tensor, n: int, heads: int, kv_heads: int, head_dim: int,
                     scaling: float, window: int | None = None) -> torch.Tensor:
    """The attention output (after the o projection) of one token: x fp32 [H] (normed); cos/sin fp32 [head_dim]
    for its position; keys/values fp32 [1, kv_heads, capacity, head_dim] contiguous caches, this token's k and v
    written at slot n (the caller counts it); window: a sliding window of that many positions, or None.
    Returns fp32 [H]."""
    if not (x.dtype is torch.float32 and x.is_contiguous() and x.numel() == ops.hidden):
        raise ValueError(f"attention_decode: an fp32 contiguous x of {ops.hidden} is needed, got x {list(x.shape)} "
                         f"{x.dtype}")
    out = torch.empty(ops.hidden, dtype=torch.float32)
    args = attention_args(ops, cos, sin, keys, values, n, heads, kv_heads, head_dim, scaling, window,
                          x.data_ptr(), out.data_ptr())
    _check_rc(_kernel().attention_decode(ctypes.addressof(args)), "attention_decode")
    return out


def attention_rows(x: torch.Tensor, ops: AttentionOps, cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor,
                   values: torch.Tensor, n: int, heads: int, kv_heads: int, head_dim: int, scaling: float,
                   window: int | None = None, first: torch.Tensor | None = None) -> torch.Tensor:
    """attention_decode for each of a decode batch's B rows in one call: x fp32 [B, H]; cos/sin fp32 [B, head_dim]
    (each row's position); keys/values fp32 [B, kv_heads, capacity, head_dim] contiguous, every row's k and v
    written at slot n; first: int64 [B], row b's first real slot (its left padding before it is not attended), or
    None. The projections multiply all rows at once (their weights read once); each row's output has the bits of
    attention_decode on that row alone. Returns fp32 [B, H]."""
    b = x.shape[0] if x.dim() == 2 else -1
    if not (x.dtype is torch.float32 and x.is_contiguous() and b >= 1 and x.shape[1] == ops.hidden):
        raise ValueError(f"attention_rows: an fp32 contiguous x [B, {ops.hidden}] is needed, got x {list(x.shape)} "
                         f"{x.dtype}")
    for name, t in (("cos", cos), ("sin", sin)):
        if not (t.dtype is torch.float32 and t.is_contiguous() and tuple(t.shape) == (b, head_dim)):
            raise ValueError(f"attention_rows: fp32 contiguous {name} [{b}, {head_dim}] is needed, got "
                             f"{list(t.shape)} {t.dtype}")
    cap = check_cache(keys, values, n, kv_heads, head_dim, "attention_rows", rows=b)
    if first is not None and not (first.dtype is torch.int64 and first.is_contiguous() and tuple(first.shape) == (b,)
                                  and int(first.min()) >= 0 and int(first.max()) <= n):
        raise ValueError(f"attention_rows: first must be int64 [{b}] of slots 0..{n}")
    if window is not None and window <= 0:
        raise ValueError(f"attention_rows: a sliding window of at least one position is needed, got {window}")
    out = torch.empty(b, ops.hidden, dtype=torch.float32)
    args = (ctypes.c_int64 * 21)(
        x.data_ptr(), ctypes.addressof(ops.qkv._args), ctypes.addressof(ops.o._args), out.data_ptr(),
        cos.data_ptr(), sin.data_ptr(), keys.data_ptr(), values.data_ptr(), cap, n, heads, kv_heads, head_dim,
        float_bits(scaling), torch.get_num_threads(), ops.wide,
        0 if ops.qkv_bias is None else ops.qkv_bias.data_ptr(), 0 if ops.o_bias is None else ops.o_bias.data_ptr(),
        window or 0, b, 0 if first is None else first.data_ptr())
    _check_rc(_kernel().attention_rows(ctypes.addressof(args)), "attention_rows")
    return out


# attention_args' slots that change from one token to the next (the others depend on the layer alone)
SLOT_COS, SLOT_SIN, SLOT_KEYS, SLOT_VALUES, SLOT_CAPACITY, SLOT_N, SLOT_THREADS = 4, 5, 6, 7, 8, 9, 14


def check_rotary(cos: torch.Tensor, sin: torch.Tensor, head_dim: int, who: str = "attention_decode") -> None:
    """ValueError unless cos and sin are fp32 contiguous [head_dim] (one token's rotary phases)."""
    if not (cos.dtype is torch.float32 and sin.dtype is torch.float32 and cos.is_contiguous() and sin.is_contiguous()
            and cos.numel() == head_dim and sin.numel() == head_dim):
        raise ValueError(f"{who}: fp32 contiguous cos/sin of {head_dim} are needed, got {list(cos.shape)} {cos.dtype}")


def check_cache(keys: torch.Tensor, values: torch.Tensor, n: int, kv_heads: int, head_dim: int,
                who: str = "attention_decode", rows: int = 1) -> int:
    """The caches' capacity; ValueError unless keys and values are fp32 contiguous [rows, kv_heads, capacity,
    head_dim] with a free slot at n."""
    cap = keys.shape[2] if keys.dim() == 4 else -1
    if not (keys.dtype is torch.float32 and values.dtype is torch.float32 and keys.is_contiguous()
            and values.is_contiguous() and keys.shape == (rows, kv_heads, cap, head_dim) and values.shape == keys.shape
            and 0 <= n < cap):
        raise ValueError(f"{who}: fp32 contiguous caches [{rows}, g, capacity, D] with a free slot at {n} are needed, "
                         f"got {list(keys.shape)} {keys.dtype}")
    return cap


def attention_args(ops: AttentionOps, cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                   n: int, heads: int, kv_heads: int, head_dim: int, scaling: float, window: int | None,
                   x_address: int = 0, out_address: int = 0) -> ctypes.Array:
    """attention_decode.c's int64[19] argument array for one token's step (arguments as attention_decode's), after
    checking the rotary tables and caches; x and out at those addresses (0: decode_layer.c fills them in).
    ValueError where they do not fit."""
    check_rotary(cos, sin, head_dim)
    cap = check_cache(keys, values, n, kv_heads, head_dim)
    if window is not None and window <= 0:
        raise ValueError(f"attention_decode: a sliding window of at least one position is needed, got {window}")
    return (ctypes.c_int64 * 19)(
        x_address, ctypes.addressof(ops.qkv._args), ctypes.addressof(ops.o._args), out_address,
        cos.data_ptr(), sin.data_ptr(), keys.data_ptr(), values.data_ptr(), cap, n, heads, kv_heads, head_dim,
        float_bits(scaling), torch.get_num_threads(), ops.wide,
        0 if ops.qkv_bias is None else ops.qkv_bias.data_ptr(), 0 if ops.o_bias is None else ops.o_bias.data_ptr(),
        window or 0)

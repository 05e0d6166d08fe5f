"""Decoders of the stored encodings (the `Encoding` spec is in prism_load/container/format.py; the encoders
live in prism_convert): bit packing, dequantisation, and the runtime's linear operators over stored forms.
The runtime and the converter's in-memory check share `decode`, so round trips are bit-exact.
"""

from __future__ import annotations

import math

import torch

from .. import kernels
from ..errors import ContainerError
from .format import PASSTHROUGH_DTYPES, Encoding, packed_row_bytes

# -- bit packing ---------------------------------------------------------------------------------------
PACK_CHUNK_WORDS = 1 << 16  # 8-value words per pass: keeps the int64 temporaries in cache


def _rows_per_chunk(words: int) -> int:
    return max(1, PACK_CHUNK_WORDS // max(words, 1))


def pack_bits(q: torch.Tensor, bits: int) -> torch.Tensor:
    """q uint8 [rows, cols] with values < 2**bits -> uint8 [rows, ceil(cols*bits/8)], little-endian per row.

    Value j of a row occupies bits j*bits .. j*bits+bits-1 of the row's bit stream (bit 0 = LSB of byte 0).
    Computed 8 values at a time: 8 values fill exactly `bits` bytes, so a row is a run of int64 words."""
    rows, cols = q.shape
    if bits == 8:
        return q.to(torch.uint8).contiguous()
    words = -(-cols // 8)
    value_shift = torch.arange(8) * bits  # [8]
    byte_shift = torch.arange(bits) * 8  # [bits]
    step = _rows_per_chunk(words)
    out = []
    for r in range(0, rows, step):
        v = torch.nn.functional.pad(q[r : r + step].to(torch.int64), (0, words * 8 - cols))  # [r, words*8]
        word = (v.reshape(-1, words, 8) << value_shift).sum(-1, keepdim=True)  # [r, words, 1]
        out.append(((word >> byte_shift) & 255).to(torch.uint8).reshape(-1, words * bits))  # [r, words*bits]
    return torch.cat(out)[:, : packed_row_bytes(cols, bits)].contiguous()


def unpack_bits(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of pack_bits: uint8 [rows, ceil(cols*bits/8)] -> uint8 [rows, cols] (fresh memory)."""
    out = torch.empty(packed.shape[0], cols, dtype=torch.uint8, device=packed.device)
    kernels.unpack_codes_into(packed, bits, cols, out)
    return out


# -- decoding ------------------------------------------------------------------------------------------
def _sub(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def check_tensors(enc: Encoding, tensors: dict[str, torch.Tensor], where: str = "") -> None:
    """Stored tensors must match the encoding's specs exactly (names, dtypes, shapes)."""
    specs = enc.tensor_specs()
    if set(tensors) != set(specs):
        raise ContainerError(f"{where}: stored tensors {sorted(tensors)} do not match encoding {sorted(specs)}")
    for name, (dtype, shape) in specs.items():
        t = tensors[name]
        if t.dtype != dtype or tuple(t.shape) != shape:
            raise ContainerError(
                f"{where}.{name}: stored as {t.dtype} {list(t.shape)}, encoding says {dtype} {list(shape)}"
            )


def dequantize_int(enc: Encoding, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """Bits unpacked and dequantised in one lock-free kernel call (prism_load/kernels.py)."""
    w = torch.empty(enc.shape, dtype=torch.float32, device=tensors["qweight"].device)
    kernels.dequantize_into(tensors["qweight"], enc.bits, enc.shape[1], tensors["scales"], tensors["zeros"],
                            enc.group_size, w)
    return w if dtype == torch.float32 else w.to(dtype)


class CodesLinear:
    """Integer weights kept as unpacked codes (uint8, a byte per weight) with their fp16 scales and zeros,
    dequantised at every call: on a CPU this holds an expert in about a quarter of its fp32 bytes and
    turns a cache miss's bit unpacking into a per-use dequantisation. `parts` are row blocks (gate, up),
    each (codes [rows, in], scale_zero fp16 [2, rows, groups], group size), concatenated after
    dequantisation, so the weight equals the dense decode bit for bit."""

    def __init__(self, parts: list[tuple[torch.Tensor, torch.Tensor, int]], dtype: torch.dtype):
        self.parts, self.dtype = parts, dtype
        self.rows, self.cols = sum(q.shape[0] for q, _, _ in parts), parts[0][0].shape[1]
        self.blocks, row = [], 0  # (first row, end row, codes, scales, zeros, group size): no per-call indexing
        for q, sz, g in parts:
            self.blocks.append((row, row + q.shape[0], q, sz[0], sz[1], g))
            row += q.shape[0]

    def weight(self) -> torch.Tensor:
        """Each part dequantised into its row block (no concatenation copy), one kernel call per part."""
        w = torch.empty(self.rows, self.cols, dtype=torch.float32, device=self.parts[0][0].device)
        for start, stop, q, scales, zeros, g in self.blocks:
            kernels.dequantize_into(q, 8, self.cols, scales, zeros, g, w[start:stop])
        return w if self.dtype == torch.float32 else w.to(self.dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight())

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for q, sz, _ in self.parts for t in (q, sz))


def codes_part(enc: Encoding, tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One `int` tensor as a CodesLinear part, in fresh memory (nothing aliases the stored bytes)."""
    codes = unpack_bits(tensors["qweight"], enc.bits, enc.shape[1])
    return codes, torch.stack([tensors["scales"], tensors["zeros"]]), enc.group_size


def codes_nbytes(enc: Encoding) -> int:
    """Bytes of codes_part's tensors: a byte per weight plus fp16 scales and zeros."""
    out, inp = enc.shape
    return out * inp + 2 * 2 * out * math.ceil(inp / enc.group_size)


def decode(enc: Encoding, tensors: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dense tensor [shape] in `dtype`. Deterministic: the same inputs give the same bits everywhere."""
    if enc.kind in PASSTHROUGH_DTYPES:
        return tensors["weight"].to(dtype)
    if enc.kind == "int":
        return dequantize_int(enc, tensors, dtype)
    a = decode(enc.parts()["lr_a"], _sub(tensors, "lr_a"), torch.float32)
    b = decode(enc.parts()["lr_b"], _sub(tensors, "lr_b"), torch.float32)
    w = a @ b
    if enc.kind == "int+lowrank":
        w = decode(enc.parts()["base"], _sub(tensors, "base"), torch.float32) + w
    return w.to(dtype)


class LowRankLinear:
    """x -> (x @ B^T) @ A^T: the factored form, cheaper than A @ B when rank < out*in/(out+in)."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, base: torch.Tensor | None = None):
        self.a, self.b, self.base = a, b, base

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(linear(x, self.b), self.a)
        return y if self.base is None else y + linear(x, self.base)

    @property
    def nbytes(self) -> int:
        return sum(op_nbytes(op) for op in (self.a, self.b, self.base) if op is not None)

    def native_parts(self) -> tuple:
        """(base or None, b, a): the operators a native expert block composes (native.expert_block.LowRankBound)."""
        return self.base, self.b, self.a


def linear(x: torch.Tensor, op) -> torch.Tensor:
    """x @ op^T for a weight tensor or any linear operator (LowRankLinear, PackedLinear, ...)."""
    from ..models.linear import linear as product

    return product(x, op) if isinstance(op, torch.Tensor) else op(x)


def op_nbytes(op) -> int:
    return op.numel() * op.element_size() if isinstance(op, torch.Tensor) else op.nbytes


def kept_factored(enc: Encoding) -> bool:
    """Whether the runtime keeps a `lowrank` encoding as its factors: they hold fewer values than the dense matrix
    (rank x (out + in) < out x in); else it decodes them dense. The decoded form, the packed form and the stores'
    sizes all follow this one rule."""
    return enc.kind == "lowrank" and enc.rank * sum(enc.shape) < math.prod(enc.shape)


def decode_linear(enc: Encoding, tensors: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32):
    """Runtime form: a dense tensor, or a LowRankLinear when keeping the factors is smaller than dense."""
    if not kept_factored(enc):
        return decode(enc, tensors, dtype)
    a = decode(enc.parts()["lr_a"], _sub(tensors, "lr_a"), dtype)
    b = decode(enc.parts()["lr_b"], _sub(tensors, "lr_b"), dtype)
    return LowRankLinear(a, b)

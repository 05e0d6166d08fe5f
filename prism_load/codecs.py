"""Stored encodings of weight matrices and their decoders (the encoders live in prism_convert).

An `Encoding` says how one tensor is stored; `tensor_specs()` lists the exact stored tensors (suffix ->
dtype, shape) and `nbytes()` their exact size, so bits-per-weight figures always count scales, zeros and
padding. The runtime and the converter's in-memory check share `decode`, so round trips are bit-exact.

Kinds:
- `bf16` / `fp16` / `fp32`: the tensor itself, suffix `weight`.
- `int`: group-wise asymmetric integer quantization, w = (q - zero) * scale per group of `group_size`
  input channels; `qweight` uint8 [out, ceil(in*bits/8)] is a dense little-endian bitstream per row (only
  the row end is padded), `scales` and `zeros` fp16 [out, ceil(in/group_size)].
- `lowrank`: w = A @ B with A [out, rank], B [rank, in]; each factor stored as bf16 (`factor_bits` 16)
  or as `int` with `factor_bits` bits, under suffixes `lr_a.*` and `lr_b.*`.
- `int+lowrank`: an `int` base (`base.*`) plus a low-rank correction of its residual (`lr_a.*`, `lr_b.*`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch

from . import kernels
from .errors import ContainerError

KINDS = ("bf16", "fp16", "fp32", "int", "lowrank", "int+lowrank")
INT_BITS = (2, 3, 4, 5, 6, 8)
PASSTHROUGH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Encoding:
    kind: str
    shape: tuple[int, ...]
    bits: int | None = None
    group_size: int | None = None
    rank: int | None = None
    factor_bits: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        self.validate()

    # -- description ---------------------------------------------------------------------------------
    def validate(self) -> None:
        if self.kind not in KINDS:
            raise ContainerError(f"encoding kind {self.kind!r} is unknown (known: {', '.join(KINDS)})")
        if any(s <= 0 for s in self.shape) or not self.shape:
            raise ContainerError(f"encoding shape {list(self.shape)} must be non-empty and positive")
        if self.kind in PASSTHROUGH_DTYPES:
            return
        if len(self.shape) != 2:
            raise ContainerError(f"{self.kind} encoding needs a 2-D shape, got {list(self.shape)}")
        if self.kind in ("int", "int+lowrank") and self.bits not in INT_BITS:
            raise ContainerError(f"int bits must be one of {INT_BITS}, got {self.bits}")
        needs_groups = self.kind in ("int", "int+lowrank") or self.factor_bits not in (None, 16)
        if needs_groups and (not isinstance(self.group_size, int) or self.group_size <= 0):
            raise ContainerError(f"{self.kind} encoding needs a positive group_size, got {self.group_size}")
        if self.kind in ("lowrank", "int+lowrank"):
            if not isinstance(self.rank, int) or not 0 < self.rank <= min(self.shape):
                raise ContainerError(f"rank must be in 1..{min(self.shape)}, got {self.rank}")
            if self.factor_bits not in (16, *INT_BITS):
                raise ContainerError(f"factor_bits must be 16 or one of {INT_BITS}, got {self.factor_bits}")

    def to_dict(self) -> dict:
        return {k: (list(v) if k == "shape" else v) for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: dict) -> Encoding:
        if not isinstance(data, dict):
            raise ContainerError(f"encoding must be an object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ContainerError(f"encoding has unknown keys {unknown}")
        if "kind" not in data or "shape" not in data:
            raise ContainerError("encoding needs 'kind' and 'shape'")
        if not isinstance(data["shape"], list) or not all(isinstance(s, int) for s in data["shape"]):
            raise ContainerError(f"encoding shape must be a list of integers, got {data['shape']!r}")
        return cls(**data)

    def _factor(self, rows: int, cols: int) -> Encoding:
        if self.factor_bits == 16:
            return Encoding("bf16", (rows, cols))
        return Encoding("int", (rows, cols), bits=self.factor_bits, group_size=self.group_size)

    def parts(self) -> dict[str, Encoding]:
        """Sub-encodings of composite kinds, by suffix prefix."""
        out, inp = self.shape[0], self.shape[-1]
        parts = {}
        if self.kind == "int+lowrank":
            parts["base"] = Encoding("int", self.shape, bits=self.bits, group_size=self.group_size)
        if self.kind in ("lowrank", "int+lowrank"):
            parts["lr_a"] = self._factor(out, self.rank)
            parts["lr_b"] = self._factor(self.rank, inp)
        return parts

    def tensor_specs(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """Exact stored tensors: suffix -> (dtype, shape)."""
        if self.kind in PASSTHROUGH_DTYPES:
            return {"weight": (PASSTHROUGH_DTYPES[self.kind], self.shape)}
        if self.kind == "int":
            out, inp = self.shape
            groups = math.ceil(inp / self.group_size)
            return {
                "qweight": (torch.uint8, (out, packed_row_bytes(inp, self.bits))),
                "scales": (torch.float16, (out, groups)),
                "zeros": (torch.float16, (out, groups)),
            }
        return {
            f"{prefix}.{suffix}": spec
            for prefix, part in self.parts().items()
            for suffix, spec in part.tensor_specs().items()
        }

    def nbytes(self) -> int:
        return sum(math.prod(shape) * dtype.itemsize for dtype, shape in self.tensor_specs().values())

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes() / self.numel

    def label(self) -> str:
        """Short human label: 'int3/g128', 'int2+r16', 'lr32', 'bf16'."""
        if self.kind in PASSTHROUGH_DTYPES:
            return self.kind
        if self.kind == "int":
            return f"int{self.bits}/g{self.group_size}"
        if self.kind == "lowrank":
            return f"lr{self.rank}"
        return f"int{self.bits}+r{self.rank}"


def packed_row_bytes(cols: int, bits: int) -> int:
    return (cols * bits + 7) // 8


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
        return torch.nn.functional.linear(x, self.weight())

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


def linear(x: torch.Tensor, op) -> torch.Tensor:
    """x @ op^T for a weight tensor or any linear operator (LowRankLinear, PackedLinear, ...)."""
    from .models.linear import linear as product

    return product(x, op) if isinstance(op, torch.Tensor) else op(x)


def op_nbytes(op) -> int:
    return op.numel() * op.element_size() if isinstance(op, torch.Tensor) else op.nbytes


def decode_linear(enc: Encoding, tensors: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32):
    """Runtime form: a dense tensor, or a LowRankLinear when keeping the factors is smaller than dense."""
    if enc.kind != "lowrank":
        return decode(enc, tensors, dtype)
    out, inp = enc.shape
    if enc.rank * (out + inp) >= out * inp:
        return decode(enc, tensors, dtype)
    a = decode(enc.parts()["lr_a"], _sub(tensors, "lr_a"), dtype)
    b = decode(enc.parts()["lr_b"], _sub(tensors, "lr_b"), dtype)
    return LowRankLinear(a, b)

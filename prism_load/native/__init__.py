"""Native CPU kernels for decode-shaped products, on weights in the form the container stores them.

Decode is memory-bound: reading 4-bit codes instead of fp32 or bf16 weights is the speed-up, provided the
unpacking costs less than the bytes it saves. torch's stock int4 op (`_weight_int4pack_mm_for_cpu`) needs
its own layout and is compute-bound on AVX2, and its one-row bf16 product reads bf16 weights no faster than
fp32 ones. So (bench/results/kernels.md compares them all):
- `int_linear` / `BoundIntLinear`: an `int` weight (prism_load/container/codecs.py layout) read as stored,
  exact with fp32 x (int_linear.c); with `activations="int16"` or `"int8"`, x rounded to int16 / int8 per
  group and multiplied in integers (q8_linear.c: VNNI where the CPU has it, else AVX2), which takes fewer
  vector instructions per weight than the exact kernel's widening to fp32: int16 rounds x 250 times finer
  than bf16 would (the "native-int16" kernel), int8 as llama.cpp does (the opt-in "native-int8" kernel);
- `bf16_linear`: a bf16 weight times up to GEMV_MAX_ROWS bf16 rows (int_linear.c), rounded as torch rounds.
- `expert_block.expert_block`: a decode token's routed experts of one MoE layer (gate, up, SwiGLU, down and
  the weighted sum) in one call on the integer kernels (expert_block.c).
The C sources are compiled on first use (build.py); when that is impossible `available()` is False and
`unavailable_reason()` says why, and callers use stock torch ops.
"""

from __future__ import annotations

import ctypes
import struct
import threading

import torch

from .build import NativeUnavailable, load

BITS = (2, 4, 8)
ACTIVATIONS = ("fp32", "int16", "int8")  # what x is multiplied as: exact fp32, or rounded per group
Q16_MAX_GROUP = 2048  # q8_linear.c's int16 path: integer sums stay exact up to this group size
# rows of x up to which the 256-bit int16 tiles beat the exact kernel; beyond, the exact kernel's gemm path (weights
# dequantised once per block, then fp32 register tiles) is faster (bench/results/kernels.md, M = 8 vs 16). The
# 512-bit tiles beat it at every M measured (1 to 64: bench/results/kernels.md) and take any number of rows.
Q16_UPTO_M = 8
_ARGS = 13  # prism_int_linear_packed's argument array
_local = threading.local()  # one argument array per thread: the compute and prefetch threads may both call


def available() -> bool:
    return load()[0] is not None


def unavailable_reason() -> str | None:
    return load()[1]


def q8_available() -> bool:
    """Whether the integer-activation kernels (q8_linear.c) run here: wherever the native kernels do (AVX2 is
    their floor); a function of its own so tests can take them away alone."""
    return available()


def q8_instructions() -> str | None:
    """The integer dot product q8_linear.c uses on this CPU ("AVX-VNNI", "AVX512-VNNI" or "AVX2"), or None."""
    fn = load()[0]
    return None if fn is None else fn.q8_instructions()


def q16_vector_bits() -> int | None:
    """The vector width of the int16-activation tiles here: 512 where the CPU has AVX512-VNNI and AVX512BW (and
    no AVX2 was forced), else 256; None without the native kernels. Same outputs either way (q8_linear.c)."""
    fn = load()[0]
    return None if fn is None else (512 if fn.q16_zmm() else 256)


def q8_force_instructions(name: str | None) -> None:
    """Make q8_linear.c use these instructions ("AVX2", or the VNNI this CPU has; None: detect), so tests and
    benchmarks can compare them on one machine. ValueError where the CPU lacks them."""
    from .build import Q8_INSTRUCTIONS

    codes = {v: k for k, v in Q8_INSTRUCTIONS.items()}
    if name is not None and name not in codes:
        raise ValueError(f"unknown instructions {name!r}; expected one of {sorted(codes)}")
    rc = _kernel().q8_force(0 if name is None else codes[name])
    if rc == -3:
        raise ValueError(f"this CPU cannot run {name} (it runs {q8_instructions()})")
    _check_rc(rc, "q8_force")


def _whole_blocks(m: int, k: int, bits: int, group_size: int, block_bits: int, max_group: int) -> bool:
    """q8_linear.c's shape rule (q8_make): groups and K of whole weight blocks, groups of at most max_group codes;
    a last group shorter than group_size is one of its own."""
    return (bits in BITS and m > 0 and (group_size * bits) % block_bits == 0 and 0 < group_size <= max_group
            and k > 0 and (k * bits) % block_bits == 0)


def q8_takes(m: int, k: int, bits: int, group_size: int) -> bool:
    """Whether q8_linear.c takes this shape with int8 x: 32-byte blocks, groups up to 16384 codes."""
    return _whole_blocks(m, k, bits, group_size, 256, 16384)


def q16_takes(m: int, k: int, bits: int, group_size: int) -> bool:
    """Whether q8_linear.c takes this shape with int16 x: 16-byte blocks, groups up to Q16_MAX_GROUP codes."""
    return _whole_blocks(m, k, bits, group_size, 128, Q16_MAX_GROUP)


def q16_512(k: int, bits: int, group_size: int) -> bool:
    """Whether the int16 path multiplies this weight with its 512-bit tiles: a CPU that has them, and groups and
    K of whole 32-byte blocks (q8_make)."""
    return q16_vector_bits() == 512 and (group_size * bits) % 256 == 0 and (k * bits) % 256 == 0


def q16_row_limit(k: int, bits: int, group_size: int) -> int | None:
    """The most rows of x the int16 path takes for this weight (None: any): Q16_UPTO_M on the 256-bit tiles."""
    return None if q16_512(k, bits, group_size) else Q16_UPTO_M


def integer_takes(activations: str, m: int, k: int, bits: int, group_size: int) -> bool:
    """Whether the kernel of these activations ("int16", "int8") runs here and takes this shape (int16: any rows
    on the 512-bit tiles, up to Q16_UPTO_M on the 256-bit ones; more rows go to the exact kernel, which is
    faster there)."""
    if not q8_available():
        return False
    if activations == "int16":
        limit = q16_row_limit(k, bits, group_size)
        if limit is not None and m > limit:
            return False
    return {"int16": q16_takes, "int8": q8_takes}[activations](m, k, bits, group_size)


def _entry(fn, activations: str, m: int, k: int, bits: int, group_size: int, pair: bool = False):
    """The native entry point for these activations where it takes the shape, else the exact kernel's."""
    if activations not in ACTIVATIONS:
        raise ValueError(f"activations={activations!r}: expected one of {', '.join(ACTIVATIONS)}")
    if activations != "fp32" and integer_takes(activations, m, k, bits, group_size):
        return {("int8", False): fn.q8, ("int8", True): fn.q8_pair,
                ("int16", False): fn.q16, ("int16", True): fn.q16_pair}[activations, pair]
    return fn.pair if pair else fn


def _check_rc(rc: int, what: str) -> None:
    """A native entry point's return code as the exception it stands for (0: nothing)."""
    if rc == -1:
        raise MemoryError(f"{what}: out of memory for its scratch buffers")
    if rc != 0:
        raise ValueError(f"{what} rejected its arguments (code {rc})")


def _kernel():
    fn, reason, _ = load()
    if fn is None:
        raise NativeUnavailable(f"native kernels unavailable: {reason}")
    return fn


def _args() -> ctypes.Array:
    args = getattr(_local, "args", None)
    if args is None:
        args = _local.args = (ctypes.c_int64 * _ARGS)()
    return args


def _check(name: str, t, dtype: torch.dtype, shape: tuple[int, int]) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dtype != dtype or tuple(t.shape) != shape or t.device.type != "cpu":
        raise ValueError(f"{name} must be {dtype} {list(shape)} on cpu, got {t.dtype} {list(t.shape)} on {t.device}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def _diagnose(x, qweight, scales, zeros, bits, group_size, k) -> None:
    """The first thing wrong with int_linear's arguments, as a ValueError (the fast check only says whether)."""
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")
    if not isinstance(group_size, int) or group_size <= 0 or not isinstance(k, int) or k <= 0:
        raise ValueError(f"group_size and k must be positive integers, got {group_size!r} and {k!r}")
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != k or x.device.type != "cpu":
        raise ValueError(f"x must be a cpu tensor [M, {k}], got {getattr(x, 'shape', type(x).__name__)}")
    if not x.is_floating_point():
        raise ValueError(f"x must be floating point, got {x.dtype}")
    n = qweight.shape[0] if isinstance(qweight, torch.Tensor) and qweight.dim() == 2 else -1
    _check_weight(qweight, scales, zeros, n, bits, group_size, k)


def _check_weight(qweight, scales, zeros, n: int, bits: int, group_size: int, k: int) -> None:
    """ValueError naming the first of an `int` weight's tensors that is not what int_linear reads for an
    [n, k] weight of `bits` bits in groups of `group_size`: contiguous cpu tensors of its dtype and shape."""
    _check("qweight", qweight, torch.uint8, (n, (k * bits + 7) // 8))
    _check("scales", scales, torch.float16, (n, -(-k // group_size)))
    _check("zeros", zeros, torch.float16, (n, -(-k // group_size)))


def int_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
               group_size: int, k: int, out: torch.Tensor | None = None, activations: str = "fp32") -> torch.Tensor:
    """x [M, k] (fp32, or bf16/fp16, widened) @ w.T -> fp32 [M, N], w the `int` weight [N, k] of `bits` bits
    in groups of `group_size` (qweight uint8 [N, ceil(k*bits/8)], scales and zeros fp16 [N, ceil(k/g)]),
    read as stored. `out`: an fp32 [M, N] destination (rows may be strided). Runs on torch's thread count.
    `activations` "int16" / "int8": where the integer kernel takes the shape (integer_takes: int16 for up to
    Q16_UPTO_M rows), x is rounded to int16 / int8 per group and multiplied in integers (q8_linear.c: faster,
    not exact); elsewhere, and for "fp32", the exact kernel runs.
    Called about 50 times per decoded token, so the common case is checked in one expression."""
    fn = _kernel()
    try:
        n = qweight.shape[0]
        ok = (bits in BITS and type(group_size) is int and group_size > 0 and type(k) is int and k > 0
              and x.dim() == 2 and x.shape[1] == k and x.is_floating_point()
              and qweight.dtype is torch.uint8 and qweight.shape == (n, (k * bits + 7) // 8)
              and scales.dtype is torch.float16 and scales.shape == (n, -(-k // group_size))
              and zeros.dtype is torch.float16 and zeros.shape == scales.shape
              and qweight.is_contiguous() and scales.is_contiguous() and zeros.is_contiguous()
              and x.is_cpu and qweight.is_cpu and scales.is_cpu and zeros.is_cpu)
    except (AttributeError, TypeError, IndexError):
        ok = False
    if not ok:
        _diagnose(x, qweight, scales, zeros, bits, group_size, k)
        raise ValueError("int_linear: invalid arguments")  # _diagnose names the problem; this is a backstop
    m = x.shape[0]
    if x.dtype is not torch.float32 or x.stride(1) != 1 or (m > 1 and x.stride(0) < k):
        x = x.to(torch.float32).contiguous()
    if out is None:
        out = torch.empty(m, n, dtype=torch.float32)
    elif (not isinstance(out, torch.Tensor) or out.dtype is not torch.float32 or out.shape != (m, n)
          or not out.is_cpu or out.stride(1) != 1 or (m > 1 and out.stride(0) < n)):
        raise ValueError(f"out must be fp32 [{m}, {n}] on cpu with unit column stride")
    if m == 0 or n == 0:
        return out
    args = _args()
    args[:] = (x.data_ptr(), max(x.stride(0), k), m, k, qweight.data_ptr(), scales.data_ptr(), zeros.data_ptr(),
               n, bits, group_size, out.data_ptr(), max(out.stride(0), n), torch.get_num_threads())
    _check_rc(_entry(fn, activations, m, k, bits, group_size)(ctypes.addressof(args)), "int_linear")
    return out


def _fp32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype is torch.float32 and x.is_contiguous() else x.to(torch.float32).contiguous()


class BoundIntLinear:
    """int_linear for one weight, its arguments checked and bound once: a call fills the slots that change (x,
    its rows, the output, the thread count). Why: an expert's three projections are called at every decode
    step, and checking the same weight each time costs more Python than the call itself on small models.
    Other threads (and x that the fast path does not take) go through int_linear."""

    __slots__ = ("tensors", "bits", "group_size", "k", "n", "activations", "_args", "_addr", "_call", "_pair",
                 "_exact", "_exact_pair", "_upto", "_thread")

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                 group_size: int, k: int, activations: str = "fp32"):
        fn = _kernel()
        _diagnose(torch.empty(1, k) if isinstance(k, int) and k > 0 else None, qweight, scales, zeros, bits,
                  group_size, k)
        self.tensors = (qweight, scales, zeros)  # kept alive: the bound pointers are theirs
        self.bits, self.group_size, self.k, self.n = bits, group_size, k, qweight.shape[0]
        self._call = _entry(fn, activations, 1, k, bits, group_size)
        self._pair = _entry(fn, activations, 1, k, bits, group_size, pair=True)
        # what this weight is actually multiplied with ("fp32" where the integer kernel does not take it)
        self.activations = activations if self._call is not fn else "fp32"
        self._exact, self._exact_pair = fn, fn.pair
        # rows beyond: the exact kernel
        self._upto = q16_row_limit(k, bits, group_size) if self.activations == "int16" else None
        self._args = (ctypes.c_int64 * _ARGS)(0, k, 0, k, qweight.data_ptr(), scales.data_ptr(), zeros.data_ptr(),
                                              self.n, bits, group_size, 0, self.n, 1)
        self._addr = ctypes.addressof(self._args)
        self._thread = threading.get_ident()

    def spec(self) -> BoundIntLinear:
        """This call without its tensors (their pointers zeroed, callable by nobody: its thread matches none, so
        a call goes to int_linear, which has no tensors): what `rebound` copies for another expert of the same
        layout."""
        s = self._copy(())
        s._args[4] = s._args[5] = s._args[6] = 0
        s._thread = None
        return s

    def rebound(self, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> BoundIntLinear:
        """This call for other tensors of the same dtypes and shapes, contiguous (an expert of the same stored
        layout in another slab, ContainerStore.read_into; the shapes are checked): its checks and kernel
        choice reused, only the pointers new. Why: on small experts building the three calls of a cache miss
        cost more than reading it."""
        try:
            _check_weight(qweight, scales, zeros, self.n, self.bits, self.group_size, self.k)
        except ValueError as e:
            raise ValueError(f"rebound: tensors of another layout than this call's ({e})") from None
        b = self._copy((qweight, scales, zeros))
        b._args[4], b._args[5], b._args[6] = qweight.data_ptr(), scales.data_ptr(), zeros.data_ptr()
        return b

    def _copy(self, tensors: tuple) -> BoundIntLinear:
        b = object.__new__(BoundIntLinear)
        for name in ("bits", "group_size", "k", "n", "activations", "_call", "_pair", "_exact", "_exact_pair",
                     "_upto"):
            setattr(b, name, getattr(self, name))
        b.tensors = tensors
        b._args = (ctypes.c_int64 * _ARGS)(*self._args)
        b._addr = ctypes.addressof(b._args)
        b._thread = threading.get_ident()
        return b

    def _takes(self, x: torch.Tensor) -> bool:
        """Whether the bound call takes x as it is bound (else int_linear checks it: another thread, another
        width, not a float cpu matrix)."""
        return (threading.get_ident() == self._thread and x.dim() == 2 and x.shape[1] == self.k and x.is_cpu
                and x.is_floating_point())

    def _bind_call(self, x: torch.Tensor, out: torch.Tensor, threads: int) -> None:
        a = self._args
        a[0], a[2], a[10], a[12] = x.data_ptr(), x.shape[0], out.data_ptr(), threads

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, k] @ w.T -> fp32 [M, N], as int_linear(x, *tensors, ...)."""
        if not self._takes(x):
            return int_linear(x, *self.tensors, self.bits, self.group_size, self.k, activations=self.activations)
        xf = _fp32(x)
        out = torch.empty(xf.shape[0], self.n, dtype=torch.float32)
        if xf.shape[0]:
            self._bind_call(xf, out, torch.get_num_threads())
            call = self._call if self._upto is None or xf.shape[0] <= self._upto else self._exact
            _check_rc(call(self._addr), "int_linear")
        return out

    def pair(self, other: BoundIntLinear, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(self(x), other(x)) in one native call (an expert's gate and up): x is prepared once and both
        weights share one parallel loop; the same bits as two calls. Two calls where the pair cannot share
        (another thread, another input width, kernels of different activations)."""
        if not (self._takes(x) and other._takes(x)) or self.activations != other.activations:
            return self(x), other(x)
        xf = _fp32(x)
        ya = torch.empty(xf.shape[0], self.n, dtype=torch.float32)
        yb = torch.empty(xf.shape[0], other.n, dtype=torch.float32)
        if xf.shape[0]:
            threads = torch.get_num_threads()
            self._bind_call(xf, ya, threads)
            other._bind_call(xf, yb, threads)
            pair = self._pair if self._upto is None or xf.shape[0] <= self._upto else self._exact_pair
            _check_rc(pair(self._addr, other._addr), "int_linear")
        return ya, yb


INTEGER_WIDE = {"int16": 1, "int8": 0}  # the native calls' `wide` flag by activation rounding (q8_linear.c)


def bound_integer_ops(*ops) -> list[BoundIntLinear] | None:
    """The BoundIntLinear of each operator (`native_bound()`, as PackedLinear exposes it) where all are on one
    integer kernel (int16 or int8 x), else None: what the fused native calls (expert_block.c,
    attention_decode.c) can read."""
    bound = [getattr(op, "native_bound", lambda: None)() for op in ops]
    if any(b is None for b in bound) or len({b.activations for b in bound}) != 1:
        return None
    return bound if bound[0].activations in INTEGER_WIDE else None


def float_bits(value: float) -> int:
    """An fp32 value's bits as an int64 argument slot (the native calls take their floats so)."""
    return struct.unpack("<I", struct.pack("<f", value))[0]


RMS_NORM_MAX_ROWS = 64  # rows rms_norm takes (decode and short prompts); torch's rms_norm threads longer ones


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """transformers' RMSNorm of x (fp32 or bf16, any leading shape, up to RMS_NORM_MAX_ROWS rows) with a weight of
    x's dtype: weight * (x_fp32 * rsqrt(mean(x^2) + eps)).to(dtype), in one native call (rms_norm.c); None where
    it does not take the arguments (the caller uses torch)."""
    dt = x.dtype
    if not (dt in (torch.float32, torch.bfloat16) and weight.dtype is dt and x.is_cpu and weight.is_cpu
            and x.dim() >= 1 and weight.dim() == 1 and x.shape[-1] == weight.shape[0] and weight.is_contiguous()
            and x.is_contiguous()):
        return None
    cols = x.shape[-1]
    rows = x.numel() // cols if cols else 0
    if not 0 < rows <= RMS_NORM_MAX_ROWS or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        return None
    fn = load()[0]
    if fn is None:
        return None
    out = torch.empty_like(x)
    args = _args()
    args[:9] = (x.data_ptr(), cols, rows, cols, weight.data_ptr(), out.data_ptr(), cols,
                float_bits(eps), int(dt is torch.bfloat16))
    _check_rc(fn.rms_norm(ctypes.addressof(args)), "rms_norm")
    return out


ROUTER_ROWS = 64  # rows router_topk takes (a decode batch, a short prompt): one C call a row


def router_topk(x: torch.Tensor, weight: torch.Tensor, k: int,
                renormalise: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """A softmax top-k router for fp32 rows x [B, H] (B up to ROUTER_ROWS) and an fp32 weight [E, H]
    (router_topk.c, one call a row): (logits [B, E], indices int64 [B, k], weights fp32 [B, k]), the weights
    renormalised to sum 1 if asked; None where it does not take the arguments (the caller uses torch). Each row is
    routed as the single-row decode step routes it (decode_layer.c calls the same function), so a batch's row
    gets that row's experts whatever the batch; torch's batched matmul may order the logits' sums otherwise."""
    if not (x.dtype is torch.float32 and weight.dtype is torch.float32 and x.dim() == 2
            and 0 < x.shape[0] <= ROUTER_ROWS and weight.dim() == 2 and x.shape[1] == weight.shape[1] and x.is_cpu
            and weight.is_cpu and x.is_contiguous() and weight.is_contiguous() and 0 < k <= weight.shape[0] <= 4096
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
        return None
    fn = load()[0]
    if fn is None:
        return None
    b, (e, h) = x.shape[0], weight.shape
    logits = torch.empty(b, e, dtype=torch.float32)
    indices = torch.empty(b, k, dtype=torch.int64)
    weights = torch.empty(b, k, dtype=torch.float32)
    args = _args()
    xp, lp, ip, wp = x.data_ptr(), logits.data_ptr(), indices.data_ptr(), weights.data_ptr()
    args[:9] = (xp, weight.data_ptr(), e, h, k, int(renormalise), lp, ip, wp)
    for r in range(b):
        if r:
            args[0], args[6], args[7], args[8] = xp + 4 * h * r, lp + 4 * e * r, ip + 8 * k * r, wp + 4 * k * r
        _check_rc(fn.router_topk(ctypes.addressof(args)), "router_topk")
    return logits, indices, weights


WIDENINGS = {3: 4, 5: 8, 6: 8}  # stored bits -> the width the int kernels read them at (widen_codes)


def widen_codes(qweight: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """A `bits`-bit stored tensor's codes (uint8 [rows, ceil(cols*bits/8)]) rewritten WIDENINGS[bits] wide, in
    fresh memory: the same values in the layout the int kernels read (int_linear.c: one BMI2 pdep per 8 codes).
    Why native: this runs at every cache miss of a 3-, 5- or 6-bit expert."""
    to = WIDENINGS.get(bits)
    rows = qweight.shape[0] if qweight.dim() == 2 else -1
    if (to is None or qweight.dtype is not torch.uint8 or not qweight.is_cpu or rows < 0 or qweight.stride(1) != 1
            or qweight.shape[1] != (cols * bits + 7) // 8):
        raise ValueError(f"widen_codes: a cpu uint8 [rows, {(cols * bits + 7) // 8}] tensor of 3, 5 or 6-bit codes "
                         f"is needed, got {qweight.dtype} {list(qweight.shape)} at {bits} bits")
    out = torch.empty(rows, (cols * to + 7) // 8, dtype=torch.uint8)
    if rows and cols:
        _check_rc(_kernel().widen(qweight.data_ptr(), qweight.stride(0), out.data_ptr(), out.stride(0), rows, cols,
                                  bits, to), "widen_codes")
    return out


GEMV_MAX_ROWS = 4  # rows of x bf16_linear takes (decode); more rows are a matrix product for torch


def bf16_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """F.linear for a bf16 weight [N, K] and x of at most GEMV_MAX_ROWS rows (any leading shape) on the CPU:
    a bf16 x (and bias) gives a bf16 result rounded as torch rounds; an fp32 x (and bias) gives the fp32 product
    with the weight widened to fp32 (a bf16-weight model computing in fp32). None where the kernel does not take
    the arguments (the caller uses torch). Why: torch's one-row bf16 product is slower than its fp32 one on most
    CPUs, although it reads half the bytes, and torch multiplies no fp32 x by a bf16 weight (see int_linear.c)."""
    io = x.dtype
    if not (io in (torch.bfloat16, torch.float32) and weight.dtype is torch.bfloat16 and weight.dim() == 2
            and x.dim() >= 1 and x.shape[-1] == weight.shape[1] and x.is_cpu and weight.is_cpu
            and weight.stride(1) == 1 and weight.shape[1] > 0 and weight.stride(0) >= weight.shape[1]
            and (bias is None or (bias.dtype is io and bias.is_cpu and bias.is_contiguous()
                                  and bias.shape == (weight.shape[0],)))):
        return None
    k, n = weight.shape[1], weight.shape[0]
    rows = x.numel() // k
    if not 0 < rows <= GEMV_MAX_ROWS or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        return None
    fn = load()[0]
    if fn is None:
        return None
    x2 = x.reshape(rows, k)
    if x2.stride(1) != 1 or (rows > 1 and x2.stride(0) < k):
        x2 = x2.contiguous()
    out = torch.empty(rows, n, dtype=io)
    args = _args()
    args[:12] = (x2.data_ptr(), max(x2.stride(0), k), rows, k, weight.data_ptr(), weight.stride(0), n,
                 0 if bias is None else bias.data_ptr(), out.data_ptr(), n, torch.get_num_threads(),
                 int(io is torch.float32))
    _check_rc(fn.gemv(ctypes.addressof(args)), "bf16_linear")
    return out.view(*x.shape[:-1], n)


__all__ = ["ACTIVATIONS", "BITS", "GEMV_MAX_ROWS", "INTEGER_WIDE", "RMS_NORM_MAX_ROWS", "BoundIntLinear",
           "NativeUnavailable", "available", "bf16_linear", "bound_integer_ops", "float_bits", "int_linear",
           "integer_takes", "q8_available", "q8_force_instructions", "q8_instructions", "q8_takes", "q16_512",
           "q16_row_limit", "q16_takes", "q16_vector_bits", "rms_norm", "router_topk", "unavailable_reason",
           "widen_codes"]

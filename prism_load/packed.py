"""The packed fast tier: experts stay in the form the container stores them in, and the matmul reads it.

Why: decode is memory-bound, and a container's experts are 2-8 bits a weight. Expanding them to fp32 at load
(the "decoded" form) multiplies the RAM an expert needs by 4-16 and the bytes every token streams through
the cores by as much. Here an `int` tensor stays packed and one of three kernels multiplies it:

- `native`: prism's AVX2 kernel (prism_load/native), reading the stored bitstream itself: 2-, 4- and 8-bit
  tensors are views of the bytes the container holds, so loading an expert is one positional read. 3-bit
  tensors are widened to 4-bit nibbles, 5- and 6-bit ones to bytes, once, when the expert is loaded
  (the codes are integers: widening changes no value). Activations stay fp32 inside the kernel.
- `int4pack`: torch's stock group-wise int4 kernel (`_weight_int4pack_mm_for_cpu`, bf16 activations), for
  machines where the native kernel cannot be built; the codes are repacked into its layout and its
  scale/zero pairs rounded to bf16 when the expert is loaded. Needs a bf16 model, at most 4 bits, rows a
  multiple of 16 and a group size it supports (a partial last group is split into smaller exact groups).
- `dequant`: the stored bits, dequantised at each use into a temporary and multiplied with F.linear: any
  encoding, any device, the same bits as the decoded form in fp32, and the slowest. A CPU load that
  puts tensors here although a kernel exists for others warns (prism_load.load never falls back to
  fp32-sized memory silently).
- `native-int16` and `native-int8`: the native kernel's memory form, but x is rounded to int16 (steps of
  max|x| / 32767 per weight group: 250 times finer than a bf16 rounding of x) or to int8 (as llama.cpp's
  CPU kernels do) and multiplied in integers (q8_linear.c: VNNI where the CPU has it, else AVX2): fewer
  vector instructions per weight than the exact kernel, which is bound by them, and not exact
  (bench/results/packed.md measures the KL of each). Tensors whose groups a kernel cannot take run the
  exact kernel.
  At decode, a token's experts on these kernels run in one native call per MoE layer
  (native/expert_block.py: ExpertWeights.block()).

Everything else (bf16/fp16/fp32 expert tensors, low-rank factors, biases) is kept as tensors in the model's
dtype; low-rank factors stay factored (`LowRankLinear`), with `int` factors packed like any `int` tensor.
Dense Linear layers stored as `int` (a container's attention projections are int8 by default) stay packed
too where the native kernel runs (`PackedDense`: the exact kernel, or native-int8 where that was asked for),
instead of being decoded to bf16.
"""

from __future__ import annotations

import warnings
from dataclasses import replace

import torch

from . import kernels, native  # native compiles nothing at import (native.available() builds on first use)
from .container.codecs import LowRankLinear, kept_factored, unpack_bits
from .container.format import Encoding, packed_row_bytes
from .errors import ContainerError
from .models.linear import linear

BACKENDS = ("native", "int4pack", "dequant", "native-int16", "native-int8")  # "auto" takes the first that can run
NATIVE_ACTIVATIONS = {"native": "fp32", "native-int16": "int16", "native-int8": "int8"}  # native.int_linear's
NATIVE = tuple(NATIVE_ACTIVATIONS)  # the backends that read the native kernel's form
INT4PACK_GROUPS = (256, 128, 64, 32)  # group sizes torch's CPU int4 kernel takes
INT4PACK_ROW_MULTIPLE = 16  # its packing needs output rows in multiples of this


def native_available() -> bool:
    return native.available()


def native_unavailable_reason() -> str:
    return native.unavailable_reason()


def kernel_bits(bits: int) -> int:
    """The width the native kernel reads a `bits`-bit tensor at: 2, 4 and 8 as stored, 3 widened to nibbles,
    5 and 6 to bytes (native.WIDENINGS)."""
    return native.WIDENINGS.get(bits, bits)


def held_nbytes(enc: Encoding) -> int:
    """Bytes the packed CPU form (the native kernels' form) holds for one stored tensor: `int` codes at the width
    the kernels read them (kernel_bits: 3 bits held as 4, 5 and 6 as 8; scales and zeros as stored), low-rank
    factors and bases likewise, anything else as stored. What a conversion priced at "runtime" spends."""
    def widened(e: Encoding) -> Encoding:
        if e.kind not in ("int", "int+lowrank", "lowrank"):
            return e
        factor = e.factor_bits if e.factor_bits in (None, 16) else kernel_bits(e.factor_bits)
        return replace(e, bits=None if e.bits is None else kernel_bits(e.bits), factor_bits=factor)
    return widened(enc).nbytes()


def int4pack_group(shape: tuple[int, int], group_size: int) -> int | None:
    """The group size torch's int4 kernel can use for this tensor exactly (a divisor of the stored group size
    and of the columns, so a partial last group splits into whole ones), or None."""
    rows, cols = shape
    if rows % INT4PACK_ROW_MULTIPLE:
        return None
    for g in INT4PACK_GROUPS:
        if g <= group_size and group_size % g == 0 and cols % g == 0:
            return g
    return None


def integer_kernel_takes(backend: str, enc: Encoding) -> bool:
    """Whether the integer-activation kernel of `backend` (native-int16, native-int8) runs here and takes this
    tensor's groups."""
    rows, cols = enc.shape
    return native.integer_takes(NATIVE_ACTIVATIONS[backend], 1, cols, kernel_bits(enc.bits), enc.group_size)


def choose_backend(enc: Encoding, dtype: torch.dtype, device: torch.device, requested: str = "auto") -> str:
    """The kernel for one `int` tensor: `requested` where it can run it, else the fastest exact one that can.
    "auto" on a CPU: native-int16 where it takes the tensor (its rounding of x is far below what the logits
    notice, and it is the fastest kernel that is not opt-in), except for an fp32 model, which asks for the
    reference arithmetic and gets the exact kernel."""
    if requested not in ("auto", *BACKENDS):
        raise ValueError(f"expert_kernel={requested!r}: expected 'auto' or one of {', '.join(BACKENDS)}")
    cpu = device.type == "cpu"
    if (requested == "auto" and cpu and dtype != torch.float32 and native_available()
            and integer_kernel_takes("native-int16", enc)):
        return "native-int16"
    can = {
        "native": cpu and native_available(),
        "int4pack": cpu and dtype == torch.bfloat16 and enc.bits <= 4 and int4pack_group(enc.shape, enc.group_size) is not None,
        "dequant": True,
    }
    if requested in ("native-int16", "native-int8"):
        can[requested] = can["native"] and integer_kernel_takes(requested, enc)
    if requested != "auto" and can[requested]:
        return requested
    return next(b for b in BACKENDS if can.get(b))  # the fastest that can (the fallback warning counts these)


class PackedLinear:
    """x [n, in] -> x @ W^T [n, out] for one `int` tensor kept packed; `tensors` in the backend's form:
    native/dequant (qweight, scales, zeros) as stored (native: widened to 4 or 8 bits); int4pack
    (weight in the kernel's layout, scale_zero bf16 [in / group, out, 2])."""

    __slots__ = ("backend", "shape", "bits", "group_size", "tensors", "_bound", "like")

    def __init__(self, backend: str, shape: tuple[int, int], bits: int, group_size: int,
                 tensors: tuple[torch.Tensor, ...]):
        self.backend, self.shape, self.bits, self.group_size = backend, tuple(shape), bits, group_size
        self.tensors = tuple(tensors)
        self._bound = None  # native: the kernel call bound to these tensors, made at the first call
        # [BoundIntLinear.spec() or None], shared by the operators of one stored layout (ContainerStore.read_into):
        # the first bound call of the layout fills it, the others are rebound from it
        self.like: list | None = None

    def with_tensors(self, tensors) -> PackedLinear:
        """The same operator over other tensors of the same layout (a slab copy, a device copy)."""
        op = PackedLinear(self.backend, self.shape, self.bits, self.group_size, tuple(tensors))
        op.like = self.like
        return op

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)

    @property
    def fp32_inside(self) -> bool:
        """The kernel computes in fp32 whatever x's dtype (expert_forward then converts once per expert)."""
        return self.backend in NATIVE

    def _native_call(self):
        """The native kernel bound to these tensors (made at the first call; rebound from the spec of another
        operator of this stored layout where `like` holds one)."""
        bound = self._bound
        if bound is None:
            like = self.like
            if like is not None and like[0] is not None:
                bound = like[0].rebound(*self.tensors)
            else:
                bound = native.BoundIntLinear(*self.tensors, self.bits, self.group_size, self.shape[1],
                                              activations=NATIVE_ACTIVATIONS[self.backend])
                if like is not None:
                    like[0] = bound.spec()
            self._bound = bound
        return bound

    def native_bound(self):
        """The native kernel bound to these tensors (BoundIntLinear), or None for the other backends
        (expert_block.c reads the bound arguments)."""
        return self._native_call() if self.backend in NATIVE else None

    def pair(self, other: PackedLinear, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(self(x), other(x)); one native call where both are native operators of one kind and x is fp32
        (an expert's gate and up: BoundIntLinear.pair), else two calls."""
        if (self.backend in NATIVE and isinstance(other, PackedLinear) and other.backend == self.backend
                and x.dtype is torch.float32):
            return self._native_call().pair(other._native_call(), x)
        return self(x), other(x)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend in NATIVE:
            y = self._native_call()(x)  # fp32
            return y if x.dtype is torch.float32 else y.to(x.dtype)
        if self.backend == "int4pack":
            w, scale_zero = self.tensors
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16).contiguous(), w, self.group_size,
                                                           scale_zero)
            return y.to(x.dtype)
        return linear(x, self.weight(torch.float32).to(x.dtype))

    def weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense weight (the dequant backend's per-use temporary; tests compare the kernels with it)."""
        if self.backend == "int4pack":
            eye = torch.eye(self.shape[1], dtype=torch.bfloat16, device=self.tensors[0].device)
            return self(eye).t().to(dtype)
        q, s, z = self.tensors
        w = torch.empty(self.shape, dtype=torch.float32, device=q.device)
        kernels.dequantize_into(q, self.bits, self.shape[1], s, z, self.group_size, w)
        return w.to(dtype)


def pack_int(enc: Encoding, tensors: dict[str, torch.Tensor], backend: str) -> PackedLinear:
    """One stored `int` tensor as a PackedLinear. Views of `tensors` where the backend reads the stored form
    as it is (native at 4 or 8 bits, dequant); fresh memory otherwise."""
    q, s, z = tensors["qweight"], tensors["scales"], tensors["zeros"]
    if backend == "dequant":
        return PackedLinear(backend, enc.shape, enc.bits, enc.group_size, (q, s, z))
    rows, cols = enc.shape
    meta = q.device.type == "meta"  # sizing only (ContainerStore): the same shapes, nothing computed
    if backend in NATIVE:
        bits = kernel_bits(enc.bits)
        if bits != enc.bits and meta:
            q = torch.empty(rows, packed_row_bytes(cols, bits), dtype=torch.uint8, device="meta")
        elif bits != enc.bits:
            q = native.widen_codes(q, enc.bits, cols)
        return PackedLinear(backend, enc.shape, bits, enc.group_size, (q, s, z))
    if backend != "int4pack":
        raise ValueError(f"unknown backend {backend!r}")
    g = int4pack_group(enc.shape, enc.group_size)
    if g is None:
        raise ContainerError(f"{enc.label()} {list(enc.shape)}: torch's int4 kernel cannot take this tensor")
    if meta:
        return PackedLinear(backend, enc.shape, 4, g, (torch.empty(rows, cols // 2, dtype=torch.uint8, device="meta"),
                                                      torch.empty(cols // g, rows, 2, dtype=torch.bfloat16, device="meta")))
    codes = unpack_bits(q, enc.bits, cols).to(torch.int32)
    weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    # (q - zero) * scale == (q - 8) * scale + (8 - zero) * scale: the kernel's convention is the right side
    parent = torch.arange(cols // g) * g // enc.group_size  # stored group of each kernel group
    scale, zero = s.float()[:, parent], z.float()[:, parent]
    scale_zero = torch.stack([scale, (8 - zero) * scale], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
    return PackedLinear(backend, enc.shape, 4, g, (weight, scale_zero))


def is_view_of_stored(enc: Encoding, backend: str) -> bool:
    """Whether pack_int keeps the stored tensors themselves (the expert can be read straight into its slab)."""
    return enc.kind == "int" and (backend == "dequant" or (backend in NATIVE and kernel_bits(enc.bits) == enc.bits))


def fallback_warning(backends: dict[str, int], device: torch.device, requested: str = "auto") -> None:
    """Warn when `int` tensors of a CPU model run on the dequant-per-use path that nobody asked for (no
    kernel here takes them): slower, never larger."""
    if device.type != "cpu" or not backends.get("dequant") or requested == "dequant":
        return
    reason = "" if native_available() else f" (the native kernel is unavailable: {native_unavailable_reason()})"
    warnings.warn(f"{backends['dequant']} of {sum(backends.values())} packed expert tensors have no kernel here"
                  f"{reason} and are dequantised at every use: same memory, slower", stacklevel=3)


# -- dense layers ------------------------------------------------------------------------------------------
class PackedDense(torch.nn.Module):
    """A dense Linear whose stored `int` weight stays as stored and is multiplied by a native kernel: the
    attention projections of a container are int8 by default, and decoding them to bf16 at load doubled the
    bytes every decode step streams (and the memory they hold) for a less exact product."""

    def __init__(self, op: PackedLinear, bias: torch.Tensor | None):
        super().__init__()
        self.op = op
        self.out_features, self.in_features = op.shape
        self.bias = bias  # a Parameter (moved from the Linear it replaces) or None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.op(x.reshape(-1, self.in_features)).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


def dense_nbytes(model: torch.nn.Module) -> int:
    """Bytes of a model's dense weights as it holds them: its parameters outside the experts, and the stored
    tensors of its packed dense layers (which are not parameters)."""
    params = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".mlp.experts." not in n)
    return params + sum(m.op.nbytes for m in model.modules() if isinstance(m, PackedDense))


def dense_packable(module, enc: Encoding, device: torch.device) -> bool:
    """Whether a dense tensor can stay packed: the weight of a prism Linear, `int` at a width the native
    kernel reads as stored (2, 4, 8 bits), on a CPU where the kernel runs."""
    from .models.linear import Linear

    return (type(module) is Linear and enc.kind == "int" and kernel_bits(enc.bits) == enc.bits
            and device.type == "cpu" and native_available())


def packable_dense(model: torch.nn.Module, dense: dict, device) -> set[str]:
    """The names of the dense weights that can stay packed (dense_packable): the caller loads the rest (the
    biases of these layers included), then swap_dense replaces their Linear layers. A tied lm_head shares the
    embedding's weight, is not a dense tensor of its own, and is never among them."""
    device = torch.device(device)
    taken = set()
    for name, (enc, _) in dense.items():
        if not name.endswith(".weight"):
            continue
        path = name[: -len(".weight")]
        try:
            module = model.get_submodule(path)
        except AttributeError:
            continue
        if dense_packable(module, enc, device):
            taken.add(name)
    return taken


def swap_dense(model: torch.nn.Module, dense: dict, taken: set[str], requested: str = "auto",
               dtype: torch.dtype = torch.bfloat16) -> None:
    """Put a PackedDense where each taken Linear was (after its bias was loaded), its kernel chosen as an
    expert's is (choose_backend for a `dtype` model on the CPU: taken tensors run natively, so the choice is
    among the native kernels)."""
    for name in taken:
        path = name[: -len(".weight")]
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        old = getattr(parent, child)
        enc, tensors = dense[name]
        backend = choose_backend(enc, dtype, torch.device("cpu"), requested)
        # owned copies: the stored tensors are views of the dense shard's memory map, and one view kept alive
        # keeps the whole mapping, every page of it read while loading, resident beside the decoded copies
        op = pack_int(enc, {k: v.clone(memory_format=torch.contiguous_format) for k, v in tensors.items()}, backend)
        setattr(parent, child, PackedDense(op, old.bias))


def fuse_qkv(model: torch.nn.Module) -> int:
    """One PackedDense for each attention's q, k and v projections where all three are packed alike (same
    backend, bits, group size, input width; biases all present or all absent): one kernel call per layer
    instead of three. Each output row is computed exactly as before (rows do not interact), so the logits
    are unchanged. Returns how many attentions were fused."""
    from .models.layers import Attention

    fused = 0
    for attn in model.modules():
        if type(attn) is not Attention:
            continue
        parts = [getattr(attn, name, None) for name in ("q_proj", "k_proj", "v_proj")]
        if not all(isinstance(m, PackedDense) for m in parts):
            continue
        ops = [m.op for m in parts]
        if (len({(o.backend, o.bits, o.group_size, o.shape[1]) for o in ops}) != 1
                or len({m.bias is None for m in parts}) != 1):
            continue
        tensors = tuple(torch.cat([o.tensors[i] for o in ops]) for i in range(len(ops[0].tensors)))
        rows = sum(o.shape[0] for o in ops)
        op = PackedLinear(ops[0].backend, (rows, ops[0].shape[1]), ops[0].bits, ops[0].group_size, tensors)
        bias = None if parts[0].bias is None else torch.nn.Parameter(torch.cat([m.bias for m in parts]),
                                                                        requires_grad=False)
        attn.qkv_proj = PackedDense(op, bias)
        attn.qkv_sizes = [o.shape[0] for o in ops]
        del attn.q_proj, attn.k_proj, attn.v_proj
        fused += 1
    return fused


# -- whole experts -------------------------------------------------------------------------------------
EncodedTensor = tuple[Encoding, dict[str, torch.Tensor]]


def _sub(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


class ExpertPacker:
    """Turns one expert's stored tensors into packed operators: one kernel choice per `int` tensor (the
    same for every expert of the same encodings), counted in `backends` for the fallback warning."""

    def __init__(self, dtype: torch.dtype, device, requested: str = "auto"):
        self.dtype, self.device, self.requested = dtype, torch.device(device), requested
        self.backends: dict[str, int] = {}

    def backend(self, enc: Encoding) -> str:
        return choose_backend(enc, self.dtype, self.device, self.requested)

    def linear(self, enc: Encoding, tensors: dict[str, torch.Tensor], count: bool = True):
        """One stored tensor as an operator: PackedLinear, LowRankLinear (factors packed or in dtype), or
        a tensor in the model's dtype (an owned copy: nothing views a read buffer's floats)."""
        if enc.kind == "int":
            backend = self.backend(enc)
            if count:
                self.backends[backend] = self.backends.get(backend, 0) + 1
            return pack_int(enc, tensors, backend)
        if enc.kind in ("bf16", "fp16", "fp32"):
            return tensors["weight"].to(self.dtype, copy=True)
        parts = enc.parts()
        if enc.kind == "lowrank" and not kept_factored(enc):
            return self._dense(enc, tensors)  # factors larger than the matrix: as the decoded form does
        a = self.linear(parts["lr_a"], _sub(tensors, "lr_a"), count)
        b = self.linear(parts["lr_b"], _sub(tensors, "lr_b"), count)
        base = self.linear(parts["base"], _sub(tensors, "base"), count) if "base" in parts else None
        return LowRankLinear(a, b, base)

    def _dense(self, enc: Encoding, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        from .container.codecs import decode

        if tensors and next(iter(tensors.values())).device.type == "meta":
            return torch.empty(enc.shape, dtype=self.dtype, device="meta")
        return decode(enc, tensors, self.dtype)

    def expert(self, encoded: dict[str, EncodedTensor], count: bool = True):
        """ExpertWeights of packed operators; gate and up stay two operators (ConcatLinear), each reading its
        own stored rows (expert_forward calls them one by one, without a concatenation)."""
        from .container.reader import ConcatLinear
        from .models.moe import ExpertWeights

        ops = {name: self.linear(enc, t, count) for name, (enc, t) in encoded.items()
               if name in ("gate_proj", "up_proj", "down_proj")}
        biases = {name: t["weight"].to(self.dtype, copy=True) for name, (enc, t) in encoded.items()
                  if name.endswith("_bias")}
        gate_up_bias = torch.cat([biases["gate_bias"], biases["up_bias"]]) if "gate_bias" in biases else None
        return ExpertWeights(ConcatLinear([ops["gate_proj"], ops["up_proj"]]), ops["down_proj"], gate_up_bias,
                             biases.get("down_bias"))

    def reads_stored_form(self, encodings: dict[str, Encoding]) -> bool:
        """Whether every tensor of the expert is used as stored, so its bytes can be read straight into the
        memory the cache holds it in (no copy, no repacking)."""
        return all(self._used_as_stored(enc) for enc in encodings.values())

    def _used_as_stored(self, enc: Encoding) -> bool:
        """An `int` tensor its kernel reads as stored, or a low-rank operator kept factored whose parts all are
        (int factors and base: an int+lowrank projection of the native expert block, expert_block.h)."""
        if enc.kind == "int":
            return is_view_of_stored(enc, self.backend(enc))
        if enc.kind == "int+lowrank" or kept_factored(enc):
            return all(self._used_as_stored(part) for part in enc.parts().values())
        return False

    def nbytes(self, encodings: dict[str, Encoding]) -> int:
        """Exact bytes of expert()'s tensors, from the encodings alone (built on the meta device)."""
        from .runtime.stores import weights_nbytes

        encoded = {name: (enc, {k: torch.empty(shape, dtype=dt, device="meta")
                                for k, (dt, shape) in enc.tensor_specs().items()})
                   for name, enc in encodings.items()}
        return weights_nbytes(self.expert(encoded, count=False))

    def count(self, encodings: dict[str, Encoding]) -> None:
        """Count the kernel each `int` tensor of an expert gets (low-rank factors and int bases included)."""
        for enc in encodings.values():
            todo = [enc]
            while todo:
                e = todo.pop()
                if e.kind == "int":
                    b = self.backend(e)
                    self.backends[b] = self.backends.get(b, 0) + 1
                else:
                    todo.extend(e.parts().values())

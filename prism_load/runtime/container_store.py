"""The expert store of a .prism container (the runtime's cold tier when it is a container).

Apart from prism_load/runtime/stores.py (the store protocol, the in-memory and checkpoint stores, and the
helpers over ExpertWeights), because it builds the packed operators: prism_load/packed.py imports stores.py,
so stores.py must not import packed.py.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch

from .. import kernels
from ..container.codecs import codes_nbytes, kept_factored
from ..container.format import Encoding, aligned
from ..container.reader import codes_layout, decode_expert
from ..models.moe import ExpertWeights
from ..native.expert_block import BlockTemplate
from ..packed import ExpertPacker
from .stores import (
    TENSOR_ALIGNMENT,
    DeferredViews,
    StoreBase,
    map_weights,
    pack_into,
    packed_nbytes,
    packed_ops,
    weights_nbytes,
    weights_tensors,
)
from .tiers import Slab


def decoded_nbytes(encodings: dict[str, Encoding], dtype: torch.dtype, codes: bool = False) -> int:
    """Bytes of decode_expert's output for one expert: a low-rank tensor stays factored when that is smaller;
    with codes=True, what codes_layout keeps as codes costs a byte per weight plus scales and zeros."""
    as_codes = codes_layout(encodings) if codes else {}
    total = 0
    for name, enc in encodings.items():
        if as_codes.get(name):
            total += codes_nbytes(enc)
        elif kept_factored(enc):
            total += enc.rank * sum(enc.shape) * dtype.itemsize
        else:
            total += math.prod(enc.shape) * dtype.itemsize
    return total


def expert_nbytes(records, packer: ExpertPacker | None, dtype: torch.dtype, codes: bool = False) -> dict:
    """{(layer, expert): bytes of its fast-tier form}: packed (packer.nbytes, exact) or else decoded
    (decoded_nbytes), worked out once per distinct set of encodings (experts of one encoding share their size).
    What the cache budgets and what a resident load holds (container/loader.resident_expert_nbytes)."""
    by_encodings, out = {}, {}
    for r in records:
        sig = tuple(sorted(r.encodings.items()))
        if sig not in by_encodings:
            by_encodings[sig] = (packer.nbytes(r.encodings) if packer is not None
                                 else decoded_nbytes(r.encodings, dtype, codes))
        out[(r.layer, r.expert)] = by_encodings[sig]
    return out


class ContainerStore(StoreBase):
    """Experts of a .prism container: one positional read per expert (checksum checked) into one uint8 tensor
    (the form the CUDA host tier pins as it is), then the fast tier's form on the tensor's device.

    form: "packed" (prism_load/packed.py: `int` tensors stay packed and a kernel multiplies them; an expert
    whose tensors are all used as stored is read straight into its slab, `read_into`), "decoded" (dense
    weights) or "codes" (`int` projections as unpacked uint8 codes)."""

    def __init__(self, container, args, dtype: torch.dtype = torch.float32, verify_checksums: bool | str = True,
                 form: str = "decoded", kernel: str = "auto", device="cpu"):
        self.container, self.dtype, self.verify_checksums = container, dtype, verify_checksums
        self._verified: set = set()  # experts whose bytes were checked once (verify_checksums=True checks no more)
        self.form, self.codes = form, form == "codes"
        self.packer = ExpertPacker(dtype, device, kernel) if form == "packed" else None
        self.num_experts, self.top_k = args.num_experts, args.num_experts_per_tok
        self.moe_layers = tuple(args.moe_layers)
        self._layouts = {(r.layer, r.expert): r.layout() for r in container.records}
        # each stored tensor's (tensor, suffix, byte range, dtype, shape), split once: _encoded runs per miss
        self._views = {key: [(*t.key.split(".", 1), t.start, t.start + t.nbytes, t.dtype, tuple(t.shape)) for t in layout]
                       for key, layout in self._layouts.items()}
        # each expert's encodings as one hashable key: experts of one encoding share their size and form
        self._signatures = {(r.layer, r.expert): tuple(sorted(r.encodings.items())) for r in container.records}
        self._nbytes = expert_nbytes(container.records, self.packer, dtype, self.codes)
        direct = {}
        for r in container.records:
            sig = self._signatures[(r.layer, r.expert)]
            if sig not in direct:
                direct[sig] = self.packer is not None and self.packer.reads_stored_form(r.encodings)
            if self.packer is not None:
                self.packer.count(r.encodings)
        self._direct = {key: direct[sig] for key, sig in self._signatures.items()}
        self._view_plans: dict = {}  # (layer, expert) -> read_into's operators on meta and their byte ranges
        self._layout_ids: dict = {}  # _view_plan's layouts, numbered
        self._likes: dict = {}  # layout -> one PackedLinear.like per operator of the layout, in packed_ops order
        self._block_templates: dict = {}  # layout -> its BlockTemplate, or False where it is no native block
        plain = dtype == torch.float32 and form == "decoded"
        self._int_plans = {key: int_plan(self.container.record(*key).encodings, layout) if plain else None
                           for key, layout in self._layouts.items()}

    def nbytes(self, layer, expert):
        return self._nbytes[(layer, expert)]

    def stored_nbytes(self, layer, expert):
        return self.container.record(layer, expert).length

    def frequency(self, layer, expert):
        return self.container.record(layer, expert).frequency

    def hot(self, layer, expert):
        return self.container.record(layer, expert).tier == "hot"

    def _verify(self, key) -> bool:
        """Whether this read of the expert checks its checksum: every read with "always", the first with True
        (a reload reads the range that first read checked), none with False."""
        return self.verify_checksums == "always" or (self.verify_checksums is True and key not in self._verified)

    def _read(self, record, into=None, threads: int = 1):
        key = (record.layer, record.expert)
        verify = self._verify(key)
        out = self.container.read_expert_bytes(record, verify, into=into, threads=threads)
        if verify:
            self._verified.add(key)
        return out

    def fetch(self, layer, expert) -> torch.Tensor:
        return torch.frombuffer(self._read(self.container.record(layer, expert)), dtype=torch.uint8)

    def _encoded(self, layer, expert, tensor_at: Callable[..., torch.Tensor]) -> dict:
        """{tensor: (Encoding, {suffix: tensor_at(start, end, dtype, shape)})} over the expert's stored layout:
        decode passes views of the read bytes (what Container.read_expert makes), _view_plan meta tensors."""
        record = self.container.record(layer, expert)
        encoded = {name: (enc, {}) for name, enc in record.encodings.items()}
        for tensor, suffix, start, end, dtype, shape in self._views[(layer, expert)]:
            encoded[tensor][1][suffix] = tensor_at(start, end, dtype, shape)
        return encoded

    def decode(self, layer, expert, raw: torch.Tensor) -> ExpertWeights:
        """The fast tier's form of the stored bytes in raw (packed operators may view raw itself)."""
        encoded = self._encoded(layer, expert, lambda start, end, dtype, shape: raw[start:end].view(dtype).reshape(shape))
        if self.packer is not None:
            return self.packer.expert(encoded, count=False)
        return decode_expert(encoded, self.dtype, self.codes)

    def reads_into(self, layer, expert) -> bool:
        """Whether read_into can serve this expert: its packed form is its stored bytes."""
        return self._direct[(layer, expert)]

    def read_into(self, layer, expert, take_slab: Callable[[int], Slab], threads: int = 1) -> ExpertWeights:
        """A fetch that is only a read: the stored bytes land in take_slab(stored bytes).buf (a fast-tier slab)
        with one positional read (split across `threads` OpenMP threads where large: a demand load on the
        decoding thread), and the packed operators view them there: the operators the slab last held for an
        expert of this layout where it has them (the same views, the same bound kernel arguments), else views
        made from the layout's plan, kept on the slab for the next expert read into it."""
        record = self.container.record(layer, expert)
        slab = take_slab(record.length)
        buf = slab.buf
        self._read(record, into=buf.numpy(), threads=threads)
        plan = self._view_plan(layer, expert)
        if plan is None:
            return self.decode(layer, expert, buf)
        layout = plan[3]
        built = slab.built.get(layout)
        if built is not None:
            return built
        # the native block: the layout's first is bound the usual way (checked, its kernel chosen), later ones are
        # that block moved to this buffer (BlockTemplate), not three rebound calls, with the views built on demand
        block_template = self._block_templates.get(layout)
        if block_template:
            built = DeferredViews(functools.partial(slab_views, buf, plan), block_template.at(buf.data_ptr(), buf),
                                  plan[4])
        else:
            built = slab_views(buf, plan)
            if block_template is None:
                block = built.block()
                self._block_templates[layout] = False if block is None else BlockTemplate(block, buf.data_ptr())
        slab.built[layout] = built
        return built

    def native_read(self, layer, expert) -> tuple | None:
        """What the native miss path (runtime/native_misses.py, native/expert_miss.c) needs to read this expert
        into a slab and give it its native block without Python: (shard index, file offset, stored bytes, its
        layout's BlockTemplate); None where its reads must come through read_into: the next one checks its
        checksum, its view plan or its layout's template is not made yet (read_into makes them), or its
        operators are no native block."""
        key = (layer, expert)
        plan = self._view_plans.get(key)
        if not self._direct[key] or self._verify(key) or plan is None:
            return None
        template = self._block_templates.get(plan[3])
        if not template:
            return None
        record = self.container.record(layer, expert)
        return record.shard, record.offset, record.length, template

    def native_weights(self, layer, expert, slab, block) -> ExpertWeights:
        """The weights of an expert the native miss path read into the slab, with the block it made there: views
        built on first use, as read_into's (the slab's tensor too, where it has none yet: NativeSlab)."""
        plan = self._view_plans[(layer, expert)]
        return DeferredViews(functools.partial(_views_of_slab, slab, plan), block, plan[4])

    def _view_plan(self, layer, expert):
        """(the expert's operators built once on the meta device; the dtype, shape, stride and element offset of
        each of their tensors in the stored bytes, in weights_tensors order; the dtypes; the layout, a key
        experts with the same stored bytes, encodings and views share; the bytes of its tensors, checked
        against nbytes()), or None where an operator holds anything but a view of the stored bytes, or a tensor
        sits off its dtype's alignment.
        A miss then only views its buffer, one as_strided per tensor: no encoding walk and no kernel choice
        per miss (about half of a small expert's load time went to those)."""
        key = (layer, expert)
        if key not in self._view_plans:
            where = {}

            def on_meta(start, _end, dtype, shape):
                t = torch.empty(shape, dtype=dtype, device="meta")  # held by `encoded`: no id() below is reused
                if start % dtype.itemsize == 0:
                    where[id(t)] = (dtype, t.shape, t.stride(), start // dtype.itemsize)
                return t

            record = self.container.record(layer, expert)
            encoded = self._encoded(layer, expert, on_meta)
            template = self.packer.expert(encoded, count=False)
            ranges = [where.get(id(t)) for t in weights_tensors(template)]
            usable = None not in ranges and record.length % 8 == 0
            layout = (record.length, self._signatures[key], tuple(ranges))
            layout = self._layout_ids.setdefault(layout, len(self._layout_ids))  # a small int: hashed per miss
            ops = [*packed_ops(template.gate_up), *packed_ops(template.down)]
            likes = self._likes.setdefault(layout, [[None] for _ in ops])
            for op, like in zip(ops, likes, strict=True):
                op.like = like  # every view of this layout shares its bound calls' spec (packed.py)
            tensor_nbytes = weights_nbytes(template)
            if usable and tensor_nbytes != self._nbytes[key]:
                raise RuntimeError(f"store {type(self).__name__}: layer {layer} expert {expert} decodes to "
                                   f"{tensor_nbytes} bytes, its nbytes() said {self._nbytes[key]}")
            self._view_plans[key] = (template, ranges, {r[0] for r in ranges}, layout, tensor_nbytes) if usable else None
        return self._view_plans[key]

    def decode_into(self, layer, expert, raw: torch.Tensor, take_buffer: Callable[[int], torch.Tensor]) -> ExpertWeights:
        """Decoded weights in take_buffer(packed bytes) (a fast-tier slab), laid out as pack_into lays them.
        An expert whose three projections are `int` (fp32 runtime, no biases) is dequantised straight into
        the buffer in one lock-free kernel call (kernels.decode_int_expert): no temporaries, no
        concatenation, no second copy, and little interpreter-lock time on a prefetch thread. Others
        decode, then are copied in."""
        plan = self._int_plans[(layer, expert)]
        if plan is None:
            weights = self.decode(layer, expert, raw)
            return pack_into(take_buffer(packed_nbytes(weights)), weights)
        meta, nbytes, (inter, hidden), down_start = plan
        buf = take_buffer(nbytes)
        kernels.decode_int_expert(raw, raw[: raw.numel() // 2 * 2].view(torch.float16), buf.view(torch.float32), meta)
        gate_up = buf[: 2 * inter * hidden * 4].view(torch.float32).view(2 * inter, hidden)
        down = buf[down_start : down_start + hidden * inter * 4].view(torch.float32).view(hidden, inter)
        return ExpertWeights(gate_up, down)


def _views_of_slab(slab, plan: tuple) -> ExpertWeights:
    return slab_views(slab.buf, plan)


def slab_views(buf: torch.Tensor, plan: tuple) -> ExpertWeights:
    """The operators of a read_into plan over the stored bytes in buf: one as_strided view per tensor."""
    template, ranges, dtypes = plan[:3]
    typed = {dtype: buf if dtype == torch.uint8 else buf.view(dtype) for dtype in dtypes}  # one view per dtype
    # as_strided's offset counts from its storage's start, and a slab may view its storage from further in
    # (a huge-page buffer starts on a 2 MiB boundary of a larger allocation)
    base = {dtype: t.storage_offset() for dtype, t in typed.items()}
    views = iter([typed[dtype].as_strided(shape, stride, base[dtype] + offset) for dtype, shape, stride, offset in ranges])
    return map_weights(template, lambda _: next(views))


def int_plan(encodings: dict[str, Encoding], layout) -> tuple | None:
    """decode_into's plan for an expert of three `int` projections and nothing else (None otherwise):
    (kernels.decode_int_expert's meta, slab bytes, (intermediate, hidden), byte offset of down), the slab
    laid out as pack_into lays ExpertWeights(gate_up, down): gate rows, up rows, then down 64-byte aligned."""
    names = ("gate_proj", "up_proj", "down_proj")
    if set(encodings) != set(names) or any(encodings[n].kind != "int" for n in names):
        return None
    where = {t.key: t for t in layout}
    inter, hidden = encodings["gate_proj"].shape
    down_start = aligned(2 * inter * hidden * 4, TENSOR_ALIGNMENT)
    nbytes = down_start + aligned(hidden * inter * 4, TENSOR_ALIGNMENT)
    meta = []
    for name, dst in zip(names, (0, inter * hidden, down_start // 4)):
        enc, q, s, z = encodings[name], *(where[f"{name}.{k}"] for k in ("qweight", "scales", "zeros"))
        if s.start % 2 or z.start % 2:  # the spec's layout puts fp16 first: always even
            return None
        meta += [q.start, q.shape[0], q.shape[1], s.start // 2, z.start // 2, s.shape[1], enc.bits, enc.shape[1],
                 enc.group_size, dst]
    return meta, nbytes, (inter, hidden), down_start

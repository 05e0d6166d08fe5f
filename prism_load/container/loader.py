"""Build a runnable prism model from a .prism container, every expert resident.

The skeleton comes from the embedded config through the family registry (on the meta device); dense
tensors are checked against it by name and shape before anything is decoded, then assigned. Experts stay
packed by default (ResidentExperts of prism_load/packed.py operators: the container's bytes in RAM); with
expert_form="decoded" a MoE layer whose experts all decode to dense tensors gets them stacked into its
StackedExperts, and a layer with a factored (low-rank) expert gets a ResidentExperts source instead.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError, ContainerError
from ..generation_config import FILE_NAME as GENERATION_CONFIG
from ..generation_config import GenerationConfig
from ..hf_loader import stack_experts
from ..hugepages import huge_buffer
from ..models.model import MoEForCausalLM
from ..models.moe import ExpertWeights, MoEBlock
from ..models.precision import held_dtype
from ..models.rope import Rotary
from ..native.expert_block import one_rounding
from ..packed import NATIVE, ExpertPacker, fallback_warning, fuse_qkv, packable_dense, swap_dense
from ..runtime.container_store import expert_nbytes
from ..runtime.memory import check_fits
from ..runtime.stores import map_weights, pack_into, packed_nbytes
from .codecs import decode
from .reader import Container, ResolveFile, model_args, owned


class ResidentExperts(nn.Module):
    """An ExpertSource holding every expert of one layer decoded (plain tensors or factored operators)."""

    def __init__(self, experts: list[ExpertWeights]):
        super().__init__()
        self.experts = experts
        self.num_experts = len(experts)

    def acquire(self, layer_index: int, expert_ids: list[int]) -> dict[int, ExpertWeights]:
        return {e: self.experts[e] for e in expert_ids}

    def native_blocks(self) -> list | None:
        """Every expert as native expert_block.c operators (ExpertWeights.block) where all are, in one rounding
        of x; else None. The whole-token decode step (models/native_token.py) reads them from a table."""
        return one_rounding([w.block() for w in self.experts])

    def resident_table(self, layer_index: int):
        """Where not every expert is a native block of one rounding (native_blocks None): those that are, of the
        most common rounding, as the whole-token decode loop's resident table (native.decode_layer.ResidentTable),
        so a step whose routed experts are all in it runs without a callback into Python; a step routed to
        another expert calls back (route), as every step did before. None without the native kernels. Why: on
        the reference model one low-rank expert of 48 made every layer of every token call back."""
        from ..native import available
        from ..native.decode_layer import ResidentTable

        if not available():
            return None
        table = self.__dict__.get("_table")
        if table is None:
            blocks = [w.block() for w in self.experts]
            roundings = [b.wide for b in blocks if b is not None]
            table = self.__dict__["_table"] = ResidentTable(self.num_experts)
            if roundings:
                common = max(set(roundings), key=roundings.count)
                for e, block in enumerate(blocks):
                    if block is not None and block.wide == common:
                        table.put(e, block)
        return table

    def record_hits(self, records: list[tuple[int, list[int]]]) -> None:
        """The steps the loop ran from the resident table: nothing counts a resident expert's uses."""


def load_dense(c: Container, model: MoEForCausalLM, dtype: torch.dtype, verify_checksums: bool,
               expert_form: str = "decoded", kernel: str = "auto", device: str | torch.device = "cpu",
               compute_dtype: torch.dtype | None = None) -> None:
    """Decode every dense tensor of the container into `model` (owned copies): big matrices in `dtype`, the
    rest in `compute_dtype` (models/precision.py), fp32 where the family keeps it.
    With the packed form and a native kernel (auto, native, native-int8) on a CPU where it runs, the `int`
    weights of dense Linear layers stay as stored (packed.PackedDense), as the experts do; with the dequant or
    int4pack kernels (the references) they are decoded."""
    family, args = model.family, model.args
    dense = c.dense_encoded(verify_checksum=verify_checksums)
    _check_dense_names(model, dense)
    packed = expert_form == "packed" and (kernel == "auto" or kernel in NATIVE)
    kept = packable_dense(model, dense, device) if packed else set()
    state = {name: owned(decode(enc, t, dense_decode_dtype(family, args, name,
                                                           held_dtype(model, name, dtype, compute_dtype))),
                         {x.untyped_storage().data_ptr() for x in t.values()})
             for name, (enc, t) in dense.items() if name not in kept}
    model.load_state_dict(state, assign=True, strict=False)
    model.compute_dtype = compute_dtype
    swap_dense(model, dense, kept, kernel, dtype)
    fuse_qkv(model)


def load_container(path: str | Path, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu", *,
                   verify_checksums: bool = True, resolve_file: ResolveFile | None = None,
                   expert_form: str = "packed", expert_kernel: str = "auto",
                   compute_dtype: torch.dtype | None = None, mmap: bool = False) -> MoEForCausalLM:
    """Open, validate and load a container; with verify_checksums every byte read is checked.
    expert_form "packed" (the default) keeps every expert as stored, multiplied by a kernel that reads that
    form (prism_load/packed.py): the model needs the container's bytes, not fp32's. "decoded" expands them to
    dense `dtype` weights (the reference the packed kernels are tested against). compute_dtype: the activations'
    dtype where it differs from `dtype` (models/precision.py; None: `dtype`). mmap: packed experts used as
    stored view a memory map of their shards (Container.map_expert_bytes) instead of the layer's arena: the load
    reads no expert byte but what checksums need, and the kernel's page cache holds the experts."""
    if expert_form not in ("packed", "decoded"):
        raise ContainerError(f"expert_form={expert_form!r}: a resident container is 'packed' or 'decoded'")
    if mmap and expert_form != "packed":
        raise ContainerError(f"mmap=True maps the stored bytes, which expert_form={expert_form!r} does not keep")
    with Container(path, resolve_file) as c:
        family, args = model_args(c.config)
        model = build_skeleton(family, args)
        packer = ExpertPacker(dtype, device, expert_kernel) if expert_form == "packed" else None
        load_dense(c, model, dtype, verify_checksums, expert_form, expert_kernel, device, compute_dtype)
        if not mmap:  # the dense weights are in, so what is left to take is what the experts may use
            check_experts_fit(c, packer, dtype, device, path)
        for i, block in model.moe_blocks():
            if packer is None:
                experts = [c.expert_weights(i, e, dtype, verify_checksum=verify_checksums)
                           for e in range(args.num_experts)]
                _attach_experts(block, experts, device)
            else:
                _check_biases(block, c.record(i, 0).encodings)
                arena = None if mmap else _ExpertArena(c, packer, i, args.num_experts, device)
                block.experts = ResidentExperts([_packed_expert(c, packer, i, e, device, verify_checksums, arena,
                                                                mapped=mmap)
                                                 for e in range(args.num_experts)])
        if packer is not None:
            fallback_warning(packer.backends, torch.device(device), expert_kernel)
        model.tie_weights()
        model.rotary = build_rotary(family, args)
        model.tokenizer = read_tokenizer(c, verify_checksums)
        model.generation_config = read_generation_config(c, verify_checksums)
    return model.to(device).eval()


def resident_expert_nbytes(c: Container, packer: ExpertPacker | None, dtype: torch.dtype) -> int:
    """Bytes every expert of the container holds resident: its packed form (packer.nbytes) or, decoded, its weights
    in `dtype` (a low-rank tensor factored where that is smaller: at most what the load holds, so the check
    built on it never refuses a load that fits); from the manifest's encodings alone, once per encoding."""
    return sum(expert_nbytes(c.records, packer, dtype).values())


def check_experts_fit(c: Container, packer: ExpertPacker | None, dtype: torch.dtype, device, path) -> None:
    """Refuse a resident load whose experts would not fit the memory this process may still take, before any
    is read (runtime/memory.check_fits), naming the loads that do fit."""
    form = "as stored (packed)" if packer is not None else f"decoded to {str(dtype).removeprefix('torch.')}"
    instead = ("Load it with expert_cache='auto' (experts served from the container by a cache sized to the memory "
               "left)")
    if torch.device(device).type == "cpu":
        instead += (" or mmap=True (experts paged in from the container by the kernel, so the page cache, not this "
                    "process, holds them)")
    if packer is None:
        instead += "; expert_form='packed' (the default) holds them as stored"
    check_fits(resident_expert_nbytes(c, packer, dtype), device, f"{path}: every expert resident, {form},",
               instead + ".")


def build_skeleton(family, args) -> MoEForCausalLM:
    """The model on the meta device; an embedded config that cannot build one is the container's fault."""
    try:
        with torch.device("meta"):
            return MoEForCausalLM(args, family, [family.build_layer(args, i) for i in range(args.num_hidden_layers)])
    except Exception as e:  # noqa: BLE001 - untrusted config values may break module construction anyway
        raise ContainerError(f"manifest.json: config does not build a model ({type(e).__name__}: {e})") from None


def build_rotary(family, args) -> Rotary:
    try:
        return Rotary(family.rotary_config(args))
    except Exception as e:  # noqa: BLE001
        raise ContainerError(f"manifest.json: config's rotary settings are invalid ({type(e).__name__}: {e})") from None


def _check_dense_names(model: MoEForCausalLM, dense: dict) -> None:
    """Dense tensors must be exactly the model's non-expert parameters, with its shapes."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items() if ".mlp.experts." not in k}
    if model.args.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    missing, unexpected = sorted(set(expected) - set(dense)), sorted(set(dense) - set(expected))
    if missing or unexpected:
        raise ContainerError(f"manifest.json: dense tensors do not match the model: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}")
    for name, shape in expected.items():
        if dense[name][0].shape != shape:
            raise ContainerError(f"manifest.json: dense[{name!r}]: shape {list(dense[name][0].shape)}, "
                                 f"the model needs {list(shape)}")


def dense_decode_dtype(family, args, name: str, dtype: torch.dtype) -> torch.dtype:
    """Dtype to decode a dense tensor in: fp32 where the family's reference keeps it so whatever the model
    dtype (DeepSeek's router, for example), as hf_loader does; otherwise `dtype`."""
    if name.startswith("layers."):
        _, i, key = name.split(".", 2)
        checkpoint_name = family.checkpoint_name(args, int(i), key)
    else:
        checkpoint_name = family.top_level_names(args).get(name, name)
    return torch.float32 if family.keeps_fp32(checkpoint_name) else dtype


class _ExpertArena:
    """One huge-page buffer (prism_load/hugepages.py) for the stored bytes of a MoE layer's experts that are used
    as stored (on a CPU): each is read straight into its slice, 64-byte aligned, and its operators view it
    there. Other experts read into their own buffers."""

    ALIGN = 64

    def __init__(self, c: Container, packer: ExpertPacker, layer: int, num_experts: int, device):
        self.ranges: dict[int, tuple[int, int]] = {}  # expert -> its slice (start, end)
        size = 0
        if torch.device(device).type == "cpu":
            for e in range(num_experts):
                record = c.record(layer, e)
                if packer.reads_stored_form(record.encodings):
                    self.ranges[e] = (size, size + record.length)
                    size += -(-record.length // self.ALIGN) * self.ALIGN
        self.buffer = huge_buffer(size) if size else None

    def slot(self, expert: int) -> torch.Tensor | None:
        at = self.ranges.get(expert)
        return None if at is None else self.buffer[at[0] : at[1]]


def _packed_expert(c: Container, packer: ExpertPacker, layer: int, expert: int, device,
                   verify_checksums: bool, arena: _ExpertArena | None = None, mapped: bool = False) -> ExpertWeights:
    """One expert in its packed form: operators viewing its read buffer where they use the stored bytes as
    they are (the buffer is then the expert's memory: its slice of the layer's arena where there is one, or its
    range of the shard's memory map when mapped), else copied into one buffer of their own (so no read buffer
    stays alive for a few views)."""
    record = c.record(layer, expert)
    packer.count(record.encodings)
    into = arena.slot(expert) if arena is not None else None
    # a large expert is read by the compute's threads together (native.read_range; a load runs outside any
    # parallel region)
    read = c.read_expert(layer, expert, verify_checksums, into=into, mapped=mapped, threads=torch.get_num_threads())
    weights = packer.expert(read, count=False)
    if not packer.reads_stored_form(record.encodings):
        weights = pack_into(torch.empty(packed_nbytes(weights), dtype=torch.uint8), weights)
    return map_weights(weights, lambda t: t.to(device))


def _check_biases(block: MoEBlock, encodings: dict) -> None:
    has_bias = hasattr(block.experts, "gate_up_bias")
    if ("gate_bias" in encodings) != has_bias:
        raise ContainerError(f"layer {block.layer_index}: expert biases {'missing' if has_bias else 'unexpected'} "
                             f"for this model family")


def _attach_experts(block: MoEBlock, experts: list[ExpertWeights], device) -> None:
    _check_biases(block, {"gate_bias": None} if experts[0].gate_up_bias is not None else {})
    if all(isinstance(w.gate_up, torch.Tensor) and isinstance(w.down, torch.Tensor) for w in experts):
        per_expert = [_canonical(w) for w in experts]
        block.experts.load_state_dict(stack_experts(per_expert), assign=True, strict=True)
    else:
        block.experts = ResidentExperts([map_weights(w, lambda t: t.to(device)) for w in experts])


def _canonical(w: ExpertWeights) -> dict[str, torch.Tensor]:
    """ExpertWeights -> the canonical per-expert tensors stack_experts expects."""
    inter = w.gate_up.shape[0] // 2
    out = {"gate_proj": w.gate_up[:inter], "up_proj": w.gate_up[inter:], "down_proj": w.down}
    if w.gate_up_bias is not None:
        out |= {"gate_bias": w.gate_up_bias[:inter], "up_bias": w.gate_up_bias[inter:], "down_bias": w.down_bias}
    return out


def read_tokenizer(c: Container, verify_checksums: bool):
    if not any(f.name == "tokenizer.json" for f in c.manifest.tokenizer_files):
        return None
    from tokenizers import Tokenizer

    data = c.file_bytes("tokenizer.json", verify_checksum=verify_checksums)
    try:
        return Tokenizer.from_str(data.decode("utf-8"))
    except Exception as e:  # noqa: BLE001 - the tokenizers library raises plain Exceptions
        raise ContainerError(f"tokenizer.json: not a valid tokenizer ({e})") from None


def read_generation_config(c: Container, verify_checksums: bool) -> GenerationConfig:
    """The source model's generation_config.json where the container carries one (a tokenizer file), else defaults."""
    if not any(f.name == GENERATION_CONFIG for f in c.manifest.tokenizer_files):
        return GenerationConfig()
    data = c.file_bytes(GENERATION_CONFIG, verify_checksum=verify_checksums)
    try:
        return GenerationConfig.from_bytes(data, GENERATION_CONFIG)
    except ConfigError as e:
        raise ContainerError(str(e)) from None

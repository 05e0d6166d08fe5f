"""Read a .prism container: validated at open, one positional read per expert, checksums on demand.

`Container(path)` parses manifest.json (prism_load/container/format.py), validates it against its embedded
model config (`validate`, here: the spec module knows no model code) and checks the size of every file
present; shard headers are checked against the manifest when a shard is first used. A shard that is not in
the folder is looked up through `resolve_file(name) -> Path` (the Hub fetches it on demand).
"""

from __future__ import annotations

import json
import math
import mmap
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..errors import ContainerError
from ..models.family import family_for
from ..models.moe import ExpertWeights
from ..native.read_range import pread_into
from .codecs import (
    CodesLinear,
    LowRankLinear,
    check_tensors,
    codes_part,
    decode,
    decode_linear,
    linear,
    op_nbytes,
)
from .format import (
    ALIGNMENT_BYTES,
    MANIFEST_NAME,
    MAX_EXPERTS,
    MAX_HEADER_BYTES,
    MAX_LAYERS,
    MAX_MANIFEST_BYTES,
    SHARD_FORMATS,
    DataFile,
    Encoding,
    ExpertRecord,
    ExpertShard,
    Manifest,
    aligned,
    checksum,
    expert_blob_name,
    fail,
    predictor_sources,
    validate_layout,
)

EncodedTensor = tuple[Encoding, dict[str, torch.Tensor]]
ResolveFile = Callable[[str], "str | Path"]
Progress = Callable[..., None]  # progress(bytes just checked[, total bytes])
MAX_OPEN_SHARDS = 64
CHUNK_BYTES = 64 << 20


def _access_advice(fd: int, random: bool) -> None:
    """POSIX_FADV_RANDOM or _NORMAL for the whole file behind fd (advice: a platform without it reads as before)."""
    advise = getattr(os, "posix_fadvise", None)
    if advise is not None:
        advise(fd, 0, 0, os.POSIX_FADV_RANDOM if random else os.POSIX_FADV_NORMAL)


class Container:
    """A .prism folder. `read_expert` fetches one expert with one read; `verify` checks every byte."""

    def __init__(self, path: str | Path, resolve_file: ResolveFile | None = None, *, check_files: bool = True):
        self.folder = Path(path)
        if not self.folder.is_dir():
            raise ContainerError(f"{self.folder}: not a folder")
        self.root = self.folder.resolve()
        self.resolve_file = resolve_file
        self.manifest = read_manifest(self._local(MANIFEST_NAME, required=True))
        self.config = self.manifest.config
        self.records = self.manifest.experts
        self._by_id = {(r.layer, r.expert): r for r in self.records}
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._checked_shards: set[int] = set()
        self._pins: dict[int, int] = {}
        self._closing: set[int] = set()  # shards whose descriptor close() left to its readers (shard_fd) to close
        self._maps: dict[int, torch.Tensor] = {}  # shard index -> its whole file, memory-mapped (map_expert)
        self._random = False  # expert reads are random accesses: no kernel readahead on the shards (read_randomly)
        self._lock = threading.Lock()
        if check_files:
            for f in self._files():
                local = self._local(f.name)
                if local is not None:
                    check_size(local, f)

    def __enter__(self) -> Container:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        self.close()

    def close(self) -> None:
        """Close the cached descriptors, under the lock another thread's reads take; one a reader holds now
        (shard_fd) closes when it lets go, not under it (its number could be reused by another file). Mappings stay
        valid while tensors view them (each holds its mapping). A later read opens its shard again."""
        if not hasattr(self, "_lock"):  # __init__ failed before making it
            return
        with self._lock:
            for index in list(self._fds):
                if self._pins.get(index):
                    self._closing.add(index)
                else:
                    os.close(self._fds.pop(index))
            self._maps.clear()

    # -- files ---------------------------------------------------------------------------------------
    def _files(self) -> list[DataFile | ExpertShard]:
        return self.manifest.files()

    def _local(self, name: str, required: bool = False) -> Path | None:
        """The file inside the folder, refusing symlinks that lead out of it; None if absent."""
        path = self.folder / name
        if not os.path.lexists(path):
            if required:
                raise ContainerError(f"{path}: missing (not a .prism container?)")
            return None
        real = path.resolve()
        if not real.is_relative_to(self.root):
            raise ContainerError(f"{path}: symlink leads outside the container folder (to {real})")
        if not real.is_file():
            raise ContainerError(f"{path}: not a regular file")
        return real

    def path(self, name: str) -> Path:
        """Local path of a file listed in the manifest: in the folder, else through resolve_file."""
        if not any(f.name == name for f in self._files()):
            raise ContainerError(f"{self.folder}: {name} is not listed in {MANIFEST_NAME}")
        local = self._local(name)
        if local is not None:
            return local
        if self.resolve_file is None:
            raise ContainerError(f"{self.folder / name}: missing (listed in {MANIFEST_NAME})")
        try:
            path = Path(self.resolve_file(name))
        except ContainerError:
            raise
        except Exception as e:  # noqa: BLE001 - a fetch may fail in any way; name the file
            raise ContainerError(f"{name}: could not be fetched ({type(e).__name__}: {e})") from None
        if not path.is_file():
            raise ContainerError(f"{name}: resolve_file returned {path}, which is not a file")
        return path

    @contextmanager
    def shard_fd(self, shard_index: int):
        """A pinned file descriptor of an expert shard (size and header checked when the file is first opened).
        Descriptors are cached, at most MAX_OPEN_SHARDS unpinned ones; a pinned one is never closed under a
        reader in another thread (a reused descriptor number could otherwise read another file)."""
        fd = self._acquire(shard_index)
        try:
            yield fd
        finally:
            with self._lock:
                self._pins[shard_index] -= 1
                if not self._pins[shard_index] and shard_index in self._closing:
                    self._closing.discard(shard_index)
                    os.close(self._fds.pop(shard_index))
                self._evict()

    def _acquire(self, shard_index: int) -> int:
        with self._lock:
            if shard_index in self._fds:
                self._fds.move_to_end(shard_index)
                self._pins[shard_index] = self._pins.get(shard_index, 0) + 1
                return self._fds[shard_index]
        shard = self.manifest.expert_shards[shard_index]
        path = self.path(shard.name)  # may fetch through resolve_file: not under the lock
        fd = os.open(path, os.O_RDONLY)
        try:
            check_size(path, shard, os.fstat(fd).st_size)
            if shard_index not in self._checked_shards:
                self._check_expert_header(fd, shard_index)
        except BaseException:
            os.close(fd)
            raise
        with self._lock:
            self._checked_shards.add(shard_index)
            if shard_index in self._fds:  # another thread opened it meanwhile
                os.close(fd)
            else:
                self._fds[shard_index] = fd
                if self._random:  # under the lock: read_randomly advises the open ones under it
                    _access_advice(fd, True)
            self._fds.move_to_end(shard_index)
            self._pins[shard_index] = self._pins.get(shard_index, 0) + 1
            self._evict()
            return self._fds[shard_index]

    def read_randomly(self, random: bool = True) -> None:
        """Tell the kernel that expert reads from now on are random accesses (POSIX_FADV_RANDOM on every shard,
        open or opened later): an expert cache's misses read one expert here and another there, and the kernel's
        readahead, which takes a read for the start of a sequential scan, otherwise reads past each expert (up to
        the device's read_ahead_kb, 8 MiB on the machine the README's figures come from): bytes the disk moves and
        the page cache holds for nothing. Decode speed measured the same either way there (bench_runtime.py's
        "kernel readahead" row, bench_peer.py's +kernel-readahead). False restores the kernel's default
        (POSIX_FADV_NORMAL)."""
        with self._lock:
            self._random = random
            for fd in self._fds.values():
                _access_advice(fd, random)

    def _evict(self) -> None:
        for index in list(self._fds):
            if len(self._fds) <= MAX_OPEN_SHARDS:
                return
            if not self._pins.get(index):
                os.close(self._fds.pop(index))

    def check_shard(self, shard_index: int) -> None:
        """Open an expert shard now: its size and safetensors header are checked against the manifest."""
        with self.shard_fd(shard_index):
            pass

    def _check_expert_header(self, fd: int, shard_index: int) -> None:
        """The safetensors header must list exactly this shard's experts, each blob covering its range
        plus the zero padding to the next 4 KiB boundary, tiling the data area."""
        shard = self.manifest.expert_shards[shard_index]
        data_start, entries, metadata = read_safetensors_header(fd, shard.bytes, shard.name)
        where = f"{shard.name}: safetensors header"
        if metadata != {"format": SHARD_FORMATS["experts"], "format_version": str(self.manifest.format_version)}:
            raise ContainerError(f"{where}: __metadata__ {metadata} is not a prism expert shard's")
        if data_start % ALIGNMENT_BYTES:
            raise ContainerError(f"{where}: data starts at {data_start}, not on a {ALIGNMENT_BYTES}-byte boundary")
        records = [r for r in self.records if r.shard == shard_index]
        expected = {expert_blob_name(r.layer, r.expert): r for r in records}
        if set(entries) != set(expected):
            extra, missing = sorted(set(entries) - set(expected)), sorted(set(expected) - set(entries))
            raise ContainerError(f"{where}: tensors do not match {MANIFEST_NAME} (unexpected {extra[:3]}, missing {missing[:3]})")
        for name, r in expected.items():
            dtype, shape, (begin, end) = entries[name]
            blob = aligned(r.length)
            if dtype != "U8" or shape != [blob] or (begin + data_start, end + data_start) != (r.offset, r.offset + blob):
                raise ContainerError(
                    f"{where}: {name} is {dtype} {shape} at data offsets [{begin}, {end}); {MANIFEST_NAME} says U8 "
                    f"[{blob}] at [{r.offset - data_start}, {r.offset - data_start + blob})")

    # -- experts -------------------------------------------------------------------------------------
    def record(self, layer: int, expert: int) -> ExpertRecord:
        try:
            return self._by_id[(layer, expert)]
        except KeyError:
            raise ContainerError(f"{self.folder}: no expert {expert} in layer {layer}") from None

    def read_expert_bytes(self, record: ExpertRecord, verify_checksum: bool = False, into=None, threads: int = 1):
        """The expert's byte range, fetched with one positional read (into a fresh bytearray, or into `into`:
        any writable buffer of exactly record.length bytes, returned), split across `threads` OpenMP threads
        where it is large (native.read_range: only from a thread outside any parallel region)."""
        shard = self.manifest.expert_shards[record.shard]
        buf = bytearray(record.length) if into is None else into
        view = memoryview(buf).cast("B")
        if len(view) != record.length:
            raise ValueError(f"{record.where()}: read buffer holds {len(view)} bytes, the expert {record.length}")
        with self.shard_fd(record.shard) as fd:
            n = pread_into(fd, view, record.offset, threads)
        if n != record.length:
            raise ContainerError(f"{shard.name}: {record.where()}: read {n} of {record.length} bytes (file truncated?)")
        if verify_checksum:
            self._check_expert(record, buf)
        return buf

    def _check_expert(self, record: ExpertRecord, data) -> None:
        """ContainerError naming the shard, the expert and its byte range where data's checksum differs."""
        got = checksum(data)
        if got != record.checksum:
            shard = self.manifest.expert_shards[record.shard]
            raise ContainerError(f"{shard.name}: {record.where()}: checksum {got} != {record.checksum} in "
                                 f"{MANIFEST_NAME} (bytes [{record.offset}, {record.end}) are damaged)")

    def map_expert_bytes(self, record: ExpertRecord, verify_checksum: bool = False) -> torch.Tensor:
        """The expert's byte range as a uint8 tensor viewing a memory map of its shard: nothing is read until
        a page is touched, pages stay shared with the kernel's page cache (which may drop and re-read them
        under memory pressure), and the tensor keeps the mapping alive after close(). The map is private
        copy-on-write, so a write through the tensor never reaches the file. With verify_checksum every page is
        read once, here. As with any memory map, a shard truncated while mapped ends the process (SIGBUS) at the
        next touch of a page past its new end: sizes are checked when a shard is first opened, not after."""
        with self._lock:
            whole = self._maps.get(record.shard)
        if whole is None:
            with self.shard_fd(record.shard) as fd:  # size and header checked at first open
                size = os.fstat(fd).st_size
                # ACCESS_COPY: MAP_PRIVATE, writable (torch.frombuffer wants a writable buffer), never written back
                whole = torch.frombuffer(mmap.mmap(fd, size, access=mmap.ACCESS_COPY), dtype=torch.uint8)
            with self._lock:
                whole = self._maps.setdefault(record.shard, whole)
        raw = whole[record.offset : record.offset + record.length]
        if verify_checksum:
            self._check_expert(record, raw.numpy())
        return raw

    def read_expert(self, layer: int, expert: int, verify_checksum: bool = False,
                    into: torch.Tensor | None = None, mapped: bool = False,
                    threads: int = 1) -> dict[str, EncodedTensor]:
        """{tensor name: (Encoding, {suffix: stored tensor})} of one expert; tensors view one read buffer (a fresh
        one, or `into`: a contiguous uint8 CPU tensor of exactly the expert's stored bytes; read by `threads`
        threads where large, read_expert_bytes), or with mapped=True the shard's memory map (map_expert_bytes)."""
        record = self.record(layer, expert)
        if mapped:
            raw = self.map_expert_bytes(record, verify_checksum)
        elif into is None:
            raw = torch.frombuffer(self.read_expert_bytes(record, verify_checksum, threads=threads), dtype=torch.uint8)
        else:
            raw = into
            self.read_expert_bytes(record, verify_checksum, into=into.numpy(), threads=threads)
        out: dict[str, EncodedTensor] = {name: (enc, {}) for name, enc in record.encodings.items()}
        for t in record.layout():
            tensor, suffix = t.key.split(".", 1)
            out[tensor][1][suffix] = raw[t.start : t.start + t.nbytes].view(t.dtype).reshape(t.shape)
        return out

    def expert_weights(self, layer: int, expert: int, dtype: torch.dtype = torch.float32,
                       verify_checksum: bool = False) -> ExpertWeights:
        return decode_expert(self.read_expert(layer, expert, verify_checksum), dtype)

    # -- dense tensors -------------------------------------------------------------------------------
    def dense_encoded(self, verify_checksum: bool = False) -> dict[str, EncodedTensor]:
        """Every dense tensor as stored, checked against its encoding (names, dtypes, shapes)."""
        out: dict[str, EncodedTensor] = {}
        for i in range(len(self.manifest.dense_shards)):
            out.update(self.dense_shard(i, verify_checksum))
        return out

    def dense_shard(self, index: int, verify_checksum: bool = False) -> dict[str, EncodedTensor]:
        """The dense tensors of one dense shard, read with the stock safetensors reader."""
        from safetensors import SafetensorError, safe_open

        shard = self.manifest.dense_shards[index]
        path = self.path(shard.name)
        check_size(path, shard)
        if verify_checksum and (problem := file_checksum_problem(path, shard)):
            raise ContainerError(problem)
        records = [r for r in self.manifest.dense.values() if r.shard == index]
        expected = {key for r in records for key in r.keys().values()}
        out: dict[str, EncodedTensor] = {}
        try:
            with safe_open(path, framework="pt") as f:
                keys = set(f.keys())
                if f.metadata() != {"format": SHARD_FORMATS["dense"]} or keys != expected:
                    raise ContainerError(
                        f"{shard.name}: tensors or metadata do not match {MANIFEST_NAME} (unexpected "
                        f"{sorted(keys - expected)[:3]}, missing {sorted(expected - keys)[:3]}, metadata {f.metadata()})")
                for r in records:
                    tensors = {suffix: f.get_tensor(key) for suffix, key in r.keys().items()}
                    check_tensors(r.encoding, tensors, f"{shard.name}: {r.name}")
                    out[r.name] = (r.encoding, tensors)
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise ContainerError(f"{shard.name}: unreadable safetensors file ({e})") from None
        return out

    def predictor_tensors(self, verify_checksum: bool = False) -> dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]:
        """The fitted prefetch predictors (docs/FORMAT.md §4a): (MoE layer, source MoE layer) -> (weight [E, H],
        bias [E]), fp32; empty when the container has none."""
        from safetensors import SafetensorError, safe_open

        p = self.manifest.predictor
        if p is None:
            return {}
        path = self.path(p.file.name)
        check_size(path, p.file)
        if verify_checksum and (problem := file_checksum_problem(path, p.file)):
            raise ContainerError(problem)
        _, args = model_args(self.config)
        shapes = {}
        for x in p.layers:
            w, b = x.keys()
            shapes[w], shapes[b] = [args.num_experts, args.hidden_size], [args.num_experts]
        try:
            with safe_open(path, framework="pt") as f:
                keys = set(f.keys())
                if f.metadata() != {"format": SHARD_FORMATS["predictor"]} or keys != set(shapes):
                    raise ContainerError(
                        f"{p.file.name}: tensors or metadata do not match {MANIFEST_NAME} (unexpected "
                        f"{sorted(keys - set(shapes))[:3]}, missing {sorted(set(shapes) - keys)[:3]}, metadata {f.metadata()})")
                tensors = {k: f.get_tensor(k) for k in shapes}
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise ContainerError(f"{p.file.name}: unreadable safetensors file ({e})") from None
        for k, t in tensors.items():
            if t.dtype != torch.float32 or list(t.shape) != shapes[k]:
                raise ContainerError(f"{p.file.name}: {k} is {t.dtype} {list(t.shape)}, expected float32 {shapes[k]}")
            if not torch.isfinite(t).all():
                raise ContainerError(f"{p.file.name}: {k} holds NaN or infinite values")
        return {(x.layer, x.from_layer): (tensors[x.keys()[0]], tensors[x.keys()[1]]) for x in p.layers}

    def dense_state(self, dtype: torch.dtype = torch.float32, verify_checksum: bool = False) -> dict[str, torch.Tensor]:
        """prism state_dict names -> decoded dense tensors."""
        out = {}
        for name, (enc, t) in self.dense_encoded(verify_checksum).items():
            out[name] = owned(decode(enc, t, dtype), {x.untyped_storage().data_ptr() for x in t.values()})
        return out

    def file_bytes(self, name: str, verify_checksum: bool = False) -> bytes:
        """A whole listed file (a tokenizer file, for example), checked against the manifest."""
        entry = next((f for f in self.manifest.tokenizer_files if f.name == name), None)
        if entry is None:
            raise ContainerError(f"{self.folder}: {name} is not a tokenizer file of {MANIFEST_NAME}")
        data = self.path(name).read_bytes()
        if len(data) != entry.bytes or (verify_checksum and checksum(data) != entry.checksum):
            raise ContainerError(f"{name}: size or checksum differs from {MANIFEST_NAME} (damaged)")
        return data

    # -- verification --------------------------------------------------------------------------------
    def data_bytes(self) -> int:
        return sum(f.bytes for f in self._files())


@dataclass(frozen=True)
class Overhead:
    """Bytes a container spends beyond its stored tensors, against its routed-expert weights."""

    manifest_bytes: int
    header_bytes: int  # safetensors headers (with their alignment padding) of every shard
    padding_bytes: int  # zeros between an expert's range and the next 4 KiB boundary
    expert_weights: int

    @property
    def bits_per_expert_weight(self) -> float:
        return 8 * (self.manifest_bytes + self.header_bytes + self.padding_bytes) / self.expert_weights

    def to_dict(self) -> dict:
        return {**asdict(self), "bits_per_expert_weight": self.bits_per_expert_weight}


def metadata_overhead(container: Container) -> Overhead:
    c = container
    dense_headers = 0
    for shard in c.manifest.dense_shards:
        with open(c.path(shard.name), "rb") as f:
            dense_headers += 8 + int.from_bytes(f.read(8), "little")
    first = {}
    for r in c.records:
        first.setdefault(r.shard, r.offset)  # records are in file order: the first starts where the data does
    return Overhead(
        manifest_bytes=(c.folder / MANIFEST_NAME).stat().st_size,
        header_bytes=dense_headers + sum(first.values()),
        padding_bytes=sum(aligned(r.length) - r.length for r in c.records),
        expert_weights=sum(r.numel for r in c.records),
    )


def overhead_bits_per_expert_weight(container: Container | str | Path) -> float:
    """(manifest + safetensors headers + alignment padding) in bits, per routed-expert weight."""
    if not isinstance(container, Container):
        with Container(container) as c:
            return metadata_overhead(c).bits_per_expert_weight
    return metadata_overhead(container).bits_per_expert_weight


def decode_expert(encoded: dict[str, EncodedTensor], dtype: torch.dtype = torch.float32,
                  codes: bool = False) -> ExpertWeights:
    """Stored tensors of one expert -> runtime ExpertWeights (gate and up rows concatenated; a low-rank
    tensor stays factored when that is smaller). The one decode path of every expert source. codes=True
    keeps `int` projections as CodesLinear (gate and up only when both are `int`; see codes_layout)."""
    stored = {t.untyped_storage().data_ptr() for _, ts in encoded.values() for t in ts.values()}
    as_codes = codes_layout({name: enc for name, (enc, _) in encoded.items()}) if codes else {}
    ops = {name: owned(decode_linear(enc, t, dtype), stored) for name, (enc, t) in encoded.items()
           if not as_codes.get(name)}
    if as_codes.get("gate_proj"):
        ops["gate_up"] = CodesLinear([codes_part(*encoded["gate_proj"]), codes_part(*encoded["up_proj"])], dtype)
    if as_codes.get("down_proj"):
        ops["down_proj"] = CodesLinear([codes_part(*encoded["down_proj"])], dtype)
    gate, up = ops.get("gate_proj"), ops.get("up_proj")
    if "gate_up" in ops:
        gate_up = ops["gate_up"]
    elif isinstance(gate, torch.Tensor) and isinstance(up, torch.Tensor):
        gate_up = torch.cat([gate, up])
    else:
        gate_up = ConcatLinear([gate, up])
    bias = None
    if "gate_bias" in ops:
        bias = torch.cat([ops["gate_bias"], ops["up_bias"]])
    return ExpertWeights(gate_up, ops["down_proj"], bias, ops.get("down_bias"))


def codes_layout(encodings: dict[str, Encoding]) -> dict[str, bool]:
    """Which projections decode_expert(codes=True) keeps as codes: gate and up together when both are
    `int` (their rows are concatenated), down when it is `int`; the rest decode densely."""
    is_int = {name: encodings[name].kind == "int" for name in ("gate_proj", "up_proj", "down_proj")}
    pair = is_int["gate_proj"] and is_int["up_proj"]
    return {"gate_proj": pair, "up_proj": pair, "down_proj": is_int["down_proj"]}


def owned(op, stored_ptrs: set[int]):
    """`op` with no tensor aliasing stored data (a same-dtype passthrough decode is a view): copies are fresh,
    64-byte-aligned allocations, so matmul results do not depend on where a tensor sat in a file or read
    buffer (CPU GEMM kernels round differently on misaligned inputs), and no view pins a whole read buffer."""
    if isinstance(op, torch.Tensor):
        return op.clone() if op.untyped_storage().data_ptr() in stored_ptrs else op
    if isinstance(op, LowRankLinear):
        return LowRankLinear(owned(op.a, stored_ptrs), owned(op.b, stored_ptrs), op.base)
    return op


class ConcatLinear:
    """x -> cat([op(x) for op]) along the last dim: gate and up when one of them is kept factored."""

    def __init__(self, ops: list):
        self.ops = ops

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([linear(x, op) for op in self.ops], dim=-1)

    @property
    def nbytes(self) -> int:
        return sum(op_nbytes(op) for op in self.ops)


# -- helpers -------------------------------------------------------------------------------------------
def read_manifest(path: Path) -> Manifest:
    size = path.stat().st_size
    if size > MAX_MANIFEST_BYTES:
        raise ContainerError(f"{path}: {size} bytes is larger than the {MAX_MANIFEST_BYTES}-byte limit")
    return parse_manifest(path.read_bytes())


def parse_manifest(text: str | bytes) -> Manifest:
    """manifest.json's text as a Manifest, every field checked, the layout and against its model config."""
    manifest = Manifest.from_json(text)
    validate_config(manifest)
    return manifest


def validate(m: Manifest) -> None:
    """Everything checkable without touching a data file: names, references, byte ranges, the model."""
    validate_layout(m)
    validate_config(m)


def validate_config(m: Manifest) -> None:
    """The manifest against its embedded model config: experts, their shapes, the predictor's layers."""
    _validate_against_config(m)
    _validate_predictor(m)


# -- the embedded model config -------------------------------------------------------------------------
def model_args(config: dict):
    """(family, ModelArgs) of the embedded config; any failure is the container's fault."""
    layers = config.get("num_hidden_layers")
    if not isinstance(layers, int) or isinstance(layers, bool) or not 0 < layers <= MAX_LAYERS:
        fail("config.num_hidden_layers", f"expected an integer in 1..{MAX_LAYERS}, got {layers!r}")
    try:
        family = family_for(config)
        args = family.parse_config(config)
    except Exception as e:  # noqa: BLE001 - an untrusted config may break parsing in any way
        fail("config", f"not a supported model config ({type(e).__name__}: {e})")
    _check_args(args)
    return family, args


def _check_args(args) -> None:
    """Values a model cannot be built or run with (the parsers check presence, not sense)."""
    for name in ("vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                 "num_experts", "num_experts_per_tok", "moe_intermediate_size"):
        v = getattr(args, name)
        if not isinstance(v, int) or not 0 < v < 2**31:
            fail(f"config.{name}", f"expected a positive integer, got {v!r}")
    if args.num_experts_per_tok > args.num_experts:
        fail("config.num_experts_per_tok", f"{args.num_experts_per_tok} > {args.num_experts} experts")
    if args.num_attention_heads % args.num_key_value_heads:
        fail("config.num_key_value_heads", f"{args.num_key_value_heads} does not divide {args.num_attention_heads} heads")
    if not (isinstance(args.rms_norm_eps, float) and math.isfinite(args.rms_norm_eps) and args.rms_norm_eps >= 0):
        fail("config.rms_norm_eps", f"expected a finite number >= 0, got {args.rms_norm_eps!r}")


def _validate_against_config(m: Manifest) -> None:
    """Exactly one record per (MoE layer, expert); tensor shapes as the config says; biases all or none."""
    _, args = model_args(m.config)
    if not 0 < args.num_experts <= MAX_EXPERTS:
        fail("config", f"num_experts {args.num_experts} is out of range 1..{MAX_EXPERTS}")
    h, inter = args.hidden_size, args.moe_intermediate_size
    shapes = {"gate_proj": (inter, h), "up_proj": (inter, h), "down_proj": (h, inter),
              "gate_bias": (inter,), "up_bias": (inter,), "down_bias": (h,)}
    moe_layers = set(args.moe_layers)
    has_bias = None
    for i, r in enumerate(m.experts):
        where = f"experts[{i}] ({r.where()})"
        if r.layer not in moe_layers:
            fail(f"{where}.layer", f"layer {r.layer} is not a MoE layer of the config (MoE layers: {sorted(moe_layers)})")
        if r.expert >= args.num_experts:
            fail(f"{where}.expert", f"{r.expert} >= num_experts {args.num_experts}")
        for name, enc in r.encodings.items():
            if enc.shape != shapes[name]:
                fail(f"{where}.tensors.{name}", f"shape {list(enc.shape)}, the config says {list(shapes[name])}")
        bias = "gate_bias" in r.encodings
        if has_bias is not None and bias != has_bias:
            fail(where, "some experts have biases and others not")
        has_bias = bias
    expected = len(moe_layers) * args.num_experts
    if len(m.experts) != expected:
        missing = sorted({(i, e) for i in moe_layers for e in range(args.num_experts)}
                         - {(r.layer, r.expert) for r in m.experts})
        fail("experts", f"{len(m.experts)} records, the config has {expected} routed experts "
                         f"(first missing: layer {missing[0][0]} expert {missing[0][1]})")




def _validate_predictor(m: Manifest) -> None:
    """Each (layer, from_layer) once, in ascending order; layer a MoE layer, from_layer one of the two MoE
    layers before it."""
    if m.predictor is None:
        return
    _, args = model_args(m.config)
    moe = sorted(args.moe_layers)
    sources = predictor_sources(moe)
    last = (-1, -1)
    for n, x in enumerate(m.predictor.layers):
        where = f"predictor.layers[{n}]"
        if not sources.get(x.layer):
            fail(f"{where}.layer", f"{x.layer} is not a MoE layer after the first (MoE layers: {moe})")
        if x.from_layer not in sources[x.layer]:
            fail(f"{where}.from_layer", f"{x.from_layer}: layer {x.layer} is predicted from one of the MoE layers "
                                         f"{sources[x.layer]}")
        if (x.layer, x.from_layer) <= last:
            fail(where, f"layer {x.layer} from layer {x.from_layer} is listed twice or out of order")
        last = (x.layer, x.from_layer)


# -- file checks ---------------------------------------------------------------------------------------
def check_size(path: Path, entry: DataFile | ExpertShard, size: int | None = None) -> None:
    size = path.stat().st_size if size is None else size
    if size != entry.bytes:
        what = "truncated" if size < entry.bytes else "longer than listed"
        raise ContainerError(f"{entry.name}: {size} bytes on disk, {MANIFEST_NAME} says {entry.bytes} ({what})")


def file_checksum_problem(path: Path, entry: DataFile, progress: Progress | None = None) -> str | None:
    import xxhash

    h = xxhash.xxh3_64()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            h.update(chunk)
            if progress is not None:
                progress(len(chunk))
    if h.hexdigest() != entry.checksum:
        return f"{entry.name}: checksum {h.hexdigest()} != {entry.checksum} in {MANIFEST_NAME} (file damaged)"
    return None


def read_safetensors_header(fd: int, file_bytes: int, name: str) -> tuple[int, dict, dict]:
    """(data start, {key: (dtype, shape, (begin, end))}, metadata) of a safetensors file; every field checked."""
    head = os.pread(fd, 8, 0)
    if len(head) < 8:
        raise ContainerError(f"{name}: shorter than a safetensors header")
    n = int.from_bytes(head, "little")
    if n > min(MAX_HEADER_BYTES, file_bytes - 8):
        raise ContainerError(f"{name}: safetensors header length {n} is past the file end or the limit")
    text = os.pread(fd, n, 8)
    try:
        header = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise ContainerError(f"{name}: safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise ContainerError(f"{name}: safetensors header is not an object")
    metadata = header.pop("__metadata__", {})
    entries, spans = {}, []
    for key, v in header.items():
        ok = (isinstance(v, dict) and set(v) == {"dtype", "shape", "data_offsets"} and isinstance(v["dtype"], str)
              and isinstance(v["shape"], list) and all(type(s) is int and s >= 0 for s in v["shape"])
              and isinstance(v["data_offsets"], list) and len(v["data_offsets"]) == 2
              and all(type(o) is int and o >= 0 for o in v["data_offsets"]))
        if not ok:
            raise ContainerError(f"{name}: safetensors header entry {key!r} is malformed: {v!r}"[:300])
        entries[key] = (v["dtype"], v["shape"], tuple(v["data_offsets"]))
        spans.append(tuple(v["data_offsets"]))
    data_start, end = 8 + n, 0
    for begin, stop in sorted(spans):
        if begin != end or stop < begin:
            raise ContainerError(f"{name}: safetensors data offsets leave a hole or overlap at byte {begin}")
        end = stop
    if data_start + end != file_bytes:
        raise ContainerError(f"{name}: safetensors data ends at {data_start + end}, the file has {file_bytes} bytes")
    return data_start, entries, metadata

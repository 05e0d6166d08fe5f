"""Write a .prism container (spec: docs/FORMAT.md; constants and layout rules:
prism_load/container/format.py).

`write_container` lays out every shard from the encodings alone (so the manifest is validated before any
data is written), then writes each expert with one positional write at its 4 KiB-aligned offset, in the
order given: tensor dicts are read one expert at a time, so lazy mappings stream a model larger than RAM.
The folder is built beside the target and renamed into place at the end.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import xxhash

from prism_load import __version__
from prism_load.atomic import atomic_folder
from prism_load.container import (
    ALIGNMENT_BYTES,
    DEFAULT_SHARD_BYTES,
    DENSE_ALIGNMENT_BYTES,
    EXPERT_BIASES,
    EXPERT_TENSORS,
    FILE_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    PLACEMENTS,
    PREDICTOR_FILE,
    SAFETENSORS_DTYPES,
    SHARD_FORMATS,
    TENSOR_NAME,
    TIERS,
    DataFile,
    DenseRecord,
    ExpertRecord,
    ExpertShard,
    Manifest,
    Predictor,
    PredictorLayer,
    Source,
    aligned,
    checksum,
    dense_key,
    expert_blob_name,
    expert_layout,
    round_stat,
    safetensors_header,
    validate,
)
from prism_load.container.codecs import check_tensors
from prism_load.container.format import Encoding
from prism_load.container.reader import Container
from prism_load.errors import ContainerError

EncodedTensor = tuple[Encoding, dict[str, torch.Tensor]]
PENDING_CHECKSUM = "0" * 16


@dataclass
class ExpertInput:
    """One routed expert to store: its identity, routing statistics, tier and encoded tensors
    (`gate_proj`, `up_proj`, `down_proj`, plus `gate_bias`, `up_bias`, `down_bias` for families with biases)."""

    layer: int
    expert: int
    tier: str  # "hot" | "cold"
    frequency: float
    gate_mass: float
    placement: str  # "fast" | "host" | "cold"
    tensors: dict[str, EncodedTensor]


@dataclass
class _Shard:
    name: str
    tier: str  # "" for dense shards
    header: bytes  # the 8-byte length and the padded JSON header
    members: list  # experts: (input index, data offset, blob bytes); dense: (name, suffix), in file order
    size: int


def write_container(
    out_dir: str | Path,
    *,
    config: dict,
    source: dict,
    tokenizer_files: list[Path],
    dense: dict[str, EncodedTensor],
    experts: Sequence[ExpertInput],
    recipe: dict,
    budget: dict,
    quality: dict | None = None,
    shard_size_bytes: int = DEFAULT_SHARD_BYTES,
    extra: dict | None = None,
    overwrite: bool = True,
    predictor: dict[tuple[int, int], dict] | None = None,
) -> Path:
    """Write a complete container to `out_dir` atomically; returns its path. `predictor`: the fitted prefetch
    predictors to store ((predicted MoE layer, source MoE layer) -> {"recall", "shadow_recall", "weight",
    "bias"}, as materialize.predictors gives them), or None."""
    out_dir = Path(out_dir)
    for name, value in (("config", config), ("recipe", recipe), ("budget", budget), ("quality", quality), ("extra", extra)):
        _check_json(name, value, nullable=name in ("quality", "extra"))
    if shard_size_bytes < ALIGNMENT_BYTES:
        raise ContainerError(f"shard size {shard_size_bytes} is below the {ALIGNMENT_BYTES}-byte alignment")
    encodings = [_expert_encodings(x) for x in experts]
    expert_shards, placed = _plan_expert_shards(experts, encodings, shard_size_bytes)
    dense_shards, dense_records = _plan_dense_shards(dense, shard_size_bytes)
    records = [_record(experts[i], encodings[i], shard, offset) for i, (shard, offset) in placed.items()]
    records.sort(key=lambda r: (r.shard, r.offset))
    manifest = Manifest(
        writer=f"prism {__version__}", source=Source.from_dict(source), config=config, recipe=recipe, budget=budget,
        quality=quality, extra=extra, tokenizer_files=[], dense_shards=[DataFile(s.name, s.size, PENDING_CHECKSUM) for s in dense_shards],
        expert_shards=[ExpertShard(s.name, s.size, s.tier) for s in expert_shards], dense=dense_records, experts=records,
        predictor=_predictor_record(predictor, DataFile(PREDICTOR_FILE, 0, PENDING_CHECKSUM)),
    )
    validate(manifest)  # the whole layout is checked before a byte is written
    with atomic_folder(out_dir, overwrite=overwrite) as tmp:
        manifest.tokenizer_files = [_copy_file(Path(p), tmp) for p in tokenizer_files]
        manifest.dense_shards = [_write_dense_shard(tmp, s, dense) for s in dense_shards]
        digests = _write_expert_shards(tmp, expert_shards, experts, encodings, placed)
        if predictor:
            manifest.predictor = _predictor_record(predictor, _write_predictor(tmp, predictor, config))
        manifest.experts = [_with_checksum(r, digests[(r.layer, r.expert)]) for r in records]
        _write_text(tmp / MANIFEST_NAME, manifest.to_json())
        with Container(tmp) as c:  # what we wrote must open and its headers must match the manifest
            for i in range(len(c.manifest.expert_shards)):
                c.check_shard(i)
    return out_dir


# -- inputs --------------------------------------------------------------------------------------------
def _check_json(name: str, value, nullable: bool) -> None:
    if value is None and nullable:
        return
    if not isinstance(value, dict):
        raise ContainerError(f"{name} must be a dict, got {type(value).__name__}")
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ContainerError(f"{name} is not JSON-serializable ({e})") from None


def _expert_encodings(x: ExpertInput) -> dict[str, Encoding]:
    where = f"layer {x.layer} expert {x.expert}"
    if set(x.tensors) not in (set(EXPERT_TENSORS), set(EXPERT_TENSORS + EXPERT_BIASES)):
        raise ContainerError(f"{where}: tensors {sorted(x.tensors)} must be {list(EXPERT_TENSORS)} (+ biases)")
    if x.tier not in TIERS or x.placement not in PLACEMENTS:
        raise ContainerError(f"{where}: tier {x.tier!r} / placement {x.placement!r} not in {TIERS} / {PLACEMENTS}")
    for stat in (x.frequency, x.gate_mass):
        if not (isinstance(stat, (int, float)) and math.isfinite(stat) and stat >= 0):
            raise ContainerError(f"{where}: routing statistic {stat!r} must be a finite number >= 0")
    return {name: x.tensors[name][0] for name in (*EXPERT_TENSORS, *EXPERT_BIASES) if name in x.tensors}


def _record(x: ExpertInput, encodings: dict[str, Encoding], shard: int, offset: int) -> ExpertRecord:
    return ExpertRecord(
        layer=x.layer, expert=x.expert, tier=x.tier, frequency=round_stat(x.frequency),
        gate_mass=round_stat(x.gate_mass), placement=x.placement, shard=shard, offset=offset,
        length=sum(e.nbytes() for e in encodings.values()), checksum=PENDING_CHECKSUM, encodings=encodings,
    )


def _with_checksum(r: ExpertRecord, digest: str) -> ExpertRecord:
    from dataclasses import replace

    return replace(r, checksum=digest)


# -- layout --------------------------------------------------------------------------------------------
def _entry_bytes(key: str, blob: int, begin: int) -> int:
    """Length of `,"key":{...}` in a compact safetensors header (so shard sizes are exact as experts are added)."""
    value = {"dtype": "U8", "shape": [blob], "data_offsets": [begin, begin + blob]}
    return 2 + len(json.dumps(key)) + len(json.dumps(value, separators=(",", ":")))


def _plan_expert_shards(experts, encodings, shard_size_bytes) -> tuple[list[_Shard], dict[int, tuple[int, int]]]:
    """Hot experts first, in shards of their own, then cold ones; each tier in (layer, expert) order.
    A shard takes experts while header + data stay within shard_size_bytes (an expert alone may exceed it)."""
    shards: list[_Shard] = []
    placed: dict[int, tuple[int, int]] = {}
    seen: set[tuple[int, int]] = set()
    metadata = {"format": SHARD_FORMATS["experts"], "format_version": str(FORMAT_VERSION)}
    empty_header = len(json.dumps({"__metadata__": metadata}, separators=(",", ":")))
    for tier in TIERS:
        order = sorted((i for i, x in enumerate(experts) if x.tier == tier),
                       key=lambda i: (experts[i].layer, experts[i].expert))
        members, text, data = [], empty_header, 0
        for i in order:
            x = experts[i]
            if (x.layer, x.expert) in seen:
                raise ContainerError(f"layer {x.layer} expert {x.expert} is given twice")
            seen.add((x.layer, x.expert))
            key, blob = expert_blob_name(x.layer, x.expert), aligned(sum(e.nbytes() for e in encodings[i].values()))
            if members and aligned(8 + text + _entry_bytes(key, blob, data)) + data + blob > shard_size_bytes:
                number = sum(sh.tier == tier for sh in shards)
                shards.append(_close_expert_shard(tier, members, metadata, len(shards), placed, experts, number))
                members, text, data = [], empty_header, 0
            members.append((i, data, blob))
            text += _entry_bytes(key, blob, data)
            data += blob
        if members:
            number = sum(sh.tier == tier for sh in shards)
            shards.append(_close_expert_shard(tier, members, metadata, len(shards), placed, experts, number))
    return shards, placed


def _close_expert_shard(tier, members, metadata, index, placed, experts, number) -> _Shard:
    entries = [(expert_blob_name(experts[i].layer, experts[i].expert), "U8", [blob], begin, begin + blob)
               for i, begin, blob in members]
    header = safetensors_header(entries, metadata, ALIGNMENT_BYTES)
    for i, begin, _ in members:
        placed[i] = (index, len(header) + begin)
    size = len(header) + members[-1][1] + members[-1][2]
    return _Shard(f"experts-{tier}-{number:05d}.safetensors", tier, header, members, size)


def _plan_dense_shards(dense: dict[str, EncodedTensor], shard_size_bytes: int) -> tuple[list[_Shard], dict[str, DenseRecord]]:
    shards: list[_Shard] = []
    records: dict[str, DenseRecord] = {}
    current: list[tuple[str, Encoding]] = []
    data = 0
    for name, (enc, tensors) in dense.items():
        if not isinstance(name, str) or not TENSOR_NAME.fullmatch(name):
            raise ContainerError(f"dense tensor name {name!r} is not allowed (pattern {TENSOR_NAME.pattern})")
        check_tensors(enc, tensors, f"dense {name}")
        if current and data + enc.nbytes() > shard_size_bytes:
            shards.append(_dense_shard(current, len(shards)))
            current, data = [], 0
        current.append((name, enc))
        data += enc.nbytes()
        records[name] = DenseRecord(name, len(shards), enc)
    if current:
        shards.append(_dense_shard(current, len(shards)))
    return shards, records


def _dense_shard(members: list[tuple[str, Encoding]], index: int) -> _Shard:
    """Stored tensors by descending element size, then key, packed (each lands aligned to its size)."""
    items = sorted(((dense_key(name, suffix), dtype, shape, name, suffix) for name, enc in members
                    for suffix, (dtype, shape) in enc.tensor_specs().items()), key=lambda t: (-t[1].itemsize, t[0]))
    entries, sources, begin = [], [], 0
    for key, dtype, shape, name, suffix in items:
        nbytes = math.prod(shape) * dtype.itemsize
        entries.append((key, SAFETENSORS_DTYPES[dtype], list(shape), begin, begin + nbytes))
        sources.append((name, suffix))
        begin += nbytes
    header = safetensors_header(entries, {"format": SHARD_FORMATS["dense"]}, DENSE_ALIGNMENT_BYTES)
    return _Shard(f"dense-{index:05d}.safetensors", "", header, sources, len(header) + begin)


# -- writing -------------------------------------------------------------------------------------------
def _tensor_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def _write_dense_shard(folder: Path, shard: _Shard, dense: dict[str, EncodedTensor]) -> DataFile:
    h = xxhash.xxh3_64()
    path = folder / shard.name
    with open(path, "wb") as f:
        for chunk in (shard.header, *(_tensor_bytes(dense[name][1][suffix]) for name, suffix in shard.members)):
            f.write(chunk)
            h.update(chunk)
        f.flush()
        os.fsync(f.fileno())
    return DataFile(shard.name, path.stat().st_size, h.hexdigest())


def _write_expert_shards(folder, shards, experts, encodings, placed) -> dict[tuple[int, int], str]:
    """Headers first, then each expert with one positional write, in the order given; padding is the
    zero fill of the pre-sized file."""
    fds = []
    try:
        for s in shards:
            fd = os.open(folder / s.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            fds.append(fd)
            os.ftruncate(fd, s.size)
            os.pwrite(fd, s.header, 0)
        digests = {}
        for i, x in enumerate(experts):
            blob = _expert_blob(x, encodings[i])
            shard, offset = placed[i]
            if os.pwrite(fds[shard], blob, offset) != len(blob):
                raise ContainerError(f"{shards[shard].name}: short write of layer {x.layer} expert {x.expert}")
            digests[(x.layer, x.expert)] = checksum(blob)
        for fd in fds:
            os.fsync(fd)
        return digests
    finally:
        for fd in fds:
            os.close(fd)


def _expert_blob(x: ExpertInput, encodings: dict[str, Encoding]) -> bytearray:
    where = f"layer {x.layer} expert {x.expert}"
    for name, enc in encodings.items():
        check_tensors(enc, x.tensors[name][1], f"{where} {name}")
    layout = expert_layout(encodings)
    blob = bytearray(layout[-1].start + layout[-1].nbytes)
    for t in layout:
        tensor, suffix = t.key.split(".", 1)
        blob[t.start : t.start + t.nbytes] = _tensor_bytes(x.tensors[tensor][1][suffix])
    return blob


def _predictor_record(predictor: dict[tuple[int, int], dict] | None, file: DataFile) -> Predictor | None:
    if not predictor:
        return None
    layers = [PredictorLayer(j, i, float(p["recall"]), float(p["shadow_recall"])) for (j, i), p in sorted(predictor.items())]
    return Predictor(file, layers)


def _write_predictor(folder: Path, predictor: dict[tuple[int, int], dict], config: dict) -> DataFile:
    """predictor.safetensors (stock writer; F32 weight [E, H] and bias [E] per layer), checked before writing."""
    from safetensors.torch import save

    from prism_load.container import model_args

    _, args = model_args(config)
    tensors = {}
    for (j, i), p in sorted(predictor.items()):
        w, b = p["weight"], p["bias"]
        where = f"predictor of layer {j} from layer {i}"
        if tuple(w.shape) != (args.num_experts, args.hidden_size) or tuple(b.shape) != (args.num_experts,):
            raise ContainerError(f"{where}: weight {list(w.shape)} / bias {list(b.shape)}, the config "
                                 f"says [{args.num_experts}, {args.hidden_size}] / [{args.num_experts}]")
        if not (torch.isfinite(w).all() and torch.isfinite(b).all()):
            raise ContainerError(f"{where}: NaN or infinite values")
        key_w, key_b = PredictorLayer(j, i, 0.0, 0.0).keys()
        tensors[key_w], tensors[key_b] = w.float().contiguous(), b.float().contiguous()
    data = save(tensors, metadata={"format": SHARD_FORMATS["predictor"]})
    with open(folder / PREDICTOR_FILE, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return DataFile(PREDICTOR_FILE, len(data), checksum(data))


def _copy_file(src: Path, folder: Path) -> DataFile:
    if not FILE_NAME.fullmatch(src.name) or src.name == MANIFEST_NAME:
        raise ContainerError(f"tokenizer file name {src.name!r} is not allowed in a container")
    if (folder / src.name).exists():
        raise ContainerError(f"tokenizer file {src.name} is given twice")
    shutil.copyfile(src, folder / src.name)
    data = (folder / src.name).read_bytes()
    return DataFile(src.name, len(data), checksum(data))


def _write_text(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())

"""The .prism container format (spec: docs/FORMAT.md): constants, encodings, byte layout rules and the manifest.

Everything here is the spec in code; it imports no model code and nothing of prism_load but its errors. The
writer (prism_convert/packing/container_writer.py) imports it; the reader (`Container`,
prism_load/container/reader.py) enforces it. Manifest records are dataclasses; `Manifest.from_json`
validates every field (types, ranges, unknown keys, cross references, byte ranges) and raises ContainerError
naming the field and the value; the reader then checks layer/expert indices and shapes against the embedded
model config (reader.validate_config).

Encoding kinds (`Encoding`: how one tensor is stored; decoders in prism_load/container/codecs.py):
- `bf16` / `fp16` / `fp32`: the tensor itself, suffix `weight`.
- `int`: group-wise asymmetric integer quantization, w = (q - zero) * scale per group of `group_size`
  input channels; `qweight` uint8 [out, ceil(in*bits/8)] is a dense little-endian bitstream per row (only
  the row end is padded), `scales` and `zeros` fp16 [out, ceil(in/group_size)].
- `lowrank`: w = A @ B with A [out, rank], B [rank, in]; each factor stored as bf16 (`factor_bits` 16)
  or as `int` with `factor_bits` bits, under suffixes `lr_a.*` and `lr_b.*`.
- `int+lowrank`: an `int` base (`base.*`) plus a low-rank correction of its residual (`lr_a.*`, `lr_b.*`).
`tensor_specs()` lists the exact stored tensors (suffix -> dtype, shape) and `nbytes()` their exact size,
so bits-per-weight figures always count scales, zeros and padding.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import xxhash

from ..errors import ContainerError

__all__ = [  # the spec's public names (prism_load.container re-exports them)
    "FORMAT_NAME", "FORMAT_VERSION", "MANIFEST_NAME", "ALIGNMENT_BYTES", "DENSE_ALIGNMENT_BYTES", "TIERS",
    "PLACEMENTS", "EXPERT_TENSORS", "EXPERT_BIASES", "CHECKSUM_NAME", "SHARD_FORMATS", "PREDICTOR_FILE",
    "MAX_MANIFEST_BYTES", "MAX_HEADER_BYTES", "MAX_LAYERS", "MAX_EXPERTS", "DEFAULT_SHARD_BYTES",
    "FLOAT_DIGITS", "FILE_NAME", "TENSOR_NAME", "CHECKSUM_HEX", "SAFETENSORS_DTYPES", "KINDS", "INT_BITS",
    "PASSTHROUGH_DTYPES", "Encoding", "packed_row_bytes", "checksum", "aligned", "expert_blob_name",
    "dense_key", "StoredTensor", "expert_layout", "safetensors_header", "fail", "round_stat", "Source",
    "DataFile", "ExpertShard", "DenseRecord", "ExpertRecord", "PredictorLayer", "Predictor", "Manifest",
    "validate_layout", "PREDICTOR_DISTANCES", "predictor_sources",
]

FORMAT_NAME = "prism"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
ALIGNMENT_BYTES = 4096  # every expert starts on a 4 KiB boundary of its shard file
DENSE_ALIGNMENT_BYTES = 8  # dense shards: data starts 8-aligned, as the stock safetensors writer does
TIERS = ("hot", "cold")
PLACEMENTS = ("fast", "host", "cold")  # where the runtime should keep an expert when memory is short
EXPERT_TENSORS = ("gate_proj", "up_proj", "down_proj")
EXPERT_BIASES = ("gate_bias", "up_bias", "down_bias")
CHECKSUM_NAME = "xxh3-64"
SHARD_FORMATS = {"dense": "prism-dense", "experts": "prism-experts", "predictor": "prism-predictor"}
PREDICTOR_FILE = "predictor.safetensors"
MAX_MANIFEST_BYTES = 1 << 30
MAX_HEADER_BYTES = 100_000_000  # the safetensors (Rust) limit
MAX_LAYERS, MAX_EXPERTS = 4096, 1 << 16  # sanity bounds on the embedded config, checked before it is parsed
DEFAULT_SHARD_BYTES = 2 * 10**9
FLOAT_DIGITS = 6  # routing statistics are stored with 6 significant digits

FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
TENSOR_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.]{0,255}")
CHECKSUM_HEX = re.compile(r"[0-9a-f]{16}")
SAFETENSORS_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.uint8: "U8"}


# -- encodings: how one tensor is stored (docs/FORMAT.md §3) ----------------------------------------------
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


# -- byte layout rules ---------------------------------------------------------------------------------
def checksum(data) -> str:
    """xxh3-64 of a byte range, as 16 lowercase hex digits."""
    return xxhash.xxh3_64_hexdigest(data)


def aligned(n: int, alignment: int = ALIGNMENT_BYTES) -> int:
    return -(-n // alignment) * alignment


def expert_blob_name(layer: int, expert: int) -> str:
    """Name of the one U8 tensor holding an expert (plus its zero padding) in an expert shard."""
    return f"layers.{layer}.experts.{expert}"


def dense_key(name: str, suffix: str) -> str:
    """safetensors key of one stored tensor of a dense tensor: `{prism name}.{encoding suffix}`."""
    return f"{name}.{suffix}"


@dataclass(frozen=True)
class StoredTensor:
    key: str  # `{tensor}.{suffix}`, e.g. `gate_proj.qweight`
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # byte offset inside the expert's range
    nbytes: int


def expert_layout(encodings: dict[str, Encoding]) -> list[StoredTensor]:
    """Where each stored tensor sits inside an expert's byte range: by descending element size, then by
    key, packed without gaps (every tensor lands aligned to its element size, so zero-copy views work)."""
    specs = [
        (f"{tensor}.{suffix}", dtype, shape)
        for tensor, enc in encodings.items()
        for suffix, (dtype, shape) in enc.tensor_specs().items()
    ]
    specs.sort(key=lambda s: (-s[1].itemsize, s[0]))
    out, start = [], 0
    for key, dtype, shape in specs:
        nbytes = math.prod(shape) * dtype.itemsize
        out.append(StoredTensor(key, dtype, tuple(shape), start, nbytes))
        start += nbytes
    return out


def safetensors_header(entries: list[tuple[str, str, list[int], int, int]], metadata: dict[str, str], alignment: int) -> bytes:
    """The 8-byte length plus the JSON header, padded with spaces so the data starts `alignment`-aligned.

    entries: (key, dtype, shape, begin, end) with offsets relative to the data start, in file order.
    """
    header = {"__metadata__": metadata}
    header.update({k: {"dtype": d, "shape": s, "data_offsets": [b, e]} for k, d, s, b, e in entries})
    text = json.dumps(header, separators=(",", ":")).encode()
    size = aligned(8 + len(text), alignment) - 8
    return size.to_bytes(8, "little") + text + b" " * (size - len(text))


# -- manifest field readers (every error names the field and the value) ------------------------------------
def fail(where: str, what: str):
    """Raise the ContainerError of a manifest field: `manifest.json: {where}: {what}`."""
    raise ContainerError(f"{MANIFEST_NAME}: {where}: {what}")


def _keys(data, where: str, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict:
    if not isinstance(data, dict):
        fail(where, f"expected an object, got {type(data).__name__}")
    unknown = sorted(set(data) - set(required) - set(optional))
    if unknown:
        fail(where, f"unknown key {unknown[0]!r} (known: {', '.join(required + optional)})")
    missing = [k for k in required if k not in data]
    if missing:
        fail(where, f"missing required key {missing[0]!r}")
    return data


def _int(data: dict, key: str, where: str, lo: int = 0, hi: int | None = None) -> int:
    v = data[key]
    if not isinstance(v, int) or isinstance(v, bool):
        fail(f"{where}.{key}", f"expected an integer, got {v!r}")
    if v < lo or (hi is not None and v > hi):
        fail(f"{where}.{key}", f"{v} is out of range [{lo}, {'∞' if hi is None else hi}]")
    return v


def _float(data: dict, key: str, where: str) -> float:
    v = data[key]
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
        fail(f"{where}.{key}", f"expected a finite number >= 0, got {v!r}")
    return float(v)


def _str(data: dict, key: str, where: str, choices: tuple[str, ...] | None = None, pattern=None) -> str:
    v = data[key]
    if not isinstance(v, str):
        fail(f"{where}.{key}", f"expected a string, got {v!r}")
    if choices is not None and v not in choices:
        fail(f"{where}.{key}", f"{v!r} is not one of {', '.join(choices)}")
    if pattern is not None and not pattern.fullmatch(v):
        fail(f"{where}.{key}", f"{v!r} is not allowed (pattern {pattern.pattern})")
    return v


def _list(data: dict, key: str, where: str, nonempty: bool = False) -> list:
    v = data[key]
    if not isinstance(v, list) or (nonempty and not v):
        fail(f"{where}.{key}", f"expected a {'non-empty ' if nonempty else ''}list, got {type(v).__name__}")
    return v


def _object_or_null(data: dict, key: str, where: str) -> dict | None:
    v = data.get(key)
    if v is not None and not isinstance(v, dict):
        fail(f"{where}.{key}", f"expected an object or null, got {type(v).__name__}")
    return v


def _file_name(data: dict, where: str) -> str:
    return _str(data, "name", where, pattern=FILE_NAME)  # a plain name: no '/', no '..', not absolute


def round_stat(x: float) -> float:
    return float(f"{x:.{FLOAT_DIGITS}g}")


# -- manifest records ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Source:
    model_id: str
    revision: str | None = None

    @classmethod
    def from_dict(cls, data, where: str = "source") -> Source:
        _keys(data, where, ("model_id",), ("revision",))
        rev = data.get("revision")
        if rev is not None and not isinstance(rev, str):
            fail(f"{where}.revision", f"expected a string or null, got {rev!r}")
        return cls(_str(data, "model_id", where), rev)

    def to_dict(self) -> dict:
        return {"model_id": self.model_id, "revision": self.revision}


@dataclass(frozen=True)
class DataFile:
    """A file checked as a whole: a dense shard or a tokenizer file."""

    name: str
    bytes: int
    checksum: str

    @classmethod
    def from_dict(cls, data, where: str) -> DataFile:
        _keys(data, where, ("name", "bytes", "checksum"))
        return cls(_file_name(data, where), _int(data, "bytes", where), _str(data, "checksum", where, pattern=CHECKSUM_HEX))

    def to_dict(self) -> dict:
        return {"name": self.name, "bytes": self.bytes, "checksum": self.checksum}


@dataclass(frozen=True)
class ExpertShard:
    """An expert shard: checked per expert range (checksums live in the expert records)."""

    name: str
    bytes: int
    tier: str

    @classmethod
    def from_dict(cls, data, where: str) -> ExpertShard:
        _keys(data, where, ("name", "bytes", "tier"))
        return cls(_file_name(data, where), _int(data, "bytes", where), _str(data, "tier", where, TIERS))

    def to_dict(self) -> dict:
        return {"name": self.name, "bytes": self.bytes, "tier": self.tier}


@dataclass(frozen=True)
class DenseRecord:
    name: str  # prism state_dict name, e.g. `layers.0.self_attn.q_proj.weight`
    shard: int  # index into dense_shards
    encoding: Encoding

    def keys(self) -> dict[str, str]:
        """Encoding suffix -> safetensors key in the dense shard."""
        return {suffix: dense_key(self.name, suffix) for suffix in self.encoding.tensor_specs()}


@dataclass(frozen=True)
class ExpertRecord:
    layer: int
    expert: int
    tier: str
    frequency: float  # share of the layer's calibration tokens routed to this expert
    gate_mass: float  # routing weight this expert received in calibration
    placement: str
    shard: int  # index into expert_shards
    offset: int  # absolute byte offset of the expert's range in its shard file (4 KiB-aligned)
    length: int  # exact bytes of its stored tensors; the range is [offset, offset + length)
    checksum: str  # xxh3-64 of the range
    encodings: dict[str, Encoding] = field(hash=False)

    @property
    def end(self) -> int:
        return self.offset + self.length

    @property
    def numel(self) -> int:
        return sum(e.numel for e in self.encodings.values())

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per weight of the expert (scales, zeros and factors counted), from its encodings."""
        return 8 * self.length / self.numel

    @property
    def rank(self) -> int:
        """Largest low-rank factor rank among the expert's tensors (0: none is low-rank)."""
        return max((e.rank or 0) for e in self.encodings.values())

    def layout(self) -> list[StoredTensor]:
        return expert_layout(self.encodings)

    def where(self) -> str:
        return f"layer {self.layer} expert {self.expert}"


@dataclass(frozen=True)
class PredictorLayer:
    """A fitted prefetch predictor of MoE layer `layer`'s experts from the output of MoE layer `from_layer`
    (one of the two MoE layers before it), with its recall and the shadow router's on the profile's
    held-back tokens."""

    layer: int
    from_layer: int
    recall: float
    shadow_recall: float

    @classmethod
    def from_dict(cls, data, where: str) -> PredictorLayer:
        _keys(data, where, ("layer", "from_layer", "recall", "shadow_recall"))
        rec = cls(_int(data, "layer", where), _int(data, "from_layer", where), _float(data, "recall", where),
                  _float(data, "shadow_recall", where))
        for key in ("recall", "shadow_recall"):
            if not 0.0 <= getattr(rec, key) <= 1.0:
                fail(f"{where}.{key}", f"{getattr(rec, key)} is outside [0, 1]")
        return rec

    def to_dict(self) -> dict:
        return {"layer": self.layer, "from_layer": self.from_layer, "recall": self.recall,
                "shadow_recall": self.shadow_recall}

    def keys(self) -> tuple[str, str]:
        """Its tensors in the predictor file: weight [E, H] and bias [E], F32."""
        return f"layers.{self.layer}.from.{self.from_layer}.weight", f"layers.{self.layer}.from.{self.from_layer}.bias"


@dataclass(frozen=True)
class Predictor:
    """The optional predictor file and the layers it holds."""

    file: DataFile
    layers: list[PredictorLayer]

    @classmethod
    def from_dict(cls, data, where: str = "predictor") -> Predictor:
        _keys(data, where, ("file", "layers"))
        layers = [PredictorLayer.from_dict(x, f"{where}.layers[{i}]")
                  for i, x in enumerate(_list(data, "layers", where, nonempty=True))]
        return cls(DataFile.from_dict(data["file"], f"{where}.file"), layers)

    def to_dict(self) -> dict:
        return {"file": self.file.to_dict(), "layers": [x.to_dict() for x in self.layers]}


@dataclass
class Manifest:
    writer: str
    source: Source
    config: dict
    recipe: dict
    budget: dict
    quality: dict | None
    extra: dict | None
    tokenizer_files: list[DataFile]
    dense_shards: list[DataFile]
    expert_shards: list[ExpertShard]
    dense: dict[str, DenseRecord]
    experts: list[ExpertRecord]
    predictor: Predictor | None = None
    format_version: int = FORMAT_VERSION

    def files(self) -> list[DataFile | ExpertShard]:
        """Every data file the manifest lists (all but manifest.json itself)."""
        return [*self.tokenizer_files, *self.dense_shards, *self.expert_shards,
                *([self.predictor.file] if self.predictor is not None else [])]

    def whole_files(self) -> list[DataFile]:
        """The files checked as a whole (size and checksum) and needed to load the model before any expert:
        dense shards, tokenizer files, the predictor file."""
        return [*self.dense_shards, *self.tokenizer_files, *([self.predictor.file] if self.predictor is not None else [])]

    # -- writing -------------------------------------------------------------------------------------
    def to_json(self) -> str:
        """Top-level fields one per line; dense and expert records one per line (compact, diffable)."""
        table: dict[str, int] = {}

        def enc_index(enc: Encoding) -> int:
            return table.setdefault(json.dumps(enc.to_dict(), sort_keys=True), len(table))

        dense = {r.name: {"shard": r.shard, "encoding": enc_index(r.encoding)} for r in self.dense.values()}
        experts = [
            {"layer": r.layer, "expert": r.expert, "tier": r.tier, "frequency": r.frequency,
             "gate_mass": r.gate_mass, "placement": r.placement, "shard": r.shard, "offset": r.offset,
             "length": r.length, "checksum": r.checksum,
             "tensors": {name: enc_index(enc) for name, enc in r.encodings.items()}}
            for r in self.experts
        ]
        top = {
            "format": FORMAT_NAME, "format_version": self.format_version, "writer": self.writer,
            "source": self.source.to_dict(), "config": self.config, "recipe": self.recipe, "budget": self.budget,
            "quality": self.quality, "extra": self.extra,
            "tokenizer_files": [f.to_dict() for f in self.tokenizer_files],
            "dense_shards": [f.to_dict() for f in self.dense_shards],
            "expert_shards": [f.to_dict() for f in self.expert_shards],
            "encodings": [json.loads(k) for k in table],
        }

        def dump(v) -> str:
            return json.dumps(v, separators=(",", ":"), allow_nan=False)

        lines = [f"{dump(k)}:{dump(v)}" for k, v in top.items()]
        lines.append('"dense":{\n' + ",\n".join(f"{dump(k)}:{dump(v)}" for k, v in dense.items()) + "\n}")
        if self.predictor is not None:  # optional: absent, the manifest is byte for byte what it was before
            lines.append(f'"predictor":{dump(self.predictor.to_dict())}')
        lines.append('"experts":[\n' + ",\n".join(dump(r) for r in experts) + "\n]")
        return "{\n" + ",\n".join(lines) + "\n}\n"

    # -- reading -------------------------------------------------------------------------------------
    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        try:
            data = json.loads(text, parse_constant=_reject_constant)
        except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise ContainerError(f"{MANIFEST_NAME}: not valid JSON ({e})") from None
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data) -> Manifest:
        top = ("format", "format_version", "writer", "source", "config", "recipe", "budget", "tokenizer_files",
               "dense_shards", "expert_shards", "encodings", "dense", "experts")
        if isinstance(data, dict) and "format_version" in data:  # the version decides what else is valid
            version = data["format_version"]
            if version != FORMAT_VERSION or isinstance(version, bool):
                fail("format_version", f"{version!r} is not supported (this reader knows version {FORMAT_VERSION})")
        _keys(data, "manifest", top, ("quality", "extra", "predictor"))
        _str(data, "format", "manifest", (FORMAT_NAME,))
        for key in ("config", "recipe", "budget"):
            if not isinstance(data[key], dict):
                fail(key, f"expected an object, got {type(data[key]).__name__}")
        encodings = [_encoding(e, f"encodings[{i}]") for i, e in enumerate(_list(data, "encodings", "manifest"))]
        manifest = cls(
            writer=_str(data, "writer", "manifest"),
            source=Source.from_dict(data["source"]),
            config=data["config"], recipe=data["recipe"], budget=data["budget"],
            quality=_object_or_null(data, "quality", "manifest"), extra=_object_or_null(data, "extra", "manifest"),
            tokenizer_files=[DataFile.from_dict(f, f"tokenizer_files[{i}]")
                             for i, f in enumerate(_list(data, "tokenizer_files", "manifest"))],
            dense_shards=[DataFile.from_dict(f, f"dense_shards[{i}]")
                          for i, f in enumerate(_list(data, "dense_shards", "manifest", nonempty=True))],
            expert_shards=[ExpertShard.from_dict(f, f"expert_shards[{i}]")
                           for i, f in enumerate(_list(data, "expert_shards", "manifest"))],
            dense=_dense_records(data["dense"], encodings),
            experts=[_expert_record(r, f"experts[{i}]", encodings) for i, r in enumerate(_list(data, "experts", "manifest"))],
            predictor=Predictor.from_dict(data["predictor"]) if "predictor" in data else None,  # absent, never null
        )
        validate_layout(manifest)
        return manifest


def _reject_constant(name: str):
    raise ValueError(f"{name} is not allowed")


def _encoding(data, where: str) -> Encoding:
    try:
        return Encoding.from_dict(data)
    except ContainerError as e:
        fail(where, str(e))
    except (TypeError, ValueError) as e:
        fail(where, f"invalid encoding {data!r} ({e})")


def _table_index(data: dict, key: str, where: str, table: list) -> Any:
    return table[_int(data, key, where, 0, len(table) - 1)] if table else fail(f"{where}.{key}", "the table is empty")


def _dense_records(data, encodings: list[Encoding]) -> dict[str, DenseRecord]:
    if not isinstance(data, dict) or not data:
        fail("dense", "expected a non-empty object of dense tensors")
    out = {}
    for name, rec in data.items():
        where = f"dense[{name!r}]"
        if not TENSOR_NAME.fullmatch(name):
            fail(where, f"tensor name {name!r} is not allowed (pattern {TENSOR_NAME.pattern})")
        _keys(rec, where, ("shard", "encoding"))
        out[name] = DenseRecord(name, _int(rec, "shard", where), _table_index(rec, "encoding", where, encodings))
    return out


def _expert_record(data, where: str, encodings: list[Encoding]) -> ExpertRecord:
    _keys(data, where, ("layer", "expert", "tier", "frequency", "gate_mass", "placement", "shard", "offset",
                        "length", "checksum", "tensors"))
    tensors = data["tensors"]
    if not isinstance(tensors, dict):
        fail(f"{where}.tensors", f"expected an object, got {type(tensors).__name__}")
    names = tuple(tensors)
    if set(names) not in (set(EXPERT_TENSORS), set(EXPERT_TENSORS + EXPERT_BIASES)):
        fail(f"{where}.tensors", f"{sorted(names)} must be {list(EXPERT_TENSORS)} (+ {list(EXPERT_BIASES)})")
    return ExpertRecord(
        layer=_int(data, "layer", where, 0, MAX_LAYERS - 1), expert=_int(data, "expert", where, 0, MAX_EXPERTS - 1),
        tier=_str(data, "tier", where, TIERS), frequency=_float(data, "frequency", where),
        gate_mass=_float(data, "gate_mass", where), placement=_str(data, "placement", where, PLACEMENTS),
        shard=_int(data, "shard", where), offset=_int(data, "offset", where), length=_int(data, "length", where, 1),
        checksum=_str(data, "checksum", where, pattern=CHECKSUM_HEX),
        encodings={name: _table_index(tensors, name, f"{where}.tensors", encodings) for name in names},
    )


# -- cross-field validation ----------------------------------------------------------------------------
def validate_layout(m: Manifest) -> None:
    """Everything checkable without the model or a data file: names, references, byte ranges. The checks
    against the embedded model config live with the reader (prism_load/container/reader.py: validate)."""
    _unique_names(m)
    _validate_dense(m)
    _validate_expert_ranges(m)


def _unique_names(m: Manifest) -> None:
    seen: set[str] = {MANIFEST_NAME}
    for kind, files in (("tokenizer_files", m.tokenizer_files), ("dense_shards", m.dense_shards),
                        ("expert_shards", m.expert_shards), ("predictor", [m.predictor.file] if m.predictor else [])):
        for i, f in enumerate(files):
            if f.name in seen:
                fail(f"{kind}[{i}].name", f"{f.name!r} is listed twice")
            seen.add(f.name)


def _validate_dense(m: Manifest) -> None:
    keys_by_shard: dict[int, set[str]] = {}
    for rec in m.dense.values():
        where = f"dense[{rec.name!r}]"
        if rec.shard >= len(m.dense_shards):
            fail(f"{where}.shard", f"{rec.shard} is not an index of dense_shards (0..{len(m.dense_shards) - 1})")
        keys = keys_by_shard.setdefault(rec.shard, set())
        for key in rec.keys().values():
            if key in keys:
                fail(where, f"stored key {key!r} collides with another dense tensor's")
            keys.add(key)
    for i, shard in enumerate(m.dense_shards):
        if i not in keys_by_shard:
            fail(f"dense_shards[{i}]", f"{shard.name} holds no dense tensor")


def _validate_expert_ranges(m: Manifest) -> None:
    """Hot shards first; records in file order; each range aligned, inside its shard, not overlapping."""
    tiers = [s.tier for s in m.expert_shards]
    if tiers != sorted(tiers, key=TIERS.index):
        fail("expert_shards", f"hot shards must come before cold shards, got tiers {tiers}")
    seen, prev = set(), None
    for i, r in enumerate(m.experts):
        where = f"experts[{i}] ({r.where()})"
        if (r.layer, r.expert) in seen:
            fail(where, "this expert has two records")
        seen.add((r.layer, r.expert))
        if r.shard >= len(m.expert_shards):
            fail(f"{where}.shard", f"{r.shard} is not an index of expert_shards (0..{len(m.expert_shards) - 1})")
        shard = m.expert_shards[r.shard]
        if r.tier != shard.tier:
            fail(f"{where}.tier", f"{r.tier!r} but its shard {shard.name} holds the {shard.tier} tier")
        if r.offset % ALIGNMENT_BYTES or r.offset < ALIGNMENT_BYTES:
            fail(f"{where}.offset", f"{r.offset} is not a multiple of {ALIGNMENT_BYTES} past the header")
        stored = sum(e.nbytes() for e in r.encodings.values())
        if r.length != stored:
            fail(f"{where}.length", f"{r.length} bytes, but its encodings store {stored} bytes")
        if aligned(r.end) > shard.bytes:
            fail(f"{where}", f"range [{r.offset}, {r.end}) ends past the end of {shard.name} ({shard.bytes} bytes)")
        if prev is not None:
            if r.shard < prev.shard:
                fail(where, "records must be in file order (shard, then offset)")
            if r.shard == prev.shard and r.offset < aligned(prev.end):
                fail(where, f"range [{r.offset}, {r.end}) overlaps the previous expert's "
                             f"[{prev.offset}, {prev.end}) in {shard.name}")
        prev = r
    used = {r.shard for r in m.experts}
    for i, shard in enumerate(m.expert_shards):
        if i not in used:
            fail(f"expert_shards[{i}]", f"{shard.name} holds no expert")


PREDICTOR_DISTANCES = 2  # a layer is predicted from the output of one of the two MoE layers before it


def predictor_sources(moe_layers) -> dict[int, list[int]]:
    """MoE layer -> the MoE layers a fitted predictor of it may start from (the PREDICTOR_DISTANCES before it)."""
    moe = sorted(moe_layers)
    return {j: moe[max(0, n - PREDICTOR_DISTANCES) : n] for n, j in enumerate(moe)}

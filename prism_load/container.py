"""The .prism container format (spec: docs/FORMAT.md): constants, byte layout rules and the manifest.

Everything here is the spec in code. The writer (prism_convert/pack.py) imports it; the reader
(`Container`, prism_load/container_reader.py) enforces it. Manifest records are dataclasses; `Manifest.from_json`
validates every field (types, ranges, unknown keys, cross references, byte ranges, layer/expert indices vs
the embedded config) and raises ContainerError naming the field and the value.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import xxhash

from .codecs import Encoding
from .errors import ContainerError

if TYPE_CHECKING:
    from .container_reader import Container  # noqa: F401


def __getattr__(name: str):
    """`from prism_load.container import Container`: the reader lives in container_reader.py (it imports this)."""
    if name == "Container":
        from .container_reader import Container

        return Container
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

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
def _fail(where: str, what: str):
    raise ContainerError(f"{MANIFEST_NAME}: {where}: {what}")


def _keys(data, where: str, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict:
    if not isinstance(data, dict):
        _fail(where, f"expected an object, got {type(data).__name__}")
    unknown = sorted(set(data) - set(required) - set(optional))
    if unknown:
        _fail(where, f"unknown key {unknown[0]!r} (known: {', '.join(required + optional)})")
    missing = [k for k in required if k not in data]
    if missing:
        _fail(where, f"missing required key {missing[0]!r}")
    return data


def _int(data: dict, key: str, where: str, lo: int = 0, hi: int | None = None) -> int:
    v = data[key]
    if not isinstance(v, int) or isinstance(v, bool):
        _fail(f"{where}.{key}", f"expected an integer, got {v!r}")
    if v < lo or (hi is not None and v > hi):
        _fail(f"{where}.{key}", f"{v} is out of range [{lo}, {'∞' if hi is None else hi}]")
    return v


def _float(data: dict, key: str, where: str) -> float:
    v = data[key]
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
        _fail(f"{where}.{key}", f"expected a finite number >= 0, got {v!r}")
    return float(v)


def _str(data: dict, key: str, where: str, choices: tuple[str, ...] | None = None, pattern=None) -> str:
    v = data[key]
    if not isinstance(v, str):
        _fail(f"{where}.{key}", f"expected a string, got {v!r}")
    if choices is not None and v not in choices:
        _fail(f"{where}.{key}", f"{v!r} is not one of {', '.join(choices)}")
    if pattern is not None and not pattern.fullmatch(v):
        _fail(f"{where}.{key}", f"{v!r} is not allowed (pattern {pattern.pattern})")
    return v


def _list(data: dict, key: str, where: str, nonempty: bool = False) -> list:
    v = data[key]
    if not isinstance(v, list) or (nonempty and not v):
        _fail(f"{where}.{key}", f"expected a {'non-empty ' if nonempty else ''}list, got {type(v).__name__}")
    return v


def _object_or_null(data: dict, key: str, where: str) -> dict | None:
    v = data.get(key)
    if v is not None and not isinstance(v, dict):
        _fail(f"{where}.{key}", f"expected an object or null, got {type(v).__name__}")
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
            _fail(f"{where}.revision", f"expected a string or null, got {rev!r}")
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
                _fail(f"{where}.{key}", f"{getattr(rec, key)} is outside [0, 1]")
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
                _fail("format_version", f"{version!r} is not supported (this reader knows version {FORMAT_VERSION})")
        _keys(data, "manifest", top, ("quality", "extra", "predictor"))
        _str(data, "format", "manifest", (FORMAT_NAME,))
        for key in ("config", "recipe", "budget"):
            if not isinstance(data[key], dict):
                _fail(key, f"expected an object, got {type(data[key]).__name__}")
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
        validate(manifest)
        return manifest


def _reject_constant(name: str):
    raise ValueError(f"{name} is not allowed")


def _encoding(data, where: str) -> Encoding:
    try:
        return Encoding.from_dict(data)
    except ContainerError as e:
        _fail(where, str(e))
    except (TypeError, ValueError) as e:
        _fail(where, f"invalid encoding {data!r} ({e})")


def _table_index(data: dict, key: str, where: str, table: list) -> Any:
    return table[_int(data, key, where, 0, len(table) - 1)] if table else _fail(f"{where}.{key}", "the table is empty")


def _dense_records(data, encodings: list[Encoding]) -> dict[str, DenseRecord]:
    if not isinstance(data, dict) or not data:
        _fail("dense", "expected a non-empty object of dense tensors")
    out = {}
    for name, rec in data.items():
        where = f"dense[{name!r}]"
        if not TENSOR_NAME.fullmatch(name):
            _fail(where, f"tensor name {name!r} is not allowed (pattern {TENSOR_NAME.pattern})")
        _keys(rec, where, ("shard", "encoding"))
        out[name] = DenseRecord(name, _int(rec, "shard", where), _table_index(rec, "encoding", where, encodings))
    return out


def _expert_record(data, where: str, encodings: list[Encoding]) -> ExpertRecord:
    _keys(data, where, ("layer", "expert", "tier", "frequency", "gate_mass", "placement", "shard", "offset",
                        "length", "checksum", "tensors"))
    tensors = data["tensors"]
    if not isinstance(tensors, dict):
        _fail(f"{where}.tensors", f"expected an object, got {type(tensors).__name__}")
    names = tuple(tensors)
    if set(names) not in (set(EXPERT_TENSORS), set(EXPERT_TENSORS + EXPERT_BIASES)):
        _fail(f"{where}.tensors", f"{sorted(names)} must be {list(EXPERT_TENSORS)} (+ {list(EXPERT_BIASES)})")
    return ExpertRecord(
        layer=_int(data, "layer", where, 0, MAX_LAYERS - 1), expert=_int(data, "expert", where, 0, MAX_EXPERTS - 1),
        tier=_str(data, "tier", where, TIERS), frequency=_float(data, "frequency", where),
        gate_mass=_float(data, "gate_mass", where), placement=_str(data, "placement", where, PLACEMENTS),
        shard=_int(data, "shard", where), offset=_int(data, "offset", where), length=_int(data, "length", where, 1),
        checksum=_str(data, "checksum", where, pattern=CHECKSUM_HEX),
        encodings={name: _table_index(tensors, name, f"{where}.tensors", encodings) for name in names},
    )


# -- cross-field validation ----------------------------------------------------------------------------
def validate(m: Manifest) -> None:
    """Everything checkable without touching a data file: names, references, byte ranges, the model."""
    _unique_names(m)
    _validate_dense(m)
    _validate_expert_ranges(m)
    _validate_against_config(m)
    _validate_predictor(m)


def _unique_names(m: Manifest) -> None:
    seen: set[str] = {MANIFEST_NAME}
    for kind, files in (("tokenizer_files", m.tokenizer_files), ("dense_shards", m.dense_shards),
                        ("expert_shards", m.expert_shards), ("predictor", [m.predictor.file] if m.predictor else [])):
        for i, f in enumerate(files):
            if f.name in seen:
                _fail(f"{kind}[{i}].name", f"{f.name!r} is listed twice")
            seen.add(f.name)


def _validate_dense(m: Manifest) -> None:
    keys_by_shard: dict[int, set[str]] = {}
    for rec in m.dense.values():
        where = f"dense[{rec.name!r}]"
        if rec.shard >= len(m.dense_shards):
            _fail(f"{where}.shard", f"{rec.shard} is not an index of dense_shards (0..{len(m.dense_shards) - 1})")
        keys = keys_by_shard.setdefault(rec.shard, set())
        for key in rec.keys().values():
            if key in keys:
                _fail(where, f"stored key {key!r} collides with another dense tensor's")
            keys.add(key)
    for i, shard in enumerate(m.dense_shards):
        if i not in keys_by_shard:
            _fail(f"dense_shards[{i}]", f"{shard.name} holds no dense tensor")


def _validate_expert_ranges(m: Manifest) -> None:
    """Hot shards first; records in file order; each range aligned, inside its shard, not overlapping."""
    tiers = [s.tier for s in m.expert_shards]
    if tiers != sorted(tiers, key=TIERS.index):
        _fail("expert_shards", f"hot shards must come before cold shards, got tiers {tiers}")
    seen, prev = set(), None
    for i, r in enumerate(m.experts):
        where = f"experts[{i}] ({r.where()})"
        if (r.layer, r.expert) in seen:
            _fail(where, "this expert has two records")
        seen.add((r.layer, r.expert))
        if r.shard >= len(m.expert_shards):
            _fail(f"{where}.shard", f"{r.shard} is not an index of expert_shards (0..{len(m.expert_shards) - 1})")
        shard = m.expert_shards[r.shard]
        if r.tier != shard.tier:
            _fail(f"{where}.tier", f"{r.tier!r} but its shard {shard.name} holds the {shard.tier} tier")
        if r.offset % ALIGNMENT_BYTES or r.offset < ALIGNMENT_BYTES:
            _fail(f"{where}.offset", f"{r.offset} is not a multiple of {ALIGNMENT_BYTES} past the header")
        stored = sum(e.nbytes() for e in r.encodings.values())
        if r.length != stored:
            _fail(f"{where}.length", f"{r.length} bytes, but its encodings store {stored} bytes")
        if aligned(r.end) > shard.bytes:
            _fail(f"{where}", f"range [{r.offset}, {r.end}) ends past the end of {shard.name} ({shard.bytes} bytes)")
        if prev is not None:
            if r.shard < prev.shard:
                _fail(where, "records must be in file order (shard, then offset)")
            if r.shard == prev.shard and r.offset < aligned(prev.end):
                _fail(where, f"range [{r.offset}, {r.end}) overlaps the previous expert's "
                             f"[{prev.offset}, {prev.end}) in {shard.name}")
        prev = r
    used = {r.shard for r in m.experts}
    for i, shard in enumerate(m.expert_shards):
        if i not in used:
            _fail(f"expert_shards[{i}]", f"{shard.name} holds no expert")


def model_args(config: dict):
    """(family, ModelArgs) of the embedded config; any failure is the container's fault."""
    from .models.family import family_for

    layers = config.get("num_hidden_layers")
    if not isinstance(layers, int) or isinstance(layers, bool) or not 0 < layers <= MAX_LAYERS:
        _fail("config.num_hidden_layers", f"expected an integer in 1..{MAX_LAYERS}, got {layers!r}")
    try:
        family = family_for(config)
        args = family.parse_config(config)
    except Exception as e:  # noqa: BLE001 - an untrusted config may break parsing in any way
        _fail("config", f"not a supported model config ({type(e).__name__}: {e})")
    _check_args(args)
    return family, args


def _check_args(args) -> None:
    """Values a model cannot be built or run with (the parsers check presence, not sense)."""
    for name in ("vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                 "num_experts", "num_experts_per_tok", "moe_intermediate_size"):
        v = getattr(args, name)
        if not isinstance(v, int) or not 0 < v < 2**31:
            _fail(f"config.{name}", f"expected a positive integer, got {v!r}")
    if args.num_experts_per_tok > args.num_experts:
        _fail("config.num_experts_per_tok", f"{args.num_experts_per_tok} > {args.num_experts} experts")
    if args.num_attention_heads % args.num_key_value_heads:
        _fail("config.num_key_value_heads", f"{args.num_key_value_heads} does not divide {args.num_attention_heads} heads")
    if not (isinstance(args.rms_norm_eps, float) and math.isfinite(args.rms_norm_eps) and args.rms_norm_eps >= 0):
        _fail("config.rms_norm_eps", f"expected a finite number >= 0, got {args.rms_norm_eps!r}")


def _validate_against_config(m: Manifest) -> None:
    """Exactly one record per (MoE layer, expert); tensor shapes as the config says; biases all or none."""
    _, args = model_args(m.config)
    if not 0 < args.num_experts <= MAX_EXPERTS:
        _fail("config", f"num_experts {args.num_experts} is out of range 1..{MAX_EXPERTS}")
    h, inter = args.hidden_size, args.moe_intermediate_size
    shapes = {"gate_proj": (inter, h), "up_proj": (inter, h), "down_proj": (h, inter),
              "gate_bias": (inter,), "up_bias": (inter,), "down_bias": (h,)}
    moe_layers = set(args.moe_layers)
    has_bias = None
    for i, r in enumerate(m.experts):
        where = f"experts[{i}] ({r.where()})"
        if r.layer not in moe_layers:
            _fail(f"{where}.layer", f"layer {r.layer} is not a MoE layer of the config (MoE layers: {sorted(moe_layers)})")
        if r.expert >= args.num_experts:
            _fail(f"{where}.expert", f"{r.expert} >= num_experts {args.num_experts}")
        for name, enc in r.encodings.items():
            if enc.shape != shapes[name]:
                _fail(f"{where}.tensors.{name}", f"shape {list(enc.shape)}, the config says {list(shapes[name])}")
        bias = "gate_bias" in r.encodings
        if has_bias is not None and bias != has_bias:
            _fail(where, "some experts have biases and others not")
        has_bias = bias
    expected = len(moe_layers) * args.num_experts
    if len(m.experts) != expected:
        missing = sorted({(i, e) for i in moe_layers for e in range(args.num_experts)}
                         - {(r.layer, r.expert) for r in m.experts})
        _fail("experts", f"{len(m.experts)} records, the config has {expected} routed experts "
                         f"(first missing: layer {missing[0][0]} expert {missing[0][1]})")


PREDICTOR_DISTANCES = 2  # a layer is predicted from the output of one of the two MoE layers before it


def predictor_sources(moe_layers) -> dict[int, list[int]]:
    """MoE layer -> the MoE layers a fitted predictor of it may start from (the PREDICTOR_DISTANCES before it)."""
    moe = sorted(moe_layers)
    return {j: moe[max(0, n - PREDICTOR_DISTANCES) : n] for n, j in enumerate(moe)}


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
            _fail(f"{where}.layer", f"{x.layer} is not a MoE layer after the first (MoE layers: {moe})")
        if x.from_layer not in sources[x.layer]:
            _fail(f"{where}.from_layer", f"{x.from_layer}: layer {x.layer} is predicted from one of the MoE layers "
                                         f"{sources[x.layer]}")
        if (x.layer, x.from_layer) <= last:
            _fail(where, f"layer {x.layer} from layer {x.from_layer} is listed twice or out of order")
        last = (x.layer, x.from_layer)

"""The bits-and-rank plan: one allocation over every expert tensor of the model, from the work folder(s).

Budget: `--bits B` = average bits per routed-expert weight — scales, zeros, row padding, low-rank factors,
expert biases and the padding that aligns each expert's byte range to 4 KiB all counted — or `--size S` =
total bytes of all tensors (dense + aligned experts). The allocation unit is the expert: its options are the
Pareto combinations of its tensors' candidates priced at their aligned size, so alignment padding is spent on
precision where it can be.

Price (`--price`): "runtime" (the default) counts each candidate at the bytes prism_load's packed CPU form holds
(packed.held_nbytes: the kernels read 3-bit codes as 4-bit nibbles and 5- and 6-bit codes as bytes), so a
budget sized to a machine's RAM holds once the container is loaded; under it a 3-, 5- or 6-bit candidate costs
what the wider one does and is chosen only where nothing wider of that price is on offer. "stored" counts the
container's bytes (disk and download size), where the wider codes at load are the runtime's business.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from prism_convert.allocation.knapsack import Option, allocate, pareto_front
from prism_convert.compression.workdir import WorkDir, WorkError, WorkJob
from prism_load.atomic import write_json
from prism_load.container import ALIGNMENT_BYTES, aligned
from prism_load.container.format import Encoding
from prism_load.errors import BudgetError
from prism_load.packed import held_nbytes

PRICES = ("runtime", "stored")  # what a candidate costs the budget: bytes the packed runtime holds, or stored


@dataclass(frozen=True)
class Budget:
    bits: float | None = None
    size_bytes: int | None = None
    price: str = "runtime"  # PRICES: the bytes a candidate costs

    def __post_init__(self):
        if (self.bits is None) == (self.size_bytes is None):
            raise BudgetError("give exactly one budget: --bits B or --size S")
        if self.bits is not None and not 0 < self.bits <= 32:
            raise BudgetError(f"--bits {self.bits} is out of range (0, 32]")
        if self.price not in PRICES:
            raise BudgetError(f"--price {self.price!r}: expected one of {', '.join(PRICES)}")

    def to_dict(self) -> dict:
        size = {"bits": self.bits} if self.bits is not None else {"size_bytes": self.size_bytes}
        return {**size, "price": self.price}

    @classmethod
    def from_dict(cls, data: dict) -> Budget:
        """A budget as to_dict wrote it; one recorded before budgets had a price was priced as stored."""
        return cls(bits=data.get("bits"), size_bytes=data.get("size_bytes"), price=data.get("price", "stored"))


class PlanError(WorkError):
    """plan.json does not hold a bit plan: a field is missing, unexpected or of the wrong type."""


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{type(value).__name__} {text[:32]}..."


_KINDS = {
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "int or null": lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool)),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "bool": lambda v: isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "object": lambda v: isinstance(v, dict),
    "list": lambda v: isinstance(v, list),
}


class _Fields:
    """One JSON object of plan.json as it is read: each field checked for presence and type, every error
    naming the file and the field's path (e.g. `plan.json: experts[3].tensors.up_proj.nbytes`)."""

    def __init__(self, data, file: str, path: str, keys: tuple[str, ...]):
        self.file, self.path = file, path
        if not isinstance(data, dict):
            raise PlanError(f"{self.where()}: expected object, got {_show(data)}")
        unknown = [k for k in data if k not in keys]
        if unknown:
            raise PlanError(f"{self.where()}: unexpected field {unknown[0]!r}")
        self.data = data

    def where(self, key: str | None = None) -> str:
        path = self.child(key) if key is not None else self.path
        return f"{self.file}: {path}" if path else self.file

    def child(self, key: str | int) -> str:
        if isinstance(key, int):
            return f"{self.path}[{key}]"
        return f"{self.path}.{key}" if self.path else key

    def __getitem__(self, spec: tuple[str, str]):
        key, kind = spec
        if key not in self.data:
            raise PlanError(f"{self.where()}: missing field {key!r}")
        value = self.data[key]
        if not _KINDS[kind](value):
            raise PlanError(f"{self.where(key)}: expected {kind}, got {_show(value)}")
        return value


@dataclass(frozen=True)
class TensorPick:
    """The candidate chosen for one tensor of an expert, with its encoding's label, size and error."""

    name: str  # gate_proj, up_proj, down_proj
    candidate: int  # index into the work folder's candidates of this tensor
    label: str
    bits_per_weight: float
    rank: int | None
    nbytes: int
    error: float  # output error of the candidate, not weighted by importance

    def to_json(self) -> dict:
        return {"candidate": self.candidate, "label": self.label, "bits_per_weight": self.bits_per_weight,
                "rank": self.rank, "nbytes": self.nbytes, "error": self.error}

    @classmethod
    def from_json(cls, name: str, data, file: str, path: str) -> TensorPick:
        f = _Fields(data, file, path, ("candidate", "label", "bits_per_weight", "rank", "nbytes", "error"))
        return cls(name, f["candidate", "int"], f["label", "str"], f["bits_per_weight", "number"],
                   f["rank", "int or null"], f["nbytes", "int"], f["error", "number"])


@dataclass(frozen=True)
class ExpertPlan:
    """One routed expert's allocation: its calibration routing, its aligned stored size and each tensor's pick."""

    layer: int
    expert: int
    tokens: int
    gate_mass: float
    importance: float
    rare: bool  # too few routed tokens: planned with a neutral prior, still encoded
    stored_bytes: int  # the expert's byte range, aligned
    bits_per_weight: float  # stored_bytes per weight of its tensors
    tensors: tuple[TensorPick, ...]  # in the work folder's tensor order

    @property
    def key(self) -> tuple[int, int]:
        return (self.layer, self.expert)

    def tensor(self, name: str) -> TensorPick:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(f"layer {self.layer} expert {self.expert} has no tensor {name!r}")

    def to_json(self) -> dict:
        return {"layer": self.layer, "expert": self.expert, "tokens": self.tokens, "gate_mass": self.gate_mass,
                "importance": self.importance, "rare": self.rare, "stored_bytes": self.stored_bytes,
                "bits_per_weight": self.bits_per_weight, "tensors": {t.name: t.to_json() for t in self.tensors}}

    @classmethod
    def from_json(cls, data, file: str, path: str) -> ExpertPlan:
        f = _Fields(data, file, path, ("layer", "expert", "tokens", "gate_mass", "importance", "rare",
                                       "stored_bytes", "bits_per_weight", "tensors"))
        head = (f["layer", "int"], f["expert", "int"], f["tokens", "int"], f["gate_mass", "number"],
                f["importance", "number"], f["rare", "bool"], f["stored_bytes", "int"], f["bits_per_weight", "number"])
        tensors = tuple(TensorPick.from_json(name, t, file, f"{f.child('tensors')}.{name}")
                        for name, t in f["tensors", "object"].items())
        return cls(*head, tensors)


_TOTALS = {"expert_weights": "int", "alignment_bytes": "int", "budget_bytes": "int", "expert_bytes": "int",
           "expert_runtime_bytes": "int", "expert_tensor_bytes": "int", "alignment_padding_bytes": "int", "dense_bytes": "int", "total_bytes": "int",
           "bits_per_expert_weight": "number", "expected_error": "number"}
PLAN_KEYS = ("budget", *_TOTALS, "rare_experts", "experts", "job")  # plan.json's keys, in its order


@dataclass(frozen=True)
class BitPlan:
    """plan.json: the allocation over every routed expert of the model under one budget. make_plan builds it;
    to_json gives plan.json's content (keys in this order, numbers as computed), from_json reads it back and
    refuses, naming the field, anything that is not a plan."""

    budget: Budget
    expert_weights: int  # weights of all routed-expert tensors
    alignment_bytes: int  # each expert's byte range is a multiple of this
    budget_bytes: int  # what the allocator could spend on the experts, priced as budget.price says
    expert_bytes: int  # the experts' stored size (aligned ranges)
    expert_runtime_bytes: int  # what the packed runtime holds for them (packed.held_nbytes, aligned alike)
    expert_tensor_bytes: int  # of which the chosen candidates' tensors
    alignment_padding_bytes: int  # and of which padding (the rest is expert biases)
    dense_bytes: int
    total_bytes: int  # expert_bytes + dense_bytes
    bits_per_expert_weight: float
    expected_error: float  # sum of the chosen options' importance-weighted errors
    rare_experts: tuple[tuple[int, int], ...]  # (layer, expert), in allocation order
    experts: tuple[ExpertPlan, ...]  # sorted by (layer, expert)
    model: dict  # the compress job's model identity (path, model_type, config_sha256, num_hidden_layers)
    profile: dict  # the compress job's profile (path, tokens, dataset)

    def expert(self, layer: int, expert: int) -> ExpertPlan:
        return self._by_key[(layer, expert)]

    def layers(self) -> list[int]:
        """The MoE layers the plan covers, ascending."""
        return sorted({x.layer for x in self.experts})

    def layer(self, layer: int) -> list[ExpertPlan]:
        return [x for x in self.experts if x.layer == layer]

    @property
    def runtime_bits_per_expert_weight(self) -> float:
        """bits_per_expert_weight as the packed runtime holds the experts."""
        return 8 * self.expert_runtime_bytes / self.expert_weights

    @property
    def priced_bits(self) -> float:
        """Bits per expert weight as the budget counts them (budget.price): what --bits compares with."""
        held = self.budget.price == "runtime"
        return self.runtime_bits_per_expert_weight if held else self.bits_per_expert_weight

    @cached_property
    def _by_key(self) -> dict[tuple[int, int], ExpertPlan]:
        return {x.key: x for x in self.experts}

    def to_json(self) -> dict:
        return {
            "budget": self.budget.to_dict(),
            "expert_weights": self.expert_weights,
            "alignment_bytes": self.alignment_bytes,
            "budget_bytes": self.budget_bytes,
            "expert_bytes": self.expert_bytes,
            "expert_runtime_bytes": self.expert_runtime_bytes,
            "expert_tensor_bytes": self.expert_tensor_bytes,
            "alignment_padding_bytes": self.alignment_padding_bytes,
            "dense_bytes": self.dense_bytes,
            "total_bytes": self.total_bytes,
            "bits_per_expert_weight": self.bits_per_expert_weight,
            "expected_error": self.expected_error,
            "rare_experts": [list(k) for k in self.rare_experts],
            "experts": [x.to_json() for x in self.experts],
            "job": {"model": self.model, "profile": self.profile},
        }

    def write(self, path: Path) -> None:
        write_json(path, self.to_json())

    @classmethod
    def read(cls, path: Path) -> BitPlan:
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise PlanError(f"{path}: not JSON ({e.msg})") from None
        return cls.from_json(data, str(path))

    @classmethod
    def from_json(cls, data, file: str = "plan.json") -> BitPlan:
        f = _Fields(data, file, "", PLAN_KEYS)
        budget = _budget_from_json(f["budget", "object"], file)
        totals = {key: f[key, kind] for key, kind in _TOTALS.items()}
        experts = tuple(ExpertPlan.from_json(x, file, f.child("experts") + f"[{n}]")
                        for n, x in enumerate(f["experts", "list"]))
        seen = set()
        for n, x in enumerate(experts):
            if x.key in seen:
                raise PlanError(f"{file}: experts[{n}]: layer {x.layer} expert {x.expert} appears twice")
            seen.add(x.key)
        rare = f["rare_experts", "list"]
        marked = sorted([x.layer, x.expert] for x in experts if x.rare)
        if not all(isinstance(k, list) and len(k) == 2 and all(_KINDS["int"](v) for v in k) for k in rare) \
                or sorted(rare) != marked:
            raise PlanError(f"{f.where('rare_experts')}: {_show(rare)} does not match the experts marked rare ({marked})")
        job = _Fields(f["job", "object"], file, "job", ("model", "profile"))
        return cls(budget, **totals, rare_experts=tuple((k[0], k[1]) for k in rare), experts=experts,
                   model=job["model", "object"], profile=job["profile", "object"])


def _budget_from_json(data: dict, file: str) -> Budget:
    f = _Fields(data, file, "budget", ("bits", "size_bytes", "price"))
    bits = f["bits", "number"] if "bits" in data else None
    size = f["size_bytes", "int"] if "size_bytes" in data else None
    price = f["price", "str"] if "price" in data else "stored"
    try:
        return Budget(bits=bits, size_bytes=size, price=price)
    except BudgetError as e:
        raise PlanError(f"{f.where()}: {e}") from None


def gather_layers(works: list[WorkDir]) -> tuple[WorkJob, dict[int, WorkDir]]:
    """The job all folders share, and which folder holds each layer; refuses mismatched or incomplete work."""
    jobs = [w.job() for w in works]
    first = jobs[0]
    for w, job in zip(works[1:], jobs[1:]):
        for key in ("model", "profile", "recipe"):
            if job.identity(key) != first.identity(key):
                raise WorkError(f"{w.folder}: {key} differs from {works[0].folder}'s; these work folders cannot be merged")
    owner: dict[int, WorkDir] = {}
    for w in works:
        for i in w.done_layers():
            if i in owner and owner[i].folder != w.folder:
                raise WorkError(f"layer {i} was compressed twice ({owner[i].folder} and {w.folder})")
            owner[i] = w
    n = first.num_layers
    missing = [i for i in range(n) if i not in owner]
    if missing:
        raise WorkError(f"incomplete work: layers {_ranges(missing)} of 0..{n - 1} are missing; run prism compress --layers for them")
    return first, owner


def _ranges(ids: list[int]) -> str:
    out, start = [], ids[0]
    for a, b in zip(ids, ids[1:] + [None]):
        if b != a + 1:
            out.append(str(start) if start == a else f"{start}-{a}")
            start = b
    return ", ".join(out)


def encoding_price(enc: Encoding, price: str) -> int:
    """Bytes one encoded tensor costs the budget: as stored, or as the packed runtime holds it."""
    return enc.nbytes() if price == "stored" else held_nbytes(enc)


def candidate_price(cand: dict, price: str) -> int:
    """encoding_price of a work folder's candidate (its stored size is recorded with it)."""
    return cand["nbytes"] if price == "stored" else encoding_price(Encoding.from_dict(cand["encoding"]), price)


def bias_nbytes(rec: dict) -> int:
    """Bytes of an expert's biases (stored and held alike): fixed, whichever candidates are chosen."""
    return sum(Encoding.from_dict(b["encoding"]).nbytes() for b in rec.get("biases", {}).values())


def expert_options(rec: dict, alignment: int, price: str = "runtime") -> tuple[list[Option], list[tuple[int, ...]]]:
    """One expert's choices as a whole: every Pareto-optimal combination of its tensors' candidates,
    priced by `price` — the sum of their bytes plus fixed biases, rounded up to the expert alignment
    (each expert is one aligned byte range of the container). Errors are weighted by its importance."""
    front: list[tuple[int, float, tuple[int, ...]]] = [(0, 0.0, ())]
    for cands in rec["tensors"].values():
        costs = [candidate_price(c, price) for c in cands]
        combos = [(b + cost, e + rec["importance"] * c["error"], picks + (j,))
                  for b, e, picks in front for j, (c, cost) in enumerate(zip(cands, costs))]
        front = pareto_front(combos)
    fixed = bias_nbytes(rec)
    priced = pareto_front([(aligned(b + fixed, alignment), e, picks) for b, e, picks in front])
    return [Option(b, e) for b, e, _ in priced], [picks for _, _, picks in priced]


@dataclass
class PlanInputs:
    """Every expert's priced choices, read once from the work folder(s)."""

    job: WorkJob
    keys: list[tuple[int, int]]  # (layer, expert) per table
    tables: list[list[Option]]
    picks: list[list[tuple[int, ...]]]  # per table and option: the candidate index of each tensor
    records: dict[tuple[int, int], dict]
    expert_weights: int
    dense_bytes: int
    alignment: int
    price: str = "runtime"  # what the tables' option bytes count (PRICES)

    @classmethod
    def read(cls, works: list[WorkDir], alignment: int = ALIGNMENT_BYTES, price: str = "runtime") -> PlanInputs:
        job, owner = gather_layers(works)
        top_meta, _ = works[0].top()
        keys, tables, picks, records = [], [], [], {}
        expert_weights = 0
        dense_bytes = sum(r["nbytes"] for r in top_meta["dense"].values())
        for i in sorted(owner):
            meta = owner[i].layer_meta(i)
            dense_bytes += sum(r["nbytes"] for r in meta["dense"].values())
            for rec in meta.get("experts", []):
                records[(i, rec["expert"])] = rec
                expert_weights += sum(math.prod(c[0]["encoding"]["shape"]) for c in rec["tensors"].values())
                options, combos = expert_options(rec, alignment, price)
                keys.append((i, rec["expert"]))
                tables.append(options)
                picks.append(combos)
        return cls(job, keys, tables, picks, records, expert_weights, dense_bytes, alignment, price)

    def budget_bytes(self, budget: Budget) -> int:
        """Bytes the allocator may spend on the experts' (aligned) byte ranges, priced as budget.price says.
        --size leaves what the dense weights do not take (they are held as stored: the packed runtime keeps
        a container's int8 dense layers packed)."""
        if budget.bits is not None:
            return math.floor(budget.bits * self.expert_weights / 8)
        spare = budget.size_bytes - self.dense_bytes
        if spare <= 0:
            raise BudgetError(
                f"--size {budget.size_bytes:,} bytes does not even hold the dense weights ({self.dense_bytes:,} bytes)"
            )
        return spare

    def lowest_bits(self) -> float:
        return 8 * sum(min(o.nbytes for o in t) for t in self.tables) / self.expert_weights


def make_plan(works: list[WorkDir] | PlanInputs, budget: Budget) -> BitPlan:
    inputs = works if isinstance(works, PlanInputs) else PlanInputs.read(works, price=budget.price)
    if inputs.price != budget.price:
        raise ValueError(f"the plan inputs are priced {inputs.price!r}, the budget {budget.price!r}")
    budget_bytes = inputs.budget_bytes(budget)
    try:
        choice = allocate(inputs.tables, budget_bytes)
    except BudgetError as e:
        raise BudgetError(f"{e}; the lowest this recipe allows is {inputs.lowest_bits():.3f} bits per expert weight") from None
    experts = []
    spent = held = weighted = tensor_bytes = bias_bytes = 0
    for (i, e), table, combos, k in zip(inputs.keys, inputs.tables, inputs.picks, choice):
        rec = inputs.records[(i, e)]
        tensors, held_tensors = [], 0
        for name, j in zip(rec["tensors"], combos[k]):
            cand = rec["tensors"][name][j]
            enc = Encoding.from_dict(cand["encoding"])
            tensors.append(TensorPick(name, j, enc.label(), enc.bits_per_weight, enc.rank, cand["nbytes"], cand["error"]))
            held_tensors += held_nbytes(enc)
        weights = sum(math.prod(c[0]["encoding"]["shape"]) for c in rec["tensors"].values())
        fixed, stored_tensors = bias_nbytes(rec), sum(t.nbytes for t in tensors)
        stored = aligned(stored_tensors + fixed, inputs.alignment)
        spent += stored
        held += aligned(held_tensors + fixed, inputs.alignment)
        weighted += table[k].error
        tensor_bytes += stored_tensors
        bias_bytes += fixed
        experts.append(ExpertPlan(
            layer=i, expert=e, tokens=rec["tokens"], gate_mass=rec["gate_mass"], importance=rec["importance"],
            rare=rec["rare"], stored_bytes=stored, bits_per_weight=8 * stored / weights,
            tensors=tuple(tensors),
        ))
    return BitPlan(
        budget=budget,
        expert_weights=inputs.expert_weights,
        alignment_bytes=inputs.alignment,
        budget_bytes=budget_bytes,
        expert_bytes=spent,
        expert_runtime_bytes=held,
        expert_tensor_bytes=tensor_bytes,
        alignment_padding_bytes=spent - tensor_bytes - bias_bytes,
        dense_bytes=inputs.dense_bytes,
        total_bytes=spent + inputs.dense_bytes,
        bits_per_expert_weight=8 * spent / inputs.expert_weights,
        expected_error=weighted,
        rare_experts=tuple((x.layer, x.expert) for x in experts if x.rare),
        experts=tuple(sorted(experts, key=lambda x: (x.layer, x.expert))),
        model=inputs.job.model,
        profile=inputs.job.profile,
    )


def error_size_curve(inputs: PlanInputs, bits_grid: list[float]) -> list[dict]:
    """Expected weighted error of the optimal allocation at each average bit-width (the trade-off curve)."""
    points = []
    for bits in bits_grid:
        try:
            plan = make_plan(inputs, Budget(bits=bits, price=inputs.price))
        except BudgetError:
            continue
        points.append({"bits": plan.priced_bits, "error": plan.expected_error})
    return points

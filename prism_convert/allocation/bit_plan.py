"""The bits-and-rank plan: one allocation over every expert tensor of the model, from the work folder(s).

Budget: `--bits B` = average bits per routed-expert weight as stored — scales, zeros, row padding,
low-rank factors, expert biases and the padding that aligns each expert's byte range to 4 KiB all
counted — or `--size S` = total bytes of all stored tensors (dense + aligned experts). The allocation
unit is the expert: its options are the Pareto combinations of its tensors' candidates priced at their
aligned size, so alignment padding is spent on precision where it can be.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from prism_convert.allocation.knapsack import Option, allocate, pareto_front
from prism_convert.compression.workdir import WorkDir, WorkError, WorkJob
from prism_load.container import ALIGNMENT_BYTES, aligned
from prism_load.container.format import Encoding
from prism_load.errors import BudgetError


@dataclass(frozen=True)
class Budget:
    bits: float | None = None
    size_bytes: int | None = None

    def __post_init__(self):
        if (self.bits is None) == (self.size_bytes is None):
            raise BudgetError("give exactly one budget: --bits B or --size S")
        if self.bits is not None and not 0 < self.bits <= 32:
            raise BudgetError(f"--bits {self.bits} is out of range (0, 32]")

    def to_dict(self) -> dict:
        return {"bits": self.bits} if self.bits is not None else {"size_bytes": self.size_bytes}

    @classmethod
    def from_dict(cls, data: dict) -> Budget:
        return cls(bits=data.get("bits"), size_bytes=data.get("size_bytes"))


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


def expert_options(rec: dict, alignment: int) -> tuple[list[Option], list[tuple[int, ...]]]:
    """One expert's choices as a whole: every Pareto-optimal combination of its tensors' candidates,
    priced as stored — the sum of their bytes plus fixed biases, rounded up to the expert alignment
    (each expert is one aligned byte range of the container). Errors are weighted by its importance."""
    front: list[tuple[int, float, tuple[int, ...]]] = [(0, 0.0, ())]
    for cands in rec["tensors"].values():
        combos = [(b + c["nbytes"], e + rec["importance"] * c["error"], picks + (j,))
                  for b, e, picks in front for j, c in enumerate(cands)]
        front = pareto_front(combos)
    fixed = sum(Encoding.from_dict(b["encoding"]).nbytes() for b in rec.get("biases", {}).values())
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

    @classmethod
    def read(cls, works: list[WorkDir], alignment: int = ALIGNMENT_BYTES) -> PlanInputs:
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
                options, combos = expert_options(rec, alignment)
                keys.append((i, rec["expert"]))
                tables.append(options)
                picks.append(combos)
        return cls(job, keys, tables, picks, records, expert_weights, dense_bytes, alignment)

    def budget_bytes(self, budget: Budget) -> int:
        """Bytes the allocator may spend on the experts' stored (aligned) byte ranges."""
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


def make_plan(works: list[WorkDir] | PlanInputs, budget: Budget) -> dict:
    inputs = works if isinstance(works, PlanInputs) else PlanInputs.read(works)
    budget_bytes = inputs.budget_bytes(budget)
    try:
        choice = allocate(inputs.tables, budget_bytes)
    except BudgetError as e:
        raise BudgetError(f"{e}; the lowest this recipe allows is {inputs.lowest_bits():.3f} bits per expert weight") from None
    experts = []
    spent = weighted = tensor_bytes = 0
    for (i, e), table, combos, k in zip(inputs.keys, inputs.tables, inputs.picks, choice):
        rec = inputs.records[(i, e)]
        tensors = {}
        for name, j in zip(rec["tensors"], combos[k]):
            cand = rec["tensors"][name][j]
            enc = Encoding.from_dict(cand["encoding"])
            tensors[name] = {"candidate": j, "label": enc.label(), "bits_per_weight": enc.bits_per_weight,
                             "rank": enc.rank, "nbytes": cand["nbytes"], "error": cand["error"]}
        weights = sum(math.prod(c[0]["encoding"]["shape"]) for c in rec["tensors"].values())
        spent += table[k].nbytes
        weighted += table[k].error
        tensor_bytes += sum(t["nbytes"] for t in tensors.values())
        experts.append({
            "layer": i, "expert": e, "tokens": rec["tokens"], "gate_mass": rec["gate_mass"],
            "importance": rec["importance"], "rare": rec["rare"], "stored_bytes": table[k].nbytes,
            "bits_per_weight": 8 * table[k].nbytes / weights, "tensors": tensors,
        })
    return {
        "budget": budget.to_dict(),
        "expert_weights": inputs.expert_weights,
        "alignment_bytes": inputs.alignment,
        "budget_bytes": budget_bytes,
        "expert_bytes": spent,
        "expert_tensor_bytes": tensor_bytes,
        "alignment_padding_bytes": spent - tensor_bytes - sum(
            Encoding.from_dict(b["encoding"]).nbytes() for r in inputs.records.values() for b in r.get("biases", {}).values()),
        "dense_bytes": inputs.dense_bytes,
        "total_bytes": spent + inputs.dense_bytes,
        "bits_per_expert_weight": 8 * spent / inputs.expert_weights,
        "expected_error": weighted,
        "rare_experts": [[x["layer"], x["expert"]] for x in experts if x["rare"]],
        "experts": sorted(experts, key=lambda x: (x["layer"], x["expert"])),
        "job": {"model": inputs.job.model, "profile": inputs.job.profile},
    }


def error_size_curve(inputs: PlanInputs, bits_grid: list[float]) -> list[dict]:
    """Expected weighted error of the optimal allocation at each average bit-width (the trade-off curve)."""
    points = []
    for bits in bits_grid:
        try:
            plan = make_plan(inputs, Budget(bits=bits))
        except BudgetError:
            continue
        points.append({"bits": plan["bits_per_expert_weight"], "error": plan["expected_error"]})
    return points

"""The bit plan as a typed record: make_plan builds it, to_json writes the same plan.json as the dict form
did (golden bytes), from_json reads it back and names the field that is wrong."""

import json
import math
from pathlib import Path

import pytest

from prism_convert.allocation.bit_plan import (
    BitPlan,
    Budget,
    PlanError,
    PlanInputs,
    expert_options,
    make_plan,
)
from prism_convert.compression.workdir import WorkJob
from prism_load.container.format import Encoding
from prism_load.errors import BudgetError

GOLDEN = Path(__file__).parent / "fixtures" / "bit_plan" / "plan.json"
TENSORS = {"gate_proj": (32, 64), "up_proj": (32, 64), "down_proj": (64, 32)}


def candidate(shape, bits, group_size, error, rank=None):
    kind = "int" if rank is None else "int+lowrank"
    enc = Encoding(kind, shape, bits=bits, group_size=group_size, rank=rank, factor_bits=None if rank is None else 16)
    return {"encoding": enc.to_dict(), "nbytes": enc.nbytes(), "error": error}


def synthetic_inputs(alignment: int = 512) -> PlanInputs:
    """Two MoE layers of three experts, three int candidates per tensor (one with a low-rank correction),
    biases on one expert and one rare expert: small enough to write out, varied enough to cover every field."""
    records, keys, tables, picks = {}, [], [], []
    weights = 0
    for i in (1, 2):
        for e in range(3):
            scale = (1 + i) * (1 + e) / 7
            tensors = {name: [candidate(shape, 2, 32, 0.9 * scale), candidate(shape, 4, 32, 0.11 * scale),
                              candidate(shape, 2, 32, 0.05 * scale, rank=4), candidate(shape, 8, 64, 0.004 * scale)]
                       for name, shape in TENSORS.items()}
            rec = {"expert": e, "tokens": 10 * (3 - e) * i, "gate_mass": round(1.5 * (3 - e) * i, 3),
                   "importance": 1.0 if e == 2 and i == 2 else 0.25 * (3 - e) + 0.125 * i, "rare": e == 2 and i == 2,
                   "tensors": tensors}
            if e == 1:
                rec["biases"] = {"down_bias": {"encoding": Encoding("bf16", (64,)).to_dict()}}
            records[(i, e)] = rec
            weights += sum(math.prod(c[0]["encoding"]["shape"]) for c in tensors.values())
            options, combos = expert_options(rec, alignment)
            keys.append((i, e))
            tables.append(options)
            picks.append(combos)
    job = WorkJob({"path": "/models/tiny", "model_type": "qwen3_moe", "config_sha256": "ab" * 32, "num_hidden_layers": 3},
                  {"path": "/prof", "tokens": 4096, "dataset": "builtin:mix"}, {"name": "test"}, [0, 3])
    return PlanInputs(job, keys, tables, picks, records, weights, 123_456, alignment)


def test_to_json_writes_the_golden_plan_json():
    """Same keys, order and number formatting as the dict make_plan returned before the record existed
    (the golden file was written by that code from these inputs)."""
    plan = make_plan(synthetic_inputs(), Budget(bits=4.5))
    assert isinstance(plan, BitPlan)
    assert json.dumps(plan.to_json(), indent=1) == GOLDEN.read_text()


def test_from_json_round_trips():
    plan = make_plan(synthetic_inputs(), Budget(bits=4.5))
    again = BitPlan.from_json(json.loads(json.dumps(plan.to_json())))
    assert again == plan
    assert json.dumps(again.to_json(), indent=1) == GOLDEN.read_text()
    assert BitPlan.read(GOLDEN).to_json() == json.loads(GOLDEN.read_text())


def test_record_fields():
    plan = make_plan(synthetic_inputs(), Budget(bits=4.5))
    assert plan.rare_experts == ((2, 2),)
    assert [(x.layer, x.expert) for x in plan.experts] == [(1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2)]
    assert plan.expert(2, 1).tensor("down_proj").candidate in range(4)
    assert [t.name for t in plan.expert(1, 0).tensors] == list(TENSORS)
    assert plan.expert_bytes == sum(x.stored_bytes for x in plan.experts)
    assert plan.layers() == [1, 2]


def damaged(path: str, value):
    """The golden plan with one field (a path like 'experts.3.tensors.up_proj.nbytes') replaced or, for
    value=KeyError, removed."""
    data = json.loads(GOLDEN.read_text())
    *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
    node = data
    for p in parents:
        node = node[p]
    if value is KeyError:
        del node[last]
    else:
        node[last] = value
    return data


@pytest.mark.parametrize("path, value, message", [
    ("experts.3.tensors.up_proj.nbytes", "x", "plan.json: experts[3].tensors.up_proj.nbytes: expected int, got 'x'"),
    ("experts.1.layer", 1.0, "plan.json: experts[1].layer: expected int, got 1.0"),
    ("experts.0.rare", 0, "plan.json: experts[0].rare: expected bool, got 0"),
    ("experts.2.gate_mass", None, "plan.json: experts[2].gate_mass: expected number, got None"),
    ("experts.4.tensors.gate_proj.rank", "4", "plan.json: experts[4].tensors.gate_proj.rank: expected int or null, got '4'"),
    ("experts.5.tensors", [], "plan.json: experts[5].tensors: expected object, got []"),
    ("experts.0.tensors.down_proj.label", KeyError, "plan.json: experts[0].tensors.down_proj: missing field 'label'"),
    ("expert_bytes", KeyError, "plan.json: missing field 'expert_bytes'"),
    ("total_bytes", True, "plan.json: total_bytes: expected int, got True"),
    ("experts", {}, "plan.json: experts: expected list, got {}"),
    ("budget", {"bits": 3, "size_bytes": 5}, "plan.json: budget: give exactly one budget"),
    ("budget", {"megabytes": 5}, "plan.json: budget: unexpected field 'megabytes'"),
    ("budget", {"bits": 4.5, "price": "disk"}, "plan.json: budget: --price 'disk': expected one of runtime, stored"),
    ("expert_runtime_bytes", KeyError, "plan.json: missing field 'expert_runtime_bytes'"),
    ("job.model", "m", "plan.json: job.model: expected object, got 'm'"),
    ("rare_experts", [[1, 0]], "plan.json: rare_experts: [[1, 0]] does not match the experts marked rare ([[2, 2]])"),
    ("experts.1.extra", 1, "plan.json: experts[1]: unexpected field 'extra'"),
])
def test_from_json_names_the_damaged_field(path, value, message):
    with pytest.raises(PlanError) as e:
        BitPlan.from_json(damaged(path, value))
    assert str(e.value).startswith(message)


def test_from_json_refuses_a_non_object():
    with pytest.raises(PlanError, match=r"plan.json: expected object, got \[\]"):
        BitPlan.from_json([])


# -- price: what a candidate costs the budget ----------------------------------------------------------
def mixed_width_inputs(price: str) -> PlanInputs:
    """One layer of four experts whose tensors may be int2, int3 or int4 (g32) or int6 (g64): int3 is stored
    smaller than int4 but held as int4 by the packed runtime, int6 held as int8."""
    records, keys, tables, picks, weights = {}, [], [], [], 0
    for e in range(4):
        tensors = {name: [candidate(shape, 2, 32, 1.0), candidate(shape, 3, 32, 0.3), candidate(shape, 4, 32, 0.12),
                          candidate(shape, 6, 64, 0.02)]
                   for name, shape in TENSORS.items()}
        rec = {"expert": e, "tokens": 10, "gate_mass": 1.0, "importance": 1.0 + e, "rare": False, "tensors": tensors}
        records[(0, e)] = rec
        weights += sum(math.prod(c[0]["encoding"]["shape"]) for c in tensors.values())
        options, combos = expert_options(rec, 512, price)
        keys.append((0, e))
        tables.append(options)
        picks.append(combos)
    job = WorkJob({"path": "/m", "model_type": "mixtral", "config_sha256": "cd" * 32, "num_hidden_layers": 1},
                  {"path": "/p", "tokens": 40, "dataset": "builtin:mix"}, {"name": "test"}, [0, 1])
    return PlanInputs(job, keys, tables, picks, records, weights, 0, 512, price)


def held_bits_of(plan) -> float:
    return 8 * plan.expert_runtime_bytes / plan.expert_weights


def test_runtime_price_keeps_the_loaded_experts_within_the_budget():
    """Priced as stored, a 3.5-bit budget buys int3 tensors the runtime then holds as int4: more RAM than the
    budget. Priced at runtime the same budget holds once loaded, and int3 (held like int4, with more error)
    is never chosen."""
    stored = make_plan(mixed_width_inputs("stored"), Budget(bits=3.5, price="stored"))
    runtime = make_plan(mixed_width_inputs("runtime"), Budget(bits=3.5, price="runtime"))
    assert stored.bits_per_expert_weight <= 3.5 < held_bits_of(stored)
    assert any(t.label.startswith("int3") for x in stored.experts for t in x.tensors)
    assert held_bits_of(runtime) <= 3.5
    assert runtime.priced_bits == held_bits_of(runtime) and stored.priced_bits == stored.bits_per_expert_weight
    labels = {t.label for x in runtime.experts for t in x.tensors}
    assert labels <= {"int2/g32", "int4/g32", "int6/g64"} and "int3/g32" not in labels
    assert runtime.expert_bytes == sum(x.stored_bytes for x in runtime.experts)  # stored sizes stay stored


def test_runtime_price_of_a_candidate_is_its_packed_size():
    enc = Encoding("int", (32, 64), bits=3, group_size=32)
    wide = Encoding("int", (32, 64), bits=4, group_size=32)
    cand = {"encoding": enc.to_dict(), "nbytes": enc.nbytes(), "error": 0.1}
    (runtime,), _ = expert_options({"importance": 1.0, "tensors": {"gate_proj": [cand]}}, 1, "runtime")
    (stored,), _ = expert_options({"importance": 1.0, "tensors": {"gate_proj": [cand]}}, 1, "stored")
    assert (runtime.nbytes, stored.nbytes) == (wide.nbytes(), enc.nbytes())


def test_budget_price_round_trips_and_old_budgets_read_as_stored():
    assert Budget.from_dict(Budget(bits=3.0).to_dict()) == Budget(bits=3.0, price="runtime")
    assert Budget.from_dict({"size_bytes": 10, "price": "stored"}) == Budget(size_bytes=10, price="stored")
    assert Budget.from_dict({"bits": 3.0}).price == "stored"  # recorded before budgets had a price
    with pytest.raises(BudgetError, match="--price 'ram': expected one of runtime, stored"):
        Budget(bits=3.0, price="ram")


def test_plan_inputs_and_budget_must_agree_on_the_price():
    with pytest.raises(ValueError, match="priced 'stored', the budget 'runtime'"):
        make_plan(mixed_width_inputs("stored"), Budget(bits=4.0))

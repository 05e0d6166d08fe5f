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

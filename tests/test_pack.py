"""prism pack: the converted container loads and equals the original with the same encodings applied in
memory (decode is bit-exact); tiers and placement follow the recipe; partitions merge."""

import json

import pytest
import torch
from containers import assert_container_equals_in_memory_decode

import prism_load
from prism_convert.allocation.bit_plan import BitPlan, Budget
from prism_convert.compression.compress_layers import run_compress
from prism_convert.pipeline import pack_work
from prism_convert.profiling.profiler import run_profile
from prism_convert.recipe import Recipe

RECIPE = {"quantization": {"group_size": 16, "max_tokens_per_expert": 64},
          "candidates": {"int_bits": [2, 3, 4, 8], "int_lowrank": [[2, 0.25]]},  # pure low-rank experts stay factored at load (equal to 1e-5, tested in test_container)
          "limits": {"max_bits": 12.0}, "dense": {"attention": "int8"}}


@pytest.fixture(scope="module", params=["mixtral", "qwen2_moe"])
def packed(request, tiny_checkpoint, tmp_path_factory):
    folder, ref = tiny_checkpoint(request.param)
    root = tmp_path_factory.mktemp(f"pack_{request.param}")
    tokens = torch.randint(0, ref.config.vocab_size, (6, 16), generator=torch.Generator().manual_seed(5))
    run_profile(folder, tokens, root / "profile", {"spec": "random"}, min_tokens=4)
    run_compress(folder, root / "profile", Recipe.from_dict(RECIPE), root / "work")
    plan = pack_work([root / "work"], root / "m.prism", Budget(bits=12.0), shard_size_bytes=1 << 16)
    return folder, ref, tokens, root, plan


def test_container_equals_in_memory_decode(packed):
    folder, ref, tokens, root, plan = packed
    assert_container_equals_in_memory_decode(folder, root / "work", root / "m.prism", plan, tokens)


def test_plan_json_reads_back_as_the_plan(packed):
    """pack writes plan.json beside the work; BitPlan.read gives back the record pack returned."""
    _, _, _, root, plan = packed
    path = root / "work" / "plan.json"
    assert BitPlan.read(path) == plan
    assert path.read_text() == json.dumps(plan.to_json(), indent=1)


def test_manifest_records_plan_tiers_and_budget(packed):
    _, ref, _, root, plan = packed
    manifest = json.loads((root / "m.prism" / "manifest.json").read_text())
    assert manifest["budget"]["bits"] == 12.0
    assert manifest["budget"]["bits_per_expert_weight"] == pytest.approx(plan.bits_per_expert_weight)
    assert plan.bits_per_expert_weight <= 12.0
    records = manifest["experts"]
    moe_layers = {x.layer for x in plan.experts}
    assert sorted((r["layer"], r["expert"]) for r in records) == [(x.layer, x.expert) for x in plan.experts]
    for layer in moe_layers:
        mine = sorted((r for r in records if r["layer"] == layer), key=lambda r: -r["frequency"])
        hot = [r for r in mine if r["tier"] == "hot"]
        assert len(hot) == -(-len(mine) // 4)  # hot_share 0.25, rounded up
        assert all(r["placement"] == "fast" for r in hot)
        assert min(r["frequency"] for r in hot) >= max(r["frequency"] for r in mine if r["tier"] == "cold")


def test_pack_merges_layer_ranges(packed, tmp_path):
    folder, _, tokens, root, _ = packed
    recipe = Recipe.from_dict(RECIPE)
    n = json.loads((folder / "config.json").read_text())["num_hidden_layers"]
    run_compress(folder, root / "profile", recipe, tmp_path / "a", layers=f"0:{n // 2}")
    run_compress(folder, root / "profile", recipe, tmp_path / "b", layers=f"{n // 2}:")
    pack_work([tmp_path / "a", tmp_path / "b"], tmp_path / "merged.prism", Budget(bits=12.0), 1 << 16)
    merged, whole = prism_load.load(tmp_path / "merged.prism"), prism_load.load(root / "m.prism")
    with torch.no_grad():
        assert torch.equal(merged(tokens), whole(tokens))


def test_pack_takes_the_recorded_budget_and_its_price_unless_told(packed, tmp_path):
    """A budget recorded before budgets had a price is priced as stored; --price replaces the recorded price
    and keeps its size; the manifest says which price the plan was made at."""
    import shutil

    from prism_convert.compression.workdir import WorkDir

    _, _, _, root, _ = packed
    work = tmp_path / "work"
    shutil.copytree(root / "work", work)
    w = WorkDir(work)
    w.write_job(w.job().with_budget({"bits": 12.0}))  # tiny experts: 4 KiB alignment alone is 6-11 bits
    stored = pack_work([work], tmp_path / "a.prism", None, shard_size_bytes=1 << 16)
    runtime = pack_work([work], tmp_path / "b.prism", None, shard_size_bytes=1 << 16, price="runtime")
    assert stored.budget == Budget(bits=12.0, price="stored") and stored.bits_per_expert_weight <= 12.0
    assert runtime.budget == Budget(bits=12.0, price="runtime") and runtime.priced_bits <= 12.0
    assert 8 * runtime.expert_runtime_bytes / runtime.expert_weights <= 12.0
    for name, plan in (("a.prism", stored), ("b.prism", runtime)):
        budget = json.loads((tmp_path / name / "manifest.json").read_text())["budget"]
        assert budget["price"] == plan.budget.price
        assert budget["runtime_bits_per_expert_weight"] == pytest.approx(8 * plan.expert_runtime_bytes / plan.expert_weights)

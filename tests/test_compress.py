"""prism compress: streaming measurement, resume, layer partitions, whole-model allocation, clear errors."""

import json

import pytest
import torch

from prism_convert.allocation.bit_plan import Budget, PlanInputs, make_plan
from prism_convert.compression.compress_layers import run_compress
from prism_convert.compression.workdir import WorkDir, WorkError
from prism_convert.packing.materialize import apply_in_memory, decoded_state, dense_tensors, planned_experts
from prism_convert.profiling.profiler import run_profile
from prism_convert.recipe import Recipe
from prism_load.errors import BudgetError, ProfileError

SMALL = {"quantization": {"group_size": 16, "max_tokens_per_expert": 64},
         "candidates": {"int_bits": [2, 3, 4, 8], "int_lowrank": [[2, 0.25]]}, "limits": {"max_bits": 12.0}}


@pytest.fixture(scope="module")
def setup(tiny_checkpoint, tmp_path_factory):
    folder, ref = tiny_checkpoint("qwen2_moe")
    tokens = torch.randint(0, ref.config.vocab_size, (6, 16), generator=torch.Generator().manual_seed(3))
    root = tmp_path_factory.mktemp("compress")
    run_profile(folder, tokens, root / "profile", {"spec": "random"}, min_tokens=4)
    recipe = Recipe.from_dict(SMALL)
    run_compress(folder, root / "profile", recipe, root / "work")
    return folder, ref, tokens, root, recipe


def test_every_layer_measured_with_pareto_candidates(setup):
    folder, ref, _, root, _ = setup
    work = WorkDir(root / "work")
    assert work.done_layers() == list(range(ref.config.num_hidden_layers))
    meta = work.layer_meta(0)
    assert len(meta["experts"]) == ref.config.num_experts
    for rec in meta["experts"]:
        for name in ("gate_proj", "up_proj", "down_proj"):
            cands = rec["tensors"][name]
            sizes = [c["nbytes"] for c in cands]
            errors = [c["error"] for c in cands]
            assert sizes == sorted(sizes) and errors == sorted(errors, reverse=True)  # Pareto: more bytes, less error
            assert len(set(sizes)) == len(sizes)
    assert "experts" not in work.layer_meta(1)  # the dense MLP layer of this config (mlp_only_layers=[1])


@pytest.mark.parametrize("bits", [4.6, 5.5, 7.0])
def test_plan_respects_the_budget_to_the_byte(setup, bits):
    _, _, _, root, _ = setup
    inputs = PlanInputs.read([WorkDir(root / "work")], alignment=1)  # tiny experts: price tensors alone
    plan = make_plan(inputs, Budget(bits=bits))
    assert plan.expert_bytes <= bits * plan.expert_weights / 8
    assert plan.bits_per_expert_weight <= bits
    assert plan.bits_per_expert_weight > bits - 0.6  # spends most of it
    size_plan = make_plan(inputs, Budget(size_bytes=plan.total_bytes))
    assert size_plan.total_bytes <= plan.total_bytes


def test_more_budget_means_less_expected_error(setup):
    _, _, _, root, _ = setup
    inputs = PlanInputs.read([WorkDir(root / "work")], alignment=1)
    errors = [make_plan(inputs, Budget(bits=b)).expected_error for b in (4.6, 5.5, 7.0, 10.0)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < errors[0]


def test_budget_below_the_smallest_encoding(setup):
    _, _, _, root, _ = setup
    with pytest.raises(BudgetError, match=r"below the smallest possible encoding .* lowest this recipe allows is \d+\.\d+ bits"):
        make_plan([WorkDir(root / "work")], Budget(bits=3.0))


def test_decoded_model_stays_close_to_the_original(setup, tmp_path):
    """With room for 8 bits everywhere (dense kept fp32: a random tiny model's routing flips on bf16
    rounding), the in-memory decoded model's logits stay near the original's."""
    folder, ref, tokens, root, _ = setup
    import prism_load

    exact = {k: "fp32" for k in ("attention", "shared_expert", "dense_mlp", "embedding", "lm_head")}
    run_compress(folder, root / "profile", Recipe.from_dict({**SMALL, "dense": exact}), tmp_path / "w")
    works = [WorkDir(tmp_path / "w")]
    plan = make_plan(works, Budget(bits=12))
    state = decoded_state(dense_tensors(works), list(planned_experts(works, plan, 0.25, 0.0)))
    original = prism_load.load(folder, dtype=torch.float32)
    quant = apply_in_memory(prism_load.load(folder, dtype=torch.float32), state)
    with torch.no_grad():
        a, b = original(tokens), quant(tokens)
    assert (a - b).abs().max() / a.abs().max() < 0.02


def test_resume_skips_finished_layers(setup, tmp_path, monkeypatch):
    folder, _, _, root, recipe = setup
    import prism_convert.compression.compress_layers as compress_module

    calls, failed = [], []
    real = compress_module._finish_layer

    def fail_on_layer_2(work, i, *args):
        calls.append(i)
        if i == 2 and not failed:
            failed.append(i)
            raise RuntimeError("interrupted")
        return real(work, i, *args)

    monkeypatch.setattr(compress_module, "_finish_layer", fail_on_layer_2)
    with pytest.raises(RuntimeError, match="interrupted"):
        run_compress(folder, root / "profile", recipe, tmp_path / "w")
    done = WorkDir(tmp_path / "w").done_layers()
    assert 2 not in done and {0, 1} <= set(done)  # layer 3 may have finished while layer 2 failed
    calls.clear()
    result = run_compress(folder, root / "profile", recipe, tmp_path / "w")
    assert result["resumed"] == done
    assert calls == [i for i in range(4) if i not in done]
    for i in range(4):  # the resumed run produced the same measurements as the uninterrupted one
        assert json.loads(json.dumps(WorkDir(tmp_path / "w").layer_meta(i))) == WorkDir(root / "work").layer_meta(i)


def test_layer_ranges_merge_and_mismatches_are_refused(setup, tmp_path):
    folder, _, _, root, recipe = setup
    run_compress(folder, root / "profile", recipe, tmp_path / "a", layers="0:2")
    with pytest.raises(WorkError, match=r"layers 2-3 of 0..3 are missing"):
        make_plan([WorkDir(tmp_path / "a")], Budget(bits=12))
    run_compress(folder, root / "profile", recipe, tmp_path / "b", layers="2:")
    merged = make_plan([WorkDir(tmp_path / "a"), WorkDir(tmp_path / "b")], Budget(bits=12))
    whole = make_plan([WorkDir(root / "work")], Budget(bits=12))
    assert merged.experts == whole.experts
    other = Recipe.from_dict({**SMALL, "quantization": {"group_size": 32, "max_tokens_per_expert": 64}})
    run_compress(folder, root / "profile", other, tmp_path / "c", layers="2:4")
    with pytest.raises(WorkError, match="recipe differs"):
        make_plan([WorkDir(tmp_path / "a"), WorkDir(tmp_path / "c")], Budget(bits=12))
    with pytest.raises(WorkError, match="holds work of another job"):
        run_compress(folder, root / "profile", other, tmp_path / "a", layers="0:2")


@pytest.mark.parametrize("spec", ["0:9", "3:3", "x", "-1:2"])
def test_layers_out_of_range(setup, tmp_path, spec):
    folder, _, _, root, recipe = setup
    with pytest.raises(WorkError, match="--layers"):
        run_compress(folder, root / "profile", recipe, tmp_path / "w", layers=spec)


def test_profile_of_another_model(setup, tiny_checkpoint, tmp_path):
    _, _, _, root, recipe = setup
    other, _ = tiny_checkpoint("mixtral")
    with pytest.raises(ProfileError, match="another model"):
        run_compress(other, root / "profile", recipe, tmp_path / "w")


def test_work_layer_files_accept_aliased_candidate_tensors(tmp_path):
    """An int+lowrank candidate's base is the same tensor as the plain int candidate; both must be stored."""
    work = WorkDir(tmp_path)
    work.layers_dir.mkdir(parents=True)
    base = torch.arange(12, dtype=torch.uint8).reshape(3, 4)
    work.write_layer(0, {"layer": 0}, {"experts.0.down_proj.c1.qweight": base, "experts.0.down_proj.c2.base.qweight": base})
    stored = work.layer_tensors(0, "experts.0.down_proj")
    assert torch.equal(stored["c1.qweight"], base) and torch.equal(stored["c2.base.qweight"], base)


def test_aligned_pricing_counts_padding_and_fills_pages(setup):
    """Each expert is one 4 KiB-aligned range: the plan prices it so, and spends the page it pays for."""
    _, _, _, root, _ = setup
    inputs = PlanInputs.read([WorkDir(root / "work")])
    budget = inputs.lowest_bits() + 2.0
    plan = make_plan(inputs, Budget(bits=budget))
    assert plan.expert_bytes <= budget * plan.expert_weights / 8
    assert all(x.stored_bytes % 4096 == 0 for x in plan.experts)
    assert plan.expert_bytes == sum(x.stored_bytes for x in plan.experts)
    assert plan.alignment_padding_bytes == plan.expert_bytes - plan.expert_tensor_bytes
    flat = make_plan(PlanInputs.read([WorkDir(root / "work")], alignment=1), Budget(bits=budget))
    assert plan.expected_error >= flat.expected_error  # padding is a real cost

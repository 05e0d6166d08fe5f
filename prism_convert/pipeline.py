"""The stages the CLI runs, each callable from Python: compress (measure + plan), pack, convert. They return
results and report progress through a plain callback (prism_convert/progress.py); they print nothing."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from prism_convert.allocation.bit_plan import BitPlan, Budget, PlanInputs, error_size_curve, make_plan
from prism_convert.compression.compress_layers import run_compress
from prism_convert.compression.workdir import WorkDir
from prism_convert.progress import Progress

CURVE_BITS = [2.0, 2.25, 2.5, 2.75, 3.0, 3.25, 3.5, 4.0, 4.25, 5.0, 6.0, 8.25]


def plan_work(works: list[WorkDir], budget: Budget, out_folder: Path) -> BitPlan:
    """Allocate over complete work, write plan.json and plan.png (where matplotlib is installed) into out_folder."""
    from prism_convert.allocation.bit_plan_plot import write_plan_plot

    inputs = PlanInputs.read(works, price=budget.price)
    plan = make_plan(inputs, budget)
    plan.write(out_folder / "plan.json")
    curve = error_size_curve(inputs, CURVE_BITS)
    write_plan_plot(plan, curve, out_folder / "plan.png")
    return plan


def compress_model(model: Path, profile_dir: Path, budget: Budget, recipe_spec: str | None, out: Path,
                   layers: str | None, workers: int, progress: Progress | None = None) -> dict:
    """Measure the layer range into `out`; when the model is complete there, plan the allocation. The recipe
    and the budget are checked against the whole model first (an impossible budget fails now, not at the end).
    Returns {"plan": the plan (None while layers are missing), "layers": this run's layers, "num_layers",
    "work": out}."""
    from prism_convert import preflight
    from prism_load.profile_format import Profile

    checked = preflight.model_args(model)
    recipe = preflight.recipe(recipe_spec, checked)
    preflight.check_budget(checked, recipe, budget)
    Profile.load(profile_dir).check_model(checked.config)
    preflight.check_parent(out, "-o")
    result = run_compress(model, profile_dir, recipe, out, layers, workers, progress)
    work = WorkDir(out)
    work.write_job(work.job().with_budget(budget.to_dict()))
    n = work.job().num_layers
    plan = plan_work([work], budget, work.folder) if work.done_layers() == list(range(n)) else None
    return {"plan": plan, "layers": result["layers"], "num_layers": n, "work": str(out)}


def source_of(model: Path) -> dict:
    """Hub id and revision when the folder is a huggingface_hub snapshot, else the folder's name."""
    parts = Path(model).resolve().parts
    for k, part in enumerate(parts):
        if part.startswith("models--") and k + 2 < len(parts) and parts[k + 1] == "snapshots":
            return {"model_id": part[len("models--"):].replace("--", "/"), "revision": parts[k + 2]}
    return {"model_id": Path(model).resolve().name, "revision": None}


def pack_work(work_dirs: list[Path], out: Path, budget: Budget | None, shard_size_bytes: int,
              quality: dict | None = None, price: str | None = None) -> BitPlan:
    """Allocate over the merged work folders (budget from the work unless given; `price` replaces the recorded
    budget's price), then write the container."""
    from prism_convert.packing.container_writer import ExpertInput, write_container
    from prism_convert.packing.materialize import dense_tensors, planned_experts, predictors
    from prism_convert.preflight import check_output

    check_output(out, "a .prism container", "manifest.json")

    works = [WorkDir(p) for p in work_dirs]
    jobs = [w.job() for w in works]
    if budget is None:
        budgets = {json_key(j.budget) for j in jobs}
        if len(budgets) != 1 or None in budgets:
            from prism_load.errors import BudgetError

            raise BudgetError("the work folders record no common budget; give --bits or --size")
        budget = Budget.from_dict(jobs[0].budget)
        if price is not None:
            budget = replace(budget, price=price)
    plan = plan_work(works, budget, works[0].folder)
    recipe = jobs[0].recipe
    experts = [
        ExpertInput(x.layer, x.expert, x.tier, x.frequency, x.gate_mass, x.placement, x.tensors)
        for x in planned_experts(works, plan, recipe["tiers"]["hot_share"], recipe["tiers"]["hot_min_frequency"])
    ]
    folder = works[0].folder
    tokenizers = [folder / n for n in ("tokenizer.json", "tokenizer_config.json", "generation_config.json") if (folder / n).is_file()]
    import json

    write_container(
        out,
        config=json.loads((folder / "config.json").read_text()),
        source=source_of(Path(jobs[0].model["path"])),
        tokenizer_files=tokenizers,
        dense=dense_tensors(works),
        experts=experts,
        recipe=recipe,
        budget={**budget.to_dict(), "bits_per_expert_weight": plan.bits_per_expert_weight,
                "runtime_bits_per_expert_weight": plan.runtime_bits_per_expert_weight,
                "total_bytes": plan.total_bytes},
        quality=quality,
        shard_size_bytes=shard_size_bytes,
        extra={"profile": jobs[0].profile, "rare_experts": [list(k) for k in plan.rare_experts]},
        predictor=predictors(works),
    )
    return plan


def json_key(value) -> str | None:
    import json

    return None if value is None else json.dumps(value, sort_keys=True)


def convert(model: Path, out: Path, budget: Budget, dataset: str = "builtin:mix", recipe_spec: str | None = None,
            samples: int = 128, seq_len: int = 256, seed: int = 0, work: Path | None = None,
            eval_samples: int = 16, workers: int = 1, progress: Progress | None = None,
            tokenizer: str | None = None) -> dict:
    """profile -> compress -> (held-out quality of the plan, in memory) -> pack, under one progress display.
    Every input is checked first (preflight.conversion), so a bad option fails before any compute.
    Intermediate folders go to `work` (default: a hidden folder beside `out`), so a rerun resumes.
    `tokenizer`: --tokenizer (a path or Hub id) for a checkpoint that ships none."""
    from prism_convert import preflight
    from prism_convert.profiling.profiler import run_profile

    model, out = Path(model), Path(out)
    work = Path(work) if work is not None else out.parent / f".{out.name}.work"
    profile_dir, work_dir = work / "profile", work / "compress"
    job = preflight.conversion(model, out, work, budget, dataset, recipe_spec, samples, seq_len, seed, eval_samples,
                               tokenizer)
    if job.calibration.tokens is not None:
        run_profile(model, job.calibration.tokens, profile_dir, job.calibration.dataset, progress=progress,
                    tokenizer=job.calibration.tokenizer)
    run_compress(model, profile_dir, job.recipe, work_dir, None, workers, progress)
    works = [WorkDir(work_dir)]
    works[0].write_job(works[0].job().with_budget(budget.to_dict()))
    plan = make_plan(works, budget)
    quality = None
    if job.heldout is not None:
        quality = plan_quality(model, works, plan, job.heldout.tokens, job.recipe) | quality_record(
            job.heldout, dataset, eval_samples, seq_len)
    pack_work([work_dir], out, budget, shard_size_bytes=2 * 10**9, quality=quality)
    return {"plan": plan, "quality": quality, "out": str(out), "work": str(work)}


def quality_record(heldout, dataset: str, eval_samples: int, seq_len: int) -> dict:
    """How the quality figure was measured: which text, which split rule, and whether it had to shrink."""
    n = heldout.tokens.shape[0]
    record = {"dataset": dataset, "samples": n, "seq_len": seq_len, "split": "heldout", "heldout": heldout.rule}
    if n < eval_samples:
        record["note"] = (f"the held-out split holds {n} samples of {seq_len} tokens, fewer than --eval-samples "
                          f"{eval_samples}, so the quality figure is measured on {n}")
    return record


def plan_quality(model: Path, works: list[WorkDir], plan: BitPlan, tokens, recipe) -> dict:
    """KL(original || planned) and perplexities on held-out tokens, with the plan's encodings applied in memory."""
    import torch

    import prism_load
    from prism_convert.packing.materialize import (
        apply_in_memory,
        decoded_state,
        dense_tensors,
        planned_experts,
    )
    from prism_convert.tools.evaluate import compare_models

    original = prism_load.load(model, dtype=torch.float32)
    experts = list(planned_experts(works, plan, recipe.tiers.hot_share, recipe.tiers.hot_min_frequency))
    state = decoded_state(dense_tensors(works), experts, family=original.family, args=original.args)
    candidate = apply_in_memory(prism_load.load(model, dtype=torch.float32), state)
    return compare_models(original, candidate, tokens)

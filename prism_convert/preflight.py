"""Everything a stage will need, resolved and checked before it spends compute.

Profile, compress, pack, convert and eval call these first: the model's config, the output folder, the
recipe, the budget (priced from the config and the recipe alone, exactly as the allocation will price it),
the tokenizer, and the calibration and held-out splits (drawn here, so their size is known). A problem
found after hours of profiling is a bug; each error names the option to change.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from prism_convert.allocation.bit_plan import Budget, encoding_price
from prism_convert.recipe import Recipe, load_recipe
from prism_convert.tokenizer import ResolvedTokenizer, resolve_tokenizer
from prism_load.errors import BudgetError, CalibrationError, CheckpointError, PrismError, RecipeError


@dataclass
class Model:
    path: Path
    config: dict
    family: object  # prism_load.models.family.Family
    args: object  # its ModelArgs


def model_folder(model: Path) -> Path:
    if not Path(model).is_dir():
        raise CheckpointError(f"{model}: not a folder (a checkpoint folder or a .prism container)")
    return Path(model)


def model_args(model: Path) -> Model:
    """The checkpoint's config, parsed by its family (an unsupported or broken config fails here)."""
    from prism_load.checkpoint import read_config
    from prism_load.models.family import family_for

    config = read_config(model_folder(model))
    family = family_for(config)
    return Model(Path(model), config, family, family.parse_config(config))


# -- outputs -------------------------------------------------------------------------------------------
def check_output(out: Path, what: str, marker: str, option: str = "-o") -> None:
    """`out` is replaced in one rename at the end (atomic.atomic_folder): it must be new, empty, or an earlier
    output of the same kind (holding `marker`), so nothing else is ever deleted; its parent must be writable."""
    out = Path(out)
    if out.exists():
        if not out.is_dir():
            raise PrismError(f"{option} {out}: is a file, not a folder for {what}")
        if any(out.iterdir()) and not (out / marker).is_file():
            raise PrismError(f"{option} {out}: exists and is not {what} (writing there would delete what it "
                             "holds); choose a new or empty folder")
    check_parent(out, option)


def check_parent(path: Path, option: str) -> None:
    """The nearest existing folder above `path` must be a folder we may write in (it is created later)."""
    parent = Path(path).absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise PrismError(f"{option} {path}: {parent} is a file, so the folder cannot be created there")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PrismError(f"{option} {path}: {parent} is not writable")


# -- recipe and budget ---------------------------------------------------------------------------------
def recipe(spec: str | None, model: Model) -> Recipe:
    try:
        return load_recipe(spec, model.args.model_type)
    except RecipeError as e:
        raise RecipeError(f"--recipe: {e}") from None


@dataclass
class BudgetFloor:
    """What the smallest allocation this recipe allows costs, priced as bit_plan prices it (stored or held)."""

    expert_weights: int
    expert_bytes: int  # every expert at its smallest candidate per tensor, each expert aligned
    dense_bytes: int

    @property
    def bits(self) -> float:
        return 8 * self.expert_bytes / self.expert_weights


def budget_floor(model: Model, recipe: Recipe, price: str = "runtime") -> BudgetFloor:
    """Priced on the family's meta-device model: each expert tensor's cheapest candidate is on its Pareto set
    (compress keeps it), so this is exactly the floor the allocation meets later. Unfit recipes fail here."""
    from prism_convert.compression.dense import TOP_CLASSES, dense_encoding, tensor_class
    from prism_load.container import ALIGNMENT_BYTES, aligned
    from prism_load.hf_loader import empty_model
    from prism_load.models.moe import MoEBlock

    args = model.args
    meta = empty_model(model.family, args)
    shapes = meta.state_dict(keep_vars=True)
    dense = sum(dense_encoding(n, tuple(shapes[n].shape), TOP_CLASSES[n], recipe).nbytes()
                for n in model.family.top_level_names(args))
    weights = expert_bytes = 0
    cheapest: dict[tuple, int] = {}
    for layer in meta.layers:
        for key, p in layer.state_dict(keep_vars=True).items():
            if not key.startswith("mlp.experts."):
                dense += dense_encoding(f"layers.{layer.index}.{key}", tuple(p.shape), tensor_class(key), recipe).nbytes()
        if not isinstance(layer.mlp, MoEBlock):
            continue
        experts = layer.mlp.experts
        inter, hidden = experts.down_proj.shape[2], experts.down_proj.shape[1]
        tensors = {"gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
        biases = 4 * (2 * inter + hidden) if getattr(experts, "gate_up_bias", None) is not None else 0
        for e in range(args.num_experts):
            total = biases
            for name, shape in tensors.items():
                full = f"layers.{layer.index}.experts.{e}.{name}"
                key = (shape, recipe.is_kept_exact(full))
                if key not in cheapest:
                    cheapest[key] = min(encoding_price(enc, price) for enc in recipe.expert_candidates(shape, full))
                total += cheapest[key]
            expert_bytes += aligned(total, ALIGNMENT_BYTES)
            weights += 3 * inter * hidden
    return BudgetFloor(weights, expert_bytes, dense)


def check_budget(model: Model, recipe: Recipe, budget: Budget) -> BudgetFloor:
    try:
        floor = budget_floor(model, recipe, budget.price)
    except RecipeError as e:
        raise RecipeError(f"{e}; choose another --recipe") from None
    if floor.expert_weights == 0:
        raise BudgetError(f"{model.path}: the model has no routed experts to compress")
    smallest = f"recipe {recipe.name!r}; raise {{option}}, or give a --recipe with smaller candidates"
    if budget.bits is not None:
        if budget.bits * floor.expert_weights / 8 < floor.expert_bytes:
            raise BudgetError(f"--bits {budget.bits:g} is below the lowest this model allows: {floor.bits:.3f} bits "
                              "per expert weight (each expert at its smallest candidate, aligned to 4 KiB) under "
                              + smallest.format(option="--bits"))
    elif budget.size_bytes <= floor.dense_bytes:
        raise BudgetError(f"--size {budget.size_bytes:,} bytes does not even hold the dense weights "
                          f"({floor.dense_bytes:,} bytes) under " + smallest.format(option="--size"))
    elif budget.size_bytes - floor.dense_bytes < floor.expert_bytes:
        raise BudgetError(f"--size {budget.size_bytes:,} bytes is below the smallest this model allows: "
                          f"{floor.dense_bytes + floor.expert_bytes:,} bytes ({floor.dense_bytes:,} dense, "
                          f"{floor.expert_bytes:,} experts) under " + smallest.format(option="--size"))
    return floor


# -- tokenizer and text --------------------------------------------------------------------------------
@dataclass
class Calibration:
    tokenizer: ResolvedTokenizer
    dataset: dict  # what profile.json records as `dataset`
    tokens: torch.Tensor | None  # [samples, seq_len]; None when an existing profile is resumed


def tokenizer_for(model: Model, spec: str | None) -> ResolvedTokenizer:
    return resolve_tokenizer(spec, model.path, model.args.vocab_size)


def dataset_record(dataset: str, samples: int, seq_len: int, seed: int, tokenizer: ResolvedTokenizer) -> dict:
    record = {"spec": dataset, "samples": samples, "seq_len": seq_len, "seed": seed}
    return record if tokenizer.from_checkpoint else {**record, "tokenizer": tokenizer.origin}


def calibration(dataset: str, samples: int, seq_len: int, seed: int, tokenizer: ResolvedTokenizer,
                draw: bool = True) -> Calibration:
    """The calibration windows (with `draw`): a split too small names the options to change."""
    import calibration as cal

    record = dataset_record(dataset, samples, seq_len, seed, tokenizer)
    if not draw:
        return Calibration(tokenizer, record, None)
    source = _source(dataset)
    try:
        tokens = cal.token_samples(source, tokenizer.tokenizer, samples, seq_len, seed=seed)
    except cal.SplitTooSmall as e:
        raise CalibrationError(f"{e}; lower --samples or --seq-len, or give a --dataset with more text") from None
    return Calibration(tokenizer, record, tokens)


def heldout(tokenizer: ResolvedTokenizer, dataset: str, samples: int, seq_len: int, seed: int,
            fewer_ok: bool, option: str):
    """The held-out windows (calibration.Draw). With `fewer_ok` a short split gives what it holds; an empty one
    is an error either way, naming `option` (the number of held-out samples)."""
    import calibration as cal

    try:
        return cal.draw_samples(_source(dataset), tokenizer.tokenizer, samples, seq_len, seed, "heldout",
                                fewer_ok=fewer_ok)
    except cal.SplitTooSmall as e:
        skip = f"give {option} 0 to skip the evaluation" if option == "--eval-samples" else f"lower {option}"
        raise CalibrationError(f"{e}; {skip}, a shorter --seq-len, or a --dataset with more text") from None


def _source(dataset: str):
    import calibration as cal

    try:
        return cal.resolve(dataset)
    except CalibrationError as e:
        raise CalibrationError(f"--dataset: {e}") from None


# -- whole stages --------------------------------------------------------------------------------------
@dataclass
class Conversion:
    """Everything `prism convert` needs, checked: the work it may resume and the text it runs on."""

    model: Model
    recipe: Recipe
    calibration: Calibration
    heldout: object | None  # calibration.Draw, possibly fewer windows than asked; None with --eval-samples 0
    floor: BudgetFloor


def conversion(model: Path, out: Path, work: Path, budget: Budget, dataset: str, recipe_spec: str | None,
               samples: int, seq_len: int, seed: int, eval_samples: int, tokenizer_spec: str | None) -> Conversion:
    """Cheap checks first (config, folders, recipe, budget, tokenizer, earlier work), then the text."""
    from prism_convert.compression.compress_layers import IDENTITY_KEYS, compress_job
    from prism_convert.compression.workdir import WorkDir
    from prism_load.checkpoint import config_sha256
    from prism_load.profile_format import PROFILE_JSON, Profile

    m = model_args(model)
    check_output(out, "a .prism container", "manifest.json")
    check_parent(work, "--work")
    if Path(work).exists() and not Path(work).is_dir():
        raise PrismError(f"--work {work}: is a file, not a folder")
    r = recipe(recipe_spec, m)
    floor = check_budget(m, r, budget)
    profile_dir, work_dir = Path(work) / "profile", Path(work) / "compress"
    resume = (profile_dir / PROFILE_JSON).is_file()
    cal = calibration(dataset, samples, seq_len, seed, tokenizer_for(m, tokenizer_spec), draw=False)
    if resume:
        old = Profile.load(profile_dir).data
        for key, want in (("model", config_sha256(m.config)), ("dataset", cal.dataset)):
            have = old["model"]["config_sha256"] if key == "model" else old["dataset"]
            if have != want:
                raise PrismError(f"--work {work}: holds the profile of an earlier conversion of another {key} "
                                 f"({have} there, {want} here); give another --work folder, or remove it")
    profile = {"tokens": samples * seq_len, "dataset": cal.dataset}
    job = compress_job(m.path, m.config, m.args, profile_dir, profile, r, range(m.args.num_hidden_layers))
    WorkDir(work_dir).check_job(job, IDENTITY_KEYS, option="--work")
    if not resume:
        cal = calibration(dataset, samples, seq_len, seed, cal.tokenizer)
    held = heldout(cal.tokenizer, dataset, eval_samples, seq_len, seed, True, "--eval-samples") if eval_samples else None
    return Conversion(m, r, cal, held, floor)

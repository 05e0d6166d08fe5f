"""The compress work folder: what `prism compress` writes and `prism pack` merges.

    WORK_DIR/job.json              model, profile, recipe and layer range of this job (its identity)
    WORK_DIR/config.json           the model's config (copied), tokenizer files beside it
    WORK_DIR/top.safetensors|json  embedding, final norm, LM head, encoded by the recipe's dense rules
    WORK_DIR/layers/NNNN.json      per layer: dense tensors' encodings; per expert: tokens, gate mass,
                                   importance, and the Pareto candidates of each tensor (encoding, bytes, error)
    WORK_DIR/layers/NNNN.safetensors  every stored tensor of that layer, candidates included:
                                   `dense.{name}.{suffix}`, `experts.{e}.{tensor}.c{j}.{suffix}`
    WORK_DIR/plan.json             the allocation, a BitPlan (written once every layer of the model is present)

Candidates do not depend on the budget, so a finished work folder can be re-planned at any budget.
Layer files are written atomically and a layer whose pair of files exists is not redone (resume).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from prism_load.atomic import write_json
from prism_load.container.format import Encoding
from prism_load.errors import PrismError

WORK_FORMAT, WORK_VERSION = "prism-work", 1


class WorkError(PrismError):
    """A work folder is incomplete, from another job, or damaged."""


@dataclass(frozen=True)
class WorkJob:
    """job.json: the identity of a compress job (model, profile, recipe, layer range), the layers an earlier
    run had finished when this one resumed, and the budget compress or convert recorded for pack. Written
    and read as the same JSON as before the record existed (keys in this order, absent ones left out)."""

    model: dict  # path, model_type, config_sha256, num_hidden_layers
    profile: dict  # path, tokens, dataset
    recipe: dict  # Recipe.to_dict()
    layers: list[int]  # [start, stop)
    layers_done_before: list[int] | None = None
    budget: dict | None = None  # Budget.to_dict()

    IDENTITY = ("model", "profile", "recipe", "layers")  # what a resumed work folder must share with the job

    @property
    def num_layers(self) -> int:
        return self.model["num_hidden_layers"]

    def with_budget(self, budget: dict) -> WorkJob:
        return replace(self, budget=budget)

    def to_json(self) -> dict:
        out = {"format": WORK_FORMAT, "version": WORK_VERSION, "model": self.model, "profile": self.profile,
               "recipe": self.recipe, "layers": list(self.layers)}
        if self.layers_done_before is not None:
            out["layers_done_before"] = self.layers_done_before
        if self.budget is not None:
            out["budget"] = self.budget
        return out

    @classmethod
    def from_json(cls, data: dict, where: str = "job.json") -> WorkJob:
        if not isinstance(data, dict) or data.get("format") != WORK_FORMAT or data.get("version") != WORK_VERSION:
            raise WorkError(f"{where}: not a {WORK_FORMAT} v{WORK_VERSION} job")
        try:
            job = cls(data["model"], data["profile"], data["recipe"], list(data["layers"]),
                      data.get("layers_done_before"), data.get("budget"))
            job.num_layers  # noqa: B018 (checked here, not where pack first needs it)
        except (KeyError, TypeError) as e:
            raise WorkError(f"{where}: damaged job record ({type(e).__name__}: {e})") from None
        return job

    def identity(self, key: str):
        """One identity field as JSON holds it (tuples become lists), for comparing jobs."""
        return json.loads(json.dumps(self.to_json().get(key)))


def _owned(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous tensors, copying any that share storage with an earlier one (safetensors refuses aliases:
    an int+lowrank candidate's base is the plain int candidate's tensors)."""
    seen, out = set(), {}
    for k, v in tensors.items():
        v = v.contiguous()
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out


def layer_stem(i: int) -> str:
    return f"{i:04d}"


class WorkDir:
    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.layers_dir = self.folder / "layers"

    # -- job identity ----------------------------------------------------------------------------------
    def job(self) -> WorkJob:
        path = self.folder / "job.json"
        if not path.is_file():
            raise WorkError(f"{self.folder}: no job.json (not a prism compress work folder)")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise WorkError(f"{path}: not JSON ({e.msg})") from None
        return WorkJob.from_json(data, str(path))

    def write_job(self, job: WorkJob) -> None:
        write_json(self.folder / "job.json", job.to_json())

    def check_job(self, job: WorkJob, identity_keys: tuple[str, ...] = WorkJob.IDENTITY, option: str = "-o") -> None:
        """Refuse to resume work of another job (convert checks this before it profiles)."""
        if not (self.folder / "job.json").is_file():
            return
        old = self.job()
        for key in identity_keys:
            if old.identity(key) != job.identity(key):
                raise WorkError(f"{self.folder}: holds work of another job ({key} differs); use another {option} folder")

    def start(self, job: WorkJob, model_folder: Path, identity_keys: tuple[str, ...] = WorkJob.IDENTITY,
              tokenizer: Path | None = None) -> None:
        """Create the folder for `job`, or check that an existing one belongs to the same job (resume).
        `tokenizer`: the tokenizer.json to ship instead of the checkpoint's (the one calibration was cut with)."""
        if (self.folder / "job.json").is_file():
            self.check_job(job, identity_keys)
            job = replace(job, layers_done_before=self.done_layers())
        self.layers_dir.mkdir(parents=True, exist_ok=True)
        if tokenizer is not None and not (self.folder / "tokenizer.json").is_file():
            shutil.copyfile(tokenizer, self.folder / "tokenizer.json")
        for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
            if (model_folder / name).is_file() and not (self.folder / name).is_file():
                shutil.copyfile(model_folder / name, self.folder / name)
        self.write_job(job)

    # -- per-layer results -----------------------------------------------------------------------------
    def has_layer(self, i: int) -> bool:
        stem = layer_stem(i)
        return (self.layers_dir / f"{stem}.json").is_file() and (self.layers_dir / f"{stem}.safetensors").is_file()

    def done_layers(self) -> list[int]:
        return sorted(int(p.stem) for p in self.layers_dir.glob("*.json") if self.has_layer(int(p.stem)))

    def write_layer(self, i: int, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
        """Tensors first, then the JSON: the JSON's presence marks the layer complete."""
        stem = layer_stem(i)
        tmp = self.layers_dir / f".{stem}.safetensors.partial"
        save_file(_owned(tensors), tmp)
        tmp.replace(self.layers_dir / f"{stem}.safetensors")
        write_json(self.layers_dir / f"{stem}.json", meta, indent=None)

    def layer_meta(self, i: int) -> dict:
        path = self.layers_dir / f"{layer_stem(i)}.json"
        if not path.is_file():
            raise WorkError(f"{self.folder}: layer {i} is missing (layers/{path.name})")
        return json.loads(path.read_text())

    def layer_tensors(self, i: int, prefix: str) -> dict[str, torch.Tensor]:
        """Stored tensors of layer i whose names start with `prefix.` (prefix stripped)."""
        with safe_open(self.layers_dir / f"{layer_stem(i)}.safetensors", framework="pt") as f:
            return {k[len(prefix) + 1 :]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix + ".")}

    def write_top(self, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
        tmp = self.folder / ".top.safetensors.partial"
        save_file(_owned(tensors), tmp)
        tmp.replace(self.folder / "top.safetensors")
        write_json(self.folder / "top.json", meta)

    def top(self) -> tuple[dict, dict[str, torch.Tensor]]:
        meta_path = self.folder / "top.json"
        if not meta_path.is_file():
            raise WorkError(f"{self.folder}: top.json is missing")
        with safe_open(self.folder / "top.safetensors", framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        return json.loads(meta_path.read_text()), tensors


def encoded_entry(enc: Encoding, prefix: str, tensors: dict[str, torch.Tensor], out: dict) -> dict:
    """Adds `prefix.suffix` tensors to `out`; returns the JSON record of the encoding."""
    for suffix, t in tensors.items():
        out[f"{prefix}.{suffix}"] = t
    return {"encoding": enc.to_dict(), "nbytes": enc.nbytes()}


def split_encoded(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}

"""`prism push`: publish a .prism container as a Hugging Face Hub model repository, with a model card.

The container is validated first (manifest and file sizes), a README.md card is generated from its
manifest (YAML metadata the Hub indexes: library_name, base_model + base_model_relation, tags), then the
repo is created if needed and the folder uploaded with `HfApi.upload_folder`. With hf_xet installed
(huggingface_hub 2.x default) that upload is streamed, split into several commits for large folders, and
resumable: re-running the same push skips what was already committed. Only files the manifest lists (plus
the manifest and the card) are uploaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from prism_load import __version__
from prism_load.atomic import write_text
from prism_load.container import MANIFEST_NAME
from prism_load.hub import REPO_ID, HubError

CARD_NAME = "README.md"
TAGS = ["moe", "prism", "quantized", "mixture-of-experts"]
REPO_TYPE = "model"


@dataclass
class PushPlan:
    """What a push sends: the repo, where, and the exact files (name, bytes) in upload order."""

    repo_id: str
    revision: str | None
    private: bool
    folder: Path
    files: list[tuple[str, int]]
    commit_message: str
    card: str
    commit_url: str | None = None
    operations: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(n for _, n in self.files)

    @property
    def allow_patterns(self) -> list[str]:
        return [name for name, _ in self.files]


# -- the model card ------------------------------------------------------------------------------------------
def container_summary(container) -> dict:
    """Figures the card quotes, all from the manifest (no data file is read)."""
    m = container.manifest
    records = m.experts
    expert_weights = sum(r.numel for r in records)
    expert_bytes = sum(r.length for r in records)
    layers = sorted({r.layer for r in records})
    return {
        "model_type": m.config.get("model_type", "?"),
        "source": m.source,
        "writer": m.writer,
        "budget": m.budget,
        "quality": m.quality,
        "recipe": (m.recipe or {}).get("name"),
        "moe_layers": len(layers),
        "experts": len(records),
        "experts_per_layer": len(records) // max(1, len(layers)),
        "experts_per_token": m.config.get("num_experts_per_tok"),
        "hot_experts": sum(r.tier == "hot" for r in records),
        "expert_bits_per_weight": 8 * expert_bytes / expert_weights if expert_weights else 0.0,
        "expert_bytes": sum(s.bytes for s in m.expert_shards),
        "dense_bytes": sum(f.bytes for f in m.dense_shards),
        "total_bytes": container.data_bytes(),
    }


def gigabytes(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def _value(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return f"`{v}`" if isinstance(v, str) else str(v)


def _flatten(data: dict, prefix: str = "") -> list[tuple[str, object]]:
    out = []
    for k, v in data.items():
        key = f"{prefix}{k}"
        out += _flatten(v, key + ".") if isinstance(v, dict) else [(key, v)]
    return out


def _budget_line(budget: dict) -> str:
    parts = []
    counted = {"runtime": "as prism_load holds them", "stored": "as stored"}.get(budget.get("price"), "as stored")
    if budget.get("bits") is not None:
        parts.append(f"{budget['bits']:g} bits per routed-expert weight (average, {counted})")
    if budget.get("size_bytes") is not None:
        parts.append(f"{gigabytes(budget['size_bytes'])} of tensors ({counted})")
    rest = [
        (k, v)
        for k, v in budget.items()
        if k not in ("bits", "size_bytes", "price", "bits_per_expert_weight", "runtime_bits_per_expert_weight",
                     "total_bytes")
    ]
    parts += [f"{k} {_value(v)}" for k, v in rest]
    return "; ".join(parts) or "not recorded"


def card_metadata(base_model: str | None) -> str:
    """The YAML block, written through huggingface_hub's ModelCardData so the Hub parses it as intended."""
    from huggingface_hub import ModelCardData

    extra = {"base_model_relation": "quantized"} if base_model else {}
    data = ModelCardData(
        base_model=base_model, library_name="prism", pipeline_tag="text-generation", tags=TAGS, **extra
    )
    return data.to_yaml()


def model_card(summary: dict, repo_id: str, base_model: str | None = None) -> str:
    """README.md for the repo: metadata, what was converted, the budget, measured quality, usage."""
    source = summary["source"]
    base_model = base_model or (source.model_id if REPO_ID.fullmatch(source.model_id) else None)
    origin = f"[{base_model}](https://huggingface.co/{base_model})" if base_model else f"`{source.model_id}`"
    if source.revision:
        origin += f" (revision `{source.revision}`)"
    s = summary
    lines = [
        "---",
        card_metadata(base_model),
        "---",
        "",
        f"# {repo_id.split('/')[1]}",
        "",
        f"{origin} converted to a mixed-precision `.prism` container by {s['writer']}: routed experts stored "
        "with per-expert bits and ranks chosen from calibration statistics, dense weights as the recipe says. "
        "Load it by repo id with `prism_load`: files go through the Hugging Face cache (so `HF_HUB_OFFLINE=1` "
        "works once they are cached), manifest, dense shards and tokenizer first, expert shards as the reader "
        "asks for them.",
        "",
        "## Budget",
        "",
        "| | |",
        "|---|---|",
        f"| budget | {_budget_line(s['budget'] or {})} |",
        f"| routed-expert bits per weight | {s['expert_bits_per_weight']:.3f} (scales, zeros and low-rank factors counted) |",
        f"| size | {gigabytes(s['total_bytes'])}: dense shards {gigabytes(s['dense_bytes'])}, expert shards {gigabytes(s['expert_bytes'])} |",
        f"| experts | {s['moe_layers']} MoE layers x {s['experts_per_layer']} experts, top-{s['experts_per_token']}; "
        f"{s['hot_experts']} in the hot tier |",
        f"| model type | `{s['model_type']}` |",
    ]
    if s["recipe"]:
        lines.append(f"| recipe | `{s['recipe']}` |")
    if s["quality"]:
        lines += ["", "## Measured quality", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_value(v)} |" for k, v in _flatten(s["quality"])]
    lines += [
        "",
        "## Usage",
        "",
        "```python",
        "import prism_load",
        "",
        f'model = prism_load.load("{repo_id}")',
        "```",
        "",
    ]
    return "\n".join(lines)


# -- the push --------------------------------------------------------------------------------------------------
def prepare_push(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    base_model: str | None = None,
) -> PushPlan:
    """Validate the container, write its card (README.md, atomically) and list what the upload sends."""
    from prism_load.container.reader import Container

    if not REPO_ID.fullmatch(repo_id) or ".." in repo_id:
        raise HubError(f"repo id {repo_id!r} is not of the form ORG/NAME")
    if base_model is not None and not REPO_ID.fullmatch(base_model):
        raise HubError(f"base model {base_model!r} is not a Hub repo id (ORG/NAME)")
    folder = Path(folder)
    with Container(folder) as c:
        summary = container_summary(c)
        m = c.manifest
        listed = [f.name for f in m.files()]
    missing = [n for n in listed if not (folder / n).is_file()]
    if missing:
        raise HubError(
            f"{folder}: {len(missing)} files the manifest lists are missing ({', '.join(missing[:3])})"
        )
    card = model_card(summary, repo_id, base_model)
    write_text(folder / CARD_NAME, card)
    names = [MANIFEST_NAME, CARD_NAME, *listed]
    files = [(n, (folder / n).stat().st_size) for n in names]
    message = (
        f"Upload {folder.name} ({gigabytes(summary['total_bytes'])}, {summary['expert_bits_per_weight']:.2f} bits "
        f"per expert weight) with prism {__version__}"
    )
    return PushPlan(repo_id, revision, private, folder, files, message, card)


def push(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
    dry_run: bool = False,
    base_model: str | None = None,
    api=None,
) -> PushPlan:
    """Create the repo if needed (and the branch, for a revision other than main), then upload the folder.

    `dry_run` stops after writing the card and listing the files: no network, no HfApi."""
    plan = prepare_push(folder, repo_id, private=private, revision=revision, base_model=base_model)
    if dry_run:
        return plan
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    from prism_load.hub import hub_call

    where = f"{repo_id}@{revision or 'main'}"
    hub_call(where, api.create_repo, repo_id, repo_type=REPO_TYPE, private=private, exist_ok=True)
    plan.operations.append("create_repo")
    if revision not in (None, "main"):
        hub_call(where, api.create_branch, repo_id, branch=revision, repo_type=REPO_TYPE, exist_ok=True)
        plan.operations.append("create_branch")
    info = hub_call(
        where,
        api.upload_folder,
        repo_id=repo_id,
        folder_path=str(plan.folder),
        repo_type=REPO_TYPE,
        revision=revision,
        commit_message=plan.commit_message,
        allow_patterns=plan.allow_patterns,
        ignore_patterns=None,
    )
    plan.operations.append("upload_folder")
    plan.commit_url = getattr(info, "commit_url", None)
    return plan



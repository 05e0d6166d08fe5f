"""The Hub: loading by repo id from a local cache in huggingface_hub's exact layout (offline), and pushing
(tested up to the HfApi calls: the machine has no network, and nothing here may touch the real Hub)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hub_cache import populate_cache

import prism_load
from prism_load.errors import CheckpointError, ContainerError
from prism_load.hub import HubError, is_repo_id

HAS_CONTAINER = (Path(prism_load.__file__).parent / "container" / "format.py").is_file()
needs_container = pytest.mark.skipif(not HAS_CONTAINER, reason="prism_load/container/format.py has not landed yet")
IDS = torch.tensor([[1, 5, 9, 3, 7, 2, 11, 4]])


def test_fake_cache_is_what_huggingface_hub_reads(tmp_path):
    import huggingface_hub

    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text("{}")
    commit = populate_cache(tmp_path / "cache", "org/name", src)
    found = huggingface_hub.try_to_load_from_cache("org/name", "config.json", cache_dir=tmp_path / "cache")
    assert found == str(tmp_path / "cache" / "models--org--name" / "snapshots" / commit / "config.json")
    assert (tmp_path / "cache" / "models--org--name" / "refs" / "main").read_bytes() == commit.encode()


def test_is_repo_id(tmp_path, monkeypatch):
    assert is_repo_id("org/name") and is_repo_id("Org-1/name_2.v3")
    assert not is_repo_id("name") and not is_repo_id("/abs/path") and not is_repo_id("a/b/c")
    assert not is_repo_id("../x") and not is_repo_id("org/..")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "local").mkdir(parents=True)
    assert not is_repo_id("org/local")  # an existing local folder wins


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS)


# -- loading a Hugging Face checkpoint by repo id -----------------------------------------------------------
def test_checkpoint_by_repo_id_offline_same_logits(tiny_checkpoint, tmp_path, offline):
    folder, _ = tiny_checkpoint("mixtral")
    cache = tmp_path / "cache"
    commit = populate_cache(cache, "test/tiny-mixtral", folder)
    model = prism_load.load("test/tiny-mixtral", cache_dir=cache)
    assert torch.equal(logits(model), logits(prism_load.load(folder)))
    assert model.hub.commit == commit and model.hub.kind == "checkpoint"
    assert [c[0] for c in offline] == ["snapshot_download", "snapshot_download"]
    assert offline[0][2]["allow_patterns"] == ["manifest.json", "config.json"]
    assert offline[1][2]["revision"] == commit  # pinned to the commit main pointed at


def test_not_cached_offline_names_the_repo(tmp_path, offline):
    with pytest.raises(HubError, match=r"nobody/nothing@main: not in the local cache, .*HF_HUB_OFFLINE"):
        prism_load.load("nobody/nothing", cache_dir=tmp_path)


def test_ref_with_trailing_newline_is_not_found(tiny_checkpoint, tmp_path, offline):
    """huggingface_hub reads refs/main with f.read(): a newline makes the commit unknown."""
    folder, _ = tiny_checkpoint("mixtral")
    commit = populate_cache(tmp_path, "test/newline", folder)
    (tmp_path / "models--test--newline" / "refs" / "main").write_text(commit + "\n")
    with pytest.raises(HubError, match="test/newline@main: not in the local cache"):
        prism_load.load("test/newline", cache_dir=tmp_path)


def test_hub_options_refused_for_local_folders(tiny_checkpoint):
    folder, _ = tiny_checkpoint("mixtral")
    with pytest.raises(TypeError, match="apply to Hub repo ids"):
        prism_load.load(folder, revision="main")
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        prism_load.load("no-such-folder")


# -- loading a .prism container by repo id ------------------------------------------------------------------
@pytest.fixture(scope="module")
def containers(tmp_path_factory):
    """Two tiny containers (different seeds) with a tokenizer file."""
    if not HAS_CONTAINER:
        pytest.skip("prism_load/container/format.py has not landed yet")
    from containers import random_model, write_tiny
    from tokenizers import Tokenizer, models

    root = tmp_path_factory.mktemp("hub-containers")
    tok = root / "tokenizer.json"
    Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]")).save(str(tok))
    return [
        write_tiny(root / f"seed{s}.prism", model=random_model(seed=s), tokenizer_files=[tok]) for s in (0, 1)
    ]


def manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


@needs_container
def test_container_by_repo_id_fetches_experts_on_demand(containers, tmp_path, offline):
    folder = containers[0]
    m = manifest(folder)
    dense = [f["name"] for f in m["dense_shards"]]
    experts = [s["name"] for s in m["expert_shards"]]
    assert len(experts) > 1 and dense
    commit = populate_cache(tmp_path, "test/tiny-prism", folder)
    model = prism_load.load("test/tiny-prism", cache_dir=tmp_path, token="hf_test")
    assert torch.equal(logits(model), logits(prism_load.load(folder)))
    assert model.tokenizer is not None and model.tokenizer.token_to_id("b") == 1
    snapshots = [kw["allow_patterns"] for name, _, kw in offline if name == "snapshot_download"]
    assert snapshots == [["manifest.json", "config.json"], ["manifest.json", *dense, "tokenizer.json"]]
    # expert shards are asked for only when the reader needs them, through its resolve_file hook
    downloads = [args[1] for name, args, _ in offline if name == "hf_hub_download"]
    assert sorted(downloads) == sorted(experts)
    assert model.hub.fetched == downloads
    for _, _, kw in offline:
        assert kw["token"] == "hf_test" and kw["cache_dir"] == tmp_path and kw["local_files_only"] is False
        assert kw.get("revision") in (None, commit)


@needs_container
def test_container_download_all_at_once(containers, tmp_path, offline):
    folder = containers[0]
    m = manifest(folder)
    populate_cache(tmp_path, "test/tiny-prism", folder)
    model = prism_load.load(
        "test/tiny-prism", cache_dir=tmp_path, download_experts="all", verify_checksums=True
    )
    assert torch.equal(logits(model), logits(prism_load.load(folder)))
    last = [kw["allow_patterns"] for name, _, kw in offline if name == "snapshot_download"][-1]
    assert last[-len(m["expert_shards"]) :] == [s["name"] for s in m["expert_shards"]]
    assert not [c for c in offline if c[0] == "hf_hub_download"] and model.hub.fetched == []


@needs_container
def test_missing_expert_shard_offline_is_named(containers, tmp_path, offline):
    folder = containers[0]
    m = manifest(folder)
    first = {"manifest.json", "tokenizer.json", *(f["name"] for f in m["dense_shards"])}
    populate_cache(tmp_path, "test/partial", folder, names=first)
    shard = m["expert_shards"][0]["name"]
    with pytest.raises(ContainerError, match=rf"{shard}: could not be fetched .*not in the local cache"):
        prism_load.load("test/partial", cache_dir=tmp_path)


@needs_container
def test_revision_branch_and_commit(containers, tmp_path, offline):
    a, b = containers
    commit_a = populate_cache(tmp_path, "test/revs", a)
    populate_cache(tmp_path, "test/revs", b, ref="v2")
    assert torch.equal(
        logits(prism_load.load("test/revs", cache_dir=tmp_path, revision="v2")), logits(prism_load.load(b))
    )
    assert torch.equal(
        logits(prism_load.load("test/revs", cache_dir=tmp_path, revision=commit_a)),
        logits(prism_load.load(a)),
    )
    with pytest.raises(HubError, match="test/revs@v9"):
        prism_load.load("test/revs", cache_dir=tmp_path, revision="v9")


@needs_container
def test_hf_hub_offline_env_in_a_fresh_process(containers, tmp_path):
    """The real switch: HF_HUB_OFFLINE=1 and HF_HUB_CACHE in the environment before huggingface_hub is imported."""
    folder = containers[0]
    populate_cache(tmp_path / "hub", "test/env-prism", folder)
    out = tmp_path / "logits.pt"
    code = (
        "import sys, torch, prism_load; m = prism_load.load('test/env-prism'); "
        f"torch.save(m(torch.tensor({IDS.tolist()})).detach(), sys.argv[1])"
    )
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(tmp_path / "hub"),
        "HF_HOME": str(tmp_path / "home"),
    }
    subprocess.run([sys.executable, "-c", code, str(out)], check=True, env=env, cwd=tmp_path, timeout=120)
    assert torch.equal(torch.load(out), logits(prism_load.load(folder)))


# -- pushing ---------------------------------------------------------------------------------------------------
class FakeApi:
    """Records every HfApi call; fails if anything but the expected three methods is used."""

    instances: list[FakeApi] = []

    def __init__(self, token=None):
        self.token, self.calls = token, []
        FakeApi.instances.append(self)

    def create_repo(self, *args, **kwargs):
        self.calls.append(("create_repo", args, kwargs))

    def create_branch(self, *args, **kwargs):
        self.calls.append(("create_branch", args, kwargs))

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", (), kwargs))
        return type("CommitInfo", (), {"commit_url": "https://huggingface.co/org/tiny/commit/abc"})()


@pytest.fixture
def fake_api(monkeypatch):
    import huggingface_hub

    FakeApi.instances = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    return FakeApi


@pytest.fixture
def pushable(tmp_path, containers):
    """A copy of a container with a quality summary in its manifest, and its source on the Hub."""
    import shutil

    from prism_load.container import Manifest

    folder = tmp_path / "tiny.prism"
    shutil.copytree(containers[0], folder)
    m = Manifest.from_json((folder / "manifest.json").read_bytes())
    m.quality = {"kl_divergence": 0.01234, "perplexity": {"reference": 9.87, "converted": 10.02}}
    m.source = type(m.source)("mistralai/Mixtral-8x7B-v0.1", "abc123")
    (folder / "manifest.json").write_text(m.to_json())
    return folder


def expected_card(folder: Path) -> str:
    m = manifest(folder)
    files = [*m["tokenizer_files"], *m["dense_shards"], *m["expert_shards"]]
    total = sum(f["bytes"] for f in files)
    dense = sum(f["bytes"] for f in m["dense_shards"])
    experts = sum(f["bytes"] for f in m["expert_shards"])
    from prism_load.container import Manifest

    records = Manifest.from_json((folder / "manifest.json").read_bytes()).experts
    bpw = 8 * sum(r.length for r in records) / sum(r.numel for r in records)
    mb = lambda n: f"{n / 1e6:.2f} MB"  # noqa: E731
    return f"""---
base_model: mistralai/Mixtral-8x7B-v0.1
library_name: prism
pipeline_tag: text-generation
tags:
- moe
- prism
- quantized
- mixture-of-experts
base_model_relation: quantized
---

# tiny

[mistralai/Mixtral-8x7B-v0.1](https://huggingface.co/mistralai/Mixtral-8x7B-v0.1) (revision `abc123`) converted to a mixed-precision `.prism` container by prism 0.1.0: routed experts stored with per-expert bits and ranks chosen from calibration statistics, dense weights as the recipe says. Load it by repo id with `prism_load`: files go through the Hugging Face cache (so `HF_HUB_OFFLINE=1` works once they are cached), manifest, dense shards and tokenizer first, expert shards as the reader asks for them.

## Budget

| | |
|---|---|
| budget | 3 bits per routed-expert weight (average, as stored) |
| routed-expert bits per weight | {bpw:.3f} (scales, zeros and low-rank factors counted) |
| size | {mb(total)}: dense shards {mb(dense)}, expert shards {mb(experts)} |
| experts | 2 MoE layers x 4 experts, top-2; 2 in the hot tier |
| model type | `mixtral` |
| recipe | `test` |

## Measured quality

| metric | value |
|---|---|
| kl_divergence | 0.01234 |
| perplexity.reference | 9.87 |
| perplexity.converted | 10.02 |

## Usage

```python
import prism_load

model = prism_load.load("org/tiny")
```
"""


@needs_container
def test_push_operations_and_card(pushable, fake_api):
    from prism_convert.tools.push import push

    plan = push(pushable, "org/tiny", private=True, revision="v1", token="hf_secret")
    (api,) = fake_api.instances
    assert api.token == "hf_secret"
    m = manifest(pushable)
    listed = [f["name"] for f in (*m["tokenizer_files"], *m["dense_shards"], *m["expert_shards"])]
    message = f"Upload tiny.prism ({sum(f['bytes'] for f in (*m['tokenizer_files'], *m['dense_shards'], *m['expert_shards'])) / 1e6:.2f} MB, "
    assert api.calls[0] == (
        "create_repo",
        ("org/tiny",),
        {"repo_type": "model", "private": True, "exist_ok": True},
    )
    assert api.calls[1] == (
        "create_branch",
        ("org/tiny",),
        {"branch": "v1", "repo_type": "model", "exist_ok": True},
    )
    name, _, upload = api.calls[2]
    assert name == "upload_folder" and len(api.calls) == 3
    assert upload == {
        "repo_id": "org/tiny",
        "folder_path": str(pushable),
        "repo_type": "model",
        "revision": "v1",
        "commit_message": plan.commit_message,
        "allow_patterns": ["manifest.json", "README.md", *listed],
        "ignore_patterns": None,
    }
    assert plan.commit_message.startswith(message) and plan.commit_message.endswith("with prism 0.1.0")
    assert plan.commit_url == "https://huggingface.co/org/tiny/commit/abc"
    assert (pushable / "README.md").read_text() == expected_card(pushable) == plan.card
    # the recorded calls are valid for the installed huggingface_hub's own signatures
    import inspect

    from huggingface_hub import HfApi

    for method, args, kwargs in api.calls:
        inspect.signature(getattr(HfApi, method)).bind(None, *args, **kwargs)


@needs_container
def test_push_main_needs_no_branch_and_public_by_default(pushable, fake_api):
    from prism_convert.tools.push import push

    push(pushable, "org/tiny")
    (api,) = fake_api.instances
    assert [c[0] for c in api.calls] == ["create_repo", "upload_folder"]
    assert api.calls[0][2]["private"] is False and api.calls[1][2]["revision"] is None and api.token is None


@needs_container
def test_card_parses_as_hub_metadata(pushable, fake_api):
    from huggingface_hub import ModelCard

    from prism_convert.tools.push import push

    push(pushable, "org/tiny", dry_run=True)
    data = ModelCard.load(pushable / "README.md").data.to_dict()
    assert data == {
        "base_model": "mistralai/Mixtral-8x7B-v0.1",
        "library_name": "prism",
        "pipeline_tag": "text-generation",
        "tags": ["moe", "prism", "quantized", "mixture-of-experts"],
        "base_model_relation": "quantized",
    }


@needs_container
def test_dry_run_lists_files_without_any_api(pushable, fake_api):
    from prism_convert.tools.push import push

    (pushable / "notes.txt").write_text("not in the manifest")
    plan = push(pushable, "org/tiny", dry_run=True)
    assert fake_api.instances == []
    m = manifest(pushable)
    listed = [*m["tokenizer_files"], *m["dense_shards"], *m["expert_shards"]]
    readme = (pushable / "README.md").stat().st_size
    assert plan.files == [
        ("manifest.json", (pushable / "manifest.json").stat().st_size),
        ("README.md", readme),
        *((f["name"], f["bytes"]) for f in listed),
    ]
    assert plan.total_bytes == sum(n for _, n in plan.files)
    assert plan.operations == []


@needs_container
def test_local_source_has_no_base_model(pushable, fake_api):
    from prism_convert.tools.push import push
    from prism_load.container import Manifest

    m = Manifest.from_json((pushable / "manifest.json").read_bytes())
    m.source = type(m.source)("/data/models/my-moe", None)
    (pushable / "manifest.json").write_text(m.to_json())
    card = push(pushable, "org/x", dry_run=True).card
    assert card.startswith("---\nlibrary_name: prism\npipeline_tag: text-generation\ntags:\n")
    assert "base_model" not in card and "\n`/data/models/my-moe` converted to a mixed-precision" in card
    card = push(pushable, "org/x", dry_run=True, base_model="org/base").card
    assert card.startswith("---\nbase_model: org/base\n") and "base_model_relation: quantized\n---" in card
    assert "\n[org/base](https://huggingface.co/org/base) converted to" in card


@needs_container
def test_push_refuses_bad_input(pushable, tmp_path, fake_api):
    from prism_convert.tools.push import push

    with pytest.raises(HubError, match="'not-a-repo'"):
        push(pushable, "not-a-repo", dry_run=True)
    with pytest.raises(ContainerError, match="manifest.json: missing"):
        push(tmp_path, "org/x", dry_run=True)
    m = manifest(pushable)
    (pushable / m["expert_shards"][-1]["name"]).unlink()
    with pytest.raises(
        HubError, match=rf"1 files the manifest lists are missing \({m['expert_shards'][-1]['name']}\)"
    ):
        push(pushable, "org/x", dry_run=True)
    assert fake_api.instances == []


@needs_container
def test_push_cli_dry_run(pushable, fake_api):
    from typer.testing import CliRunner

    from prism_convert.cli.app import app

    out = CliRunner().invoke(app, ["push", str(pushable), "org/tiny", "--dry-run"], env={"COLUMNS": "200"})
    assert out.exit_code == 0, out.output
    assert "dry run" in out.output and "manifest.json" in out.output and "README.md" in out.output
    assert fake_api.instances == []


@needs_container
def test_predictor_file_travels_with_the_container(tmp_path, offline, fake_api):
    """A container's fitted predictors are uploaded with it and fetched with the dense shards (small, needed
    at load), so a model loaded by repo id prefetches exactly as the local folder does."""
    from containers import random_model, write_tiny
    from runtime_fixtures import RUNTIME_CONFIG

    from prism_convert.tools.push import push

    n, h = RUNTIME_CONFIG["num_local_experts"], RUNTIME_CONFIG["hidden_size"]
    predictor = {(2, 1): {"recall": 0.9, "shadow_recall": 0.8, "weight": torch.zeros(n, h),
                          "bias": torch.arange(n, dtype=torch.float32)}}
    folder = write_tiny(tmp_path / "p.prism", model=random_model(RUNTIME_CONFIG), config=RUNTIME_CONFIG,
                        predictor=predictor)
    dense = [f["name"] for f in manifest(folder)["dense_shards"]]
    populate_cache(tmp_path / "hub", "test/pred-prism", folder)
    model = prism_load.load("test/pred-prism", cache_dir=tmp_path / "hub", expert_cache="50%", prefetch=True)
    snapshots = [kw["allow_patterns"] for name, _, kw in offline if name == "snapshot_download"]
    assert snapshots[-1] == ["manifest.json", *dense, "predictor.safetensors"]
    assert model.stats()["predictor_layers"] == [[2, 1]]
    model.runtime.close()
    plan = push(folder, "org/pred", token="hf_secret")
    assert "predictor.safetensors" in fake_api.instances[0].calls[-1][2]["allow_patterns"]
    assert "predictor.safetensors" in dict(plan.files)

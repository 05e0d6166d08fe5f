"""Resolve a Hugging Face Hub repo id for `prism_load.load` (which then loads the local files): manifest,
dense shards and tokenizer first, expert shards on demand.

Everything goes through huggingface_hub's own cache (revision, token, cache_dir, HF_HUB_OFFLINE and
local_files_only behave as they do for transformers). The revision is pinned to the commit the first call
resolved, so files fetched later cannot come from a newer push.

A cached snapshot holds symlinks into `blobs/`, which the container reader refuses inside a container
folder (a hostile folder could point anywhere); so the container is opened from a private folder holding a
copy of manifest.json only, and every other file reaches the reader through its `resolve_file` hook.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .errors import PrismError

MANIFEST = "manifest.json"
PROBE_PATTERNS = [MANIFEST, "config.json"]
CHECKPOINT_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt"]
DOWNLOAD_EXPERTS = ("lazy", "all")
REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")


class HubError(PrismError):
    """A Hub repository, revision or file cannot be resolved (not found, gated, offline and not cached)."""


def is_repo_id(value) -> bool:
    """'org/name' that is not an existing local path (a local folder always wins, as in transformers)."""
    text = str(value)
    return bool(REPO_ID.fullmatch(text)) and ".." not in text and not Path(text).exists()


@dataclass
class HubSnapshot:
    """A resolved repo: the local folder to load and, for a container, the hook that fetches other files."""

    repo_id: str
    commit: str
    folder: Path  # the cached snapshot (symlinks into blobs/)
    kind: str  # "container" or "checkpoint"
    fetch: Callable[[str], Path] | None = None
    prefetched: frozenset[str] = frozenset()  # files the snapshot downloads already brought
    fetched: list[str] = field(default_factory=list)  # files asked for on demand, in order

    def resolve_file(self, name: str) -> Path:
        """A file of the pinned commit: from the snapshot if it came first, else through hf_hub_download."""
        if name in self.prefetched:
            return self.folder / name
        self.fetched.append(name)
        return self.fetch(name)


def hub_call(what: str, fn, *args, **kwargs):
    """Call huggingface_hub, turning its errors into one HubError that names the repo, revision and file."""
    from huggingface_hub import errors

    try:
        return fn(*args, **kwargs)
    except errors.GatedRepoError:
        raise HubError(
            f"{what}: the repository is gated; accept its terms on the Hub and pass a token"
        ) from None
    except errors.RepositoryNotFoundError:
        raise HubError(f"{what}: repository not found (or private: pass a token)") from None
    except errors.RevisionNotFoundError:
        raise HubError(f"{what}: revision not found") from None
    except errors.LocalEntryNotFoundError:  # before EntryNotFoundError, its base class
        raise HubError(
            f"{what}: not in the local cache, and the Hub cannot be reached (HF_HUB_OFFLINE, "
            "local_files_only, or no network)"
        ) from None
    except (errors.EntryNotFoundError, errors.RemoteEntryNotFoundError):
        raise HubError(f"{what}: file not found in the repository") from None
    except (errors.HfHubHTTPError, errors.OfflineModeIsEnabled) as e:
        raise HubError(f"{what}: {type(e).__name__}: {e}") from None


def resolve(
    repo_id: str,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool | None = None,
    download_experts: str = "lazy",
) -> HubSnapshot:
    """Download (or find in the cache) what loading needs first; return the snapshot and its fetch hook.

    Container: manifest.json, then the dense shards and tokenizer files it lists (all expert shards too
    with download_experts="all"). Hugging Face checkpoint: config, weights and tokenizer files.
    local_files_only=None defers to HF_HUB_OFFLINE."""
    import huggingface_hub as hf

    if download_experts not in DOWNLOAD_EXPERTS:
        raise HubError(
            f"download_experts={download_experts!r}: expected one of {', '.join(DOWNLOAD_EXPERTS)}"
        )
    where = f"{repo_id}@{revision or 'main'}"
    common = dict(
        repo_type="model", cache_dir=cache_dir, token=token, local_files_only=bool(local_files_only)
    )
    probe = Path(
        hub_call(
            where, hf.snapshot_download, repo_id, revision=revision, allow_patterns=PROBE_PATTERNS, **common
        )
    )
    commit = probe.name  # snapshots/<40-hex commit>: every later download pins it
    where = f"{repo_id}@{commit[:12]}"

    def fetch(name: str) -> Path:
        return Path(
            hub_call(f"{where}: {name}", hf.hf_hub_download, repo_id, name, revision=commit, **common)
        )

    if not (probe / MANIFEST).is_file():
        if not (probe / "config.json").is_file():
            raise HubError(f"{where}: neither {MANIFEST} (a .prism container) nor config.json (a checkpoint)")
        folder = hub_call(
            where,
            hf.snapshot_download,
            repo_id,
            revision=commit,
            allow_patterns=CHECKPOINT_PATTERNS,
            **common,
        )
        return HubSnapshot(repo_id, commit, Path(folder), "checkpoint", fetch=fetch)
    from .container.reader import parse_manifest

    manifest = parse_manifest((probe / MANIFEST).read_bytes())
    first = [MANIFEST, *(f.name for f in manifest.whole_files())]
    if download_experts == "all":
        first += [s.name for s in manifest.expert_shards]
    folder = hub_call(where, hf.snapshot_download, repo_id, revision=commit, allow_patterns=first, **common)
    return HubSnapshot(repo_id, commit, Path(folder), "container", fetch=fetch, prefetched=frozenset(first))

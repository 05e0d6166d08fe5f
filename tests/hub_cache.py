"""A Hugging Face Hub cache written the way huggingface_hub writes it, for tests that resolve
repo ids without a network (test_hub, test_tokenizer); the `offline` fixture is in conftest.py."""

from __future__ import annotations

import hashlib
from pathlib import Path


# -- a Hub cache, written the way huggingface_hub writes it --------------------------------------------------
def populate_cache(
    cache: Path, repo_id: str, folder: Path, ref: str = "main", names=None, commit: str | None = None
) -> str:
    """models--{org}--{name}/refs/{ref} = commit (no trailing newline: huggingface_hub reads it with f.read()),
    snapshots/{commit}/{file} -> ../../blobs/{sha256} symlinks. Returns the commit."""
    commit = commit or hashlib.sha1(f"{repo_id}@{ref}@{folder}".encode()).hexdigest()
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    for sub in ("refs", "blobs", f"snapshots/{commit}"):
        (repo / sub).mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    for f in sorted(folder.iterdir()):
        if not f.is_file() or (names is not None and f.name not in names):
            continue
        data = f.read_bytes()
        blob = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / blob).write_bytes(data)
        link = repo / "snapshots" / commit / f.name
        if not link.exists():
            link.symlink_to(f"../../blobs/{blob}")
    return commit

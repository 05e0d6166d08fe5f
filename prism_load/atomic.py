"""Atomic outputs: build in a temporary sibling, then rename, so an interrupted run never leaves a
folder or file that looks complete."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from prism_load.errors import PrismError


def _check_writable(parent: Path) -> None:
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PrismError(f"{parent}: cannot create the output folder ({e.strerror})") from None
    if not os.access(parent, os.W_OK):
        raise PrismError(f"{parent}: output folder is not writable")


@contextlib.contextmanager
def atomic_folder(target: Path, overwrite: bool = True):
    """Yields a temporary folder beside `target`; on success it replaces `target` in one rename."""
    target = Path(target)
    _check_writable(target.parent)
    if target.exists() and not overwrite:
        raise PrismError(f"{target}: already exists")
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text(path: Path, text: str) -> None:
    """Write text atomically (temp file in the same folder, fsync, rename)."""
    path = Path(path)
    _check_writable(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: Path, data, indent: int | None = 1) -> None:
    """Write JSON atomically."""
    write_text(path, json.dumps(data, indent=indent))

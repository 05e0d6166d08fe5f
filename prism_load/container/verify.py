"""Check a whole .prism container: every file, every header, every expert range and its padding.

Problems are collected, not raised one at a time, so `prism verify` can name all that is wrong.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ContainerError
from .format import MANIFEST_NAME, aligned, checksum
from .reader import Container, Progress, ResolveFile, check_size, file_checksum_problem


def verify_container(path: str | Path, check_checksums: bool = True, progress: Progress | None = None,
                     resolve_file: ResolveFile | None = None) -> list[str]:
    """Every problem of the container at `path` (empty: intact), including one that stops it opening."""
    try:
        container = Container(path, resolve_file, check_files=False)
    except ContainerError as e:
        return [str(e)]
    with container:
        return verify_container_files(container, check_checksums, progress)


def verify_container_files(c: Container, check_checksums: bool, progress: Progress | None) -> list[str]:
    """progress(bytes just checked, total bytes) is called as the check advances."""
    problems: list[str] = []
    if progress is not None:
        m = c.manifest
        total = sum(f.bytes for f in m.expert_shards)
        if check_checksums:
            total += sum(f.bytes for f in m.whole_files())
        report, progress = progress, (lambda n: report(n, total))
    for entry in c.manifest.tokenizer_files:
        problems += _problems(lambda e=entry: _check_whole_file(c, e, check_checksums, progress))
    for i, entry in enumerate(c.manifest.dense_shards):
        problems += _problems(lambda i=i, e=entry: (_check_whole_file(c, e, check_checksums, progress),
                                                    c.dense_shard(i)))
    if (p := c.manifest.predictor) is not None:
        problems += _problems(lambda: (_check_whole_file(c, p.file, check_checksums, progress), c.predictor_tensors()))
    for i in range(len(c.manifest.expert_shards)):
        problems += _expert_shard_problems(c, i, check_checksums, progress)
    return problems


def _problems(check) -> list[str]:
    try:
        check()
    except ContainerError as e:
        return [str(e)]
    return []


def _check_whole_file(c: Container, entry, check_checksums: bool, progress: Progress | None) -> None:
    path = c.path(entry.name)
    check_size(path, entry)
    if check_checksums and (problem := file_checksum_problem(path, entry, progress)):
        raise ContainerError(problem)


def _expert_shard_problems(c: Container, index: int, check_checksums: bool, progress: Progress | None) -> list[str]:
    """Header against the manifest, then each expert's checksum and its zero padding."""
    try:
        with c.shard_fd(index) as fd:  # checks size and header
            return _expert_range_problems(c, index, fd, check_checksums, progress)
    except ContainerError as e:
        return [str(e)]


def _expert_range_problems(c: Container, index: int, fd: int, check_checksums: bool, progress) -> list[str]:
    shard = c.manifest.expert_shards[index]
    problems = []
    records = [r for r in c.records if r.shard == index]
    if progress is not None:
        progress(records[0].offset)  # the header, checked when the shard was opened
    for r in records:
        if check_checksums:
            blob = os.pread(fd, aligned(r.length), r.offset)
            if (digest := checksum(blob[: r.length])) != r.checksum:
                problems.append(f"{shard.name}: {r.where()}: checksum {digest} != {r.checksum} in {MANIFEST_NAME} "
                                f"(bytes [{r.offset}, {r.end}) are damaged)")
            if (pad := blob[r.length :]) != bytes(len(pad)):
                problems.append(f"{shard.name}: {r.where()}: padding after byte {r.end} is not zero")
        if progress is not None:
            progress(aligned(r.length))
    return problems

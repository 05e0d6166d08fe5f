"""Cap a benchmark process's memory with a Linux memory cgroup, as a machine with less RAM would.

The process joins a fresh memory cgroup after its imports (their pages stay charged where they were), so the
cap is the memory its model may use: anonymous memory and the page cache it brings in (a memory-mapped or
read file's pages are charged to the cgroup that first touched them; drop them from the page cache first, or
they are charged elsewhere and escape the cap). Past the cap the kernel reclaims the cgroup's page cache
(a mapped expert is then read from the disk again at its next use) and kills the process when anonymous
memory alone exceeds it. Needs root and a writable cgroup v1 memory hierarchy or cgroup v2 with the memory
controller; otherwise `join` raises CapUnavailable with the reason.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

V1 = Path("/sys/fs/cgroup/memory")
V2_CANDIDATES = (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified"))


class CapUnavailable(RuntimeError):
    pass


class MemoryCap:
    """This process in a memory cgroup of `limit_bytes` (join), its peak charge and failures, then out (leave)."""

    def __init__(self, folder: Path, v2: bool):
        self.folder, self.v2 = folder, v2

    @classmethod
    def join(cls, limit_bytes: int, name: str | None = None) -> MemoryCap:
        name = name or f"prism-bench-{os.getpid()}"
        if (V1 / "memory.limit_in_bytes").exists():
            cap = cls(V1 / name, v2=False)
            limit_file, procs = "memory.limit_in_bytes", "cgroup.procs"
        else:
            root = next((p for p in V2_CANDIDATES if "memory" in _read(p / "cgroup.subtree_control", "").split()), None)
            if root is None:
                raise CapUnavailable("no cgroup v1 memory hierarchy and no cgroup v2 tree delegating the memory "
                                     "controller under /sys/fs/cgroup")
            cap = cls(root / name, v2=True)
            limit_file, procs = "memory.max", "cgroup.procs"
        try:
            cap.folder.mkdir()
            (cap.folder / limit_file).write_text(str(int(limit_bytes)))
            if not cap.v2:
                (cap.folder / "memory.swappiness").write_text("0")  # no swap either way: anon memory stays
            (cap.folder / procs).write_text(str(os.getpid()))
        except OSError as e:
            cap.remove()
            raise CapUnavailable(f"cannot make or join memory cgroup {cap.folder} ({e.strerror}): run as root on "
                                 "Linux with a writable memory cgroup") from None
        return cap

    def peak_bytes(self) -> int:
        """Most bytes charged at once: anonymous memory plus page cache."""
        return int(_read(self.folder / ("memory.peak" if self.v2 else "memory.max_usage_in_bytes"), "0"))

    def reclaim_failures(self) -> int:
        """How often a charge hit the cap (v1 failcnt; v2: the memory.events 'max' count)."""
        if not self.v2:
            return int(_read(self.folder / "memory.failcnt", "0"))
        for line in _read(self.folder / "memory.events", "").splitlines():
            key, _, value = line.partition(" ")
            if key == "max":
                return int(value)
        return 0

    def leave(self) -> None:
        """Back to the parent cgroup; the cgroup goes (its charges move up or are dropped)."""
        with contextlib.suppress(OSError):
            (self.folder.parent / "cgroup.procs").write_text(str(os.getpid()))
        self.remove()

    def remove(self) -> None:
        remove(self.folder)


def remove(folder: Path) -> None:
    """Remove a cgroup folder once no task is in it (a killed process's, from its parent)."""
    with contextlib.suppress(OSError):
        folder.rmdir()


def folder_for(pid: int) -> list[Path]:
    """Where MemoryCap.join(name=None) of process `pid` puts its cgroup (for its parent to clean up)."""
    return [V1 / f"prism-bench-{pid}", *(p / f"prism-bench-{pid}" for p in V2_CANDIDATES)]


def _read(path: Path, default: str) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return default

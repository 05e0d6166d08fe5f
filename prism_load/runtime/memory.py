"""How much memory this process may still take: `expert_cache="auto"`'s budget, and the check that refuses a load
whose weights alone would not fit (`check_fits`).

Why: the case prism exists for is a model larger than the RAM it may use, and the right expert-cache budget is
that RAM less what the rest of the model and its working memory need. A process in a container (a memory
cgroup) may use far less than the machine has, and exceeding the cgroup's limit gets it killed, not slowed
(bench/results/memory_caps.md: prism read in, or llama.cpp's default, is killed under every cap there). So on
a CPU the figure is the smaller of the machine's MemAvailable and the room under this process's cgroup
limit (the limit less the anonymous memory charged to it: page cache is reclaimable and does not count); on
CUDA, the device's free memory.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import BudgetError, DoesNotFit

MIN_RESERVE = 64 << 20  # KV caches, activations, allocator slack and the page cache that reads pass through
RESERVE_SHARE = 0.10
UNLIMITED = 1 << 60  # cgroup v1 writes "no limit" as a number near 2**63


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _stat(text: str | None) -> dict[str, int]:
    out = {}
    for line in (text or "").splitlines():
        key, _, value = line.partition(" ")
        if value.strip().isdigit():
            out[key] = int(value)
    return out


def cgroup_room(proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes left under this process's memory cgroup limit (limit less the anonymous memory charged), or None
    where no limit applies or none can be read. cgroup v1: memory.limit_in_bytes and memory.stat's total_rss
    under ROOT/memory; v2: memory.max and memory.stat's anon under ROOT (or ROOT/unified)."""
    for line in (_read(proc_cgroup) or "").splitlines():
        hierarchy, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        rel = path.lstrip("/")
        if "memory" in controllers.split(","):  # v1
            folder = root / "memory" / rel
            limit = (_read(folder / "memory.limit_in_bytes") or "").strip()
            if not limit.isdigit():
                return None
            stat = _stat(_read(folder / "memory.stat"))
            limit = min(int(limit), stat.get("hierarchical_memory_limit", UNLIMITED))  # a parent's limit binds too
            return None if limit >= UNLIMITED else limit - stat.get("total_rss", stat.get("rss", 0))
        if hierarchy == "0" and controllers == "":  # v2 (its one line)
            for base in (root, root / "unified"):
                limit = _read(base / rel / "memory.max")
                if limit is None:
                    continue
                if not limit.strip().isdigit():  # "max"
                    return None
                return int(limit) - _stat(_read(base / rel / "memory.stat")).get("anon", 0)
    return None


def _meminfo(key: str, meminfo: Path) -> int | None:
    """One /proc/meminfo figure in bytes (its kB times 1024), or None where the file or the line is missing."""
    for line in (_read(meminfo) or "").splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) * 1024
    return None


def mem_available(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """The kernel's MemAvailable (free memory plus what it can reclaim), bytes; None off Linux."""
    return _meminfo("MemAvailable", meminfo)


def swap_free(meminfo: Path = Path("/proc/meminfo")) -> int:
    """The machine's free swap, bytes (0 where none or off Linux)."""
    return _meminfo("SwapFree", meminfo) or 0


def available_bytes(device) -> tuple[int, str]:
    """(bytes this process may still take on `device`, where that figure comes from)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0], f"free memory of {device}"
    figures = {"MemAvailable": mem_available(), "room under this process's memory cgroup limit": cgroup_room()}
    known = {name: value for name, value in figures.items() if value is not None}
    if not known:
        raise BudgetError("expert_cache='auto': this platform reports no available memory (no /proc/meminfo); "
                          "give a budget in bytes, a size such as '8GB', or a percentage")
    name = min(known, key=known.get)
    return known[name], name


def auto_budget(device, total_bytes: int) -> tuple[int, str]:
    """expert_cache="auto": (what the process may still take less a reserve (10% of it, at least 64 MiB), at
    most every expert's bytes; how it was reckoned, for error messages). Called once the dense weights are
    loaded, so they are already counted."""
    available, source = available_bytes(device)
    reserve = max(MIN_RESERVE, int(available * RESERVE_SHARE))
    how = (f"expert_cache='auto': {available:,} bytes available ({source}) less a {reserve:,}-byte reserve for "
           "KV caches and working memory")
    budget = min(total_bytes, available - reserve)
    if budget <= 0:
        raise BudgetError(f"{how} leave nothing for experts")
    return budget, how


def check_fits(need_bytes: int, device, what: str, instead: str) -> None:
    """Refuse, before it starts, a load that would hold need_bytes more than this process may still take on
    `device`: past that the kernel kills the process midway (bench/results/memory_caps.md: the "killed" rows),
    or on CUDA the allocator fails, after the minutes the load took. Lenient where a refusal could be wrong:
    on the CPU free swap counts as room (slow, but the load completes), and where no figure can be read
    nothing is refused. `what` names the load and `instead` says what fits, for the message."""
    try:
        available, source = available_bytes(device)
    except BudgetError:
        return
    swap = swap_free() if torch.device(device).type == "cpu" else 0
    if need_bytes <= available + swap:
        return
    room = f"{available:,} bytes ({source})" + (f" plus {swap:,} bytes of free swap" if swap else "")
    raise DoesNotFit(f"{what} would hold {need_bytes:,} bytes ({need_bytes / 2**20:,.0f} MiB), more than this "
                     f"process may still take: {room}. {instead}", need_bytes, available + swap, source)

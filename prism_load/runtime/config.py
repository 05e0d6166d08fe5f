"""RuntimeConfig: every option of `prism_load.load` beyond the path, dtype, device and the Hub's.

One typed, frozen record instead of keyword options checked against a tuple of names. `load(...,
config=RuntimeConfig(...))` takes it as it is; `load(..., expert_cache="50%", ...)` keeps working and builds
one from the keywords (`RuntimeConfig.from_options`), naming an option that does not apply.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

READ_OPTIONS = ("verify_checksums", "resolve_file")  # how a container's files are read: containers only
CONTAINER_OPTIONS = (*READ_OPTIONS, "expert_form", "expert_kernel", "mmap")  # what a resident container takes


@dataclass(frozen=True)
class RuntimeConfig:
    """How a model's experts are held and served (prism_load/runtime; defaults: every expert resident).

    expert_cache: the fast tier's budget (bytes, "50%" of every expert's bytes in the fast tier's form, "2GB",
      or "auto": what this process may still take once the dense weights are loaded, the smaller of
      MemAvailable and the room under its memory cgroup's limit (free GPU memory on CUDA), less a reserve of
      10%, at least 64 MiB: runtime/memory.py; a long context whose KV cache outgrows that reserve needs an
      explicit budget); None keeps every expert resident, without the runtime.
    prefetch: the shadow-router prefetch: True, False, or "auto" (the default: on for a CUDA device, where a
      fetch is a copy on a side stream; off on a CPU, where every configuration measured decoded faster on
      demand: bench/results/runtime_packed.md, runtime_peer.md); prefetch_extra: experts fetched beyond the
      predicted top-k; lookahead: MoE layers predicted ahead (1 or 2); both need prefetch on.
      predictor: use the container's (or `profile`'s) fitted predictors where it has them (False: the
      shadow router everywhere).
    numa: True / "auto" places the hottest experts on the compute's NUMA node (or a NumaPlacement).
    host_cache (CUDA): the pinned host tier's budget of stored bytes; decode_on (CUDA): "device" or "host".
    pin_hot: keep the container's hot tier resident ("warm": once it has been used).
    eviction: "next-use" (the default: the expert expected to be needed last, runtime/eviction.py),
      "frequency" (GreedyDual with routing frequencies; frequency_weight its weight) or "lru".
    profile (checkpoints): a prism profile folder for routing frequencies and fitted predictors.
    expert_form (containers): "packed" (default), "decoded" or "codes" (runtime only); expert_kernel:
      "auto", "native", "int4pack", "dequant", "native-int16" or "native-int8" (prism_load/packed.py).
    verify_checksums (containers): True (the default) checks every byte range the first time this process
      reads it: the dense weights and files at load, each expert at its first load (a resident load's once; a
      cache's first miss, not its reloads of the same range, whose checksums cost a cache of 4.6 MB experts 7-8%
      of its decode speed: README, "Checksums once per expert"); "always": every read, a cache's
      reloads included; False: none. resolve_file (containers): fetch a shard not in the folder.
    mmap (resident containers): experts used as stored view a memory map of their shards instead of a copy in
      the process's memory: the load reads nothing but the dense weights (and, with verify_checksums, each
      expert page once for its checksum), the kernel's page cache holds the experts, shared between processes,
      and a container larger than RAM runs with the kernel paging experts in and out (llama.cpp's default), far
      slower there than an expert_cache of the same memory (README, "Less RAM than the model").
    """

    expert_cache: int | str | None = None
    prefetch: bool | str = "auto"
    prefetch_extra: int = 0
    lookahead: int = 1
    predictor: bool = True
    numa: Any = None
    host_cache: int | str | None = None
    decode_on: str = "device"
    pin_hot: bool | str = "warm"
    eviction: str = "next-use"
    frequency_weight: float = 1.0
    profile: str | Path | None = None
    expert_form: str | None = None
    expert_kernel: str = "auto"
    verify_checksums: bool | str = True
    mmap: bool = False
    resolve_file: Callable[[str], Any] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        verify = self.verify_checksums
        if not (verify is True or verify is False or verify == "always"):
            raise ValueError(f"verify_checksums={self.verify_checksums!r}: expected True (each range checked the first "
                             "time it is read), 'always' (every read) or False")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_options(cls, options: dict[str, Any], folder: Path, container: bool) -> RuntimeConfig:
        """The config of load()'s keyword options for a local `folder`; TypeError naming the options that do
        not apply to it (an unknown name, a container's option for a checkpoint, a runtime option without an
        expert_cache). An option passed at its default value applies everywhere (mmap=False beside a cache, a
        wrapper forwarding every keyword), as RuntimeConfig.check counts only what differs from the defaults."""
        known = {f.name: f for f in fields(cls)}
        given = {name for name, value in options.items() if name not in known or _differs(known[name], value)}
        check_applies(given, folder, container, options.get("expert_cache") is not None)
        return cls(**options)

    def given(self) -> set[str]:
        """Options set to something other than their default."""
        return {f.name for f in fields(self) if _differs(f, getattr(self, f.name))}

    def check(self, folder: Path, container: bool) -> None:
        """As from_options checks keywords: the options set here must apply to `folder`."""
        check_applies(self.given(), folder, container, self.expert_cache is not None)

    def runtime_options(self) -> dict[str, Any]:
        """The options attach_runtime takes (all but the cache budget, prefetch and how files are read)."""
        skip = {"expert_cache", "prefetch", "profile", "expert_form", "expert_kernel", "predictor", "mmap",
                *READ_OPTIONS}
        return {name: getattr(self, name) for name in self.names() if name not in skip}


def _differs(option, value) -> bool:
    """Whether `value` is other than the option's (a dataclass field's) default."""
    return value is not option.default and value != option.default


def prefetch_on(prefetch, device, lookahead: int = 1, prefetch_extra: int = 0) -> bool:
    """Whether the runtime prefetches on `device` (see RuntimeConfig.prefetch); ValueError for another value,
    or for a prefetch option (lookahead, prefetch_extra) given where prefetch is off."""
    if not (isinstance(prefetch, bool) or prefetch == "auto"):
        raise ValueError(f"prefetch={prefetch!r}: expected True, False or 'auto'")
    on = getattr(device, "type", str(device).split(":")[0]) == "cuda" if prefetch == "auto" else prefetch
    if not on and (lookahead == 2 or prefetch_extra):  # another lookahead: attach_runtime names it
        why = "prefetch=False" if prefetch is False else "prefetch='auto' on a CPU (pass prefetch=True, or --prefetch)"
        raise ValueError(f"lookahead={lookahead} / prefetch_extra={prefetch_extra} need prefetch; {why} "
                         "fetches on demand only")
    return on


def check_applies(names: set[str], folder: Path, container: bool, cached: bool) -> None:
    """TypeError naming options that do not apply: without an expert_cache only a container's reading
    options (and prefetch, which then does nothing) are known; with one, every runtime option, the reading
    options for containers only."""
    names = names - {"expert_cache", "prefetch"}
    if not cached:
        if "numa" in names:
            raise TypeError("numa applies to models loaded with an expert_cache")
        if container:
            unknown = names - set(CONTAINER_OPTIONS)
            if unknown:
                raise TypeError(f"unknown container options {sorted(unknown)}")
        elif names:
            raise TypeError(f"options {sorted(names)} apply to .prism containers only")
        return
    if "mmap" in names:
        raise TypeError("mmap applies to resident containers: with an expert_cache the cache reads each expert into "
                        "its own budgeted memory")
    allowed = set(RuntimeConfig.names()) - {"expert_cache", "prefetch"}
    if not container:
        allowed -= set(READ_OPTIONS)
    if names - allowed:
        raise TypeError(f"unknown options {sorted(names - allowed)} for {folder}")

"""Shared helpers for the benchmarks: the reference model, result files, subprocess peak RSS."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parent.parent
# this checkout's packages before any installed ones: a benchmark run in another checkout (a git worktree at an
# older commit) measures that checkout's code, not the one pip installed in editable mode; every bench imports
# this module before prism_load, and run_measured passes it on (PYTHONPATH)
sys.path.insert(0, str(ROOT))


def reference(preset: str = "full") -> Path:
    from prism_reference.train import reference_model

    return reference_model(preset)


def machine() -> dict:
    """What ran a benchmark: results from different CPUs are not comparable (the figures in bench/results come
    from more than one machine), so the CPU's model name and the vector extensions the kernels use are kept."""
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "cpu": cpu_name(),
            "cpu_features": cpu_features(), "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d")}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def cpu_features() -> list[str]:
    """The extensions among those prism's and torch's CPU kernels choose by (AVX2 up to AMX)."""
    wanted = ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile")
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line.split(":", 1)[1].split() for line in f if line.startswith("flags"))
    except (OSError, StopIteration):
        return []
    return [w for w in wanted if w in flags]


def write_result(name: str, data: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **data}, indent=1))
    return path


def write_report(name: str, data: dict, markdown: str) -> Path:
    """bench/results/NAME.json (with the machine) and NAME.md, the pair every benchmark leaves."""
    path = write_result(name, data)
    (RESULTS / f"{name}.md").write_text(markdown)
    return path


def run_measured(code: str) -> tuple[dict, int]:
    """Runs `code` (which prints one JSON line last) in a fresh interpreter; returns (its JSON, peak RSS bytes)."""
    wrapper = code + "\nimport resource, json as _j\nprint(_j.dumps({'__rss': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))\n"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", wrapper], capture_output=True, text=True, check=True,
                         env=env).stdout.strip().splitlines()
    return json.loads(out[-2]), json.loads(out[-1])["__rss"]

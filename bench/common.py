"""Shared helpers for the benchmarks: the reference model, result files, subprocess peak RSS."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def reference(preset: str = "full") -> Path:
    from prism_reference.train import reference_model

    return reference_model(preset)


def machine() -> dict:
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d")}


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
    out = subprocess.run([sys.executable, "-c", wrapper], capture_output=True, text=True, check=True).stdout.strip().splitlines()
    return json.loads(out[-2]), json.loads(out[-1])["__rss"]

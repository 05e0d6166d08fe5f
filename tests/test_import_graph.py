"""The project's modules import one way: no circle between any two files of prism_load, prism_convert,
prism_reference and calibration, across packages too (tools/import_graph.py reads the source with ast;
function-level imports count). The checker itself is tested on a small package with a circle."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import import_graph  # noqa: E402

PACKAGES = ["prism_load", "prism_convert", "prism_reference", "calibration"]


def test_no_import_circle_between_the_projects_modules():
    g = import_graph.graph(ROOT, PACKAGES)
    assert "prism_load.container.reader" in g and "prism_load.container.format" in g["prism_load.container.reader"]
    assert any(m.startswith("prism_convert.") and "prism_load.container.format" in deps for m, deps in g.items())
    assert import_graph.cycles(g) == []


def test_the_checker_finds_circles_relative_absolute_and_in_functions(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..c import x\n")
    (pkg / "c.py").write_text("import pkg.a\nx = 1\n")
    (pkg / "d.py").write_text("from pkg import c\nimport os\n")
    g = import_graph.graph(tmp_path, ["pkg"])
    assert g["pkg.d"] == {"pkg.c"}
    assert import_graph.cycles(g) == [["pkg.a", "pkg.c", "pkg.sub.b"]]
    assert import_graph.main(["pkg", "--root", str(tmp_path)]) == 1

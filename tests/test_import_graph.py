"""No import circles between the files of the converter, the reference model and calibration
(tools/import_graph.py builds the graph from the source with `ast`; lazy imports inside functions count)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

import import_graph  # noqa: E402


def test_no_import_circles():
    assert import_graph.cycles(import_graph.graph(["prism_convert", "prism_reference", "calibration"])) == []


def test_a_circle_is_found(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.b import x\n")
    (pkg / "b.py").write_text("def f():\n    from . import a\n")
    assert import_graph.cycles(import_graph.graph(["pkg"], tmp_path)) == [["pkg.a", "pkg.b"]]

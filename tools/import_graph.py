"""The import graph of the project's packages, from their source alone (stdlib `ast`, nothing imported), and
its strongly connected components: an import circle between files shows up as a component of two or more
modules. Every import counts, the lazy ones inside functions included.

    python3 tools/import_graph.py prism_convert prism_reference calibration
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def modules(packages: list[str], root: Path = ROOT) -> dict[str, Path]:
    """Dotted name -> file of every module in the packages (a package is its __init__.py)."""
    out = {}
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The known module `name` refers to: itself, else its longest known prefix (`pkg.mod.attr` -> pkg.mod)."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def graph(packages: list[str], root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the modules of the same packages it imports (package __init__ files included, since
    importing `a.b.c` runs `a/__init__.py` and `a/b/__init__.py`)."""
    known = modules(packages, root)
    edges: dict[str, set[str]] = {m: set() for m in known}
    for mod, path in known.items():
        is_pkg = path.name == "__init__.py"
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                # `from pkg import mod` needs pkg.mod (and pkg's __init__, which every submodule needs anyway:
                # not counted, or each package re-exporting its modules would read as a circle)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
            for t in targets:
                hit = _resolve(t, known)
                if hit is not None and hit != mod:
                    edges[mod].add(hit)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted, largest first."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(out, key=len, reverse=True)


def main(argv: list[str]) -> int:
    packages = argv or ["prism_convert", "prism_reference", "calibration"]
    found = cycles(graph(packages))
    for comp in found:
        print("import circle:", " <-> ".join(comp))
    if not found:
        print(f"no import circles in {', '.join(packages)}")
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

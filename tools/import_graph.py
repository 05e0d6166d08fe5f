"""Module import graph of Python packages, and its circles (strongly connected components).

    python3 tools/import_graph.py prism_load [more packages] [--root DIR] [--edges]

Reads the source with `ast` (nothing is imported or run). Every `import x.y` and `from .a import b` is
resolved against the given packages, relative ones included, at any depth: imports inside functions and
under `if TYPE_CHECKING:` count too, since a function-level import that closes a circle is still a circle
that only happens to be deferred. `from pkg import name` is an edge to `pkg.name` when that is a module,
else to `pkg` (its `__init__`). Imports of modules outside the given packages are ignored. Prints every
strongly connected component of more than one module (or a module importing itself); exits 1 if any.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path


def modules(root: Path, packages: list[str]) -> dict[str, Path]:
    """Dotted module name -> source file, for every .py file under the given packages."""
    out = {}
    for package in packages:
        base = root / package.replace(".", "/")
        for path in sorted(base.rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _resolve_relative(module: str, is_package: bool, level: int, name: str | None) -> str:
    base = module.split(".")
    if not is_package:
        base = base[:-1]  # a plain module's package
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The modules of `known` that `module` (source at `path`) imports, anywhere in its body."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    out: set[str] = set()

    def add(name: str) -> None:
        while name and name not in known:  # `import a.b.c` of a name inside a module: its longest module prefix
            name = name.rpartition(".")[0]
        if name:
            out.add(name)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            target = (_resolve_relative(module, is_package, node.level, node.module) if node.level
                      else node.module or "")
            for alias in node.names:
                sub = f"{target}.{alias.name}" if target else alias.name
                add(sub if sub in known else target)
    out.discard(module)
    return out


def graph(root: Path, packages: list[str]) -> dict[str, set[str]]:
    mods = modules(root, packages)
    known = set(mods)
    return {m: imports(m, p, known) for m, p in mods.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for start in sorted(g):
        if start in index:
            continue
        work = [(start, iter(sorted(g[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(g.get(child, ())))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        m = stack.pop()
                        on_stack.discard(m)
                        component.append(m)
                        if m == node:
                            break
                    if len(component) > 1:
                        out.append(sorted(component))
    return sorted(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("packages", nargs="+", help="top-level packages (dotted), e.g. prism_load")
    ap.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent,
                    help="folder the packages are in (default: the repository)")
    ap.add_argument("--edges", action="store_true", help="also print every module's imports")
    args = ap.parse_args(argv)
    g = graph(args.root, args.packages)
    if args.edges:
        for m in sorted(g):
            print(f"{m} -> {', '.join(sorted(g[m])) or '-'}")
    found = cycles(g)
    for component in found:
        inner = {m: sorted(g[m] & set(component)) for m in component}
        print(f"circle of {len(component)} modules:")
        for m, targets in inner.items():
            print(f"  {m} -> {', '.join(targets)}")
    print(f"{len(g)} modules, {sum(map(len, g.values()))} imports, {len(found)} circle(s)")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())

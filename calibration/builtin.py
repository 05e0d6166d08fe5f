"""Text present on every Python install, so calibration and the reference model need no download.

- prose: the Python documentation bundled with the interpreter (`pydoc_data.topics`, the pages `help()`
  shows, split at their sections), plus the handful of prose files CPython ships beside its library
  (the license, IDLE's manual and notes, the email package's design note) where present.
- code: the standard library's own `.py` source, one document per file, in sorted path order. Tests,
  generated codec tables and `pydoc_data` (prose held in a Python string) are left out.
Docstrings are not counted as prose: they live inside code and would blur the two domains.
"""

from __future__ import annotations

import functools
import os
import re
import sysconfig
from html.parser import HTMLParser
from pathlib import Path

from prism_load.errors import CalibrationError

# Folders whose .py files are not hand-written library code (or are prose / data in disguise).
CODE_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__",
                            "pydoc_data", "encodings"})
# Prose files CPython installs beside its library (relative to the stdlib folder); absent ones are skipped.
PROSE_FILES = ("LICENSE.txt", "email/architecture.rst", "idlelib/help.html", "idlelib/README.txt",
               "idlelib/NEWS.txt", "idlelib/NEWS2x.txt", "idlelib/HISTORY.txt", "idlelib/extend.txt",
               "idlelib/TODO.txt")
_SECTION = re.compile(r"\n(?=[^\n]+\n={3,}\n)")  # before a title underlined with '=' (a top-level section)


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


@functools.lru_cache(maxsize=1)
def prose_documents() -> tuple[str, ...]:
    """The bundled documentation pages cut at their sections, then the shipped prose files by paragraphs."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise CalibrationError("builtin:prose: this Python has no pydoc_data (bundled documentation)") from None
    docs = [part.strip() for key in sorted(topics) for part in _SECTION.split(topics[key])]
    root = stdlib_dir()
    for rel in PROSE_FILES:
        path = root / rel
        if path.is_file():
            text = path.read_text(encoding="utf-8", errors="replace")
            docs.extend(paragraph_documents(html_text(text) if path.suffix == ".html" else text))
    return tuple(d for d in docs if d)


@functools.lru_cache(maxsize=1)
def code_documents() -> tuple[str, ...]:
    """Every hand-written .py file of the standard library, one document each, in sorted path order."""
    return tuple(path.read_text(encoding="utf-8", errors="replace") for path in code_files())


def code_files() -> list[Path]:
    root = stdlib_dir()
    if not root.is_dir():
        raise CalibrationError(f"builtin:code: the standard library folder {root} does not exist")
    files = []
    for folder, dirs, names in os.walk(root):
        # Prune while walking: site-packages alone can hold tens of thousands of files.
        dirs[:] = [d for d in dirs if d not in CODE_SKIP_DIRS and not d.startswith("config-")]
        files.extend(Path(folder) / n for n in names if n.endswith(".py"))
    return sorted(files, key=lambda p: p.relative_to(root).parts)


def paragraph_documents(text: str, min_chars: int = 2000, lines: bool = False) -> list[str]:
    """Cut running text into documents of whole paragraphs, each at least `min_chars` long (the last may
    be shorter): small enough that a document-level held-out split has many units, large enough to keep
    context. Paragraphs are separated by blank lines, or with `lines` each line is one (text written one
    paragraph a line)."""
    joiner = "\n" if lines else "\n\n"
    docs, current, size = [], [], 0
    for para in (text.split("\n") if lines else re.split(r"\n\s*\n", text)):
        para = para.strip("\n")
        if not para.strip():
            continue
        current.append(para)
        size += len(para)
        if size >= min_chars:
            docs.append(joiner.join(current))
            current, size = [], 0
    if current:
        docs.append(joiner.join(current))
    return docs


def has_blank_lines(text: str) -> bool:
    return re.search(r"\n[^\S\n]*\n", text.strip("\n")) is not None


class _TextExtractor(HTMLParser):
    BLOCKS = frozenset({"p", "div", "h1", "h2", "h3", "h4", "h5", "h6", "li", "pre", "dt", "dd", "tr", "br",
                        "section", "table", "blockquote"})

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip = 0

    def handle_starttag(self, tag, attrs):
        if tag in ("script", "style"):
            self.skip += 1
        elif tag in self.BLOCKS:
            self.parts.append("\n\n")

    def handle_endtag(self, tag):
        if tag in ("script", "style"):
            self.skip = max(0, self.skip - 1)
        elif tag in self.BLOCKS:
            self.parts.append("\n\n")

    def handle_data(self, data):
        if not self.skip:
            self.parts.append(data)


def html_text(html: str) -> str:
    """Readable text of an HTML page: tags dropped, block elements become paragraph breaks."""
    parser = _TextExtractor()
    parser.feed(html)
    text = "".join(parser.parts)
    paragraphs = (" ".join(p.split()) for p in re.split(r"\n\s*\n", text))
    return "\n\n".join(p for p in paragraphs if p)

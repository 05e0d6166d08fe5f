"""Calibration sources: one interface (`name`, `documents()`) over built-in text, local files and datasets.

Spec syntax (what `--dataset` takes), options after `?` as `key=value` joined by `&`:
- `builtin:prose`, `builtin:code`, `builtin:mix` (prose and code, sampled half and half);
- a local file: `notes.txt` (paragraphs, or lines in a file without blank lines, grouped into documents), `data.jsonl`, `data.json`, `data.parquet`
  (one document per record; option `column`, default `text`), e.g. `data.jsonl?column=content`;
- a `datasets` dataset: `hf:NAME[:CONFIG][?split=train&column=text&revision=REV]`, where NAME is a Hub id
  or a local folder (a folder of data files, or one written by `save_to_disk`). A local folder given
  without `hf:` is read the same way.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

from prism_load.errors import CalibrationError

from . import builtin
from .source_base import CalibrationSource, text_value

TEXT_SUFFIXES = (".txt", ".md", ".rst")
RECORD_SUFFIXES = (".jsonl", ".json", ".parquet")
SPEC_HELP = ("builtin:prose|code|mix, a .txt/.jsonl/.json/.parquet file, a dataset folder, "
             "or hf:NAME[:CONFIG][?split=S&column=C]")


class BuiltinSource(CalibrationSource):
    """Prose or code that ships with Python (see calibration.builtin)."""

    READERS = {"prose": builtin.prose_documents, "code": builtin.code_documents}

    def __init__(self, kind: str):
        self.kind, self.name = kind, f"builtin:{kind}"

    def documents(self) -> Iterator[str]:
        yield from self.READERS[self.kind]()


class MixSource(CalibrationSource):
    """Several sources drawn in fixed proportions of samples (not of bytes: 0.7 MB of prose next to
    10 MB of code would otherwise vanish). `documents()` yields every part's documents in turn."""

    def __init__(self, name: str, parts: list[tuple[CalibrationSource, float]]):
        self.name, self.parts = name, parts

    def documents(self) -> Iterator[str]:
        for source, _ in self.parts:
            yield from source.documents()


class TextFileSource(CalibrationSource):
    """A plain text file, cut into documents of whole paragraphs: separated by blank lines, or, in a file
    without any, one paragraph a line."""

    def __init__(self, path: Path):
        self.path, self.name = path, str(path)

    def documents(self) -> Iterator[str]:
        text = _read_text(self.path)
        yield from builtin.paragraph_documents(text, lines=not builtin.has_blank_lines(text))


class RecordFileSource(CalibrationSource):
    """JSON Lines, JSON (a list of records or an object of columns) or Parquet: one document per record."""

    def __init__(self, path: Path, column: str = "text"):
        self.path, self.column, self.name = path, column, str(path)

    def documents(self) -> Iterator[str]:
        suffix = self.path.suffix.lower()
        if suffix == ".parquet":
            values = self._parquet_column()
        elif suffix == ".jsonl":
            values = self._jsonl_column()
        else:
            values = self._json_column()
        for row, value in enumerate(values):
            yield text_value(value, f"{self.path}: row {row}, column {self.column!r}")

    def _missing(self, columns) -> CalibrationError:
        return CalibrationError(
            f"{self.path}: no column {self.column!r} (columns: {', '.join(sorted(columns)) or 'none'}); "
            f"choose one with ?column=NAME"
        )

    def _parquet_column(self):
        import pyarrow.parquet as pq

        try:
            schema = pq.read_schema(self.path)
        except Exception as e:  # pyarrow raises several types for a damaged file
            raise CalibrationError(f"{self.path}: not a readable Parquet file ({e})") from None
        if self.column not in schema.names:
            raise self._missing(schema.names)
        return pq.read_table(self.path, columns=[self.column]).column(self.column).to_pylist()

    def _jsonl_column(self):
        with open(self.path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                record = _json(line, f"{self.path}: line {line_no}")
                if not isinstance(record, dict):
                    raise CalibrationError(f"{self.path}: line {line_no} is not a JSON object")
                if self.column not in record:
                    raise self._missing(record)
                yield record[self.column]

    def _json_column(self):
        data = _json(_read_text(self.path), str(self.path))
        if isinstance(data, dict):  # columnar: {"text": [...], ...}
            if self.column not in data:
                raise self._missing(data)
            values = data[self.column]
            if not isinstance(values, list):
                raise CalibrationError(f"{self.path}: column {self.column!r} is not a list")
            return values
        if not isinstance(data, list):
            raise CalibrationError(f"{self.path}: expected a list of records or an object of columns")
        for row, record in enumerate(data):
            if not isinstance(record, dict):
                raise CalibrationError(f"{self.path}: record {row} is not a JSON object")
            if self.column not in record:
                raise self._missing(record)
        return [record[self.column] for record in data]


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CalibrationError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise CalibrationError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _json(text: str, where: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise CalibrationError(f"{where}: invalid JSON ({e.msg}, line {e.lineno} column {e.colno})") from None


def _options(spec: str, text: str, allowed: tuple[str, ...]) -> dict[str, str]:
    options = {}
    for item in filter(None, text.split("&")):
        key, sep, value = item.partition("=")
        if not sep or key not in allowed:
            raise CalibrationError(
                f"dataset {spec!r}: unknown option {item!r} (options: {', '.join(allowed) or 'none'})"
            )
        options[key] = value
    return options


def resolve(spec: str) -> CalibrationSource:
    """The calibration source a `--dataset` spec names (syntax in the module docstring)."""
    from .datasets_source import HubSource  # `datasets` is imported only when a dataset is read

    spec = spec.strip()
    if not spec:
        raise CalibrationError(f"empty dataset spec (expected {SPEC_HELP})")
    body, options_text = (spec, "") if os.path.exists(spec) else (spec.partition("?")[0], spec.partition("?")[2])
    if body.startswith("builtin:"):
        _options(spec, options_text, ())
        return builtin_source(body.removeprefix("builtin:"))
    if body.startswith("hf:"):
        name, _, config = body.removeprefix("hf:").partition(":")
        if not name:
            raise CalibrationError(f"dataset {spec!r}: no dataset name after 'hf:'")
        options = _options(spec, options_text, ("split", "column", "revision"))
        return HubSource(name, config or None, **options)
    path = Path(body).expanduser()
    if path.is_dir():
        return HubSource(str(path), None, **_options(spec, options_text, ("split", "column")))
    suffix = path.suffix.lower()
    if suffix not in TEXT_SUFFIXES + RECORD_SUFFIXES:
        if not path.exists():
            raise CalibrationError(f"dataset {spec!r}: no such file, and not a known dataset spec ({SPEC_HELP})")
        raise CalibrationError(f"{path}: unsupported file type {suffix!r} (supported: "
                               f"{', '.join(TEXT_SUFFIXES + RECORD_SUFFIXES)})")
    if not path.is_file():
        raise CalibrationError(f"{path}: no such file")
    if suffix in TEXT_SUFFIXES:
        _options(spec, options_text, ())
        return TextFileSource(path)
    return RecordFileSource(path, **_options(spec, options_text, ("column",)))


def builtin_source(kind: str) -> CalibrationSource:
    if kind == "mix":
        return MixSource("builtin:mix", [(BuiltinSource("prose"), 0.5), (BuiltinSource("code"), 0.5)])
    if kind not in BuiltinSource.READERS:
        raise CalibrationError(f"unknown built-in dataset 'builtin:{kind}' (built-in: prose, code, mix)")
    return BuiltinSource(kind)

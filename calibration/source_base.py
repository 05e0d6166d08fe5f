"""What every calibration source is: a named stream of text documents (`CalibrationSource`), and the check
that a record's value is text. Apart from sources.py so that the `datasets` source (datasets_source.py),
which sources.resolve imports lazily, does not import sources.py back."""

from __future__ import annotations

from collections.abc import Iterator

from prism_load.errors import CalibrationError


class CalibrationSource:
    """A named stream of text documents. Subclasses implement `documents()`."""

    name: str = "source"

    def documents(self) -> Iterator[str]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


def text_value(value, where: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise CalibrationError(f"{where}: expected text, found {type(value).__name__}")
    return value

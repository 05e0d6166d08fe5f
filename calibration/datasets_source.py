"""A `datasets` dataset as a calibration source: a Hub id (cached, or downloaded when online) or a local
folder (data files, or a folder written by `save_to_disk`). `datasets` is imported only here, lazily."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from prism_load.errors import CalibrationError

from .source_base import CalibrationSource, text_value


class HubSource(CalibrationSource):
    def __init__(self, path: str, config: str | None = None, split: str = "train", column: str = "text",
                 revision: str | None = None):
        self.path, self.config, self.split, self.column, self.revision = path, config, split, column, revision
        self.name = f"hf:{path}" + (f":{config}" if config else "") + f"?split={split}&column={column}"

    def documents(self) -> Iterator[str]:
        dataset = self._load()
        if self.column not in dataset.column_names:
            raise CalibrationError(
                f"{self.name}: no column {self.column!r} in split {self.split!r} "
                f"(columns: {', '.join(dataset.column_names) or 'none'}); choose one with column=NAME"
            )
        row = 0
        for batch in dataset.select_columns([self.column]).iter(batch_size=1024):
            for value in batch[self.column]:
                yield text_value(value, f"{self.name}: row {row}")
                row += 1

    def _load(self):
        try:
            import datasets
        except ImportError:
            raise CalibrationError(f"{self.name}: the 'datasets' package is not installed") from None
        folder = Path(self.path).expanduser()
        try:
            if (folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file():
                dataset = datasets.load_from_disk(str(folder))
                if isinstance(dataset, datasets.DatasetDict):
                    if self.split not in dataset:
                        raise CalibrationError(
                            f"{self.name}: no split {self.split!r} (splits: {', '.join(dataset)})"
                        )
                    dataset = dataset[self.split]
                return dataset
            return datasets.load_dataset(self.path, self.config, split=self.split, revision=self.revision)
        except CalibrationError:
            raise
        except Exception as e:  # datasets raises ConnectionError, FileNotFoundError, ValueError, ... by cause
            raise CalibrationError(f"{self.name}: cannot load the dataset ({type(e).__name__}: "
                                   f"{str(e).splitlines()[0] if str(e) else ''}){_offline_hint()}") from None


def _offline_hint() -> str:
    offline = any(os.environ.get(k, "").upper() in ("1", "ON", "YES", "TRUE")
                  for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))
    return "; offline mode is on, so only cached datasets and local folders can be read" if offline else ""

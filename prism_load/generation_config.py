"""The checkpoint's generation_config.json: the defaults `generate` uses where the caller names nothing.

Follows transformers' GenerationConfig for the fields prism uses (sampling switches, eos and pad ids, the
length of a continuation); other fields are ignored, as a config.json's unknown keys are.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace
from pathlib import Path

from .errors import ConfigError

FILE_NAME = "generation_config.json"


@dataclass(frozen=True)
class GenerationConfig:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    max_new_tokens: int | None = None
    eos_token_id: tuple[int, ...] | None = None  # None: the model config's eos ids
    pad_token_id: int | None = None

    @classmethod
    def from_dict(cls, data: dict, origin: str = FILE_NAME) -> GenerationConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"{origin}: expected a JSON object, got {type(data).__name__}")
        try:
            eos = data.get("eos_token_id")
            return cls(
                do_sample=bool(data.get("do_sample", False)),
                temperature=float(data.get("temperature") if data.get("temperature") is not None else 1.0),
                top_k=None if data.get("top_k") is None else int(data["top_k"]),
                top_p=None if data.get("top_p") is None else float(data["top_p"]),
                max_new_tokens=None if data.get("max_new_tokens") is None else int(data["max_new_tokens"]),
                eos_token_id=None if eos is None else tuple(int(x) for x in ([eos] if isinstance(eos, int) else eos)),
                pad_token_id=None if data.get("pad_token_id") is None else int(data["pad_token_id"]),
            )
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{origin}: a field has a bad value ({e})") from None

    @classmethod
    def from_bytes(cls, data: bytes, origin: str = FILE_NAME) -> GenerationConfig:
        try:
            parsed = json.loads(data)
        except ValueError as e:
            raise ConfigError(f"{origin}: not valid JSON ({e})") from None
        return cls.from_dict(parsed, origin)

    @classmethod
    def from_folder(cls, folder: Path) -> GenerationConfig:
        """The folder's generation_config.json, or the defaults where it has none."""
        path = Path(folder) / FILE_NAME
        return cls.from_bytes(path.read_bytes(), str(path)) if path.is_file() else cls()

    def updated(self, **overrides) -> GenerationConfig:
        """A copy with every override that is not None (the caller's arguments win over the file)."""
        known = {f.name for f in fields(self)}
        unknown = set(overrides) - known
        if unknown:
            raise TypeError(f"unknown generation options {sorted(unknown)}")
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

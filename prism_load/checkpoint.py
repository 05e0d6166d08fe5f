"""Lazy reader for Hugging Face checkpoint folders (config.json + single or sharded safetensors).

Tensors are memory-mapped and read one at a time, so later stages can stream models far larger than RAM.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from .dequant import FP8_DTYPES, dequantize_fp8, dequantize_fp8_scaled, fp8_block, scale_inv_name
from .errors import CheckpointError, ConfigError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def config_sha256(config: dict) -> str:
    """Identity of a model's config.json (a profile records it; compress and the runtime compare it)."""
    import hashlib

    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def read_config(folder: Path) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path}: no config.json in the checkpoint folder")
    return read_config_file(path)


def read_config_file(path: Path) -> dict:
    """A config JSON file that must hold an object (any file name: `prism plan` takes bare configs)."""
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return config


class Checkpoint:
    """A checkpoint folder: its config, its tensor names and where each lives, read on demand."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CheckpointError(f"{self.folder}: not a folder")
        self.config = read_config(self.folder)
        self.weight_map = self._weight_map()
        self._handles: dict[str, object] = {}

    def _weight_map(self) -> dict[str, str]:
        index = self.folder / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: unreadable index ({e})") from None
            for name, shard in weight_map.items():
                if Path(shard).name != shard:
                    raise CheckpointError(f"{index}: shard {shard!r} of {name} leaves the checkpoint folder")
                if not (self.folder / shard).is_file():
                    raise CheckpointError(f"{index}: shard {shard} (holding {name}) is missing")
            return dict(weight_map)
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{self.folder}: no *.safetensors files and no {INDEX_NAME}")
        weight_map = {}
        for f in files:
            with safe_open(f, framework="pt") as h:
                for name in h.keys():
                    weight_map[name] = f.name
        return weight_map

    def _handle(self, shard: str):
        h = self._handles.get(shard)
        if h is None:
            try:
                h = safe_open(self.folder / shard, framework="pt")
            except Exception as e:  # safetensors raises its own error types for damaged headers
                raise CheckpointError(f"{self.folder / shard}: unreadable safetensors file ({e})") from None
            self._handles[shard] = h
        return h

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def names(self) -> list[str]:
        return list(self.weight_map)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(self._shard(name)).get_slice(name).get_shape())

    def _shard(self, name: str) -> str:
        try:
            return self.weight_map[name]
        except KeyError:
            where = INDEX_NAME if (self.folder / INDEX_NAME).is_file() else "the *.safetensors files"
            raise CheckpointError(f"tensor {name} is missing from {self.folder / where}") from None

    def get(self, name: str, dtype: torch.dtype | None = None, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """Read one tensor (zero-copy when no cast is needed); optionally check its shape.

        FP8 weights come back dequantised, in fp32 when dtype is None, whatever the family: block FP8 with a
        `{name}_scale_inv` sibling (DeepSeek-V3, Qwen3 FP8) or scaled FP8 with `{name}_scale` (compressed-
        tensors). An FP8 tensor is never cast without its scales; one without is an error, not a wrong weight."""
        shard = self._shard(name)
        tensor = self._handle(shard).get_tensor(name)
        if shape is not None and tuple(tensor.shape) != tuple(shape):
            raise CheckpointError(
                f"tensor {name} in {self.folder / shard} has shape {list(tensor.shape)}, expected {list(shape)}"
            )
        if tensor.dtype in FP8_DTYPES:
            tensor = self._dequantize_fp8(name, tensor)
        if dtype is not None and tensor.dtype != dtype and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        return tensor

    def _dequantize_fp8(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Block FP8 (`{name}_scale_inv`, DeepSeek / Qwen) or scaled FP8 (`{name}_scale`, compressed-tensors)."""
        inverse, direct = scale_inv_name(name), f"{name}_scale"
        if inverse in self:
            return dequantize_fp8(tensor, self.get(inverse), fp8_block(self.config), name)
        if direct in self:
            return dequantize_fp8_scaled(tensor, self.get(direct), name)
        raise CheckpointError(
            f"tensor {name} in {self.folder / self._shard(name)} is {tensor.dtype} but the checkpoint has neither "
            f"{inverse} (block scales) nor {direct} (tensor or row scales): prism never reads FP8 without its scales"
        )

    def tokenizer_path(self) -> Path | None:
        path = self.folder / "tokenizer.json"
        return path if path.is_file() else None

    def close(self) -> None:
        self._handles.clear()

"""Rotary position embeddings: the inverse frequencies of each rope_type, as transformers computes them.

Reference: transformers `modeling_rope_utils` (default, linear, llama3, yarn). Both the v5 `rope_parameters`
field and the older `rope_theta` + `rope_scaling` pair are read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..errors import ConfigError

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass
class RopeConfig:
    theta: float
    dim: int
    rope_type: str = "default"
    params: dict = field(default_factory=dict)
    max_position_embeddings: int = 4096

    @classmethod
    def from_hf(cls, config: dict, dim: int, default_theta: float = 10000.0) -> RopeConfig:
        params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
        theta = params.get("rope_theta", config.get("rope_theta", default_theta))
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(
                f"config.json: rope type {rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
            )
        max_pos = int(config.get("max_position_embeddings", 4096))
        if rope_type in ("llama3", "yarn"):
            params.setdefault(
                "original_max_position_embeddings", config.get("original_max_position_embeddings", max_pos)
            )
        return cls(theta=float(theta), dim=dim, rope_type=rope_type, params=params, max_position_embeddings=max_pos)

    def inv_freq(self) -> tuple[torch.Tensor, float]:
        """Returns (inv_freq [dim/2], attention_scaling) for this rope type."""
        return _INIT[self.rope_type](self)


def _default(cfg: RopeConfig) -> tuple[torch.Tensor, float]:
    inv = 1.0 / (cfg.theta ** (torch.arange(0, cfg.dim, 2, dtype=torch.int64).float() / cfg.dim))
    return inv, 1.0


def _linear(cfg: RopeConfig) -> tuple[torch.Tensor, float]:
    inv, scale = _default(cfg)
    return inv / float(cfg.params["factor"]), scale


def _llama3(cfg: RopeConfig) -> tuple[torch.Tensor, float]:
    inv, _ = _default(cfg)
    p = cfg.params
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_len = p["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv
    inv_l = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * inv_l / factor + smooth * inv_l
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, inv_l), 1.0


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature (Peng et al. 2023), shared with DeepSeek's softmax-scale correction."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(cfg: RopeConfig) -> tuple[torch.Tensor, float]:
    p, dim, base = cfg.params, cfg.dim, cfg.theta
    original = p["original_max_position_embeddings"]
    factor = p.get("factor") or cfg.max_position_embeddings / original
    attention = p.get("attention_factor")
    mscale, mscale_all = p.get("mscale"), p.get("mscale_all_dim")
    if attention is None:
        attention = (
            yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all)
            if mscale and mscale_all
            else yarn_mscale(factor)
        )
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp
    inv = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv, float(attention)


_INIT = {"default": _default, "linear": _linear, "llama3": _llama3, "yarn": _yarn}


class Rotary(torch.nn.Module):
    """cos/sin tables for positions, computed in fp32 exactly as transformers does (concatenated halves)."""

    def __init__(self, cfg: RopeConfig):
        super().__init__()
        with torch.device("cpu"):  # real values even inside a meta-device skeleton (meta ops here would run
            inv, self.attention_scaling = cfg.inv_freq()  # torch's Python reference kernels, importing sympy)
        self.register_buffer("inv_freq", inv, persistent=False)
        self._tables: dict = {}  # dtype -> (cos, sin) of positions 0 .. n-1 (span)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[..., None].float() * self.inv_freq.to(positions.device)  # [T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(dtype), (emb.sin() * self.attention_scaling).to(dtype)

    def span(self, start: int, length: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [length, D] of positions start .. start + length - 1: views of tables made by forward() for
        the positions 0 .. n-1 (n grown by doubling as positions are asked for), the same bits as forward() on
        those positions (its ops are elementwise; tested). Why: a decode step's rotary was about ten torch ops,
        each run cold after the layers. The tables take 8 bytes per
        position and rotary dimension (up to twice the positions used): per position 1 / (layers x KV heads)
        of an fp32 KV cache's bytes."""
        end = start + length
        table = self._tables.get(dtype)
        if table is None or table[0].shape[0] < end or table[0].device != self.inv_freq.device:
            n = max(256, 1 << (end - 1).bit_length())
            table = self._tables[dtype] = self(torch.arange(n, device=self.inv_freq.device), dtype)
        return table[0][start:end], table[1][start:end]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, T, D]; cos/sin [T, D] (half-split layout, as Llama/Mixtral/Qwen)."""
    return x * cos + rotate_half(x) * sin

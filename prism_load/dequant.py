"""Dequantisation of the quantised layouts published checkpoints ship: block-wise FP8 and MXFP4.

- FP8 (DeepSeek-V3 and others): e4m3 weights `W8 [.., R, C]` plus `weight_scale_inv [.., ceil(R/bm), ceil(C/bn)]`,
  one fp32 scale per (bm x bn) block, `W = W8 * scale_inv[i // bm, j // bn]`; edge blocks are partial.
  Reference: transformers `integrations/finegrained_fp8._dequantize_fp8_weight`.
- MXFP4 (GPT-OSS experts, OCP Microscaling spec): `blocks U8 [.., G, 16]` hold 32 e2m1 values per group
  (low nibble = even element, high nibble = odd), `scales U8 [.., G]` one e8m0 exponent per group,
  `W[.., 32g + k] = FP4[nibble] * 2^(scale - 127)`. Reference: transformers `integrations/mxfp4._convert_moe_packed_tensors`.

Both return fp32 (exact: every e4m3 / e2m1 value times a power-of-two or fp32 scale is an fp32 number).
"""

from __future__ import annotations

import math

import torch

from .errors import CheckpointError, ConfigError

FP8_DEFAULT_BLOCK = (128, 128)
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)

# e2m1 values by nibble: sign bit 3, exponent bits 2..1 (bias 1), mantissa bit 0.
FP4_E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
MXFP4_GROUP = 32


def scale_inv_name(weight_name: str) -> str:
    """`x.weight` -> `x.weight_scale_inv` (the Hub FP8 convention); any other name gets `_scale_inv` appended."""
    return weight_name + "_scale_inv"


def fp8_block(config: dict) -> tuple[int, int] | None:
    """Block shape of FP8 weight scales from quantization_config (DeepSeek-V3 publishes [128, 128])."""
    qc = config.get("quantization_config") or {}
    if "weight_block_size" not in qc:
        return FP8_DEFAULT_BLOCK if qc.get("quant_method") == "fp8" else None
    block = qc["weight_block_size"]
    if block is None:
        return None
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(x, int) and x > 0 for x in block)):
        raise ConfigError(f"config.json: quantization_config.weight_block_size {block!r} is not [rows, cols]")
    return (block[0], block[1])


def dequantize_fp8(
    weight: torch.Tensor,
    scale_inv: torch.Tensor,
    block: tuple[int, int] | None = FP8_DEFAULT_BLOCK,
    name: str = "weight",
) -> torch.Tensor:
    """FP8 weight [.., R, C] times its per-block inverse scales -> fp32 [.., R, C].

    `block=None` (or a one-element scale) means one scale for the whole tensor.
    """
    if weight.dim() < 2:
        raise CheckpointError(f"tensor {name}: FP8 weight must be at least 2-D, got shape {list(weight.shape)}")
    w = weight.to(torch.float32)
    s = _scale_to_fp32(scale_inv)
    if block is None or s.numel() == 1:
        if s.numel() != 1:
            raise CheckpointError(f"tensor {name}: per-tensor FP8 scale must have one element, got {list(s.shape)}")
        return w * s.reshape(())
    rows, cols = w.shape[-2:]
    bm, bn = block
    grid = (*w.shape[:-2], math.ceil(rows / bm), math.ceil(cols / bn))
    if tuple(s.shape) != grid:
        raise CheckpointError(
            f"tensor {scale_inv_name(name)} has shape {list(s.shape)}, expected {list(grid)} "
            f"for weight {list(w.shape)} in {bm}x{bn} blocks"
        )
    s = s.repeat_interleave(bm, dim=-2)[..., :rows, :].repeat_interleave(bn, dim=-1)[..., :cols]
    return w.mul_(s)


def dequantize_fp8_scaled(weight: torch.Tensor, scale: torch.Tensor, name: str = "weight") -> torch.Tensor:
    """FP8 weight [.., R, C] times its `weight_scale` (the compressed-tensors "float-quantized" layout, as in
    the FP8 Mixtral / Llama checkpoints): one scale for the tensor ([] or [1]) or one per output row
    ([.., R, 1]) -> fp32 [.., R, C]. `input_scale` siblings are activation scales and are not needed here."""
    s = _scale_to_fp32(scale)
    if s.numel() != 1 and tuple(s.shape) != (*weight.shape[:-1], 1):
        raise CheckpointError(
            f"tensor {name}_scale has shape {list(s.shape)}: expected one scale, or {[*weight.shape[:-1], 1]} "
            f"(one per row) for weight {list(weight.shape)}"
        )
    return weight.to(torch.float32).mul_(s.reshape(()) if s.numel() == 1 else s)


def _scale_to_fp32(scale: torch.Tensor) -> torch.Tensor:
    if scale.dtype == torch.uint8:  # raw e8m0 exponents (MXFP8-style checkpoints)
        return torch.exp2(scale.to(torch.float32) - 127.0)
    return scale.to(torch.float32)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, name: str = "weight") -> torch.Tensor:
    """MXFP4 blocks U8 [.., G, 16] + scales U8 [.., G] -> fp32 [.., G * 32] (no transpose: rows stay rows)."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise CheckpointError(
            f"tensor {name}_blocks / {name}_scales: expected U8, got {blocks.dtype} / {scales.dtype}"
        )
    if blocks.shape[-1] != MXFP4_GROUP // 2 or tuple(blocks.shape[:-1]) != tuple(scales.shape):
        raise CheckpointError(
            f"tensor {name}_blocks has shape {list(blocks.shape)} and {name}_scales {list(scales.shape)}: "
            f"expected [.., G, {MXFP4_GROUP // 2}] and [.., G]"
        )
    lut = torch.tensor(FP4_E2M1_VALUES, dtype=torch.float32)
    values = torch.stack([lut[(blocks & 0x0F).long()], lut[(blocks >> 4).long()]], dim=-1)  # [.., G, 16, 2]
    values = values.reshape(*blocks.shape[:-1], MXFP4_GROUP)  # [.., G, 32]
    values = torch.ldexp(values, scales.to(torch.int32).unsqueeze(-1) - 127)
    return values.reshape(*blocks.shape[:-2], -1)

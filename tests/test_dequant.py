"""FP8 block and MXFP4 dequantisation against independent per-element decodes of the raw bits, and against
the transformers functions they must match."""

import math

import numpy as np
import pytest
import torch
from numerics import e2m1_reference, e4m3_reference

from prism_load.dequant import dequantize_fp8, dequantize_fp8_scaled, dequantize_mxfp4
from prism_load.errors import CheckpointError


def random_e4m3(shape, generator) -> torch.Tensor:
    bits = torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8)
    bits[(bits & 0x7F) == 0x7F] = 0x3C  # drop the NaN codes
    return bits


@pytest.mark.parametrize(
    "shape,block",
    [((300, 200), (128, 128)), ((256, 128), (128, 128)), ((3, 37, 70), (16, 32)), ((5, 129), (128, 128))],
)
def test_fp8_block_dequant_matches_per_element_reference(shape, block):
    g = torch.Generator().manual_seed(1)
    bits = random_e4m3(shape, g)
    weight = bits.view(torch.float8_e4m3fn)
    rows, cols = shape[-2:]
    grid = (*shape[:-2], math.ceil(rows / block[0]), math.ceil(cols / block[1]))
    scale_inv = torch.rand(grid, generator=g) * 0.01 + 1e-4

    ours = dequantize_fp8(weight, scale_inv, block)

    values = e4m3_reference(bits.numpy())
    i = np.arange(rows)[:, None] // block[0]
    j = np.arange(cols)[None, :] // block[1]
    expected = values * scale_inv.double().numpy()[..., i, j]
    assert ours.dtype == torch.float32 and ours.shape == shape
    np.testing.assert_allclose(ours.double().numpy(), expected, rtol=1e-6, atol=0)


def test_fp8_dequant_matches_transformers_reference():
    """transformers' `_dequantize_fp8_weight` (the semantics of its FP8 linear) on a shape with partial blocks."""
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    g = torch.Generator().manual_seed(2)
    weight = random_e4m3((2, 300, 200), g).view(torch.float8_e4m3fn)
    scale_inv = torch.rand(2, 3, 2, generator=g) + 0.5
    theirs = _dequantize_fp8_weight(weight, scale_inv, [128, 128], torch.float32)
    assert torch.equal(dequantize_fp8(weight, scale_inv, (128, 128)), theirs)


def test_fp8_per_tensor_and_e8m0_scales():
    g = torch.Generator().manual_seed(3)
    bits = random_e4m3((40, 24), g)
    weight = bits.view(torch.float8_e4m3fn)
    values = torch.from_numpy(e4m3_reference(bits.numpy())).float()
    assert torch.equal(dequantize_fp8(weight, torch.tensor(0.25), None), values * 0.25)
    assert torch.equal(dequantize_fp8(weight, torch.tensor([0.5]), (128, 128)), values * 0.5)
    exponents = torch.tensor([[125, 130]], dtype=torch.uint8)  # 2^-2, 2^3 over a [1, 2] grid of 128 x 16 blocks
    expected = values * torch.tensor([0.25] * 16 + [8.0] * 8)
    assert torch.equal(dequantize_fp8(weight, exponents, (128, 16)), expected)


def test_fp8_wrong_scale_grid_names_the_tensor():
    weight = torch.zeros(300, 200).to(torch.float8_e4m3fn)
    with pytest.raises(CheckpointError, match=r"q_b_proj\.weight_scale_inv.*expected \[3, 2\]"):
        dequantize_fp8(weight, torch.ones(2, 2), (128, 128), name="model.layers.0.self_attn.q_b_proj.weight")


def test_mxfp4_matches_per_element_reference():
    g = torch.Generator().manual_seed(4)
    blocks = torch.randint(0, 256, (3, 5, 4, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(100, 140, (3, 5, 4), generator=g, dtype=torch.uint8)
    ours = dequantize_mxfp4(blocks, scales)
    assert ours.shape == (3, 5, 128) and ours.dtype == torch.float32
    b, s = blocks.numpy(), scales.numpy()
    expected = np.empty((3, 5, 128))
    for e, r, grp, k in np.ndindex(*b.shape):
        byte, scale = int(b[e, r, grp, k]), 2.0 ** (int(s[e, r, grp]) - 127)
        expected[e, r, 32 * grp + 2 * k] = e2m1_reference(byte & 0xF) * scale  # low nibble: even element
        expected[e, r, 32 * grp + 2 * k + 1] = e2m1_reference(byte >> 4) * scale
    np.testing.assert_array_equal(ours.double().numpy(), expected)


def test_mxfp4_matches_transformers_layout():
    """transformers returns the in-memory layout [E, cols, rows] (x @ W); ours keeps rows: same numbers, transposed."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    g = torch.Generator().manual_seed(5)
    blocks = torch.randint(0, 256, (2, 6, 3, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(118, 134, (2, 6, 3), generator=g, dtype=torch.uint8)
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # [2, 96, 6]
    assert torch.equal(dequantize_mxfp4(blocks, scales).transpose(1, 2), theirs)


def test_mxfp4_rejects_bad_shapes_and_dtypes():
    blocks = torch.zeros(2, 3, 16, dtype=torch.uint8)
    with pytest.raises(CheckpointError, match="gate_up_proj_scales"):
        dequantize_mxfp4(blocks, torch.zeros(2, 4, dtype=torch.uint8), name="gate_up_proj")
    with pytest.raises(CheckpointError, match="expected U8"):
        dequantize_mxfp4(blocks.float(), torch.zeros(2, 3, dtype=torch.uint8))


def test_fp8_scaled_per_tensor_and_per_row_against_per_element_decode():
    g = torch.Generator().manual_seed(4)
    bits = random_e4m3((6, 10), g)
    values = torch.from_numpy(e4m3_reference(bits.numpy())).float()
    weight = bits.view(torch.float8_e4m3fn)
    assert torch.equal(dequantize_fp8_scaled(weight, torch.tensor([0.5])), values * 0.5)
    rows = torch.rand(6, 1, generator=g)
    assert torch.equal(dequantize_fp8_scaled(weight, rows), values * rows)
    with pytest.raises(CheckpointError, match=r"q_proj.weight_scale has shape \[1, 10\]: expected one scale, or \[6, 1\]"):
        dequantize_fp8_scaled(weight, torch.ones(1, 10), name="q_proj.weight")

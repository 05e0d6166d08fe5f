"""prism_load/models/rope.py: Rotary.span (a decode step's cos/sin, views of tables grown as positions are asked
for) gives the bits forward() gives for the same positions, for every rope type, in fp32 and bf16."""

from __future__ import annotations

import pytest
import torch

from prism_load.models.rope import RopeConfig, Rotary

CONFIGS = {
    "default": RopeConfig(10000.0, 128),
    "default, odd width": RopeConfig(1e6, 72),
    "linear": RopeConfig(10000.0, 96, "linear", {"factor": 2.0}),
    "llama3": RopeConfig(500000.0, 128, "llama3", {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                  "original_max_position_embeddings": 8192}),
    "yarn": RopeConfig(10000.0, 64, "yarn", {"factor": 40.0, "original_max_position_embeddings": 4096,
                                             "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
                       163840),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_span_is_forward_on_the_same_positions(name, dtype):
    rotary = Rotary(CONFIGS[name])
    # decode steps one position at a time past the first table (256) and its doubling, then a prefill's span
    for start, length in [(0, 5), *((p, 1) for p in range(250, 600, 7)), (1000, 64), (3, 1)]:
        cos, sin = rotary.span(start, length, dtype)
        want_cos, want_sin = rotary(torch.arange(start, start + length), dtype)
        assert cos.dtype is dtype and cos.shape == want_cos.shape
        assert torch.equal(cos, want_cos) and torch.equal(sin, want_sin), (start, length)
    assert rotary._tables[dtype][0].shape[0] == 2048  # grown by doubling to hold position 1063


def test_span_keeps_a_table_per_dtype_and_reuses_it():
    """A table per dtype, each forward()'s cast of the same values; a later step of a covered position makes
    nothing new (a view of the same table)."""
    rotary = Rotary(CONFIGS["default"])
    a, _ = rotary.span(10, 1, torch.float32)
    b, _ = rotary.span(10, 1, torch.bfloat16)
    assert a.dtype is torch.float32 and b.dtype is torch.bfloat16 and torch.equal(a.bfloat16(), b)
    assert rotary.span(10, 1, torch.float32)[0].data_ptr() == a.data_ptr()  # the same table, no new work

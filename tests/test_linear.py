"""models/linear.py: bf16 products of many rows run in fp32 on CPUs without bf16 matrix instructions."""

import pytest
import torch
import torch.nn.functional as F

from prism_load.models import linear as lin


@pytest.mark.parametrize("has_bf16_matmul", [False, True])
def test_bf16_prefill_rows_run_in_fp32_only_without_bf16_matmul(monkeypatch, has_bf16_matmul):
    monkeypatch.setattr(lin, "cpu_has_bf16_matmul", lambda: has_bf16_matmul)
    w, b = torch.randn(24, 40).bfloat16(), torch.randn(24).bfloat16()
    many, one = torch.randn(2, lin.UPCAST_ROWS // 2, 40).bfloat16(), torch.randn(1, 40).bfloat16()
    upcast = F.linear(many.float(), w.float(), b.float()).to(torch.bfloat16)
    assert torch.equal(lin.linear(many, w, b), F.linear(many, w, b) if has_bf16_matmul else upcast)
    assert torch.equal(lin.linear(one, w, b), F.linear(one, w, b))  # decode: bf16 streams half the bytes
    x32 = torch.randn(16, 40)
    assert torch.equal(lin.linear(x32, w.float()), F.linear(x32, w.float()))  # fp32 untouched
    layer = lin.Linear(40, 24).to(torch.bfloat16)
    assert torch.equal(layer(many), lin.linear(many, layer.weight, layer.bias))

"""The lock-free decode kernels: compiled with TorchScript, bit-identical to their plain-Python bodies and to an
independent per-element decode; the container store's straight-into-slab decode equals decode + pack_into."""

from __future__ import annotations

import pytest
import torch
from runtime_fixtures import write_runtime_container

from prism_load import kernels
from prism_load.container.codecs import pack_bits
from prism_load.runtime.container_store import ContainerStore
from prism_load.runtime.stores import load, pack_into, packed_nbytes, weights_tensors

SHAPES = [(24, 48, 16), (7, 13, 4), (5, 101, 256), (3, 9, 8), (6, 33, 16), (2, 40, 40)]  # rows, cols, group


def reference(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g: int) -> torch.Tensor:
    """(q - zero) * scale per group, with every group's pair repeated per column (fp32)."""
    cols = q.shape[1]
    s = scales.float().repeat_interleave(g, 1)[:, :cols]
    z = zeros.float().repeat_interleave(g, 1)[:, :cols]
    return (q.float() - z) * s


def test_kernels_are_compiled():
    """The point of the module: TorchScript bodies run with the interpreter lock released."""
    assert kernels.SCRIPTED, "TorchScript could not compile prism_load/kernels.py: decodes would hold the lock"
    for name in ("unpack_codes_into", "apply_groups", "dequantize_into", "decode_int_expert"):
        assert isinstance(getattr(kernels, name), torch.jit.ScriptFunction)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("rows, cols, g", SHAPES)
def test_dequantize_into_matches_python_and_reference(bits, rows, cols, g):
    gen = torch.Generator().manual_seed(bits * 1000 + cols)
    q = torch.randint(0, 2**bits, (rows, cols), dtype=torch.uint8, generator=gen)
    groups = -(-cols // g)
    scales = (torch.rand(rows, groups, generator=gen) / 7).half()
    zeros = (torch.rand(rows, groups, generator=gen) * 2**bits).half()
    packed = pack_bits(q, bits)
    ref = reference(q, scales, zeros, g)
    scripted = torch.full((rows, cols), float("nan"))  # every element must be written
    kernels.dequantize_into(packed, bits, cols, scales, zeros, g, scripted)
    python = torch.full((rows, cols), float("nan"))
    kernels.python("unpack_codes_into")(packed, bits, cols, python)
    kernels.python("apply_groups")(python, scales, zeros, g)
    assert torch.equal(scripted, ref) and torch.equal(python, ref)
    codes = torch.zeros(rows, cols, dtype=torch.uint8)
    kernels.unpack_codes_into(packed, bits, cols, codes)
    assert torch.equal(codes, q)


@pytest.mark.parametrize("mix", ["int", "mixed"])
def test_store_decode_into_equals_decode_then_pack(tmp_path, mix):
    """Experts of three int projections take the one-call kernel; the rest decode, then are copied in; either
    way the slab holds the generic decode's bytes, laid out as pack_into lays them."""
    from prism_load.container.reader import Container, model_args

    mixes = {"int": [dict(kind="int", bits=3, group_size=8), dict(kind="int", bits=5, group_size=16)],
             "mixed": [dict(kind="int", bits=4, group_size=16), dict(kind="int", bits=2, group_size=8),
                       dict(kind="int", bits=6, group_size=32), dict(kind="bf16")]}  # every 4th expert all int
    path = write_runtime_container(tmp_path / "m.prism", mix=mixes[mix])
    c = Container(path)
    store = ContainerStore(c, model_args(c.config)[1])
    direct = 0
    for i in store.moe_layers:
        for e in range(store.num_experts):
            ref = load(store, i, e)
            slab = torch.full((packed_nbytes(ref),), 255, dtype=torch.uint8)
            taken = []
            got = store.decode_into(i, e, store.fetch(i, e), lambda n, taken=taken, slab=slab: taken.append(n) or slab)
            assert taken == [packed_nbytes(ref)]
            expected = torch.full_like(slab, 255)
            pack_into(expected, ref)
            assert torch.equal(slab, expected)  # the same bytes at the same offsets, padding untouched
            for a, b in zip(weights_tensors(got), weights_tensors(ref)):
                assert torch.equal(a, b) and a.untyped_storage().data_ptr() == slab.untyped_storage().data_ptr()
            direct += store._int_plans[(i, e)] is not None
    total = len(store.moe_layers) * store.num_experts
    assert direct == total if mix == "int" else 0 < direct < total


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_decode_stays_on_the_inputs_device(bits):
    """Every temporary is made on the inputs' device (the CUDA path decodes on the GPU): on the meta device a
    CPU temporary would fail the ops that mix it with meta tensors."""
    from prism_load.container.codecs import dequantize_int, unpack_bits
    from prism_load.container.format import Encoding

    rows, cols, g = 6, 33, 16
    enc = Encoding("int", (rows, cols), bits=bits, group_size=g)
    stored = {k: torch.empty(shape, dtype=dtype, device="meta") for k, (dtype, shape) in enc.tensor_specs().items()}
    assert dequantize_int(enc, stored, torch.float32).device.type == "meta"
    assert unpack_bits(stored["qweight"], bits, cols).device.type == "meta"

"""Encodings: exact stored layouts and sizes, bit-exact decode, and the error ordering of the encoders."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prism_convert.candidates import TensorStats, weighted_error
from prism_convert.encode import encode
from prism_convert.lowrank import whitened_svd
from prism_convert.quantize import rtn
from prism_load.codecs import INT_BITS, Encoding, check_tensors, decode, pack_bits, unpack_bits
from prism_load.errors import ContainerError, EncodingError


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from(INT_BITS), rows=st.integers(1, 6), cols=st.integers(1, 70), seed=st.integers(0, 10**6))
def test_pack_unpack_round_trip(bits, rows, cols, seed):
    q = torch.randint(0, 2**bits, (rows, cols), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    packed = pack_bits(q, bits)
    assert packed.shape == (rows, math.ceil(cols * bits / 8))  # dense: only the row end is padded
    assert torch.equal(unpack_bits(packed, bits, cols), q)


def test_pack_bits_golden_bytes():
    # 3-bit values 1..5 little-endian: 001 010 011 100 101 -> bits 100 010 110 001 101 (LSB first)
    q = torch.tensor([[1, 2, 3, 4, 5]], dtype=torch.uint8)
    assert pack_bits(q, 3).tolist() == [[0b11010001, 0b01011000]]


@pytest.fixture
def problem():
    gen = torch.Generator().manual_seed(0)
    out, inp = 96, 200  # in-features not a multiple of the group size
    w = torch.randn(out, inp, generator=gen) * 0.05
    mix = torch.randn(inp, inp, generator=gen) * 0.1 + torch.diag(torch.rand(inp, generator=gen) * 3)
    x = torch.randn(2048, inp, generator=gen) @ mix
    x[:, 7] = 0.0  # a dead channel
    return w, (x.T @ x / len(x)).double()


ALL_KINDS = [
    *[Encoding("int", (96, 200), bits=b, group_size=64) for b in INT_BITS],
    Encoding("lowrank", (96, 200), rank=12, factor_bits=8, group_size=64),
    Encoding("lowrank", (96, 200), rank=12, factor_bits=16),
    Encoding("int+lowrank", (96, 200), bits=2, rank=8, factor_bits=4, group_size=64),
    Encoding("bf16", (96, 200)), Encoding("fp16", (96, 200)), Encoding("fp32", (96, 200)),
]


@pytest.mark.parametrize("enc", ALL_KINDS, ids=lambda e: e.label() + f"-fb{e.factor_bits}")
def test_round_trip_specs_sizes_and_determinism(problem, enc):
    w, h = problem
    stored = encode(w, enc, hessian=h)
    check_tensors(enc, stored, "t")
    assert sum(t.numel() * t.element_size() for t in stored.values()) == enc.nbytes()
    again = encode(w, enc, hessian=h)
    assert all(torch.equal(stored[k], again[k]) for k in stored)
    assert torch.equal(decode(enc, stored), decode(enc, again))
    assert decode(enc, stored).shape == w.shape


@pytest.mark.parametrize("bits", INT_BITS)
def test_rtn_error_within_half_a_step(problem, bits):
    w, _ = problem
    enc = Encoding("int", w.shape, bits=bits, group_size=64)
    stored = rtn(w, enc)
    step = stored["scales"].float().repeat_interleave(64, dim=1)[:, : w.shape[1]]
    err = (decode(enc, stored) - w).abs()
    assert (err <= step / 2 + 1e-3 * step + 1e-6).all()


def test_exact_bits_per_weight():
    enc = Encoding("int", (4096, 14336), bits=3, group_size=128)
    assert enc.bits_per_weight == pytest.approx(3.25)
    assert Encoding("int", (10, 13), bits=5, group_size=8).nbytes() == 10 * 9 + 2 * 2 * 10 * 2


def test_error_ordering(problem):
    w, h = problem
    stats = TensorStats(h)
    err = lambda enc, **kw: weighted_error(w, decode(enc, encode(w, enc, **kw)), stats)
    previous = math.inf
    for b in INT_BITS:
        enc = Encoding("int", w.shape, bits=b, group_size=64)
        plain = weighted_error(w, decode(enc, rtn(w, enc)), stats)
        clipped = err(enc, channel_weights=h.diagonal().float())
        hessian = err(enc, hessian=h)
        assert clipped <= plain * 1.0001  # the search includes the plain range
        assert hessian < plain  # GPTQ beats RTN under a correlated, anisotropic Hessian
        assert hessian < previous  # more bits, less error
        previous = hessian
    int2 = Encoding("int", w.shape, bits=2, group_size=64)
    fixed = Encoding("int+lowrank", w.shape, bits=2, rank=16, factor_bits=8, group_size=64)
    assert err(fixed, hessian=h) < err(int2, hessian=h)


def test_whitened_svd_beats_plain_svd(problem):
    w, h = problem
    stats = TensorStats(h)
    a, b = whitened_svd(w, 16, hessian=h)
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    plain = (u[:, :16] * s[:16]) @ vh[:16]
    assert weighted_error(w, a @ b, stats) < weighted_error(w, plain.float(), stats)


def test_bad_inputs(problem):
    w, h = problem
    enc = Encoding("int", w.shape, bits=4, group_size=64)
    with pytest.raises(EncodingError, match="Hessian of shape \\[3, 3\\]"):
        encode(w, enc, hessian=torch.eye(3))
    bad = w.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(EncodingError, match="non-finite"):
        encode(bad, enc)
    with pytest.raises(EncodingError, match="does not match encoding shape"):
        encode(w[:, :10], enc)
    with pytest.raises(ContainerError, match="needs a 2-D shape"):
        Encoding("int", (5,), bits=4, group_size=64)
    with pytest.raises(ContainerError, match="int bits must be one of"):
        Encoding("int", (5, 5), bits=7, group_size=64)


def test_encode_many_equals_one_at_a_time(problem):
    """Sharing the GPTQ pass across bit-widths (and int+lowrank bases) changes no stored bit."""
    from prism_convert.encode import encode_many

    w, h = problem
    menu = [e for e in ALL_KINDS if e.kind in ("int", "int+lowrank")]
    together = encode_many(w, menu, hessian=h)
    for enc, stored in zip(menu, together):
        alone = encode(w, enc, hessian=h)
        assert stored.keys() == alone.keys() and all(torch.equal(stored[k], alone[k]) for k in stored)

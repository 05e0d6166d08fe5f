"""Encodings: exact stored layouts and sizes, dense bit packing, bit-exact decode of every encoder's output,
the error ordering of the encoders, and clear errors for bad inputs."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prism_convert.compression.encode import encode, encode_many
from prism_convert.compression.math.measure import output_error
from prism_convert.compression.math.quantize import rtn
from prism_load.container.codecs import (
    LowRankLinear,
    check_tensors,
    decode,
    decode_linear,
    pack_bits,
    unpack_bits,
)
from prism_load.container.format import INT_BITS, Encoding, packed_row_bytes
from prism_load.errors import ContainerError, EncodingError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def bitstream_pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """The format's definition, one bit at a time: value j's bit i is bit j*bits+i of the row, LSB first."""
    rows, cols = q.shape
    out = torch.zeros(rows, packed_row_bytes(cols, bits), dtype=torch.uint8)
    for j in range(cols):
        for i in range(bits):
            pos = j * bits + i
            out[:, pos // 8] |= (((q[:, j] >> i) & 1) << (pos % 8)).to(torch.uint8)
    return out


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from(INT_BITS), rows=st.integers(1, 6), cols=st.integers(1, 70), seed=st.integers(0, 10**6))
def test_pack_unpack_round_trip(bits, rows, cols, seed):
    q = torch.randint(0, 2**bits, (rows, cols), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    packed = pack_bits(q, bits)
    assert packed.shape == (rows, math.ceil(cols * bits / 8))  # dense: only the row end is padded
    assert torch.equal(packed, bitstream_pack(q, bits))
    assert torch.equal(unpack_bits(packed, bits, cols), q)


def test_pack_bits_golden_bytes():
    # 3-bit values 1..5 little-endian: 001 010 011 100 101 -> bits 100 010 110 001 101 (LSB first)
    q = torch.tensor([[1, 2, 3, 4, 5]], dtype=torch.uint8)
    assert pack_bits(q, 3).tolist() == [[0b11010001, 0b01011000]]


def test_pack_many_rows_in_chunks():
    """Rows are packed in chunks; chunk borders must not show."""
    q = torch.randint(0, 32, (3000, 45), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    packed = pack_bits(q, 5)
    assert torch.equal(packed[2000:2003], bitstream_pack(q[2000:2003], 5))
    assert torch.equal(unpack_bits(packed, 5, 45), q)


@pytest.mark.parametrize("bits", INT_BITS)
def test_int_bytes_exact(bits):
    out, inp, g = 10, 133, 32
    enc = Encoding("int", (out, inp), bits=bits, group_size=g)
    groups = math.ceil(inp / g)
    assert enc.nbytes() == out * math.ceil(inp * bits / 8) + 2 * (2 * out * groups)
    assert enc.bits_per_weight == pytest.approx(8 * enc.nbytes() / (out * inp))


def test_exact_bits_per_weight():
    assert Encoding("int", (4096, 14336), bits=3, group_size=128).bits_per_weight == pytest.approx(3.25)
    assert Encoding("int", (10, 13), bits=5, group_size=8).nbytes() == 10 * 9 + 2 * 2 * 10 * 2
    lr = Encoding("int+lowrank", (256, 512), bits=2, rank=16, factor_bits=4, group_size=128)
    base = 256 * 128 + 2 * 2 * 256 * 4
    factors = (256 * 8 + 2 * 2 * 256) + (16 * 256 + 2 * 2 * 16 * 4)
    assert lr.nbytes() == base + factors


@pytest.fixture(scope="module")
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
    *[Encoding("lowrank", (96, 200), rank=12, factor_bits=fb, group_size=64) for fb in INT_BITS],
    Encoding("lowrank", (96, 200), rank=12, factor_bits=16),
    *[Encoding("int+lowrank", (96, 200), bits=b, rank=8, factor_bits=4, group_size=64) for b in INT_BITS],
    Encoding("int+lowrank", (96, 200), bits=3, rank=8, factor_bits=16, group_size=64),
    Encoding("bf16", (96, 200)), Encoding("fp16", (96, 200)), Encoding("fp32", (96, 200)),
]


@pytest.mark.parametrize("stats", ["hessian", "diagonal", "none"])
def test_round_trip_specs_sizes_and_determinism(problem, stats):
    w, h = problem
    kw = {"hessian": {"hessian": h}, "diagonal": {"channel_weights": h.diagonal().float()}, "none": {}}[stats]
    together = encode_many(w, ALL_KINDS, **kw)
    for enc, stored in zip(ALL_KINDS, together):
        check_tensors(enc, stored, enc.label())  # exactly the specs: names, dtypes, shapes
        assert sum(t.numel() * t.element_size() for t in stored.values()) == enc.nbytes()
        alone = encode(w, enc, **kw)  # sharing work across the menu changes no stored bit
        assert alone.keys() == stored.keys() and all(torch.equal(stored[k], alone[k]) for k in stored)
        decoded = decode(enc, stored)
        assert decoded.shape == w.shape and torch.isfinite(decoded).all()
        metric = {"hessian": {"hessian": h}, "diagonal": {"channel_weights": h.diagonal().float()}, "none": {}}[stats]
        assert output_error(w, decoded, **metric) < 0.9 * output_error(w, torch.zeros_like(w), **metric)


def test_passthrough_is_the_tensor(problem):
    w, _ = problem
    for kind, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)):
        enc = Encoding(kind, w.shape)
        assert torch.equal(decode(enc, encode(w, enc)), w.to(dtype).float())
    assert torch.equal(decode(Encoding("fp32", (5,)), encode(torch.arange(5.0), Encoding("fp32", (5,)))), torch.arange(5.0))


def test_decode_linear_keeps_factors(problem):
    w, h = problem
    enc = Encoding("lowrank", w.shape, rank=4, factor_bits=8, group_size=64)
    stored = encode(w, enc, hessian=h)
    lin = decode_linear(enc, stored)
    assert isinstance(lin, LowRankLinear)
    x = torch.randn(5, w.shape[1])
    assert torch.allclose(lin(x), x @ decode(enc, stored).T, atol=1e-5)


def test_error_falls_with_bits_and_gptq_beats_rtn(problem):
    w, h = problem
    previous = math.inf
    for b in INT_BITS:
        enc = Encoding("int", w.shape, bits=b, group_size=64)
        plain = output_error(w, decode(enc, rtn(w, enc)), hessian=h)
        searched = output_error(w, decode(enc, encode(w, enc, channel_weights=h.diagonal().float())), hessian=h)
        gptq = output_error(w, decode(enc, encode(w, enc, hessian=h)), hessian=h)
        assert gptq < searched < plain
        assert gptq < previous
        previous = gptq


def test_bad_inputs(problem):
    w, h = problem
    enc = Encoding("int", w.shape, bits=4, group_size=64)
    with pytest.raises(EncodingError, match=r"Hessian of shape \[3, 3\]"):
        encode(w, enc, hessian=torch.eye(3))
    bad = w.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(EncodingError, match="1 non-finite values"):
        encode(bad, enc)
    with pytest.raises(EncodingError, match="does not match encoding shape"):
        encode(w[:, :10], enc)
    with pytest.raises(EncodingError, match=r"needs a 2-D weight \[out, in\], got shape \[96, 200, 1\]"):
        encode(w[..., None], enc)
    with pytest.raises(EncodingError, match=r"channel weights of shape \[5\]"):
        encode(w, enc, channel_weights=torch.ones(5))
    with pytest.raises(EncodingError, match="finite and non-negative"):
        encode(w, enc, channel_weights=-torch.ones(200))
    with pytest.raises(EncodingError, match="beyond fp16"):
        encode(torch.full((2, 2), 1e6), Encoding("fp16", (2, 2)))
    with pytest.raises(EncodingError, match="outside 1..2"):
        from prism_convert.compression.math.lowrank import whitened_svd

        whitened_svd(torch.ones(2, 5), 3)
    with pytest.raises(ContainerError, match="needs a 2-D shape"):
        Encoding("int", (5,), bits=4, group_size=64)
    with pytest.raises(ContainerError, match="int bits must be one of"):
        Encoding("int", (5, 5), bits=7, group_size=64)


@pytest.mark.parametrize("bits", [2, 4])
def test_bytewise_unpack_equals_the_bitstream_definition(bits):
    """The runtime's byte-wise fast path for 2/4 bits reads the same bitstream as the general path."""
    q = torch.randint(0, 2**bits, (7, 45), dtype=torch.uint8, generator=torch.Generator().manual_seed(bits))
    packed = pack_bits(q, bits)
    bitstream = ((packed[..., None] >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(7, -1)[:, : 45 * bits]
    expected = (bitstream.reshape(7, 45, bits).long() << torch.arange(bits)).sum(-1).to(torch.uint8)
    assert torch.equal(unpack_bits(packed, bits, 45), expected)


def test_grouped_dequantize_equals_the_repeated_formula():
    enc = Encoding("int", (6, 64), bits=3, group_size=16)
    w = torch.randn(6, 64, generator=torch.Generator().manual_seed(1))
    stored = rtn(w, enc)
    q = unpack_bits(stored["qweight"], 3, 64).float()
    s = stored["scales"].float().repeat_interleave(16, 1)
    z = stored["zeros"].float().repeat_interleave(16, 1)
    assert torch.equal(decode(enc, stored), (q - z) * s)

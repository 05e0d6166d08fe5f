"""Integer encoders: RTN's derived error bound, the weighted search never losing to RTN, GPTQ equal to the
reference algorithm and beating RTN under a correlated Hessian, and the Hessian factor it shares."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from numerics import statistics

from prism_convert.compression.encode import encode
from prism_convert.compression.math.gptq import gptq
from prism_convert.compression.math.hessian import clear_cache, compute_factors, hessian_factors
from prism_convert.compression.math.measure import output_error
from prism_convert.compression.math.quantize import clipped, rtn
from prism_load.container.codecs import decode, unpack_bits
from prism_load.container.format import INT_BITS, Encoding
from prism_load.errors import EncodingError

OUT, IN, G = 48, 200, 64  # in-features not a multiple of the group size


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def problem():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(OUT, IN, generator=gen) * 0.05
    w[:, 11] *= 8  # an outlier weight column
    return w, statistics(IN)


def expanded(t: torch.Tensor, inp: int) -> torch.Tensor:
    return t.float().repeat_interleave(G, dim=1)[:, :inp]


def weighted_per_group(w, decoded, m):
    d = ((w.double() - decoded.double()) ** 2 * m.double()).reshape(w.shape[0], -1)
    d = torch.nn.functional.pad(d, (0, math.ceil(w.shape[1] / G) * G - w.shape[1]))
    return d.reshape(w.shape[0], -1, G).sum(-1)


@pytest.mark.parametrize("bits", INT_BITS)
def test_rtn_error_bound(problem, bits):
    """|w − ŵ| ≤ s (1/2 + |δz|) with δz the fp16 rounding of the zero (≤ 2^-11 |z|, or 2^-25 when
    subnormal): the scale is rounded up so [lo, hi] spans at most 2^bits − 1 steps, codes are nearest."""
    w, _ = problem
    enc = Encoding("int", w.shape, bits=bits, group_size=G)
    stored = rtn(w, enc)
    s, z = expanded(stored["scales"], IN), expanded(stored["zeros"], IN)
    bound = s * (0.5 + 2.0**-11 * z.abs() + 2.0**-25) * (1 + 1e-5) + 1e-7 * w.abs().max()
    err = (decode(enc, stored) - w).abs()
    assert (err <= bound).all(), float((err - bound).max())
    # and the bound is tight: some element uses most of its half step
    assert float((err / (s / 2)).max()) > 0.9


def test_degenerate_groups_stay_exact_to_fp16():
    w = torch.zeros(3, 130)
    w[1] = 0.3  # a constant group: no range at all
    w[2, :64] = 1.0 + torch.arange(64) * 1e-7  # a range far below fp16's resolution of the offset
    for bits in (2, 8):
        enc = Encoding("int", w.shape, bits=bits, group_size=G)
        decoded = decode(enc, rtn(w, enc))
        assert torch.isfinite(decoded).all()
        assert (decoded - w).abs().max() <= 2.0**-11 * 1.0 + 1e-7
        assert torch.equal(decoded[0], w[0])  # zeros decode to exact zeros


def test_range_too_wide_for_fp16_scales():
    w = torch.tensor([[-3e5, 3e5]])
    with pytest.raises(EncodingError, match="too wide for fp16 scales at 2 bits"):
        rtn(w, Encoding("int", (1, 2), bits=2, group_size=2))


@settings(max_examples=25, deadline=None)
@given(bits=st.sampled_from(INT_BITS), out=st.integers(1, 9), inp=st.integers(1, 150), seed=st.integers(0, 10**6),
       spread=st.floats(1e-3, 10.0), sparse=st.booleans())
def test_weighted_search_never_worse_than_rtn(bits, out, inp, seed, spread, sparse):
    """Per group (so in total), Σ m (w − ŵ)² of the search is at most RTN's: min/max is a candidate."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=gen) * spread
    m = torch.rand(inp, generator=gen) ** 3
    if sparse:
        m[torch.rand(inp, generator=gen) < 0.5] = 0.0  # channels the calibration never reached
    enc = Encoding("int", (out, inp), bits=bits, group_size=G)
    base = weighted_per_group(w, decode(enc, rtn(w, enc)), m)
    searched = weighted_per_group(w, decode(enc, clipped(w, enc, m)), m)
    assert (searched <= base * (1 + 1e-5) + 1e-12).all()


def test_search_improves_on_rtn_and_weights_matter(problem):
    w, h = problem
    m = h.diagonal().float()
    enc = Encoding("int", w.shape, bits=3, group_size=G)
    e = lambda stored: output_error(w, decode(enc, stored), channel_weights=m)
    plain, weighted, unweighted = e(rtn(w, enc)), e(clipped(w, enc, m)), e(clipped(w, enc))
    assert weighted < 0.9 * plain  # clipping the outlier column pays
    assert weighted < unweighted  # and knowing which channels matter pays again


def reference_gptq(w, h, scale, zero, bits, damp=0.01):
    """GPTQ as published (Frantar et al. 2022, Alg. 1 without lazy batches), in float64, with fixed
    per-column parameters: the upper Cholesky factor of (H + λI)⁻¹ spreads each column's error."""
    w, h = w.double().clone(), h.double().clone()
    h.diagonal().add_(damp * h.diagonal().mean())
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    codes = torch.zeros_like(w)
    for c in range(w.shape[1]):
        s, z = scale[:, c].double(), zero[:, c].double()
        codes[:, c] = q = torch.clamp(torch.round(w[:, c] / s + z), 0, 2**bits - 1)
        err = (w[:, c] - (q - z) * s) / hinv[c, c]
        w[:, c + 1 :] -= err[:, None] * hinv[c, c + 1 :]
    return codes


@pytest.mark.parametrize("bits", [2, 4])
def test_gptq_is_the_reference_algorithm(problem, bits):
    """The LDL form with lazy blocks picks the reference's codes (static groups: same parameters)."""
    w, h = problem
    enc = Encoding("int", w.shape, bits=bits, group_size=G)
    stored = gptq(w, enc, h, static_groups=True, block=48)  # a block size that splits groups
    codes = unpack_bits(stored["qweight"], bits, IN).double()
    ref = reference_gptq(w, h, expanded(stored["scales"], IN), expanded(stored["zeros"], IN), bits)
    assert float((codes == ref).double().mean()) > 0.999


@pytest.mark.parametrize("options", [{}, {"act_order": True}, {"static_groups": True}], ids=["dynamic", "act_order", "static"])
def test_gptq_beats_rtn_and_search_and_improves_with_bits(problem, options):
    w, h = problem
    previous = math.inf
    for bits in INT_BITS:
        enc = Encoding("int", w.shape, bits=bits, group_size=G)
        err = lambda stored, enc=enc: output_error(w, decode(enc, stored), hessian=h)
        g = err(gptq(w, enc, h, **options))
        assert g < 0.8 * err(rtn(w, enc))
        assert g < err(clipped(w, enc, h.diagonal().float()))  # the cross terms of H matter
        assert g < previous
        previous = g


def test_gptq_dead_channels_round_to_nearest(problem):
    """A channel with zero second moment decouples: no feedback reaches it, so it is plainly rounded."""
    w, h = problem
    enc = Encoding("int", w.shape, bits=3, group_size=G)
    stored = encode(w, enc, hessian=h)
    s, z = expanded(stored["scales"], IN), expanded(stored["zeros"], IN)
    q = unpack_bits(stored["qweight"], 3, IN).float()
    nearest = torch.clamp(torch.round(w / s + z), 0, 7)
    assert torch.equal(q[:, 7], nearest[:, 7])
    assert not torch.equal(q, nearest)  # elsewhere feedback moved codes


def test_gptq_on_a_singular_hessian():
    """Fewer tokens than channels (every expert's case): H is singular; damping still factors it."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(20, 96, generator=gen)
    h = x.T @ x / 20
    w = torch.randn(16, 96, generator=gen)
    enc = Encoding("int", w.shape, bits=2, group_size=32)
    g = output_error(w, decode(enc, encode(w, enc, hessian=h)), hessian=h)
    assert math.isfinite(g) and g < output_error(w, decode(enc, rtn(w, enc)), hessian=h)


def test_hessian_factor_and_cache(problem):
    _, h = problem
    clear_cache()
    f = compute_factors(h, damp=0.01)
    hd = h.float() + f.lam * torch.eye(IN)
    assert torch.equal(f.r, f.r.triu())
    assert float((f.r @ f.r.T - hd).norm() / hd.norm()) < 1e-5
    assert f.lam == pytest.approx(0.01 * float(h.diagonal().mean()), rel=1e-6)
    assert hessian_factors(h) is hessian_factors(h)  # one factorisation per Hessian
    ordered = hessian_factors(h, act_order=True)
    assert torch.equal(ordered.order, torch.argsort(h.diagonal().float(), descending=True, stable=True))
    h2 = h.clone()
    first = hessian_factors(h2)
    h2.mul_(2)  # modified in place: refactored
    assert float(hessian_factors(h2).lam) == pytest.approx(2 * first.lam)


def test_not_quite_psd_hessian_is_damped_until_it_factors():
    gen = torch.Generator().manual_seed(3)
    v = torch.randn(32, 32, generator=gen)
    h = v @ v.T
    h -= 1.5 * torch.linalg.eigvalsh(h)[0].abs() * torch.eye(32) + 0.02 * h.diagonal().mean() * torch.eye(32)
    f = compute_factors(h, damp=0.01)
    assert torch.isfinite(f.r).all() and f.lam > 0.01 * float(h.diagonal().mean())


def test_bad_hessians(problem):
    w, h = problem
    enc = Encoding("int", w.shape, bits=4, group_size=G)
    with pytest.raises(EncodingError, match=r"Hessian of shape \[3, 3\] does not match 200 input channels"):
        encode(w, enc, hessian=torch.eye(3))
    bad = h.clone()
    bad[0, 1] = float("nan")
    with pytest.raises(EncodingError, match="non-finite"):
        encode(w, enc, hessian=bad)
    with pytest.raises(EncodingError, match="damp must be >= 0"):
        compute_factors(h, damp=-1.0)

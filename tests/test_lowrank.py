"""Low-rank encoders: whitened SVD reaches the Eckart–Young optimum of the output error and beats plain SVD,
the randomized path matches the exact one, quantized factors and int+lowrank behave as claimed."""

import pytest
import torch
from numerics import statistics

import prism_convert.compression.math.lowrank as lowrank
from prism_convert.compression.encode import encode
from prism_convert.compression.math.hessian import hessian_factors
from prism_convert.compression.math.measure import output_error
from prism_load.container.codecs import decode
from prism_load.container.format import Encoding

OUT, IN = 64, 160


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def problem():
    gen = torch.Generator().manual_seed(4)
    u, v = torch.randn(OUT, 24, generator=gen), torch.randn(24, IN, generator=gen)
    w = (u * torch.logspace(0, -2, 24)) @ v * 0.05 + torch.randn(OUT, IN, generator=gen) * 0.002  # decaying spectrum
    return w, statistics(IN, seed=5)


def damped_error(w, approx, h, damp=0.01):
    hd = h.double() + damp * h.diagonal().mean() * torch.eye(h.shape[0], dtype=torch.float64)
    return output_error(w.double(), approx.double(), hessian=hd)


def test_whitened_svd_reaches_the_optimum(problem):
    """‖(W − AB) S‖² equals the sum of the discarded squared singular values of W S (Eckart–Young)."""
    w, h = problem
    r = hessian_factors(h).r.double()
    sigma = torch.linalg.svdvals(w.double() @ r)
    for rank in (4, 12):
        a, b = lowrank.whitened_svd(w, rank, hessian=h)
        tail = float((sigma[rank:] ** 2).sum())
        assert damped_error(w, a @ b, h) == pytest.approx(tail, rel=1e-3)


def test_any_column_order_of_the_factor_whitens_alike(problem):
    """GPTQ's act-order factor R_p (R_p R_pᵀ = P H Pᵀ) whitens as S = Pᵀ R_p: one factorisation serves both."""
    w, h = problem
    natural = lowrank.whitened_pair(w, 8, lowrank.whitening(IN, hessian_factors(h), None))
    permuted = lowrank.whitened_pair(w, 8, lowrank.whitening(IN, hessian_factors(h, act_order=True), None))
    e_nat, e_perm = (damped_error(w, a @ b, h) for a, b in (natural, permuted))
    assert e_perm == pytest.approx(e_nat, rel=1e-4)


def test_whitened_beats_plain_svd_at_the_same_rank(problem):
    w, h = problem
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    for rank in (4, 12):
        plain = ((u[:, :rank] * s[:rank]) @ vh[:rank]).float()
        a, b = lowrank.whitened_svd(w, rank, hessian=h)
        full = output_error(w, a @ b, hessian=h)
        assert full < 0.8 * output_error(w, plain, hessian=h)
        # with only the diagonal known, diagonal whitening wins on the diagonal-weighted error
        m = h.diagonal().float()
        a, b = lowrank.whitened_svd(w, rank, channel_weights=m)
        assert output_error(w, a @ b, channel_weights=m) < output_error(w, plain, channel_weights=m)


def test_randomized_svd_matches_exact(problem, monkeypatch):
    w, h = problem
    exact = lowrank.whitened_svd(w, 6, hessian=h)
    monkeypatch.setattr(lowrank, "EXACT_MAX_ELEMENTS", 0)
    fast = lowrank.whitened_svd(w, 6, hessian=h)
    again = lowrank.whitened_svd(w, 6, hessian=h)
    assert all(torch.equal(x, y) for x, y in zip(fast, again))  # seeded: deterministic
    e_exact, e_fast = (damped_error(w, a @ b, h) for a, b in (exact, fast))
    assert e_exact * (1 - 1e-5) <= e_fast <= 1.01 * e_exact  # optimal up to fp32 rounding


@pytest.mark.parametrize("stats", ["hessian", "diagonal", "none"])
def test_stored_factors_close_to_the_unrounded_pair(problem, stats):
    """bf16 factors lose only bf16 rounding; 8-bit factors (B rounded by GPTQ/search, A refit and rounded)
    stay within a few percent of the unrounded optimum; error falls with rank."""
    w, h = problem
    kw = {"hessian": {"hessian": h}, "diagonal": {"channel_weights": h.diagonal().float()}, "none": {}}[stats]
    measure = lambda enc: output_error(w, decode(enc, encode(w, enc, **kw)), hessian=h)
    a, b = lowrank.whitened_svd(w, 8, **kw)
    best = output_error(w, a @ b, hessian=h)
    bf16 = measure(Encoding("lowrank", w.shape, rank=8, factor_bits=16))
    int8 = measure(Encoding("lowrank", w.shape, rank=8, factor_bits=8, group_size=32))
    int4 = measure(Encoding("lowrank", w.shape, rank=8, factor_bits=4, group_size=32))
    assert bf16 <= best * 1.01
    assert int8 <= best * 1.05
    assert int8 < int4
    assert measure(Encoding("lowrank", w.shape, rank=16, factor_bits=8, group_size=32)) < int8


def test_int_plus_lowrank_beats_int_at_the_same_bits(problem):
    w, h = problem
    for bits in (2, 3):
        base = Encoding("int", w.shape, bits=bits, group_size=32)
        fixed = Encoding("int+lowrank", w.shape, bits=bits, rank=8, factor_bits=4, group_size=32)
        stored = encode(w, fixed, hessian=h)
        assert all(torch.equal(stored[f"base.{k}"], v) for k, v in encode(w, base, hessian=h).items())  # same base
        e_int = output_error(w, decode(base, encode(w, base, hessian=h)), hessian=h)
        assert output_error(w, decode(fixed, stored), hessian=h) < 0.7 * e_int


def test_zero_residual_is_encoded_as_zero():
    w = torch.zeros(8, 40)
    for fb in (16, 4):
        enc = Encoding("int+lowrank", w.shape, bits=2, rank=2, factor_bits=fb, group_size=16)
        assert torch.equal(decode(enc, encode(w, enc)), w)

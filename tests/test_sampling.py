"""prism_load/sampling.py: greedy picks torch's argmax; sampling draws from the distribution transformers'
warpers define (temperature, then top-k with ties kept, then top-p), counted over many draws against the
warpers' own probabilities; a seed repeats its tokens; logits with nothing to sample say so. Each on both CPU
paths (the native sampler, sample.c, and numpy's), and the native one draw by draw against numpy's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from prism_load import sampling
from prism_load.errors import GenerationError
from prism_load.sampling import (
    NUCLEUS_CANDIDATES,
    SMALL_VOCABULARY,
    Draws,
    _inverse_cdf,
    _torch_sample,
    distribution,
    next_tokens,
    sample_next,
    torch_probabilities,
)


@pytest.fixture(params=["native", "numpy"])
def sampler(request, monkeypatch):
    """The test on both CPU paths: the native sampler (sample.c) where the kernels build, and numpy's (and torch's
    below SMALL_VOCABULARY), which serves the distributions the native one does not take and machines without it."""
    if request.param == "numpy":
        monkeypatch.setattr(sampling, "_native", lambda: None)
    elif sampling._native() is None:
        pytest.skip("no native kernels here")
    return request.param


def warped(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """transformers' probabilities for one row of logits [V]: its warpers in generate's order."""
    x = logits[None].float()
    x = TemperatureLogitsWarper(temperature)(None, x)
    if top_k:
        x = TopKLogitsWarper(top_k)(None, x)
    if top_p is not None:
        x = TopPLogitsWarper(top_p)(None, x)
    return x.softmax(-1)[0].double()


def draws(logits: torch.Tensor, n: int, temperature: float, top_k, top_p, seed: int = 0) -> np.ndarray:
    """Counts per token of n draws (n rows of the same logits in one call)."""
    got = sample_next(logits[None].expand(n, -1), True, temperature, top_k, top_p,
                      torch.Generator().manual_seed(seed))
    return np.bincount(got.numpy(), minlength=logits.shape[0])


def assert_drawn_from(counts: np.ndarray, p: torch.Tensor) -> None:
    """Every token of probability 0 never drawn; every other within 5 standard deviations of its expectation."""
    p = p.numpy()
    n = counts.sum()
    assert counts[p == 0].sum() == 0, f"drawn outside the support: {np.flatnonzero((p == 0) & (counts > 0))}"
    expected, sd = n * p, np.sqrt(n * p * (1 - p))
    far = np.flatnonzero(np.abs(counts - expected) > 5 * sd + 1)
    assert len(far) == 0, f"tokens {far}: drawn {counts[far]}, expected {expected[far]}"


CASES = [(0.7, 5, None), (1.3, None, 0.8), (1.0, 20, 0.9), (0.9, None, None)]  # the draws; the distribution: below


@pytest.mark.parametrize("vocab", [300, 2500])  # torch's batched ops below SMALL_VOCABULARY, numpy's loop above
@pytest.mark.parametrize("temperature,top_k,top_p", CASES)
def test_draws_follow_transformers_warpers(temperature, top_k, top_p, vocab, sampler):
    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(1)) * 4
    assert_drawn_from(draws(logits, 20_000, temperature, top_k, top_p), warped(logits, temperature, top_k, top_p))


def dense(vocab: int, ids, p) -> np.ndarray:
    out = np.zeros(vocab)
    out[np.arange(vocab) if ids is None else ids] = p
    return out / out.sum()


def test_the_distribution_is_the_warpers_exactly():
    """The distribution a row draws from, token by token, against transformers' warpers on 300 random cases:
    vocabularies of 7 to 6,000 (past the nucleus's first candidates), spreads from flat to peaked, every
    combination of top_k and top_p."""
    g = torch.Generator().manual_seed(6)
    rng = np.random.default_rng(6)
    for case in range(300):
        vocab = int(rng.choice([7, 300, 1500, 6000]))
        logits = torch.randn(vocab, generator=g) * float(rng.choice([0.05, 1.0, 4.0, 12.0]))
        if case % 3 == 0:  # bf16 logits: many ties, at the k-th and at the nucleus's edge
            logits = logits.bfloat16().float()
        temperature = float(rng.uniform(0.3, 2.0))
        top_k = [None, 1, 5, 50, vocab + 3][case % 5]
        top_p = [None, 0.5, 0.9, 0.99][(case // 5) % 4]
        want = warped(logits, temperature, top_k if top_k and top_k < vocab else None, top_p).numpy()
        where = f"case {case}: V {vocab} T {temperature} k {top_k} p {top_p}"
        got = dense(vocab, *distribution(logits.numpy(), temperature, top_k, top_p))
        torch_way = torch_probabilities(logits[None], temperature, top_k, top_p)[0].double().numpy()
        assert np.array_equal(got > 0, torch_way > 0) and np.allclose(got, torch_way, atol=1e-6, rtol=1e-4), where
        assert_same_up_to_ties(got, want, logits.numpy(), where)


def assert_same_up_to_ties(got: np.ndarray, want: np.ndarray, logits: np.ndarray, where: str) -> None:
    """got equals want, except that where the nucleus's edge falls between equal logits, transformers keeps
    whichever its unstable sort put first (the order of equals is not defined there), prism the later token: the
    same probabilities, on tokens of one logit."""
    assert np.allclose(np.sort(got), np.sort(want), atol=1e-6, rtol=1e-4), where
    differ = np.flatnonzero((got > 0) != (want > 0))
    assert len(np.unique(logits[differ])) <= 1, f"{where}: tokens {differ} differ, of logits {logits[differ]}"
    same = (got > 0) & (want > 0)
    assert np.allclose(got[same], want[same], atol=1e-6, rtol=1e-4), where


def test_the_nucleus_boundary_is_transformers():
    """A token is kept while the mass before it is below top_p, not at it (0.5 before the second token of
    [0.5, 0.25, 0.25] with top_p 0.5: only the first); of equal probabilities the later tokens are kept (an
    ascending stable sort read backwards)."""
    for logits, top_p in ((torch.log(torch.tensor([0.5, 0.25, 0.25])), 0.5), (torch.zeros(4), 0.5),
                          (torch.zeros(5), 0.5), (torch.zeros(3000), 0.30017)):
        want = warped(logits, 1.0, None, top_p).numpy()
        got = dense(len(logits), *distribution(logits.numpy(), 1.0, None, top_p))
        assert_same_up_to_ties(got, want, logits.numpy(), f"{len(logits)} tokens")
        kept = np.flatnonzero(got)
        assert len(kept) == (want > 0).sum() and (len(logits) > 3) == (kept[0] > 0)  # equals: the later ones


@pytest.mark.parametrize("vocab", [6, SMALL_VOCABULARY])
def test_top_k_keeps_every_logit_tied_with_the_kth(vocab, sampler):
    """transformers keeps every logit equal to the k-th largest: three tied logits with top_k=2 keep all three."""
    logits = torch.full((vocab,), -5.0)
    logits[:6] = torch.tensor([0.0, 3.0, 3.0, 3.0, 1.0, -2.0])
    counts = draws(logits, 30_000, 1.0, 2, None)
    p = warped(logits, 1.0, 2, None)
    assert (p > 0).sum() == 3
    assert_drawn_from(counts, p)


@pytest.mark.parametrize("scale", [8.0, 0.01])
def test_nucleus_of_a_large_vocabulary(scale):
    """top_p without top_k over 5,000 tokens: peaked logits put the nucleus within the largest 1,024 (found
    without a full sort), nearly flat ones beyond them (the full sort): the same distribution either way."""
    vocab = 5_000
    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(2)) * scale
    p = warped(logits, 1.0, None, 0.9)
    assert ((p > 0).sum() < NUCLEUS_CANDIDATES) == (scale > 1)
    assert_drawn_from(draws(logits, 20_000, 1.0, None, 0.9), p)


def test_greedy_is_torchs_argmax_for_ties_nan_and_bf16(sampler):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 1000, generator=g)
    x[1, [10, 700]] = 50.0  # a tie: the first
    x[2, 400] = float("nan")  # NaN counts as the largest, as in torch
    x[3] = float("-inf")  # nothing but -inf: the first
    x[4, [3, 900]] = float("inf")
    x[5, 990:] = 60.0  # the largest in the last, unaligned values
    for logits in (x, x.bfloat16(), x[:, ::2], x[:, :37]):
        want = logits.float().argmax(-1)
        assert torch.equal(sample_next(logits, False, 1.0, None, None, None), want)
        assert torch.equal(want, _torch_sample(logits, False, 1.0, None, None, None).to(want.dtype))


def test_a_seed_repeats_its_tokens(sampler):
    logits = torch.randn(4, 2000, generator=torch.Generator().manual_seed(4))
    one, two, other = (sample_next(logits, True, 1.0, 50, 0.95, torch.Generator().manual_seed(s)) for s in (7, 7, 8))
    assert torch.equal(one, two) and one.dtype is torch.int64 and one.shape == (4,)
    many = [sample_next(logits, True, 1.0, None, None, torch.Generator().manual_seed(s)) for s in range(8)]
    assert len({tuple(m.tolist()) for m in many}) > 1


def test_inverse_cdf_picks_by_cumulative_mass_and_never_a_zero():
    p = np.array([0.0, 1.0, 0.0, 2.0, 0.0])
    assert [_inverse_cdf(p, u) for u in (0.0, 0.3, 0.34, 0.99, 1 - 2**-53)] == [1, 1, 3, 3, 3]
    spread = np.zeros(3000)
    spread[2500] = 1e-30  # one token, in the third block of 1,024
    assert {_inverse_cdf(spread, u) for u in (0.0, 0.5, 1 - 2**-53)} == {2500}


@pytest.mark.parametrize("vocab", [10, SMALL_VOCABULARY])
def test_nothing_to_sample_from_is_an_error(vocab, sampler):
    """All -inf, all NaN, or one NaN among finite logits: an error naming it, with or without top_k / top_p."""
    one_nan = torch.randn(1, vocab)
    one_nan[0, 3] = float("nan")
    for bad in (torch.full((1, vocab), float("-inf")), torch.full((1, vocab), float("nan")), one_nan):
        for top_k, top_p in ((None, None), (5, None), (None, 0.9), (2, 0.5)):
            with pytest.raises(GenerationError, match="no finite value to sample from"):
                sample_next(bad, True, 1.0, top_k, top_p, None)


def test_the_native_sampler_draws_what_numpy_draws():
    """sample.c against the numpy path, draw by draw, on 400 random cases: vocabularies of 7 to 33,000, bf16 logits
    (ties at the k-th and at the nucleus's edge), -inf logits, top_k from 1 to beyond 1,024 candidates, with and
    without top_p. The two compute the probabilities in float64 with sums in another order, so a draw within
    1e-9 of a boundary between two tokens is left out; every other draw must pick the same token."""
    fn = sampling._native()
    if fn is None:
        pytest.skip("no native kernels here")
    rng = np.random.default_rng(11)
    compared = 0
    for case in range(400):
        vocab = int(rng.choice([7, 300, 4096, 33_000]))
        logits = (rng.standard_normal(vocab) * rng.choice([0.05, 1.0, 4.0, 12.0])).astype(np.float32)
        if case % 3 == 0:
            logits = torch.from_numpy(logits).bfloat16().float().numpy()
        if case % 4 == 0:
            logits[rng.integers(0, vocab, 1 + vocab // 10)] = -np.inf
        top_k = min(int(rng.choice([1, 2, 5, 50, 1500])), vocab - 1)
        top_p = [None, 0.3, 0.9, 0.99][case % 4]
        temperature = float(rng.uniform(0.2, 2.0))
        ids, p = distribution(logits, temperature, top_k, top_p)
        edges = np.cumsum(p) / p.sum()
        for u in rng.random(8):
            if np.abs(edges - u).min() < 1e-9:
                continue
            want = int(ids[_inverse_cdf(p, u)])
            got = fn.sample_top_k(logits.ctypes.data, vocab, top_k, temperature, top_p or 0.0, float(u))
            assert got == want, f"case {case}: V {vocab} k {top_k} p {top_p} T {temperature:.3f} u {u}"
            compared += 1
    assert compared > 3000


def test_next_tokens_takes_greedy_and_top_k_rows_only():
    """The native path takes greedy rows and top-k below the vocabulary; top-p or temperature alone, and a top_k
    that keeps the whole vocabulary, go to sample_next's numpy path (None)."""
    if sampling._native() is None:
        pytest.skip("no native kernels here")
    logits = torch.randn(3, 500, generator=torch.Generator().manual_seed(9))
    draws = Draws(torch.Generator().manual_seed(1), 3, steps=4)
    assert next_tokens(logits, False, 1.0, None, None, None) == logits.argmax(-1).tolist()
    assert len(next_tokens(logits, True, 0.7, 40, 0.9, draws)) == 3
    for top_k, top_p in ((None, 0.9), (None, None), (500, None), (0, 0.5)):
        assert next_tokens(logits, True, 1.0, top_k, top_p, draws) is None


def test_draws_in_blocks_are_the_generators_stream():
    """Draws hands out the generator's uniforms in order, `rows` at a time, whatever the block: a seed's tokens do
    not depend on how many steps are drawn at once (the decode loop draws 64)."""
    one, block = (Draws(torch.Generator().manual_seed(3), 2, steps=s) for s in (1, 64))
    stream = torch.rand(200 * 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).tolist()
    assert [one.take() for _ in range(200)] == [block.take() for _ in range(200)] == \
        [stream[i : i + 2] for i in range(0, 400, 2)]

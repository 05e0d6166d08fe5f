"""The allocator respects the budget to the byte and matches brute force on small instances."""

import itertools
import random

import pytest

from prism_convert.allocation.knapsack import Option, allocate, lower_hull, pareto
from prism_load.errors import BudgetError


def random_tables(rng, tensors, options):
    tables = []
    for _ in range(tensors):
        size = rng.randint(50, 400)
        opts = []
        for bits in sorted(rng.sample(range(2, 9), options)):
            nbytes = size * bits + rng.randint(0, 30)
            opts.append(Option(nbytes, rng.uniform(0.5, 2.0) * size * 4.0 ** (-bits)))
        tables.append(opts)
    return tables


def brute_force(tables, budget):
    best = None
    for picks in itertools.product(*[range(len(t)) for t in tables]):
        nbytes = sum(t[p].nbytes for t, p in zip(tables, picks))
        if nbytes <= budget:
            err = sum(t[p].error for t, p in zip(tables, picks))
            if best is None or err < best[0] - 1e-15:
                best = (err, picks)
    return best


@pytest.mark.parametrize("seed", range(12))
def test_exact_matches_brute_force(seed):
    rng = random.Random(seed)
    tables = random_tables(rng, tensors=rng.randint(2, 5), options=rng.randint(2, 4))
    lo = sum(min(o.nbytes for o in t) for t in tables)
    hi = sum(max(o.nbytes for o in t) for t in tables)
    budget = rng.randint(lo, hi)
    picks = allocate(tables, budget)
    err = sum(t[p].error for t, p in zip(tables, picks))
    assert sum(t[p].nbytes for t, p in zip(tables, picks)) <= budget
    assert err == pytest.approx(brute_force(tables, budget)[0], rel=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_greedy_respects_budget_and_is_near_optimal(seed):
    rng = random.Random(100 + seed)
    tables = random_tables(rng, tensors=9, options=4)
    lo = sum(min(o.nbytes for o in t) for t in tables)
    hi = sum(max(o.nbytes for o in t) for t in tables)
    budget = (lo + hi) // 2
    greedy = allocate(tables, budget, exact_state_limit=1)  # force the large-instance path (DP + greedy)
    assert sum(t[p].nbytes for t, p in zip(tables, greedy)) <= budget
    g_err = sum(t[p].error for t, p in zip(tables, greedy))
    opt_err = brute_force(tables, budget)[0]
    assert opt_err <= g_err <= opt_err * 1.02


def test_budget_below_minimum_is_a_clear_error():
    tables = [[Option(100, 1.0), Option(200, 0.5)], [Option(50, 1.0)]]
    with pytest.raises(BudgetError, match=r"149 bytes is below the smallest possible encoding \(150 bytes\)"):
        allocate(tables, 149)


def test_budget_exactly_the_minimum_and_the_maximum():
    tables = [[Option(100, 1.0), Option(200, 0.5)], [Option(50, 1.0), Option(80, 0.1)]]
    assert allocate(tables, 150) == [0, 0]
    assert allocate(tables, 280) == [1, 1]


def test_pareto_and_hull():
    opts = [Option(10, 5.0), Option(20, 2.0), Option(25, 2.5), Option(30, 1.8), Option(40, 0.2)]
    assert pareto(opts) == [0, 1, 3, 4]
    assert lower_hull(opts, pareto(opts)) == [0, 1, 4]


def test_greedy_alone_respects_the_budget_on_a_large_instance():
    rng = random.Random(7)
    tables = random_tables(rng, tensors=300, options=5)
    lo = sum(min(o.nbytes for o in t) for t in tables)
    hi = sum(max(o.nbytes for o in t) for t in tables)
    for budget in (lo, lo + 1, (lo + hi) // 3, hi - 1, hi):
        picks = allocate(tables, budget, exact_state_limit=1, dp_cell_limit=0)
        assert sum(t[p].nbytes for t, p in zip(tables, picks)) <= budget
        with_dp = allocate(tables, budget, exact_state_limit=1)
        assert sum(t[p].nbytes for t, p in zip(tables, with_dp)) <= budget

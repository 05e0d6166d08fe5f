"""Budget allocation: pick one candidate encoding per tensor, minimising the summed weighted error under a
byte budget — a multiple-choice knapsack solved across the whole model, never layer by layer.

- Small instances: an exact Pareto-frontier dynamic program (same answer as brute force).
- Otherwise: a dynamic program over the budget quantised into `resolution` units (each option's extra bytes
  rounded up, so the budget always holds to the byte), and the convex-hull greedy (the Lagrangian
  relaxation's solution path); whichever is better after a fill pass that spends the remainder on the best
  single upgrades that still fit. Past `dp_cell_limit` cells only the greedy runs (its gap is at most one
  hull step of one tensor, negligible with thousands of tensors).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

from prism_load.errors import BudgetError


@dataclass(frozen=True)
class Option:
    nbytes: int
    error: float  # already weighted by importance


def pareto(options: list[Option]) -> list[int]:
    """Indices of non-dominated options, sorted by bytes ascending (error strictly decreasing)."""
    order = sorted(range(len(options)), key=lambda i: (options[i].nbytes, options[i].error))
    keep, best = [], math.inf
    for i in order:
        if options[i].error < best:
            keep.append(i)
            best = options[i].error
    return keep


def pareto_front(items: list[tuple]) -> list[tuple]:
    """(bytes, error, ...) items that no other item beats on both, sorted by bytes (error decreasing)."""
    items = sorted(items, key=lambda x: (x[0], x[1]))
    out, best = [], math.inf
    for item in items:
        if item[1] < best:
            out.append(item)
            best = item[1]
    return out


def lower_hull(options: list[Option], front: list[int]) -> list[int]:
    """Lower convex hull of the Pareto front in the (bytes, error) plane."""
    hull: list[int] = []
    for i in front:
        while len(hull) >= 2:
            a, b = options[hull[-2]], options[hull[-1]]
            c = options[i]
            # b is above the segment a-c -> drop b
            if (b.error - a.error) * (c.nbytes - a.nbytes) >= (c.error - a.error) * (b.nbytes - a.nbytes):
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def minimum_bytes(tables: list[list[Option]]) -> int:
    return sum(min(o.nbytes for o in t) for t in tables)


def allocate(
    tables: list[list[Option]],
    budget_bytes: int,
    exact_state_limit: int = 200_000,
    resolution: int = 4096,
    dp_cell_limit: int = 400_000_000,
) -> list[int]:
    """One option index per table with sum(nbytes) <= budget_bytes and minimal sum(error)."""
    if any(not t for t in tables):
        raise ValueError("every tensor needs at least one candidate")
    floor = minimum_bytes(tables)
    if floor > budget_bytes:
        raise BudgetError(
            f"budget of {budget_bytes:,} bytes is below the smallest possible encoding ({floor:,} bytes)"
        )
    if _product_small(tables, exact_state_limit):
        exact = _exact(tables, budget_bytes, exact_state_limit)
        if exact is not None:
            return exact
    candidates = [_greedy(tables, budget_bytes)]
    if len(tables) * resolution <= dp_cell_limit:
        candidates.append(_quantised_dp(tables, budget_bytes, resolution))
    return min(candidates, key=lambda picks: total_error(tables, picks))


def total_error(tables: list[list[Option]], picks: list[int]) -> float:
    return sum(t[p].error for t, p in zip(tables, picks))


def _quantised_dp(tables: list[list[Option]], budget: int, resolution: int) -> list[int]:
    """Knapsack DP over extra bytes above each tensor's cheapest option, in units of `unit` bytes."""
    import numpy as np

    floor = minimum_bytes(tables)
    slack = budget - floor
    unit = max(1, math.ceil(slack / resolution))
    cap = slack // unit
    best = np.zeros(cap + 1)  # best[u]: minimal error of the tensors so far using <= u extra units
    back = np.zeros((len(tables), cap + 1), dtype=np.int16)
    for i, t in enumerate(tables):
        base = min(o.nbytes for o in t)
        new = np.full(cap + 1, np.inf)
        for j, o in enumerate(t):
            cost = math.ceil((o.nbytes - base) / unit)
            if cost > cap:
                continue
            cand = np.full(cap + 1, np.inf)
            cand[cost:] = best[: cap + 1 - cost] + o.error
            better = cand < new
            new[better] = cand[better]
            back[i][better] = j
        best = new
    picks, u = [0] * len(tables), cap
    for i in range(len(tables) - 1, -1, -1):
        j = int(back[i][u])
        picks[i] = j
        base = min(o.nbytes for o in tables[i])
        u -= math.ceil((tables[i][j].nbytes - base) / unit)
    spent = sum(t[p].nbytes for t, p in zip(tables, picks))
    return _fill(tables, picks, budget - spent)


def _product_small(tables, limit) -> bool:
    total = 1
    for t in tables:
        total *= len(t)
        if total > limit:
            return False
    return True


def _exact(tables: list[list[Option]], budget: int, state_limit: int) -> list[int] | None:
    """Pareto DP over (bytes, error) states; returns None if the frontier grows past state_limit."""
    states: list[tuple[int, float, tuple[int, ...]]] = [(0, 0.0, ())]
    for t in tables:
        nxt = [(b + o.nbytes, e + o.error, picks + (j,)) for b, e, picks in states for j, o in enumerate(t)]
        states = pareto_front([s for s in nxt if s[0] <= budget])
        if len(states) > state_limit:
            return None
    return list(min(states, key=lambda s: (s[1], s[0]))[2])


def _greedy(tables: list[list[Option]], budget: int) -> list[int]:
    hulls = [lower_hull(t, pareto(t)) for t in tables]
    choice = [h[0] for h in hulls]
    pos = [0] * len(tables)
    spent = sum(tables[i][choice[i]].nbytes for i in range(len(tables)))

    def push(heap, i):
        if pos[i] + 1 < len(hulls[i]):
            a, b = tables[i][hulls[i][pos[i]]], tables[i][hulls[i][pos[i] + 1]]
            gain = (a.error - b.error) / max(b.nbytes - a.nbytes, 1)
            heapq.heappush(heap, (-gain, i))

    heap: list = []
    for i in range(len(tables)):
        push(heap, i)
    while heap:
        _, i = heapq.heappop(heap)
        a, b = tables[i][hulls[i][pos[i]]], tables[i][hulls[i][pos[i] + 1]]
        if spent + b.nbytes - a.nbytes > budget:
            continue  # this tensor's next hull step does not fit; others may
        spent += b.nbytes - a.nbytes
        pos[i] += 1
        choice[i] = hulls[i][pos[i]]
        push(heap, i)
    return _fill(tables, choice, budget - spent)


def _fill(tables: list[list[Option]], choice: list[int], left: int) -> list[int]:
    """Spend the remainder on the best single upgrades (any Pareto option, not only hull points)."""
    improved = True
    while improved and left > 0:
        improved, best = False, None
        for i, t in enumerate(tables):
            cur = t[choice[i]]
            for j, o in enumerate(t):
                extra = o.nbytes - cur.nbytes
                if o.error < cur.error and extra <= left:
                    gain = cur.error - o.error
                    if best is None or gain > best[0]:
                        best = (gain, i, j, extra)
        if best is not None:
            _, i, j, extra = best
            choice[i] = j
            left -= extra
            improved = True
    return choice

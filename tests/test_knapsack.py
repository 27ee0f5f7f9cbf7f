"""The allocator's solver: exact against brute force, monotone in the budget, fast at scale."""

from __future__ import annotations

import itertools
import random

import pytest

from mint_mlx.allocation.knapsack import Infeasible, solve


def brute_force(costs, dists, cap):
    best = None
    for combo in itertools.product(*[range(len(c)) for c in costs]):
        c = sum(costs[i][j] for i, j in enumerate(combo))
        if c <= cap:
            d = sum(dists[i][j] for i, j in enumerate(combo))
            best = d if best is None else min(best, d)
    return best


def random_instance(rng: random.Random):
    n = rng.randint(1, 7)
    costs = [[rng.randint(1, 60) for _ in range(rng.randint(1, 5))] for _ in range(n)]
    dists = [[rng.random() * 10 for _ in c] for c in costs]
    return costs, dists


@pytest.mark.parametrize("seed", range(5))
def test_matches_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(60):
        costs, dists = random_instance(rng)
        cap = rng.randint(0, sum(max(c) for c in costs))
        best = brute_force(costs, dists, cap)
        if best is None:
            with pytest.raises(Infeasible) as e:
                solve(costs, dists, cap)
            assert e.value.minimum == sum(min(c) for c in costs)
            continue
        s = solve(costs, dists, cap)
        assert s.cost <= cap
        assert s.exact
        assert s.distortion == pytest.approx(best, abs=1e-9)
        assert s.cost == sum(costs[i][k] for i, k in enumerate(s.choice))


def test_monotone_in_budget() -> None:
    rng = random.Random(7)
    costs = [[rng.randint(10, 500) for _ in range(12)] for _ in range(200)]
    dists = [[rng.random() for _ in c] for c in costs]
    lo = sum(min(c) for c in costs)
    hi = sum(max(c) for c in costs)
    previous = float("inf")
    for cap in range(lo, hi, (hi - lo) // 40):
        s = solve(costs, dists, cap)
        assert s.cost <= cap
        assert s.distortion <= previous + 1e-9
        previous = s.distortion


def test_large_instance_is_near_lp_bound() -> None:
    """20,000 tensors x 30 candidates: feasible, fills the budget, close to the LP bound."""
    rng = random.Random(3)
    n = 20_000
    costs, dists = [], []
    for _ in range(n):
        size = rng.randint(1_000, 100_000)
        bits = sorted(rng.uniform(2, 16) for _ in range(30))
        costs.append([int(size * b / 8) for b in bits])
        dists.append([size * 2.0 ** (-2 * b) * rng.uniform(0.5, 2) for b in bits])
    cap = sum(c[12] for c in costs)
    s = solve(costs, dists, cap)
    assert s.cost <= cap
    assert s.cost >= cap * 0.999


def dp_optimum(costs, dists, cap):
    """Exact minimum by dynamic programming over integer costs (small instances)."""
    inf = float("inf")
    best = [0.0] + [inf] * cap  # best[c]: least distortion of the items so far at cost exactly c
    for c_opts, d_opts in zip(costs, dists, strict=True):
        nxt = [inf] * (cap + 1)
        for c in range(cap + 1):
            if best[c] == inf:
                continue
            for oc, od in zip(c_opts, d_opts, strict=True):
                if c + oc <= cap and best[c] + od < nxt[c + oc]:
                    nxt[c + oc] = best[c] + od
        best = nxt
    return min(best)


def test_one_large_item_whose_hull_skips_its_middle_option() -> None:
    # A tied embedding in miniature: one item holds most of the bytes and its middle option lies
    # above the segment between its ends, so the LP jumps over it; taking it needs many small
    # items to step down, more than the core method's branch and bound can move.
    from mint_mlx.allocation.knapsack import _solve_core

    rng = random.Random(3)
    costs = [[2000, 3000, 4000]] + [[10, 20] for _ in range(150)]
    dists = [[10.0, 5.4, 0.5]] + [
        [d, 0.3 * d] for d in (rng.uniform(0.005, 0.02) for _ in range(150))
    ]
    cap = 4000 + 150 * 15 - 900
    best = dp_optimum(costs, dists, cap)
    assert _solve_core(costs, dists, cap).distortion > best + 1e-6  # the trap is real
    s = solve(costs, dists, cap)
    assert s.cost <= cap
    assert s.distortion == pytest.approx(best, abs=1e-9)
    assert s.choice[0] == 1  # the middle option

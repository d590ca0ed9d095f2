import math
import random

import pytest

from qcompile.passes.allocate import (
    AllocationRecord, RDTable, brute_force_allocate, exact_allocate, hull_slopes, lagrangian_allocate, lower_hull,
)

BITS = (4, 6, 8, 8, 16)
NAMES = ("int4", "int6", "int8", "fp8_e4m3", "bf16")


def random_tables(rng: random.Random, nodes: int) -> list[RDTable]:
    """Tables shaped like real ones: D falls roughly 4x per 2 bits, with noise; bf16 costs 16 bits and is exact."""
    tables = []
    for n in range(nodes):
        params = rng.randint(1, 12)
        scale = 10 ** rng.uniform(-3, 0)
        d = [scale * 4 ** (-(b - 4) / 2) * rng.uniform(0.3, 3.0) for b in BITS[:-1]] + [0.0]
        tables.append(RDTable(f"n{n}", NAMES, [b * params for b in BITS], d))
    return tables


def test_hull_drops_dominated_and_non_convex_points():
    t = RDTable("x", ("a", "b", "c", "d", "e"), (4, 6, 8, 8, 16), (10.0, 9.0, 2.0, 3.0, 0.0))
    hull = lower_hull(t)
    assert [t.options[i] for i in hull] == ["a", "c", "e"]  # b lies above the a-c chord, d is dominated by c
    slopes = hull_slopes(t, hull)
    assert slopes == sorted(slopes, reverse=True) and all(s > 0 for s in slopes)


@pytest.mark.parametrize("seed", range(40))
def test_hull_is_convex_and_below_every_point(seed):
    rng = random.Random(seed)
    t = random_tables(rng, 1)[0]
    hull = lower_hull(t)
    assert hull[0] in [i for i, r in enumerate(t.rates) if r == min(t.rates)]
    slopes = hull_slopes(t, hull)
    assert all(a >= b for a, b in zip(slopes, slopes[1:]))
    for i, (r, d) in enumerate(zip(t.rates, t.distortions)):  # every option lies on or above the hull
        for a, b in zip(hull, hull[1:]):
            if t.rates[a] <= r <= t.rates[b]:
                chord = t.distortions[a] + (t.distortions[b] - t.distortions[a]) * (r - t.rates[a]) / (t.rates[b] - t.rates[a])
                assert d >= chord - 1e-12


@pytest.mark.parametrize("seed", range(25))
def test_lagrangian_meets_budget_is_on_hull_and_optimal_for_its_rate(seed):
    rng = random.Random(seed)
    tables = random_tables(rng, rng.randint(2, 6))
    lo, hi = sum(min(t.rates) for t in tables), sum(max(t.rates) for t in tables)
    budget = rng.uniform(lo, hi)
    pure = lagrangian_allocate(tables, budget, fill=False)
    assert pure.rate <= budget
    for t in tables:
        assert pure.choice[t.key] in lower_hull(t)
    # optimal among all allocations with at most its own rate (a Lagrangian solution is exact there)
    assert math.isclose(brute_force_allocate(tables, pure.rate).distortion, pure.distortion, rel_tol=1e-9, abs_tol=1e-15)
    # against the exact optimum for the real budget: never better, and within the duality gap lam * (budget - rate)
    exact = brute_force_allocate(tables, budget)
    assert exact.distortion <= pure.distortion + 1e-15
    assert pure.distortion - exact.distortion <= pure.lam * (budget - pure.rate) * (1 + 1e-9) + 1e-15
    filled = lagrangian_allocate(tables, budget)
    assert filled.rate <= budget and exact.distortion - 1e-15 <= filled.distortion <= pure.distortion + 1e-15


@pytest.mark.parametrize("seed", range(10))
def test_dp_equals_brute_force_with_integer_rates(seed):
    rng = random.Random(100 + seed)
    tables = random_tables(rng, 5)
    budget = rng.randint(int(sum(min(t.rates) for t in tables)), int(sum(max(t.rates) for t in tables)))
    dp, bf = exact_allocate(tables, budget), brute_force_allocate(tables, budget)
    assert dp.rate <= budget
    assert math.isclose(dp.distortion, bf.distortion, rel_tol=1e-12, abs_tol=1e-15)


def test_coarse_dp_still_fits_the_budget_and_is_near_lagrangian():
    rng = random.Random(7)
    tables = random_tables(rng, 30)
    budget = 5.0 / 16 * sum(max(t.rates) for t in tables)
    lag = lagrangian_allocate(tables, budget)
    dp = exact_allocate(tables, budget, unit=0.5)
    assert dp.rate <= budget and dp.distortion <= lag.distortion * (1 + 1e-9)


def test_budget_extremes_and_errors():
    rng = random.Random(3)
    tables = random_tables(rng, 4)
    top = lagrangian_allocate(tables, sum(max(t.rates) for t in tables))
    assert top.distortion == 0.0  # everything in bf16
    low = lagrangian_allocate(tables, sum(min(t.rates) for t in tables))
    assert all(tables[i].options[low.choice[t.key]] == "int4" for i, t in enumerate(tables))
    with pytest.raises(ValueError, match="below the smallest achievable"):
        lagrangian_allocate(tables, sum(min(t.rates) for t in tables) - 1)
    with pytest.raises(ValueError, match="n0.*non-finite"):
        RDTable("n0", ("a",), (1.0,), (math.nan,))
    with pytest.raises(ValueError, match="duplicate"):
        lagrangian_allocate([tables[0], tables[0]], 1e9)


def test_record_roundtrip_and_validation():
    rec = AllocationRecord(
        4.5, "measured", ["int4", "int8"], [1.0],
        {"a": {"choice": "int4", "bits": 4, "params": 10, "distortion": {"int4": [0.1], "int8": [0.01]}},
         "b": {"choice": "int8", "bits": 8, "params": 30, "distortion": {"int4": [0.2], "int8": [0.02]}}},
        predicted=0.12,
    )
    again = AllocationRecord.from_dict(rec.to_dict())
    assert again == rec and again.average_bits == pytest.approx(7.0) and again.bits_of("a") == 4
    bad = rec.to_dict()
    bad["nodes"] = {"a": {**rec.nodes["a"], "choice": "int6"}}
    with pytest.raises(ValueError, match="node 'a' chose 'int6'"):
        AllocationRecord.from_dict(bad)
    bad["nodes"] = {"a": {**rec.nodes["a"], "distortion": {"int4": [0.1, 0.2], "int8": [0.0]}}}
    with pytest.raises(ValueError, match="node 'a'"):
        AllocationRecord.from_dict(bad)

"""Bit allocation as rate-distortion optimization over per-node tables (pure functions, no torch).

Each quantizable node ``n`` has options ``b`` (weight formats) with a rate ``R_n(b)`` (weight bits x
parameters) and a distortion ``D_n(b)`` (model-output error when only ``n`` is quantized with ``b``).
Assuming additivity, ``D(plan) ~ sum_n D_n(b_n)``; we minimize it subject to ``sum_n R_n(b_n) <= budget``.

* :func:`lower_hull`: the options on a node's lower convex hull (the only ones a Lagrangian picks).
* :func:`lagrangian_allocate`: for a multiplier ``lam`` every node takes ``argmin D + lam R`` on its
  hull (slope equalization); ``lam`` is bisected to meet the budget, then leftover budget is spent
  greedily by hull slope.
* :func:`exact_allocate` (integer DP over discretized rates) and :func:`brute_force_allocate`:
  exact optima over *all* options, to check the Lagrangian against.
* :class:`AllocationRecord`: what a plan stores about an allocation (JSON, validated on load).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np


@dataclass(frozen=True)
class RDTable:
    """The options of one node with their rates and distortions."""

    key: str
    options: tuple[str, ...]
    rates: tuple[float, ...]
    distortions: tuple[float, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "options", tuple(self.options))
        object.__setattr__(self, "rates", tuple(float(r) for r in self.rates))
        object.__setattr__(self, "distortions", tuple(float(d) for d in self.distortions))
        if not self.options or not len(self.options) == len(self.rates) == len(self.distortions):
            raise ValueError(f"node '{self.key}': options, rates and distortions must be non-empty and of equal length")
        bad = [o for o, r, d in zip(self.options, self.rates, self.distortions) if not (math.isfinite(r) and math.isfinite(d)) or r < 0]
        if bad:
            raise ValueError(f"node '{self.key}': non-finite or negative rate / distortion for option(s) {bad}")


@dataclass
class Allocation:
    """A choice of option per node, with its total rate and predicted distortion."""

    choice: dict[str, int]  # node key -> index into its table's options
    rate: float
    distortion: float
    lam: float | None = None  # the multiplier (Lagrangian solutions only)

    def options(self, tables: Sequence[RDTable]) -> dict[str, str]:
        return {t.key: t.options[self.choice[t.key]] for t in tables}


def lower_hull(table: RDTable) -> list[int]:
    """Indices of the options on the lower convex hull of (rate, distortion), by increasing rate.

    Dominated options (another has no more rate and no more distortion) are dropped first, so
    along the hull the rate increases, the distortion decreases and the slopes
    ``(D_i - D_{i+1}) / (R_{i+1} - R_i)`` decrease (diminishing returns).
    """
    order = sorted(range(len(table.options)), key=lambda i: (table.rates[i], table.distortions[i]))
    frontier: list[int] = []
    for i in order:  # Pareto front: strictly decreasing distortion with increasing rate
        if not frontier or table.distortions[i] < table.distortions[frontier[-1]]:
            if frontier and table.rates[i] == table.rates[frontier[-1]]:
                frontier.pop()
            frontier.append(i)
    hull: list[int] = []
    for i in frontier:
        while len(hull) >= 2 and _cross(table, hull[-2], hull[-1], i) <= 0:
            hull.pop()
        hull.append(i)
    return hull


def _cross(t: RDTable, a: int, b: int, c: int) -> float:
    """z of (b - a) x (c - a); > 0 for a counter-clockwise (convex from below) turn."""
    return (t.rates[b] - t.rates[a]) * (t.distortions[c] - t.distortions[a]) - (t.distortions[b] - t.distortions[a]) * (t.rates[c] - t.rates[a])


def hull_slopes(table: RDTable, hull: list[int]) -> list[float]:
    """Distortion saved per unit of rate by each step up the hull (decreasing)."""
    return [
        (table.distortions[a] - table.distortions[b]) / (table.rates[b] - table.rates[a]) for a, b in zip(hull, hull[1:])
    ]


def _totals(tables: Sequence[RDTable], choice: dict[str, int]) -> tuple[float, float]:
    return sum(t.rates[choice[t.key]] for t in tables), sum(t.distortions[choice[t.key]] for t in tables)


def choose_at(tables: Sequence[RDTable], hulls: Sequence[list[int]], lam: float) -> dict[str, int]:
    """Every node's ``argmin D + lam R`` over its hull (ties: the lower rate)."""
    out = {}
    for t, h in zip(tables, hulls):
        out[t.key] = min(h, key=lambda i: (t.distortions[i] + lam * t.rates[i], t.rates[i]))
    return out


def _check_keys(tables: Sequence[RDTable]) -> None:
    keys = [t.key for t in tables]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate node keys in the allocation tables: {sorted(k for k in keys if keys.count(k) > 1)[:5]}")


def _check_budget(tables: Sequence[RDTable], budget: float) -> None:
    lowest = sum(min(t.rates) for t in tables)
    if budget < lowest * (1 - 1e-12):
        raise ValueError(f"rate budget {budget:.6g} is below the smallest achievable total rate {lowest:.6g}")


def lagrangian_allocate(tables: Sequence[RDTable], budget: float, *, fill: bool = True, iters: int = 200) -> Allocation:
    """Minimize the summed distortion under ``sum rate <= budget`` by slope equalization.

    Bisects ``lam`` (geometrically, between the smallest and largest hull slope) for the
    smallest multiplier whose hull choices fit the budget. The result is optimal for its own
    rate. With ``fill`` the leftover budget is then spent greedily on the steepest hull steps
    that still fit (each node stays on its hull).
    """
    _check_keys(tables)
    _check_budget(tables, budget)
    hulls = [lower_hull(t) for t in tables]
    slopes = [s for t, h in zip(tables, hulls) for s in hull_slopes(t, h)]
    top = {t.key: h[-1] for t, h in zip(tables, hulls)}
    if not slopes or _totals(tables, top)[0] <= budget:
        rate, dist = _totals(tables, top)
        return Allocation(top, rate, dist, 0.0)
    positive = [s for s in slopes if s > 0]
    lo, hi = min(positive) / 2, max(slopes) * 2  # at hi every node sits at its lowest hull rate
    for _ in range(iters):
        mid = math.sqrt(lo * hi)
        if _totals(tables, choose_at(tables, hulls, mid))[0] <= budget:
            hi = mid
        else:
            lo = mid
        if hi / lo - 1 < 1e-12:
            break
    choice = choose_at(tables, hulls, hi)
    if fill:
        choice = _greedy_fill(tables, hulls, choice, budget)
    rate, dist = _totals(tables, choice)
    return Allocation(choice, rate, dist, hi)


def _greedy_fill(tables: Sequence[RDTable], hulls: Sequence[list[int]], choice: dict[str, int], budget: float) -> dict[str, int]:
    """Move nodes one hull step up, steepest slope first, while the budget allows."""
    choice = dict(choice)
    left = budget - _totals(tables, choice)[0]
    while True:
        best = None
        for t, h in zip(tables, hulls):
            pos = h.index(choice[t.key])
            if pos + 1 == len(h):
                continue
            a, b = h[pos], h[pos + 1]
            extra = t.rates[b] - t.rates[a]
            if extra <= left:
                slope = (t.distortions[a] - t.distortions[b]) / extra
                if best is None or slope > best[0]:
                    best = (slope, t.key, b, extra)
        if best is None:
            return choice
        _, key, b, extra = best
        choice[key] = b
        left -= extra


def exact_allocate(tables: Sequence[RDTable], budget: float, unit: float = 1.0) -> Allocation:
    """The exact optimum over all options by dynamic programming over rates in multiples of ``unit``.

    Rates are rounded *up* to whole units (so the result always fits the budget); with integer
    rates and ``unit=1`` the optimum is exact. Cost: nodes x options x (budget / unit).
    """
    _check_keys(tables)
    _check_budget(tables, budget)
    cap = int(math.floor(budget / unit + 1e-9))
    if cap > 5_000_000:
        raise ValueError(f"exact_allocate: {cap} rate steps is too many; pass a larger unit")
    inf = math.inf
    dp = np.full(cap + 1, inf)
    dp[0] = 0.0
    back = np.zeros((len(tables), cap + 1), dtype=np.int16)
    for n, t in enumerate(tables):
        new = np.full(cap + 1, inf)
        arg = np.zeros(cap + 1, dtype=np.int16)
        for i, (r, d) in enumerate(zip(t.rates, t.distortions)):
            steps = int(math.ceil(r / unit - 1e-9))
            if steps > cap:
                continue
            cand = np.full(cap + 1, inf)
            cand[steps:] = dp[: cap + 1 - steps] + d
            better = cand < new
            new[better] = cand[better]
            arg[better] = i
        dp, back[n] = new, arg
    end = int(np.argmin(dp))
    if not math.isfinite(dp[end]):
        raise ValueError(f"exact_allocate: no allocation fits the budget {budget:.6g} at unit {unit:.6g}")
    choice: dict[str, int] = {}
    pos = end
    for n in range(len(tables) - 1, -1, -1):
        t = tables[n]
        i = int(back[n][pos])
        choice[t.key] = i
        pos -= int(math.ceil(t.rates[i] / unit - 1e-9))
    rate, dist = _totals(tables, choice)
    return Allocation(choice, rate, dist)


def brute_force_allocate(tables: Sequence[RDTable], budget: float) -> Allocation:
    """The exact optimum by enumerating every combination (small graphs only)."""
    _check_keys(tables)
    _check_budget(tables, budget)
    if math.prod(len(t.options) for t in tables) > 2_000_000:
        raise ValueError("brute_force_allocate: too many combinations; use exact_allocate")
    best: tuple[float, float, tuple[int, ...]] | None = None
    for combo in itertools.product(*(range(len(t.options)) for t in tables)):
        rate = sum(t.rates[i] for t, i in zip(tables, combo))
        if rate > budget:
            continue
        dist = sum(t.distortions[i] for t, i in zip(tables, combo))
        if best is None or (dist, rate) < best[:2]:
            best = (dist, rate, combo)
    assert best is not None  # _check_budget guarantees the all-lowest-rate combination fits
    return Allocation({t.key: i for t, i in zip(tables, best[2])}, best[1], best[0])


# -- what a plan records ------------------------------------------------------------------------
@dataclass
class AllocationRecord:
    """A plan's record of its bit allocation: budget, per-node tables and choices, cost and prediction.

    ``nodes[key]`` holds ``choice`` (the candidate name; with ``per_group`` a list, one per timestep
    group), ``bits`` (averaged over groups by ``group_weights``), ``params`` and ``distortion``
    (candidate -> one value per timestep group). ``predicted`` is ``sum_n D_n(b_n)`` (weighted over
    groups), ``measured`` the model-output distortion of the chosen plan on the same calls.
    """

    budget_bits: float
    estimator: str
    candidates: list[str]
    group_weights: list[float]
    nodes: dict[str, dict[str, Any]]
    lam: float | None = None
    predicted: float = 0.0
    measured: float | None = None
    forward_passes: int = 0
    backward_passes: int = 0
    wall_s: float = 0.0
    calls: list[int] = field(default_factory=list)  # kept calls used per group
    per_group: bool = False  # one choice per (node, timestep group)
    solver: dict[str, Any] = field(default_factory=dict)  # e.g. the exact DP's distortion at the same budget (gap check)

    @property
    def total_params(self) -> int:
        return sum(int(n["params"]) for n in self.nodes.values())

    @property
    def average_bits(self) -> float:
        total = self.total_params
        return sum(n["bits"] * n["params"] for n in self.nodes.values()) / total if total else 0.0

    def bits_of(self, key: str) -> float | None:
        node = self.nodes.get(key)
        return None if node is None else float(node["bits"])

    def group_choices(self, key: str) -> list[str]:
        """The candidate of node ``key`` in every timestep group."""
        choice = self.nodes[key]["choice"]
        return list(choice) if isinstance(choice, list) else [choice] * len(self.group_weights)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AllocationRecord":
        """Rebuild and validate (types, finiteness, group counts, choices among the candidates)."""
        rec = cls(**d)
        groups = len(rec.group_weights)
        if groups < 1 or not all(isinstance(w, (int, float)) and w >= 0 for w in rec.group_weights):
            raise ValueError(f"allocation group_weights must be non-negative numbers, got {rec.group_weights}")
        for key, node in rec.nodes.items():
            if set(node) != {"choice", "bits", "params", "distortion"}:
                raise ValueError(f"allocation entry of node '{key}' has fields {sorted(node)}")
            choices = node["choice"] if rec.per_group else [node["choice"]]
            if not isinstance(choices, list) or len(choices) != (groups if rec.per_group else 1):
                raise ValueError(f"allocation of node '{key}' has choice {node['choice']!r}: expected one per group")
            if any(not isinstance(c, str) or c not in rec.candidates or c not in node["distortion"] for c in choices):
                raise ValueError(f"allocation of node '{key}' chose {node['choice']!r}, not among its candidates")
            if not _finite(node["bits"]):
                raise ValueError(f"allocation of node '{key}' has invalid bits {node['bits']!r}")
            if not isinstance(node["params"], int) or node["params"] <= 0:
                raise ValueError(f"allocation of node '{key}' has invalid params {node['params']!r}")
            for cand, per_group in node["distortion"].items():
                if cand not in rec.candidates or len(per_group) != groups or not all(_finite(v) for v in per_group):
                    raise ValueError(f"allocation of node '{key}': invalid distortion for {cand!r}: {per_group}")
        for name in ("predicted", "wall_s", "budget_bits"):
            if not _finite(getattr(rec, name)):
                raise ValueError(f"allocation {name} must be a finite number, got {getattr(rec, name)!r}")
        return rec


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)

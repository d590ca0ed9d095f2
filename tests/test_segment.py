"""Data-driven timestep groups: the DP finds the boundaries planted in synthetic range statistics."""

import itertools
import math

import pytest
import torch

import qcompile
from qcompile import QuantConfig
from qcompile.segment import groups_from_ranges, segment, segment_cost


def ranges(levels, sites=3, jitter=0.0, seed=0):
    """(lo, hi) of `sites` sites over bins whose absolute range is levels[b] (times a per-site factor)."""
    g = torch.Generator().manual_seed(seed)
    amax = torch.tensor(levels, dtype=torch.float64)[None, :] * torch.linspace(1, 3, sites, dtype=torch.float64)[:, None]
    amax = amax * (1 + jitter * torch.rand(amax.shape, generator=g, dtype=torch.float64))
    return -amax, amax


def test_step_changes_are_found_exactly_and_auto_picks_their_number():
    lo, hi = ranges([1.0] * 7 + [10.0] * 5 + [100.0] * 8, jitter=0.05)
    w = torch.ones(20)
    assert segment(lo, hi, w, 3).starts == (0, 7, 12)
    auto = segment(lo, hi, w, "auto")
    assert auto.starts == (0, 7, 12)
    assert auto.loss_db[2] < 1.0 < auto.loss_db[1]  # within tolerance only once both steps are cut


def test_cost_is_the_db_loss_of_the_union_range():
    lo, hi = ranges([1.0, 2.0], sites=1)
    cost = segment_cost(lo, hi, torch.tensor([3.0, 1.0]))
    assert cost[0, 1] == pytest.approx(0.0) and cost[1, 2] == pytest.approx(0.0)
    assert cost[0, 2] == pytest.approx(3 * 20 * math.log10(2.0))  # the 3 steps of bin 0 lose 6 dB each


def test_dp_is_optimal_against_brute_force():
    g = torch.Generator().manual_seed(1)
    lo = -torch.rand(4, 9, generator=g, dtype=torch.float64) * 10
    hi = torch.rand(4, 9, generator=g, dtype=torch.float64) * 10
    lo[1, 3] = hi[1, 3] = math.nan  # a site not observed in one bin
    w = torch.randint(1, 5, (9,), generator=g).double()
    cost = segment_cost(lo, hi, w)
    for k in (2, 3, 4):
        brute = min(
            sum(float(cost[a, b]) for a, b in zip((0, *cuts), (*cuts, 9))) for cuts in itertools.combinations(range(1, 9), k - 1)
        )
        seg = segment(lo, hi, w, k)
        got = sum(float(cost[a, b]) for a, b in zip(seg.starts, (*seg.starts[1:], 9)))
        assert got == pytest.approx(brute)
        assert seg.loss_db[k - 1] * float(w.sum() * 4 - w[3]) == pytest.approx(brute)


def test_heavily_weighted_bins_pull_boundaries():
    lo, hi = ranges([1, 2, 4, 8, 16, 32], sites=1)
    light, heavy = torch.ones(6), torch.tensor([1.0, 1, 1, 1, 50, 50])
    assert segment(lo, hi, light, 2).starts == (0, 3)
    assert segment(lo, hi, heavy, 2).starts[1] >= 4  # the expensive bins get their own group


def test_groups_edges_lie_between_bins():
    lo, hi = ranges([1, 1, 50, 50])
    bins = [(0.0, 0.0, 2), (10.0, 10.0, 2), (20.0, 20.0, 2), (30.0, 30.0, 2)]
    groups, seg = groups_from_ranges(bins, lo, hi, 2)
    assert groups.edges == (15.0,) and seg.count == 2


def test_calibration_with_segmented_groups_cuts_at_the_range_jump():
    class Jump(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(8, 8)

        def forward(self, x, t):
            return self.a(x * torch.where(t > 0.6, 30.0, 1.0).reshape(-1, 1))

    x = torch.randn(4, 8)

    def run(m):
        for t in torch.linspace(1, 0, 10):  # 0.67 and above are scaled by 30
            m(x, t.expand(4))

    cfg = QuantConfig.preset("w8a8-int8").replace(timestep_groups="auto")
    assert cfg.group_boundaries == "segment"
    plan = qcompile.calibrate(Jump().eval(), run, cfg, progress=False)
    assert plan.groups.count == 2
    assert 0.56 < plan.groups.edges[0] < 0.67
    assert len(plan.meta["segmentation_loss_db"]) == 10

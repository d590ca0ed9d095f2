"""Data-driven timestep groups: cut the trajectory where activation ranges change most.

Calibration keeps, per quantized site and per timestep bin, the observed range ``[lo, hi]``. If a
group of bins shares one quantizer, each bin's values are quantized on the group's (wider) range
instead of their own: at that site and step the rounding noise grows by ``20 log10(R_group / r_bin)``
dB. The cost of a segment is that loss summed over sites and over the steps (calls) in its bins;
dynamic programming finds the K contiguous segments of least total cost (exact, ``O(K B^2)`` after an
``O(S B^2)`` cost table for S sites and B <= 64 bins). With ``"auto"`` the count is the smallest K
whose mean loss per site and step is within ``tol_db`` of the best reachable with ``max_groups``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from .timesteps import TimestepGroups

MAX_GROUPS = 16  # "auto" never picks more (each group is one more compiled graph per Dynamo frame)
TOL_DB = 1.0  # "auto": accept K once its mean range loss is within this many dB of MAX_GROUPS'


@dataclass(frozen=True)
class Segmentation:
    """DP result: the start bin of every group (first is 0) and the mean range loss (dB) per K."""

    starts: tuple[int, ...]
    loss_db: tuple[float, ...]  # loss_db[k - 1]: least mean loss per site and step with k groups

    @property
    def count(self) -> int:
        return len(self.starts)


def segment_cost(lo: torch.Tensor, hi: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``cost[i, j]`` (dB x steps, summed over sites) of one quantizer for bins ``i .. j-1``.

    ``lo`` / ``hi`` are ``(sites, bins)`` ranges (``nan`` where a site was not observed in a bin);
    ranges are widened to include 0, as activation quantizers do. ``weights``: steps per bin.
    """
    lo, hi = lo.double(), hi.double()
    seen = ~(lo.isnan() | hi.isnan())
    lo = torch.where(seen, lo.clamp(max=0.0), torch.inf)
    hi = torch.where(seen, hi.clamp(min=0.0), -torch.inf)
    sites, bins = lo.shape
    width = torch.where(seen, hi - lo, 0.0)
    floor = (width.amax(dim=1, keepdim=True) * 1e-6).clamp_min(1e-30)  # all-zero inputs: no log(0)
    w = weights.double()[None, :] * seen  # steps per (site, bin) that count
    own = torch.where(seen, 20 * torch.log10(torch.maximum(width, floor)), 0.0)
    cum_w = torch.nn.functional.pad(w.cumsum(dim=1), (1, 0))  # (sites, bins + 1)
    cum_own = torch.nn.functional.pad((w * own).cumsum(dim=1), (1, 0))
    cost = torch.full((bins + 1, bins + 1), torch.inf, dtype=torch.float64)
    for i in range(bins):
        union = hi[:, i:].cummax(dim=1).values - lo[:, i:].cummin(dim=1).values  # (sites, bins - i)
        union_db = 20 * torch.log10(torch.maximum(union, floor).nan_to_num(posinf=0.0, neginf=0.0))
        n = cum_w[:, i + 1 :] - cum_w[:, i : i + 1]
        spent = cum_own[:, i + 1 :] - cum_own[:, i : i + 1]
        cost[i, i + 1 :] = torch.where(n > 0, n * union_db - spent, 0.0).sum(dim=0)
    return cost


def segment(lo: torch.Tensor, hi: torch.Tensor, weights: torch.Tensor, k: int | str, max_groups: int = MAX_GROUPS, tol_db: float = TOL_DB) -> Segmentation:
    """The least-loss split of the bins into ``k`` contiguous groups (``"auto"``: K chosen as above)."""
    bins = lo.shape[1]
    if bins == 0:
        return Segmentation((0,), (0.0,))
    cost = segment_cost(lo, hi, weights)
    total = float((weights.double()[None, :] * ~(lo.isnan() | hi.isnan())).sum()) or 1.0
    k_max = min(bins, max_groups if k == "auto" else int(k))
    best = torch.full((k_max + 1, bins + 1), torch.inf, dtype=torch.float64)
    arg = torch.zeros((k_max + 1, bins + 1), dtype=torch.long)
    best[0, 0] = 0.0
    for g in range(1, k_max + 1):
        for j in range(g, bins + 1):
            cand = best[g - 1, :j] + cost[:j, j]
            i = int(torch.argmin(cand))
            best[g, j], arg[g, j] = cand[i], i
    loss = tuple(float(best[g, bins]) / total for g in range(1, k_max + 1))
    if k == "auto":
        chosen = next(g for g in range(1, k_max + 1) if loss[g - 1] <= loss[-1] + tol_db)
    else:
        chosen = k_max
    starts, j = [], bins
    for g in range(chosen, 0, -1):
        j = int(arg[g, j])
        starts.append(j)
    return Segmentation(tuple(reversed(starts)), loss)


def bin_ranges(bin_ids: Sequence[int], stats: Mapping[tuple[str, int], Any], sites: Mapping[str, bool]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lo, hi)`` of shape ``(sites, bins)`` from per-(site, bin) statistics with ``amin`` / ``amax``.

    ``sites`` maps each site key to whether its quantizer is symmetric (then the range is ``±absmax``);
    ``nan`` where a site has no statistics in a bin.
    """
    lo = torch.full((len(sites), len(bin_ids)), math.nan, dtype=torch.float64)
    hi = lo.clone()
    for r, (key, symmetric) in enumerate(sites.items()):
        for c, bid in enumerate(bin_ids):
            s = stats.get((key, bid))
            if s is not None:
                amax = max(abs(s.amin), abs(s.amax))
                lo[r, c], hi[r, c] = (-amax, amax) if symmetric else (s.amin, s.amax)
    return lo, hi


def segment_groups(
    bins: Sequence[Sequence[float]], stats: Mapping[tuple[str, int], Any], sites: Mapping[str, bool], k: int | str
) -> tuple[TimestepGroups, Segmentation]:
    """Timestep groups from calibration's bins (``[lo_t, hi_t, calls, id]``, sorted by timestep) and statistics."""
    lo, hi = bin_ranges([int(b[3]) for b in bins], stats, sites)
    return groups_from_ranges([(b[0], b[1], b[2]) for b in bins], lo, hi, k)


def groups_from_ranges(bins: Sequence[tuple[float, float, float]], lo: torch.Tensor, hi: torch.Tensor, k: int | str) -> tuple[TimestepGroups, Segmentation]:
    """Timestep groups from per-bin ranges. ``bins``: ``(lo_t, hi_t, calls)`` sorted by timestep."""
    weights = torch.tensor([float(b[2]) for b in bins])
    seg = segment(lo, hi, weights, k)
    edges = tuple((bins[s - 1][1] + bins[s][0]) / 2 for s in seg.starts[1:])
    return TimestepGroups(edges), seg

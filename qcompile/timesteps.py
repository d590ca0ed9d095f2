"""Timesteps: finding them in a denoiser call, and mapping timestep values to groups."""

from __future__ import annotations

import bisect
import inspect
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from .errors import CalibrationError


def find_timestep(signature: inspect.Signature, args: tuple, kwargs: dict, names: Sequence[str]) -> tuple[str, float] | None:
    """(argument name, timestep value) of a denoiser call, or None if no argument is named so.

    A tensor timestep must hold one value for the whole batch (as sampling loops do); its
    first element is returned. Raises :class:`CalibrationError` if the batch mixes timesteps.
    """
    try:
        bound = signature.bind_partial(*args, **kwargs).arguments
    except TypeError:
        bound = dict(kwargs)
    for name in names:
        if name in bound and bound[name] is not None:
            return name, timestep_value(name, bound[name])
    return None


def timestep_value(name: str, value: Any) -> float:
    """The scalar timestep of an argument (Python number or tensor with one distinct value)."""
    if isinstance(value, torch.Tensor):
        flat = value.detach().reshape(-1)
        if flat.numel() == 0:
            raise CalibrationError(f"timestep argument '{name}' is an empty tensor")
        first = flat[0]
        if flat.numel() > 1 and not bool((flat == first).all()):
            raise CalibrationError(
                f"timestep argument '{name}' holds different values in one batch ({flat[:4].tolist()}...); "
                "calibration needs one timestep per denoiser call"
            )
        return float(first)
    if isinstance(value, (int, float)):
        return float(value)
    raise CalibrationError(f"timestep argument '{name}' has unsupported type {type(value).__name__}")


@dataclass(frozen=True)
class TimestepGroups:
    """Maps a timestep value to a group: group ``i`` holds ``edges[i-1] <= t < edges[i]``."""

    edges: tuple[float, ...] = ()

    @property
    def count(self) -> int:
        return len(self.edges) + 1

    def group_of(self, t: float | None) -> int:
        return 0 if t is None else bisect.bisect_right(self.edges, t)

    def to_dict(self) -> dict:
        return {"edges": list(self.edges)}

    @classmethod
    def from_dict(cls, d: dict) -> "TimestepGroups":
        edges = tuple(float(e) for e in d["edges"])
        if list(edges) != sorted(edges):
            raise ValueError(f"timestep group edges must be ascending, got {edges}")
        return cls(edges)


def equal_groups(timesteps: Sequence[float], k: int) -> TimestepGroups:
    """``k`` groups holding equal numbers of the distinct observed timesteps (uniform in step index)."""
    values = sorted(set(timesteps))
    k = max(1, min(k, len(values)))
    edges = []
    for i in range(1, k):
        j = round(i * len(values) / k)
        edges.append((values[j - 1] + values[j]) / 2)
    return TimestepGroups(tuple(edges))


@dataclass
class StepBins:
    """Online partition of observed timestep values into at most ``cap`` contiguous bins.

    Each new timestep value opens a bin; past the cap the two neighbouring bins with the fewest
    calls merge. Statistics are kept per bin and later merged into timestep groups.
    """

    cap: int = 64
    bins: list[list[float]] = field(default_factory=list)  # [lo, hi, calls, id], sorted by lo
    next_id: int = 0
    merged: list[tuple[int, int]] = field(default_factory=list)  # (absorbed id, into id), in order

    def bin_of(self, t: float) -> int:
        for b in self.bins:
            if b[0] <= t <= b[1]:
                b[2] += 1
                return int(b[3])
        self.bins.append([t, t, 1, self.next_id])
        self.bins.sort(key=lambda b: b[0])
        self.next_id += 1
        bid = self.next_id - 1
        if len(self.bins) > self.cap:
            i = min(range(len(self.bins) - 1), key=lambda i: self.bins[i][2] + self.bins[i + 1][2])
            a, b = self.bins[i], self.bins.pop(i + 1)
            a[0], a[1], a[2] = min(a[0], b[0]), max(a[1], b[1]), a[2] + b[2]
            self.merged.append((int(b[3]), int(a[3])))
            if bid == b[3]:
                bid = int(a[3])
        return bid

    def members(self, groups: TimestepGroups) -> list[list[int]]:
        """Bin ids of each group (a bin belongs to the group of its midpoint)."""
        out: list[list[int]] = [[] for _ in range(groups.count)]
        for lo, hi, _, bid in self.bins:
            out[groups.group_of((lo + hi) / 2)].append(int(bid))
        return out

import inspect

import pytest
import torch

from qcompile.errors import CalibrationError
from qcompile.timesteps import StepBins, TimestepGroups, equal_groups, find_timestep


def denoiser(sample, timestep, encoder_hidden_states=None):
    pass


SIG = inspect.signature(denoiser)


def test_timestep_found_positionally_and_by_keyword():
    x = torch.zeros(2, 4)
    assert find_timestep(SIG, (x, torch.tensor([7, 7])), {}, ("timestep",)) == ("timestep", 7.0)
    assert find_timestep(SIG, (x,), {"timestep": 3}, ("t", "timestep")) == ("timestep", 3.0)
    assert find_timestep(SIG, (x,), {}, ("timestep",)) is None


def test_mixed_timesteps_in_a_batch_are_refused():
    with pytest.raises(CalibrationError, match="different values"):
        find_timestep(SIG, (None, torch.tensor([1.0, 2.0])), {}, ("timestep",))


def test_groups_map_values_by_edges():
    g = TimestepGroups((250.0, 500.0))
    assert [g.group_of(t) for t in (0, 249, 250, 999)] == [0, 0, 1, 2]
    assert TimestepGroups.from_dict(g.to_dict()) == g


def test_equal_groups_split_distinct_steps_evenly():
    steps = [float(t) for t in range(980, -1, -20)]  # 50 DDIM-like steps
    g = equal_groups(steps + steps, 5)  # repeated calls (e.g. CFG) do not skew the split
    counts = [sum(g.group_of(t) == k for t in steps) for k in range(5)]
    assert counts == [10] * 5
    assert equal_groups(steps, 1).count == 1


def test_step_bins_merge_past_cap_and_keep_order():
    bins = StepBins(cap=8)
    ids = [bins.bin_of(float(t)) for t in range(100)]
    assert len(bins.bins) == 8
    assert [b[0] for b in bins.bins] == sorted(b[0] for b in bins.bins)
    assert sum(b[2] for b in bins.bins) == 100
    assert len(set(ids)) > 8  # ids of absorbed bins were handed out, then merged
    members = bins.members(TimestepGroups((50.0,)))
    assert sorted(members[0] + members[1]) == sorted(int(b[3]) for b in bins.bins)

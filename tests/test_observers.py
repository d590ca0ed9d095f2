import pytest
import torch

from qcompile.config import ActSpec, Format, RangeMethod
from qcompile.lowering.formats import fake_quantize
from qcompile.observers import ActivationStats, choose_qparams


def stats_of(x, size=4096):
    s = ActivationStats(size, torch.Generator().manual_seed(0))
    for i, chunk in enumerate(x.split(len(x) // 8)):
        s.update(chunk, i)
    return s


def mse(x, qp):
    return (fake_quantize(x, qp.fmt, torch.tensor(qp.scale), qp.zero_point, qp.symmetric) - x).pow(2).mean().item()


def test_exact_min_max_and_bounded_reservoir():
    x = torch.randn(100000)
    s = stats_of(x)
    assert s.amin == x.min().item() and s.amax == x.max().item()
    assert s.values.numel() == 4096 and s.count == 100000
    assert abs(s.values.mean().item()) < 0.1 and abs(s.values.std().item() - 1) < 0.1


@pytest.mark.parametrize("df,gain", [(2.0, 0.9), (4.0, 0.7)])
def test_mse_range_beats_minmax_on_heavy_tails(df, gain):
    """Full-data MSE (not just the sample's) improves: the exact tails keep outliers in the estimate."""
    x = torch.distributions.StudentT(df).sample((200000,))
    s = stats_of(x)
    for spec in [ActSpec(Format.INT8, symmetric=True), ActSpec(Format.INT8, symmetric=False), ActSpec(Format.FP8_E4M3)]:
        minmax = choose_qparams(s, ActSpec(spec.fmt, spec.symmetric, RangeMethod.MINMAX))
        searched = choose_qparams(s, spec)
        # fp8's relative precision gains little from clipping: it must only not be worse
        bound = mse(x, minmax) * (1.0 if spec.fmt is Format.FP8_E4M3 else gain)
        assert mse(x, searched) <= bound, spec


def test_asymmetric_range_fits_relu_output():
    x = torch.relu(torch.randn(50000))
    qp = choose_qparams(stats_of(x), ActSpec(Format.INT8, symmetric=False, range_method=RangeMethod.MINMAX))
    assert qp.lo == 0.0 and qp.zero_point == -128


def test_percentile_range():
    x = torch.randn(100000)
    qp = choose_qparams(stats_of(x), ActSpec(Format.INT8, symmetric=True, range_method=RangeMethod.PERCENTILE, percentile=99.0))
    assert 2.3 < qp.hi < 2.9


def test_merge_keeps_bounded_uniform_sample():
    a, b = stats_of(torch.zeros(40000)), stats_of(torch.ones(40000))
    a.merge(b)
    assert a.values.numel() == 4096 and 0.4 < a.values.mean().item() < 0.6
    assert (a.amin, a.amax, a.count) == (0.0, 1.0, 80000)

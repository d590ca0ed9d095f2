"""Outlier split of int8 activations and the per-group activation floor (temporal mixed precision)."""

import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import qcompile
from qcompile import ConfigError, PlanFileError, QuantConfig, QuantPlan
from qcompile.backend import build_quantized_graph, node_op
from qcompile.config import ActSpec, Format, WeightSpec
from qcompile.lowering import reference, triton_lowering
from qcompile.lowering.weights import quantize_weight
from qcompile.metrics import sqnr_db
from qcompile.observers import ActivationStats, _grid_range, choose_qparams, with_outlier_split
from qcompile.passes.convert import Lowering
from tests.test_plan import _rewrite

W8A8 = QuantConfig.preset("w8a8-int8")


def heavy_tailed(n=200_000, seed=0):
    """A Gaussian body with 0.05 % of values 50-200x larger: the shape of a UNet's input at t = 0."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)
    idx = torch.randperm(n, generator=g)[: n // 2000]
    x[idx] = (torch.rand(idx.numel(), generator=g) * 150 + 50) * torch.sign(torch.randn(idx.numel(), generator=g))
    return x.reshape(-1, 100)


def stats_of(x, split=None):
    s = ActivationStats(16384, torch.Generator().manual_seed(0), channel_dim=-1, split=split)
    s.update(x, 0)
    return s


def apply(q, x, splits=None):
    """x through the reference lowering's input quantizer for ActQParams ``q``."""
    scale, zp = q.slice_params()
    o = q.outlier_scales()
    return reference._maybe_quantize_input(
        x, torch.tensor(scale), torch.tensor(zp, dtype=torch.int32), q.fmt, not q.symmetric, channel_dim=-1, splits=splits,
        outlier_scale=None if o is None else torch.tensor(o),
    )


# -- reference numerics -------------------------------------------------------------------------
def test_split_reconstructs_the_input_exactly_and_outliers_are_sparse():
    x = heavy_tailed()
    q = choose_qparams(stats_of(x), W8A8.act, 0.0)
    x_in, x_out = reference.split_outliers(x, torch.tensor(q.scale), torch.tensor(q.zero_point), "int8", q.symmetric)
    assert torch.equal(x_in + x_out, x)
    lo, hi = _grid_range(q)  # what the inlier grid represents (the zero point is rounded)
    inside = (x >= lo) & (x <= hi)
    assert torch.equal(x_in[inside], x[inside]) and torch.all(x_out[inside] == 0)
    assert 0 < (x_out != 0).float().mean() < 0.02  # sparse: at most 1 % per side by construction
    codes = reference.quantize_outliers(x_out, torch.tensor(q.outlier.scale))
    assert codes.dtype == torch.int8 and torch.all(codes[inside] == 0)
    assert torch.all(reference.quantize_outliers(x_out, torch.tensor(0.0)) == 0)  # scale 0: no outlier part


def test_split_beats_a_single_quantizer_on_a_heavy_tailed_tensor_and_the_estimate_holds():
    x = heavy_tailed()
    stats = stats_of(x)
    single = choose_qparams(stats, W8A8.act)
    split = choose_qparams(stats, W8A8.act, 3.0)
    assert single.outlier is None and split.outlier is not None
    measured_single, measured_split = sqnr_db(x, apply(single, x)), sqnr_db(x, apply(split, x))
    assert measured_split > measured_single + 15.0
    assert abs((measured_split - measured_single) - split.outlier.gain_db) < 2.0  # the estimate from sample + tails


def test_a_gaussian_gains_little_and_no_split_below_the_threshold():
    x = torch.randn(500, 100, generator=torch.Generator().manual_seed(1))
    q = choose_qparams(stats_of(x), W8A8.act, 6.0)  # two int8 grids still beat one on a Gaussian, by a few dB
    assert q.outlier is None and q.outlier_gain_db is not None and 0.0 < q.outlier_gain_db < 6.0
    heavy = stats_of(heavy_tailed())
    gain = with_outlier_split(heavy, choose_qparams(heavy, W8A8.act), 0.0).outlier_gain_db
    assert choose_qparams(heavy, W8A8.act, gain + 0.1).outlier is None


def test_qlinear_with_outliers_is_the_linear_of_both_dequantized_parts():
    x = heavy_tailed(20_000).reshape(-1, 100)
    w = torch.randn(32, 100)
    q = choose_qparams(stats_of(x), W8A8.act, 0.0)
    qw = quantize_weight(w, "int8", "linear", None, False)
    s, zp, o = torch.tensor(q.scale), torch.tensor(q.zero_point, dtype=torch.int32), torch.tensor(q.outlier.scale)
    y = reference.qlinear(x, qw.data, qw.scale, None, s, zp, wfmt="int8", group_size=None, weight_shape=(32, 100), afmt="int8", asym=True,
                          outlier_scale=o)
    x_in, x_out = reference.split_outliers(x, s, zp, "int8", False)
    dq_in = reference.dequantize_activation(reference.quantize_activation(x_in, s, zp, "int8", False), s, zp, x.dtype)
    dq_out = reference.quantize_outliers(x_out, o).float() * o
    wq = qw.dequantize()
    torch.testing.assert_close(y, F.linear(dq_in, wq) + F.linear(dq_out, wq), rtol=1e-5, atol=1e-4)
    plain = reference.qlinear(x, qw.data, qw.scale, None, s, zp, wfmt="int8", group_size=None, weight_shape=(32, 100), afmt="int8", asym=True)
    zero = reference.qlinear(x, qw.data, qw.scale, None, s, zp, wfmt="int8", group_size=None, weight_shape=(32, 100), afmt="int8", asym=True,
                             outlier_scale=torch.tensor(0.0))
    assert torch.equal(plain, zero)  # a zero outlier scale is exactly the unsplit quantizer
    assert sqnr_db(F.linear(x, w), y) > sqnr_db(F.linear(x, w), plain) + 10.0


def test_split_shortcuts_get_one_outlier_decision_per_slice():
    g = torch.Generator().manual_seed(2)
    x = torch.cat([heavy_tailed(30_000).reshape(-1, 60), torch.randn(500, 40, generator=g)], dim=1)  # slice 0 heavy, slice 1 Gaussian
    q = choose_qparams(stats_of(x, split=(0, 60, 100)), W8A8.act, 8.0)
    assert q.outlier is None and q.slices[0].outlier is not None and q.slices[1].outlier is None
    scales = q.outlier_scales()
    assert scales[1] == 0.0 and scales[0] == q.slices[0].outlier.scale
    both = apply(q, x, splits=(0, 60, 100))
    first = apply(q.slices[0], x[:, :60])
    second = apply(q.slices[1], x[:, 60:])
    assert torch.equal(both, torch.cat([first, second], dim=1))


# -- config ------------------------------------------------------------------------------------
@pytest.mark.parametrize("field", ["outlier_split_db", "group_act_floor_db"])
def test_config_validation_and_serialization(field):
    cfg = W8A8.replace(**{field: 3})
    assert getattr(cfg, field) == 3.0 and isinstance(getattr(cfg, field), float)
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg
    for bad in (math.nan, math.inf, True, "3"):
        with pytest.raises(ConfigError, match=field):
            W8A8.replace(**{field: bad})
    with pytest.raises(ConfigError, match="int8 activations"):
        W8A8.replace(act=None, **{field: 3.0})
    with pytest.raises(ConfigError, match="int8 activations"):
        QuantConfig.preset("w8a8-fp8").replace(**{field: 3.0})
    assert getattr(cfg.naive(), field) is None


def test_config_negative_gain_refused_and_version_2_dicts_load():
    with pytest.raises(ConfigError, match="outlier_split_db"):
        W8A8.replace(outlier_split_db=-1.0)
    d = W8A8.to_dict()
    d["version"] = 2
    del d["outlier_split_db"], d["group_act_floor_db"]
    assert QuantConfig.from_dict(d) == W8A8


# -- calibration, plan, floor ------------------------------------------------------------------
class SpikyToy(nn.Module):
    """Quantized linears on an input with rare large spikes, plus an exact term that fades as the timestep goes to 0
    (so the small-timestep group's output SQNR is the quantized path's alone, the large-timestep group's is higher)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 32)
        self.b = nn.Linear(32, 16)

    def forward(self, x, timestep):
        h = self.a(x)
        return self.b(torch.relu(h)) + 20 * timestep.reshape(-1, 1) * torch.tanh(x)


def spiky_input():
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(3))
    x[0, 0], x[1, 3], x[5, 7] = 90.0, -70.0, 50.0
    return x


def loop(model, x=None, steps=6):
    x = spiky_input() if x is None else x
    for t in torch.linspace(1, 0, steps):
        model(x, t.expand(x.shape[0]))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return SpikyToy().eval()


@pytest.fixture(scope="module")
def outlier_plan(model):
    cfg = W8A8.replace(timestep_groups=2, outlier_split_db=1.0)
    return qcompile.calibrate(model, loop, cfg, progress=False)


def test_calibration_splits_the_spiky_input_and_the_plan_round_trips(outlier_plan, tmp_path):
    a = outlier_plan.nodes["a"]
    assert all(q.outlier is not None and q.outlier.gain_db > 1.0 for q in a.acts)
    loaded = QuantPlan.load(outlier_plan.save(tmp_path / "o.qplan"))
    assert loaded.digest() == outlier_plan.digest()
    assert [n.acts for n in loaded.nodes.values()] == [n.acts for n in outlier_plan.nodes.values()]
    report = str(qcompile.inspect(loaded))
    assert "outlier split (outlier_split_db=1)" in report and f"+{a.acts[0].outlier.gain_db:.1f} dB" in report


def test_outlier_split_improves_the_compiled_model(model, outlier_plan):
    plain = qcompile.calibrate(model, loop, W8A8.replace(timestep_groups=2), progress=False)
    x, t = spiky_input(), torch.full((64,), 0.8)
    with torch.no_grad():
        ref = model(x, t)
        split = qcompile.compile(model, outlier_plan)(x, t)
        torch._dynamo.reset()
        single = qcompile.compile(model, plain)(x, t)
    assert sqnr_db(ref, split) > sqnr_db(ref, single) + 3.0


def test_plan_validation_of_outliers(outlier_plan, tmp_path):
    def edit_outlier(**change):
        def edit(doc, tensors):
            node = next(n for n in doc["nodes"] if n["key"] == "a")
            node["acts"][0]["outlier"].update(change)
        return edit

    path = outlier_plan.save(tmp_path / "o.qplan")
    _rewrite(path, edit_outlier(scale=-1.0))
    with pytest.raises(PlanFileError, match="invalid plan metadata"):
        QuantPlan.load(path)
    path = outlier_plan.save(tmp_path / "o.qplan")
    _rewrite(path, lambda d, t: next(n for n in d["nodes"] if n["key"] == "a")["acts"][0].update(fmt="fp8_e4m3"))
    with pytest.raises(PlanFileError, match="node 'a' has an outlier quantizer in group 0 on a non-int8 input"):
        QuantPlan.load(path)
    path = outlier_plan.save(tmp_path / "o.qplan")
    _rewrite(path, lambda d, t: d.update(format_version=5))  # (the first version no qdiff reads yet)
    with pytest.raises(PlanFileError, match="format version 5; .* reads versions 1, 2, 3, 4"):
        QuantPlan.load(path)


def test_version_1_plans_still_load(model, tmp_path):
    plan = qcompile.calibrate(model, loop, W8A8, progress=False)

    def to_v1(doc, tensors):
        doc["format_version"] = 1
        doc.pop("act_floor")
        doc["config"]["version"] = 2
        for k in ("outlier_split_db", "group_act_floor_db"):
            doc["config"].pop(k)

    path = plan.save(tmp_path / "v1.qplan")
    _rewrite(path, to_v1)
    loaded = QuantPlan.load(path)
    assert loaded.act_floor is None and loaded.config == plan.config
    assert all(a.outlier is None for n in loaded.quantized_nodes() for a in n.acts)


def test_floor_keeps_16_bit_activations_only_in_the_groups_below_it(model, tmp_path):
    cfg = W8A8.replace(timestep_groups=2, group_act_floor_db=-100.0)
    measured = qcompile.calibrate(model, loop, cfg, progress=False).act_floor.measured_db  # nothing below -100 dB
    low, high = sorted(range(2), key=measured.__getitem__)
    assert measured[high] - measured[low] > 6.0  # the small-timestep group suffers from the input's rounding
    floor = (measured[low] + measured[high]) / 2
    plan = qcompile.calibrate(model, loop, cfg.replace(group_act_floor_db=floor), progress=False)
    rec = plan.act_floor
    assert rec.a16_groups == [low] and rec.step_share == pytest.approx(0.5)
    assert rec.after_db[low] > rec.measured_db[low] + 3.0 and rec.after_db[high] == rec.measured_db[high]
    for n in plan.quantized_nodes():
        assert n.acts[low] is None and n.acts[high] is not None and n.weight is not None
    assert node_op(plan.nodes["a"], low).act_fmt is None  # W8A16: weights stay int8
    loaded = QuantPlan.load(plan.save(tmp_path / "f.qplan"))
    assert loaded.act_floor == rec
    report = str(qcompile.inspect(loaded))
    assert f"group(s) [{low}] keep activations unquantized" in report and "50% of the calibration steps" in report

    def quantize_in_a16_group(doc, tensors):
        doc["nodes"][0]["acts"][low] = doc["nodes"][0]["acts"][high]

    path = plan.save(tmp_path / "f.qplan")
    _rewrite(path, quantize_in_a16_group)
    with pytest.raises(PlanFileError, match=f"quantizes its input in group {low}, which the activation floor keeps at 16 bits"):
        QuantPlan.load(path)
    path = plan.save(tmp_path / "f.qplan")
    _rewrite(path, lambda d, t: d["act_floor"].update(a16_groups=[5]))
    with pytest.raises(PlanFileError, match="invalid activation floor record"):
        QuantPlan.load(path)


# -- Triton lowering -----------------------------------------------------------------------------
def test_triton_lowering_falls_back_to_the_reference_and_says_so(outlier_plan):
    q = node_op(outlier_plan.nodes["a"], 0)
    assert q.act_outlier_scale is not None
    assert "outlier-split" in triton_lowering.fallback_reason(q)
    assert triton_lowering.fallback_reason(node_op(outlier_plan.nodes["a"], 0).__class__(q.weight, "int8", False, q.act_scale, q.act_zero_point)) is None
    x = spiky_input()
    kwargs = dict(wfmt="int8", group_size=None, weight_shape=tuple(q.weight.shape), afmt="int8", asym=True)
    s, zp, o = torch.tensor(q.act_scale), torch.tensor(q.act_zero_point, dtype=torch.int32), torch.tensor(q.act_outlier_scale)
    assert torch.equal(
        triton_lowering.qlinear(x, q.weight.data, q.weight.scale, None, s, zp, outlier_scale=o, **kwargs),
        reference.qlinear(x, q.weight.data, q.weight.scale, None, s, zp, outlier_scale=o, **kwargs),
    )
    outlier_plan.warned.clear()
    lowering = Lowering(fallback=triton_lowering.fallback_reason)  # reference functions, the Triton lowering's fallback rule
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        captured = []

        def backend(gm, inputs):
            captured.append(build_quantized_graph(gm, inputs, outlier_plan, 0, lowering))
            return gm.forward

        torch._dynamo.reset()
        torch.compile(SpikyToy().eval(), backend=backend)(x, torch.zeros(64))
    ours = [str(w.message) for w in caught if "run the reference lowering" in str(w.message)]
    assert len(ours) == 1 and "  a: outlier-split input" in ours[0]

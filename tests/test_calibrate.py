import pytest
import torch

import qcompile
from qcompile import CalibrationError, QuantConfig
from qcompile.calibrate import ObservedDenoiser
from tests.toy_models import ConvTransformerToy, GraphBreakToy, run_steps


def test_calibration_observes_every_call_of_the_trajectory():
    model = ConvTransformerToy().eval()
    x = torch.randn(2, 1, 16, 16)
    plan = qcompile.calibrate(model, lambda m: run_steps(m, x, steps=9), QuantConfig.preset("w8a8-int8"), progress=False)
    assert [c["timestep"] for c in plan.calls] == pytest.approx(torch.linspace(1, 0, 9).tolist())
    node = plan.nodes["enc.linear1"]
    assert node.call_log.shape == (9, 4)  # call, timestep, min, max for every call
    assert node.input_shape == (2, 16, 32)
    assert node.stats[0]["count"] == 9 * 2 * 16 * 32


def test_timestep_groups_are_kept_in_the_plan():
    model = ConvTransformerToy().eval()
    x = torch.randn(2, 1, 16, 16)
    cfg = QuantConfig.preset("w8a8-int8")
    cfg = cfg.replace(timestep_groups=3)
    plan = qcompile.calibrate(model, lambda m: run_steps(m, x, steps=9), cfg, progress=False)
    assert plan.groups.count == 3
    assert [c["group"] for c in plan.calls] == [2, 2, 2, 1, 1, 1, 0, 0, 0]
    scales = {a.scale for a in plan.nodes["unpatch"].acts}
    assert len(scales) == 3  # unpatch's input scales with (1 + t), so each group gets its own range
    with pytest.raises(Exception, match=r"qcompile.compile"):
        torch.compile(model, backend="qdiff", options={"plan": plan})(x, torch.ones(2))


def test_groups_need_a_timestep_argument():
    model = GraphBreakToy().eval()
    cfg = QuantConfig.preset("w8a8-int8").replace(calibration=qcompile.CalibrationSpec(timestep_args=("sigma",)), timestep_groups=2)
    with pytest.raises(CalibrationError, match="sigma"):
        qcompile.calibrate(model, lambda m: run_steps(m, torch.randn(2, 16)), cfg, progress=False)


def test_stand_in_exposes_the_model_attributes():
    model = GraphBreakToy().eval()
    model.config = {"sample_size": 16}
    seen = {}

    def run(m):
        assert isinstance(m, ObservedDenoiser)
        seen["config"] = m.config
        seen["dtype"] = next(m.parameters()).dtype
        run_steps(m, torch.randn(2, 16), 2)

    qcompile.calibrate(model, run, QuantConfig.preset("w8a8-int8"), progress=False)
    assert seen == {"config": {"sample_size": 16}, "dtype": torch.float32}


def test_sampler_that_never_calls_the_model_is_an_error():
    with pytest.raises(CalibrationError, match="never called"):
        qcompile.calibrate(GraphBreakToy().eval(), lambda m: None, QuantConfig.preset("w8a8-int8"), progress=False)


def test_skip_patterns_and_first_last_policy():
    model = ConvTransformerToy().eval()
    x = torch.randn(2, 1, 16, 16)
    cfg = QuantConfig.preset("w4a8").replace(skip_names=("enc.linear*",))
    plan = qcompile.calibrate(model, lambda m: run_steps(m, x), cfg, progress=False)
    assert "skip pattern 'enc.linear*'" in plan.nodes["enc.linear1"].reason
    assert plan.nodes["patch"].weight.fmt == "int8" and plan.nodes["unpatch"].weight.fmt == "int8"  # first/last at 8 bit
    assert plan.nodes["head"].weight.fmt == "int4"
    skip = qcompile.calibrate(model, lambda m: run_steps(m, x), cfg.replace(first_last="skip", skip_names=()), progress=False)
    assert not skip.nodes["patch"].quantized and "first/last" in skip.nodes["unpatch"].reason


@pytest.mark.parametrize("rounding,bias_correction", [("gptq", False), ("learned", False), ("learned", True)])
def test_error_aware_rounding_calibrates_roundtrips_and_beats_nearest_rounding(tmp_path, rounding, bias_correction):
    import dataclasses

    from qcompile.config import Rounding

    import torch.nn as nn

    from qcompile import QuantConfig, QuantPlan
    from qcompile.metrics import sqnr_db

    class TwoLinears(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(48, 96), nn.Linear(96, 24)

        def forward(self, x, t):
            return self.b(torch.tanh(self.a(x))) * (1 + t.reshape(-1, 1))

    torch.manual_seed(0)
    model = TwoLinears().eval()
    mix = 0.5 * torch.randn(48, 48) + torch.eye(48)
    x = torch.randn(256, 48) @ mix  # correlated input features
    run = lambda m: [m(x, torch.full((256,), t)) for t in (0.8, 0.2)]  # noqa: E731
    base = QuantConfig.preset("w4a16").replace(first_last="quantize", bias_correction=bias_correction)
    cfg = base.replace(weight=dataclasses.replace(base.weight, rounding=Rounding(rounding), rounding_iters=300))
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg
    results = {}
    for name, c in (("rtn", base), (rounding, cfg)):
        torch._dynamo.reset()
        plan = qcompile.calibrate(model, run, c, progress=False)
        plan = QuantPlan.load(plan.save(tmp_path / f"{name}.qplan"))
        torch._dynamo.reset()
        q = torch.compile(model, backend="qdiff", options={"plan": plan})
        xt = torch.randn(64, 48) @ mix
        with torch.no_grad():
            results[name] = sqnr_db(model(xt, torch.full((64,), 0.5)), q(xt, torch.full((64,), 0.5)))
        if name != "rtn":  # the plan keeps its rounding; the weights are ordinary int4 storage
            assert plan.config.weight.rounding is Rounding(rounding) and plan.nodes["a"].weight.data.dtype == torch.uint8
    print(results)
    assert results[rounding] > results["rtn"] + 1.0, results


class _SharedInput(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = torch.nn.LayerNorm(16)
        self.q, self.k, self.v, self.o = (torch.nn.Linear(16, 16) for _ in range(4))
        self.conv = torch.nn.Conv2d(16, 16, 1)

    def forward(self, x):
        h = self.norm(x)
        a = torch.softmax(self.q(h) @ self.k(h).transpose(-1, -2), -1) @ self.v(h)
        img = h.transpose(1, 2).unsqueeze(-1)
        return self.o(a) + self.conv(img).squeeze(-1).transpose(1, 2)


@pytest.mark.parametrize("preset", ["w8a8-int8", "w8a8-fp8"])
def test_sites_reading_one_tensor_share_their_statistics_and_quantizer(preset):
    """q / k / v read the same LayerNorm output: one observer's statistics, so one activation quantizer (a producer
    then quantizes once and the Triton lowering fuses the three GEMMs); o reads another tensor."""
    torch.manual_seed(0)
    model = _SharedInput().eval()
    cfg = QuantConfig.preset(preset).replace(first_last="quantize")
    plan = qcompile.calibrate(model, lambda m: [m(torch.randn(2, 8, 16) * (1 + i)) for i in range(4)], cfg, progress=False)
    act = {k: plan.nodes[k].acts[0] for k in ("q", "k", "v", "o")}
    assert act["q"] == act["k"] == act["v"] and act["o"] != act["q"]
    assert plan.nodes["conv"].acts[0] is not None  # a conv on a view of h: another tensor, its own statistics
    assert plan.meta["shared_statistics"] == {"k": "q", "v": "q"}
    notes = {r.key: r.note for r in qcompile.inspect(plan).rows}
    assert "input quantizer shared with q" in notes["v"] and "shared" not in notes["q"] + notes["o"]

"""Real diffusers denoisers (tiny configs, random weights): capture, calibrate, quantize, run on CPU."""

import statistics

import pytest
import torch

import qcompile
from qcompile import QuantConfig
from qcompile.metrics import sqnr_db
from tests.tiny_models import ALL_FACTORIES

# Output SQNR floors (dB) of one denoiser step vs full precision, per preset, for random-weight
# tiny models (trained models do better: see docs/quality.md). Measured values are ~5-10 dB above.
FLOORS = {"w8a8-int8": 25.0, "w8a8-fp8": 16.0, "w4a8": 12.0, "w4a16": 12.0}
TIMESTEPS = (900, 700, 500, 300, 100)


def with_timestep(case, t):
    """(args, kwargs) of ``case`` with one timestep value for the whole batch."""
    b = case.args[0].shape[0] if case.args else next(iter(case.kwargs.values())).shape[0]
    tt = torch.full((b,), t, dtype=case.timestep.dtype)
    if case.timestep_arg in case.kwargs:
        return case.args, {**case.kwargs, case.timestep_arg: tt}
    return (case.args[0], tt, *case.args[2:]), case.kwargs


def trajectory(case, model):
    """A stand-in sampling loop: each step feeds back a damped denoiser output."""
    args, kwargs = case.args, case.kwargs
    for t in TIMESTEPS:
        args, kwargs = with_timestep(case, t)
        out = case.output(model(*args, **kwargs))
        if args and out.shape == args[0].shape:
            args = (args[0] - 0.1 * out, *args[1:])


@pytest.mark.parametrize("name", list(ALL_FACTORIES))
@pytest.mark.parametrize("preset", list(FLOORS))
def test_quantized_denoiser_stays_close(name, preset):
    case = ALL_FACTORIES[name]()
    model = case.model
    plan = qcompile.calibrate(model, lambda m: trajectory(case, m), QuantConfig.preset(preset), progress=False)
    kinds = {n.kind.value for n in plan.quantized_nodes()}
    assert "linear" in kinds and "conv" in kinds  # every model has both, found by what the graph computes
    assert not plan.float_nodes() or all("first/last" in n.reason for n in plan.float_nodes()), [
        (n.key, n.reason) for n in plan.float_nodes()
    ]
    qmodel = torch.compile(model, backend="qdiff", options={"plan": plan})
    sq = []
    with torch.no_grad():
        for t in (800, 400, 50):
            args, kwargs = with_timestep(case.with_batch(2, seed=7), t)
            sq.append(sqnr_db(case.output(model(*args, **kwargs)), case.output(qmodel(*args, **kwargs))))
    print("SQNR", name, preset, round(statistics.mean(sq), 1))
    assert statistics.mean(sq) > FLOORS[preset], sq


def test_dit_reused_embedder_weights_get_their_own_sites():
    case = ALL_FACTORIES["dit"]()
    plan = qcompile.calibrate(case.model, lambda m: trajectory(case, m), QuantConfig.preset("w8a8-int8"), progress=False)
    assert any(k.endswith("#1") for k in plan.nodes)  # the final layer calls block 0's embedder again

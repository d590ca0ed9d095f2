"""The two trained models of ../shared, quantized end to end with their real samplers."""

import statistics

import pytest
import torch

import qcompile
from qcompile import QuantConfig
from qcompile.evaluate import StepSQNR

pytestmark = pytest.mark.shared

# Per-step SQNR (mean over a short trajectory) floors; docs/quality.md has the full 50-step numbers.
UNET_FLOORS = {"w8a8-int8": 22.0, "w8a8-fp8": 16.0, "w4a8": 16.0, "w4a16": 17.0}
VIT_FLOORS = {"w8a8-int8": 29.0, "w8a8-fp8": 25.0, "w4a8": 20.0, "w4a16": 20.0}


def per_step_sqnr(model, qmodel, sample, noise):
    pair = StepSQNR(model, qmodel)
    with torch.no_grad():
        sample(pair, noise)
    return pair.sqnr


@pytest.mark.parametrize("preset", list(UNET_FLOORS))
def test_mnist_unet_ddim(shared_models, preset):
    from qcompile.zoo import ddim_sample, load_mnist_unet

    unet = load_mnist_unet()
    calib = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    plan = qcompile.calibrate(unet, lambda m: ddim_sample(m, calib, num_steps=10), QuantConfig.preset(preset), progress=False)
    assert len(plan.quantized_nodes()) == 52 and len(plan.calls) == 10
    assert [c["timestep"] for c in plan.calls] == [900.0, 800.0, 700.0, 600.0, 500.0, 400.0, 300.0, 200.0, 100.0, 0.0]
    qunet = torch.compile(unet, backend="qdiff", options={"plan": plan})
    sq = per_step_sqnr(unet, qunet, lambda m, n: ddim_sample(m, n, num_steps=10), torch.randn(4, 1, 28, 28))
    assert statistics.mean(sq) > UNET_FLOORS[preset], sq


@pytest.mark.parametrize("preset", list(VIT_FLOORS))
def test_mnist_vit_flow_with_guidance(shared_models, preset):
    from qcompile.zoo import flow_sample, load_mnist_vit

    vit = load_mnist_vit()
    labels = torch.arange(8) % 10
    calib = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    plan = qcompile.calibrate(vit, lambda m: flow_sample(m, calib, labels, num_steps=10), QuantConfig.preset(preset), progress=False)
    keys = list(plan.nodes)
    assert "transformer.0.self_attn.in_proj" in keys  # found through the eval fast path
    assert len(plan.quantized_nodes()) == 18
    qvit = torch.compile(vit, backend="qdiff", options={"plan": plan})
    sample = lambda m, n: flow_sample(m, n, torch.arange(4) % 10, num_steps=10)  # noqa: E731
    sq = per_step_sqnr(vit, qvit, sample, torch.randn(4, 1, 28, 28))
    assert statistics.mean(sq) > VIT_FLOORS[preset], sq


def test_plan_roundtrip_on_trained_model(shared_models, tmp_path):
    from qcompile.zoo import ddim_sample, load_mnist_unet

    unet = load_mnist_unet()
    calib = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    plan = qcompile.calibrate(unet, lambda m: ddim_sample(m, calib, num_steps=5), QuantConfig.preset("w4a8"), progress=False)
    loaded = qcompile.QuantPlan.load(plan.save(tmp_path / "unet.qplan"))
    x, t = torch.randn(2, 1, 28, 28), torch.full((2, 1), 500)
    with torch.no_grad():
        a = torch.compile(unet, backend="qdiff", options={"plan": plan})(x, t)
        torch._dynamo.reset()
        b = torch.compile(unet, backend="qdiff", options={"plan": loaded})(x, t)
    assert torch.equal(a, b)
    assert (tmp_path / "unet.qplan").stat().st_size < 0.5 * sum(p.numel() * 4 for p in unet.parameters())

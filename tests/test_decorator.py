import copy

import pytest
import torch

import qcompile
from qcompile import ConfigError, PlanMismatchError, QuantConfig
from tests.tiny_models import tiny_unet2d
from tests.toy_models import GraphBreakToy, run_steps


class Holder:
    def __init__(self, unet):
        self.unet = unet


def test_first_call_calibrates_and_saves_later_calls_reuse(tmp_path):
    path = tmp_path / "toy.qplan"
    calls = []

    @qcompile.quantize(QuantConfig.preset("w8a8-int8"), plan_path=path, denoiser="unet", progress=False)
    def generate(pipe, x):
        calls.append(type(pipe.unet).__name__)
        return run_steps(pipe.unet, x, 4)

    model = GraphBreakToy().eval()
    pipe = Holder(model)
    x = torch.randn(2, 16)
    with torch.no_grad():
        first = generate(pipe, x)
        second = generate(pipe, x)
    assert path.is_file()
    assert calls == ["ObservedDenoiser", "OptimizedModule", "OptimizedModule"]  # calibrate, then quantized runs
    assert pipe.unet is model  # the pipeline is left as it was
    assert torch.equal(first, second)
    plan = generate.qdiff.plans[model]
    assert len(plan.calls) == 4

    # a new decorated function with the same plan path loads instead of calibrating
    @qcompile.quantize(QuantConfig.preset("w8a8-int8"), plan_path=path, denoiser="unet", progress=False)
    def generate2(pipe, x):
        calls.append(type(pipe.unet).__name__)
        return run_steps(pipe.unet, x, 4)

    with torch.no_grad():
        assert torch.equal(generate2(pipe, x), first)
    assert calls[-1] == "OptimizedModule" and len(calls) == 4


def test_missing_denoiser_and_foreign_plan(tmp_path):
    @qcompile.quantize(QuantConfig.preset("w8a8-int8"), denoiser="transformer", progress=False)
    def f(pipe):
        return None

    with pytest.raises(ConfigError, match="no argument has a 'transformer'"):
        f(Holder(GraphBreakToy()))

    path = tmp_path / "p.qplan"
    qcompile.calibrate(GraphBreakToy().eval(), lambda m: run_steps(m, torch.randn(2, 16)), QuantConfig.preset("w8a8-int8"), progress=False).save(path)

    @qcompile.quantize(QuantConfig.preset("w8a8-int8"), plan_path=path, progress=False)
    def g(pipe):
        return pipe.unet(torch.randn(2, 3, 16, 16), torch.tensor([1, 1]))

    with pytest.raises(PlanMismatchError, match="calibrated for .*GraphBreakToy"):
        g(Holder(tiny_unet2d().model))


def test_diffusers_ddpm_pipeline_end_to_end():
    from diffusers import DDPMPipeline, DDPMScheduler

    unet = tiny_unet2d().model
    pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=50))
    config_before = dict(pipe.config)

    @qcompile.quantize(QuantConfig.preset("w8a8-int8"), denoiser="unet", progress=False)
    def generate(pipe, seed):
        return pipe(batch_size=2, num_inference_steps=6, generator=torch.Generator().manual_seed(seed), output_type="np").images

    fp = pipe(batch_size=2, num_inference_steps=6, generator=torch.Generator().manual_seed(0), output_type="np").images
    q = generate(pipe, 0)
    q_again = generate(pipe, 0)
    assert q.shape == fp.shape == (2, 16, 16, 3)
    assert abs(q - q_again).max() == 0
    assert abs(q - fp).mean() < 0.05  # random weights, 6 steps: close to full precision
    assert pipe.unet is unet and dict(pipe.config) == config_before
    assert len(generate.qdiff.plans[unet].calls) == 6
    assert generate.qdiff.graphs(unet) == 1  # one batch size: one graph (counts per pipeline: tests/test_pipelines.py)


def test_release_float_weights_frees_the_quantized_weights_of_every_frame(tmp_path):
    from qcompile.release import released_parameters

    path = tmp_path / "toy.qplan"
    model = GraphBreakToy().eval()
    keep = Holder(copy.deepcopy(model))
    x = torch.randn(2, 16)

    def make(release):
        @qcompile.quantize(QuantConfig.preset("w8a8-int8"), plan_path=path, denoiser="unet", progress=False, release_float_weights=release)
        def generate(pipe, x):
            return run_steps(pipe.unet, x, 4)

        return generate

    with torch.no_grad():
        want = make(False)(keep, x)  # calibrates on the copy and saves the plan
        got = make(True)(Holder(model), x)  # loads it
    assert torch.equal(got, want)
    assert released_parameters(model) == ["a.weight", "b.weight"] and released_parameters(keep.unet) == []

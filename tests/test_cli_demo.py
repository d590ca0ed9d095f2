"""The main job (`qdiff demo`) on a tiny saved pipeline, the bundled models, and the CLI."""

import json

import pytest
import torch

from qcompile.cli import main
from qcompile.zoo.bundled import bundled_dir, ddim_sampler, load_cifar10_dit, load_unet
from tests.tiny_models import tiny_unet2d
from tests.tiny_pipelines import require_transformers, tiny_dit_pipeline, tiny_pixart_pipeline, tiny_sd_pipeline


def test_bundled_models_load_and_denoise():
    unet = load_unet(bundled_dir("cifar10_ddpm"))
    assert unet.config.sample_size == 32 and unet.dtype == torch.float32
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        eps = unet(x, torch.tensor([500, 500])).sample
        assert eps.shape == x.shape and 0.5 < eps.std() < 1.5  # a trained eps-predictor on noise-level inputs
        dit = load_cifar10_dit()
        out = dit(x, timestep=torch.tensor([500, 500]), class_labels=torch.tensor([3, 10])).sample
    assert out.shape == x.shape
    total = sum(p.stat().st_size for p in bundled_dir("cifar10_ddpm").parent.rglob("*.safetensors"))
    assert total <= 20e6


def test_demo_on_a_local_pipeline_folder(tmp_path, capsys):
    from diffusers import DDPMPipeline, DDPMScheduler

    case = tiny_unet2d()
    DDPMPipeline(unet=case.model, scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(tmp_path / "pipe")
    out = tmp_path / "demo"
    code = main(["demo", "--model", str(tmp_path / "pipe"), "--steps", "4", "--samples", "2", "--calib-samples", "2", "--out", str(out)])
    assert code == 0
    for name in ("grid.png", "layers.md", "plan.qplan", "report.md"):
        assert (out / name).is_file(), name
    report = (out / "report.md").read_text()
    assert "PSNR" in report and "ops quantized" in report
    assert "qdiff demo:" in capsys.readouterr().out


def test_demo_rejects_a_folder_without_a_unet(tmp_path, capsys):
    assert main(["demo", "--model", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "no diffusers pipeline folder" in capsys.readouterr().err


@pytest.mark.parametrize(
    "factory, kind",
    [
        (tiny_dit_pipeline, "DiTPipeline (transformer: DiTTransformer2DModel, conditioned on class_labels)"),
        (tiny_sd_pipeline, "StableDiffusionPipeline (unet: UNet2DConditionModel, conditioned on prompt)"),
        (tiny_pixart_pipeline, "PixArtAlphaPipeline (transformer: PixArtTransformer2DModel, conditioned on prompt)"),
    ],
    ids=["dit", "sd", "pixart"],
)
def test_demo_on_a_saved_transformer_or_text_pipeline(tmp_path, capsys, factory, kind):
    if factory is not tiny_dit_pipeline:
        require_transformers()
    factory().save_pretrained(tmp_path / "pipe")
    out = tmp_path / "demo"
    code = main(["demo", "--model", str(tmp_path / "pipe"), "--steps", "3", "--samples", "2", "--calib-samples", "2", "--out", str(out)])
    assert code == 0
    for name in ("grid.png", "layers.md", "plan.qplan", "report.md"):
        assert (out / name).is_file(), name
    report = (out / "report.md").read_text()
    assert kind in report
    assert "| graphs compiled by the qdiff backend | 1 |" in report  # calibration and samples: the same CFG batch
    psnr = float(report.split("PSNR ")[1].split(" dB")[0])
    assert psnr > 20  # random tiny models, w8a8-int8: quantized samples close to FP32
    assert "qdiff demo:" in capsys.readouterr().out


def test_demo_names_the_components_of_an_unsupported_folder(tmp_path, capsys):
    folder = tmp_path / "vae_only"
    folder.mkdir()
    index = {"_class_name": "SomePipeline", "_diffusers_version": "0.42.1", "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "DDIMScheduler"]}
    (folder / "model_index.json").write_text(json.dumps(index))
    assert main(["demo", "--model", str(folder), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert str(folder) in err and "no denoiser component named unet or transformer" in err
    assert "vae (AutoencoderKL), scheduler (DDIMScheduler)" in err


def test_inspect_command_prints_a_plan(tmp_path, capsys):
    import qcompile
    from tests.toy_models import GraphBreakToy, run_steps

    path = qcompile.calibrate(GraphBreakToy().eval(), lambda m: run_steps(m, torch.randn(2, 16)), qcompile.QuantConfig.preset("w4a16"), progress=False).save(tmp_path / "p.qplan")
    assert main(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    assert "(w4a16," in text and "2/2 ops quantized" in text  # both ops are first/last: 8-bit by policy

"""Tests for the zoo: our re-implementations of the two trained MNIST models and their samplers.

Everything here reads ``../shared`` (weights, golden outputs, the MNIST test set) and is skipped
cleanly when that folder is absent. Runtime: a few seconds on 2 CPU cores.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qcompile.zoo import (
    ddim_sample,
    ddim_timesteps,
    flow_sample,
    load_mnist_test,
    load_mnist_unet,
    load_mnist_vit,
    shared_dir,
)

pytestmark = pytest.mark.shared

UNET_DIR = "models/mnist_unet_ddpm"
VIT_DIR = "models/mnist_vit_flow"


@pytest.fixture(scope="module")
def shared():
    path = shared_dir()
    if path is None:
        pytest.skip(
            "shared data folder not found (expected <repo>/../shared or $QDIFF_SHARED); "
            "the zoo tests need the trained MNIST weights from it"
        )
    return path


@pytest.fixture(scope="module")
def unet(shared):
    return load_mnist_unet()


@pytest.fixture(scope="module")
def vit(shared):
    return load_mnist_vit()


@pytest.fixture(scope="module")
def mnist(shared):
    images, labels = load_mnist_test()
    flat = images.reshape(len(images), -1)
    return {
        "images": images,
        "labels": labels,
        "unit": flat / flat.norm(dim=1, keepdim=True),
        "mean": images.mean().item(),  # 0.1325
        "background": (images < 0.1).float().mean().item(),  # 0.824
    }


def _golden(shared, sub):
    data = np.load(shared / sub / "golden.npz")
    return {k: torch.from_numpy(data[k]) for k in data.files}


def _keys(shared, sub):
    rows = []
    for line in (shared / sub / "keys.txt").read_text().splitlines():
        if line.strip():
            name, shape = line.split("\t")
            rows.append((name, shape.strip()))
    return rows


def _seeded_noise(seeds):
    return torch.cat(
        [torch.randn(1, 1, 28, 28, generator=torch.Generator().manual_seed(s)) for s in seeds]
    )


def _nearest_mnist(samples, mnist, k=5):
    """Cosine similarity of each sample (clipped to [0, 1]) with its nearest MNIST test image, and
    the majority label of its k nearest neighbours (a k-NN classifier, ~97% accurate on MNIST)."""
    flat = samples.clamp(0, 1).reshape(len(samples), -1)
    flat = flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-8)
    top = (flat @ mnist["unit"].T).topk(k, dim=1)
    return top.values[:, 0], torch.mode(mnist["labels"][top.indices], dim=1).values


def _check_digit_statistics(samples, mnist):
    # most pixels lie in the data range [0, 1]
    in_range = ((samples > -0.1) & (samples < 1.1)).float().mean().item()
    assert in_range > 0.98, in_range
    # mean ink and background fraction close to MNIST's (0.1325 and 0.824)
    mean = samples.clamp(0, 1).mean().item()
    background = (samples < 0.1).float().mean().item()
    assert abs(mean - mnist["mean"]) < 0.07, (mean, mnist["mean"])
    assert abs(background - mnist["background"]) < 0.1, (background, mnist["background"])
    # every sample has strokes
    ink = (samples > 0.5).float().mean(dim=(1, 2, 3))
    assert bool((ink > 0.03).all()), ink
    # and resembles some real digit: nearest-neighbour cosine similarity (MNIST vs MNIST: ~0.86
    # on average; uniform noise: ~0.5)
    sim, _ = _nearest_mnist(samples, mnist)
    assert sim.mean().item() > 0.75 and sim.min().item() > 0.6, sim


# ---------------------------------------------------------------------------------------------
# exact re-implementation


def test_unet_state_dict_matches_keys(shared, unet):
    mine = [(k, str(tuple(v.shape))) for k, v in unet.state_dict().items()]
    assert mine == _keys(shared, UNET_DIR)


def test_vit_state_dict_matches_keys(shared, vit):
    mine = [(k, str(tuple(v.shape))) for k, v in vit.state_dict().items()]
    assert mine == _keys(shared, VIT_DIR)
    # the attention input projection stays the stock raw parameter
    assert vit.transformer[0].self_attn.in_proj_weight.shape == (192, 64)


def test_unet_matches_golden(shared, unet):
    g = _golden(shared, UNET_DIR)
    with torch.no_grad():
        out = unet(g["x"], g["t"])
    # observed max abs error: 2.4e-6 (torch 2.13 CPU)
    torch.testing.assert_close(out, g["out"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad-fastpath", "grad-slowpath"])
def test_vit_matches_golden(shared, vit, grad):
    # under no_grad + eval, nn.TransformerEncoderLayer takes PyTorch's fused fast path; with grad
    # enabled it takes the regular (decomposed) path: both must match
    g = _golden(shared, VIT_DIR)
    with torch.set_grad_enabled(grad):
        out = vit(g["x"], g["t"], g["y"])
    # observed max abs error: 4.5e-7 (no_grad) / 5.4e-7 (grad) (torch 2.13 CPU)
    torch.testing.assert_close(out.detach(), g["out"], atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------
# torch.compile: fullgraph=True proves there are no graph breaks


def test_unet_compiles_fullgraph(shared, unet):
    torch._dynamo.reset()
    g = _golden(shared, UNET_DIR)
    compiled = torch.compile(unet, backend="eager", fullgraph=True)
    with torch.no_grad():
        eager = unet(g["x"], g["t"])
        out = compiled(g["x"], g["t"])
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=0)


def test_vit_compiles_fullgraph(shared, vit):
    torch._dynamo.reset()
    g = _golden(shared, VIT_DIR)
    compiled = torch.compile(vit, backend="eager", fullgraph=True)
    with torch.no_grad():
        eager = vit(g["x"], g["t"], g["y"])
        out = compiled(g["x"], g["t"], g["y"])
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# samplers


def test_ddim_timesteps_leading():
    assert ddim_timesteps(50)[:3] == [980, 960, 940] and ddim_timesteps(50)[-1] == 0
    assert ddim_timesteps(20) == list(range(950, -1, -50))


def test_ddim_sampler_makes_digits(shared, unet, mnist):
    calls = []

    def model(x, t):
        assert t.dtype == torch.int64 and t.shape == (x.shape[0], 1) and t.device == x.device
        calls.append(int(t[0, 0]))
        return unet(x, t)

    noise = _seeded_noise(range(4))
    samples = ddim_sample(model, noise, num_steps=20)
    assert calls == ddim_timesteps(20)
    assert samples.shape == noise.shape and torch.isfinite(samples).all()
    # data range is [0, 1] (background ~0, strokes ~1), not [-1, 1]
    _check_digit_statistics(samples, mnist)


def test_flow_sampler_makes_the_requested_digits(shared, vit, mnist):
    calls = []

    def model(x, t, y):
        assert x.shape[0] == 8 and t.shape == (8,) and t.dtype == torch.float32 and y.shape == (8,)
        assert y[4:].eq(-1).all()
        calls.append(float(t[0]))
        return vit(x, t, y)

    labels = torch.tensor([0, 1, 7, 3])
    samples = flow_sample(model, _seeded_noise(range(4)), labels)
    assert len(calls) == 50 and calls[0] == 0.0 and max(calls) < 1.0
    _check_digit_statistics(samples, mnist)
    _, predicted = _nearest_mnist(samples, mnist)
    assert predicted.tolist() == labels.tolist()


def test_flow_sampler_reproduces_reference_png(shared, vit):
    """The first row of reference_samples.png (labels 0..9, torch.manual_seed(0) noise for 40
    images) is reproduced to within uint8 rounding (observed max error 0.5 gray levels)."""
    from PIL import Image

    png = np.asarray(Image.open(shared / VIT_DIR / "reference_samples.png"), dtype=np.float32)
    assert png.shape == (4 * 84, 10 * 84)  # 4 x 10 tiles of 28 x 28 upscaled 3x
    row0 = png[:84].reshape(84, 10, 84).transpose(1, 0, 2)[:, 1::3, 1::3]

    noise = torch.randn(40, 1, 28, 28, generator=torch.Generator().manual_seed(0))[:10]
    samples = flow_sample(vit, noise, torch.arange(10))
    mine = (samples.clamp(0, 1) * 255)[:, 0].numpy()
    err = np.abs(mine - row0)
    assert err.max() <= 2.0 and err.mean() < 0.5, (err.max(), err.mean())

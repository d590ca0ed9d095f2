import json
import math

import pytest
import torch

from qcompile import fdist
from qcompile.fdist import ClassifierConfig, FeatureClassifier, class_consistency, frechet_distance, frechet_distance_gaussian


def _random_cov(d: int, seed: int) -> torch.Tensor:
    a = torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64)


def test_frechet_distance_of_1d_gaussians_is_the_closed_form():
    fd = frechet_distance_gaussian(torch.tensor([1.0]), torch.tensor([[4.0]]), torch.tensor([-0.5]), torch.tensor([[0.25]]))
    assert fd == pytest.approx((1.0 + 0.5) ** 2 + (2.0 - 0.5) ** 2, rel=1e-12)


def test_frechet_distance_with_non_commuting_covariances_matches_the_eigenvalue_form():
    ca, cb = _random_cov(6, 0), _random_cov(6, 1)
    assert not torch.allclose(ca @ cb, cb @ ca)
    mu_a, mu_b = torch.arange(6.0).double(), torch.zeros(6).double()
    # tr((Ca Cb)^1/2) = sum of square roots of the (real, non-negative) eigenvalues of Ca Cb
    cross = torch.linalg.eigvals(ca @ cb).real.clamp(min=0).sqrt().sum()
    expected = float((mu_a - mu_b).pow(2).sum() + ca.trace() + cb.trace() - 2 * cross)
    assert frechet_distance_gaussian(mu_a, ca, mu_b, cb) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance_gaussian(mu_b, cb, mu_a, ca) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_of_samples_converges_to_the_gaussian_value():
    g = torch.Generator().manual_seed(0)
    ca, cb = _random_cov(4, 2), _random_cov(4, 3)
    mu_a, mu_b = torch.tensor([0.0, 1.0, 0.0, -1.0]).double(), torch.zeros(4).double()
    a = mu_a + torch.randn(40_000, 4, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(ca).T
    b = mu_b + torch.randn(40_000, 4, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(cb).T
    assert frechet_distance(a, b) == pytest.approx(frechet_distance_gaussian(mu_a, ca, mu_b, cb), rel=0.03)


def test_frechet_distance_with_singular_covariances_is_finite_and_zero_on_itself():
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))  # rank-7 covariance in 64 dimensions
    y = x + 0.5
    assert abs(frechet_distance(x, x)) < 1e-9
    assert frechet_distance(x, y) == pytest.approx(64 * 0.25, rel=1e-6)  # shifted copy: only the mean term
    with pytest.raises(ValueError, match="at least 2 samples"):
        frechet_distance(x[:1], y)
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        frechet_distance(x, y[:, :3])


def test_class_consistency_counts_matching_predictions():
    model = FeatureClassifier(ClassifierConfig("toy", "mnist", 1, 8, (0.0,), (1.0,), widths=(2, 2, 2, 2), feature_dim=4))
    images = torch.rand(10, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    pred = fdist.predict(model, images)
    assert class_consistency(model, images, pred) == 1.0
    assert class_consistency(model, images, (pred + 1) % 10) == 0.0
    half = torch.where(torch.arange(10) < 5, pred, (pred + 1) % 10)
    assert class_consistency(model, images, half) == 0.5
    with pytest.raises(ValueError, match="takes"):
        model.features(torch.rand(2, 3, 8, 8))


def test_classifier_config_is_validated_and_round_trips(tmp_path):
    with pytest.raises(ValueError, match="dataset"):
        ClassifierConfig("x", "imagenet", 1, 28, (0.0,), (1.0,))
    with pytest.raises(ValueError, match="mean/std"):
        ClassifierConfig("x", "mnist", 1, 28, (0.0, 0.0), (1.0,))
    cfg = ClassifierConfig("toy", "mnist", 1, 8, (0.1,), (0.3,), widths=(2, 2, 2, 2), feature_dim=4)
    model = FeatureClassifier(cfg)
    fdist.save_classifier(model, tmp_path / "toy", {"steps": 1})
    loaded = fdist.load_classifier(str(tmp_path / "toy"))
    assert loaded.config == cfg and json.loads((tmp_path / "toy" / "config.json").read_text())["training"] == {"steps": 1}
    x = torch.rand(3, 1, 8, 8)
    assert torch.allclose(loaded(x), model.eval()(x), atol=1e-2)  # fp16 weights
    with pytest.raises(FileNotFoundError, match="no classifier 'nope'"):
        fdist.load_classifier("nope")


@pytest.mark.shared
@pytest.mark.parametrize("name,floor", [("mnist", 0.97), ("cifar10", 0.6)])
def test_bundled_classifier_classifies_held_out_real_images(shared_models, name, floor):
    model = fdist.load_classifier(name)
    x, y, _, _ = fdist.held_out_split(model.config)
    acc = float((fdist.predict(model, x[:1000]) == y[:1000]).double().mean())
    assert acc > floor, f"{name} classifier: accuracy {acc:.3f} on 1000 held-out images"
    recorded = json.loads((fdist.CLASSIFIERS / name / "config.json").read_text())["training"]["held_out_accuracy"]
    assert abs(acc - recorded) < 0.05


@pytest.mark.shared
def test_distribution_metric_separates_real_images_from_noise(shared_models):
    model = fdist.load_classifier("mnist")
    held, labels, _, _ = fdist.held_out_split(model.config)
    real = held[-32:]  # not in the reference set
    dist = fdist.DistributionMetric("mnist", real, labels[-32:])
    assert dist.fp32_class_consistency > 0.9 and dist.real_fd_real is not None
    noise = torch.rand(32, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    same, noisy = dist.score(real), dist.score(noise)
    assert abs(same.fd_fp32) < 1e-9 and same.fd_real == pytest.approx(dist.fp32_fd_real)
    assert noisy.fd_real > 5 * same.fd_real and noisy.class_consistency < 0.5
    assert math.isfinite(dist.real_fd_real)

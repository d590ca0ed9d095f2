"""A distribution metric for ``qdiff eval``: Fréchet distance in the feature space of our own classifiers.

This is *not* FID: the features are the 64-d penultimate layer of a small CNN the project trained
itself (``examples/train_classifier.py``) on the ``../shared`` data — one for MNIST 28x28, one for
CIFAR-10 32x32 — shipped as fp16 safetensors in ``qcompile/assets/classifiers/<name>/``. Values are only
comparable with values from the same classifier and the same sample count.

* ``load_classifier(name)``: the classifier (float32, eval) from the package assets, no network.
* ``frechet_distance(a, b)``: FD between the Gaussians fitted to two feature sets, in float64.
* ``class_consistency(model, images, labels)``: fraction of samples classified as their conditioning class.
* ``DistributionMetric``: the held-out real reference set of a classifier, and ``score`` for one variant.

Estimator: mean and unbiased sample covariance of each set, then
``FD = |mu_a - mu_b|^2 + tr(C_a) + tr(C_b) - 2 tr((C_a^1/2 C_b C_a^1/2)^1/2)``, where both square roots
are taken on symmetric positive semi-definite matrices by ``eigh`` with eigenvalues clamped at 0. That
form is exact for singular covariances (64 samples of 64-d features have rank <= 63), so no ``eps * I``
is added. The plug-in estimate is biased upward by roughly ``tr(C)/n`` per set for ``n`` samples: with
64 samples, compare rows only against the floors reported with them (FP32 samples vs real, and ``n``
held-out real images vs the same reference).
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import nn

CLASSIFIERS = Path(__file__).resolve().parent / "assets" / "classifiers"

__all__ = [
    "ClassifierConfig",
    "FeatureClassifier",
    "load_classifier",
    "save_classifier",
    "features",
    "frechet_distance",
    "frechet_distance_gaussian",
    "class_consistency",
    "held_out_split",
    "DistributionMetric",
    "FDScore",
    "fd_reference",
    "fd_fields",
    "fd_report_lines",
]


@dataclass(frozen=True)
class ClassifierConfig:
    """Architecture, input normalisation and data split of one feature classifier.

    Inputs are images in [0, 1] of shape (``in_channels``, ``size``, ``size``). The split: the
    ``split`` images of ``dataset`` are permuted with ``perm_seed``; for MNIST (test set only) the
    first ``train_count`` are training images, for CIFAR-10 (``train_count`` 0) training uses the
    train split. The remaining (held-out) images give the test accuracy, the first
    ``reference_count`` of them are the FD reference set, the next ``floor_count`` the real-vs-real floor.
    """

    name: str
    dataset: str  # "mnist" or "cifar10"
    in_channels: int
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    widths: tuple[int, int, int, int] = (16, 32, 64, 64)
    feature_dim: int = 64
    num_classes: int = 10
    split: str = "test"
    perm_seed: int = 0
    train_count: int = 0
    reference_count: int = 2000
    floor_count: int = 1000

    def __post_init__(self) -> None:
        if self.dataset not in ("mnist", "cifar10"):
            raise ValueError(f"classifier {self.name!r}: dataset must be 'mnist' or 'cifar10', got {self.dataset!r}")
        if len(self.mean) != self.in_channels or len(self.std) != self.in_channels:
            raise ValueError(f"classifier {self.name!r}: mean/std need {self.in_channels} entries")
        if self.size < 8:
            raise ValueError(f"classifier {self.name!r}: size must be at least 8, got {self.size}")
        if len(self.widths) != 4 or min(self.widths) <= 0 or self.feature_dim <= 0 or self.num_classes < 2:
            raise ValueError(f"classifier {self.name!r}: widths (4 of them) and feature_dim must be positive and num_classes >= 2")
        if min(self.train_count, self.reference_count, self.floor_count) < 0:
            raise ValueError(f"classifier {self.name!r}: split counts must be non-negative")

    @classmethod
    def from_dict(cls, d: dict) -> "ClassifierConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"classifier config has unknown keys {sorted(unknown)}")
        tup = {k: tuple(v) for k, v in d.items() if isinstance(v, list)}
        return cls(**{**d, **tup})


class FeatureClassifier(nn.Module):
    """Four 3x3 convolutions (2x2 max-pool after the first three), a ``feature_dim`` ReLU layer, a linear head."""

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = config
        c, s = config.in_channels, config.size // 8
        layers: list[nn.Module] = []
        for i, w in enumerate(config.widths):
            layers += [nn.Conv2d(c, w, 3, padding=1), nn.ReLU()] + ([nn.MaxPool2d(2)] if i < 3 else [])
            c = w
        self.body = nn.Sequential(*layers, nn.Flatten(), nn.Linear(c * s * s, config.feature_dim), nn.ReLU())
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(config.feature_dim, config.num_classes)
        self.register_buffer("mean", torch.tensor(config.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config.std).view(1, -1, 1, 1), persistent=False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features (N, feature_dim) of images in [0, 1]."""
        expected = (self.config.in_channels, self.config.size, self.config.size)
        if tuple(x.shape[1:]) != expected:
            raise ValueError(f"classifier {self.config.name!r} takes (N, {', '.join(map(str, expected))}) images, got {tuple(x.shape)}")
        return self.body((x - self.mean) / self.std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))


def save_classifier(model: FeatureClassifier, folder: str | Path, record: dict | None = None) -> Path:
    """Write ``model.safetensors`` (fp16) and ``config.json`` (config, plus ``record`` under "training")."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    meta = {"config": asdict(model.config), "training": record or {}}
    (folder / "config.json").write_text(json.dumps(meta, indent=1) + "\n")
    return folder


def _folder(name: str) -> Path:
    folder = CLASSIFIERS / name if not Path(name).is_dir() else Path(name)
    if not (folder / "config.json").is_file():
        have = sorted(p.name for p in CLASSIFIERS.iterdir()) if CLASSIFIERS.is_dir() else []
        raise FileNotFoundError(f"no classifier '{name}' at {folder} (bundled: {have})")
    return folder


def classifier_config(name: str) -> ClassifierConfig:
    """The config of a bundled classifier (or of a classifier folder)."""
    return ClassifierConfig.from_dict(json.loads((_folder(name) / "config.json").read_text())["config"])


def load_classifier(name: str) -> FeatureClassifier:
    """A bundled classifier (``mnist`` or ``cifar10``) in float32, eval mode, from ``qcompile/assets/classifiers``."""
    from safetensors.torch import load_file

    folder = _folder(name)
    model = FeatureClassifier(classifier_config(name))
    state = {k: v.float() for k, v in load_file(str(folder / "model.safetensors")).items()}
    model.load_state_dict(state)
    return model.eval()


@torch.no_grad()
def features(model: FeatureClassifier, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Features of ``images`` (in [0, 1]) in float64, computed in batches."""
    model.eval()
    return torch.cat([model.features(images[i : i + batch_size].detach().float().cpu()) for i in range(0, len(images), batch_size)]).double()


@torch.no_grad()
def predict(model: FeatureClassifier, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Predicted classes (N,) of ``images`` in [0, 1]."""
    model.eval()
    return torch.cat([model(images[i : i + batch_size].detach().float().cpu()).argmax(1) for i in range(0, len(images), batch_size)])


def _psd_sqrt(m: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh((m + m.T) / 2)
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T


def frechet_distance_gaussian(mu_a: torch.Tensor, cov_a: torch.Tensor, mu_b: torch.Tensor, cov_b: torch.Tensor) -> float:
    """Squared 2-Wasserstein (Fréchet) distance between N(mu_a, cov_a) and N(mu_b, cov_b), in float64."""
    mu_a, mu_b, cov_a, cov_b = (t.double() for t in (mu_a, mu_b, cov_a, cov_b))
    root_a = _psd_sqrt(cov_a)
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    fd = float((mu_a - mu_b).pow(2).sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2 * cross)
    return max(fd, 0.0)  # >= 0 mathematically; clamps float64 rounding of equal sets


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """FD between the Gaussians fitted (mean, unbiased covariance) to feature sets ``a`` (N, D) and ``b`` (M, D)."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets must be (N, D) and (M, D), got {tuple(a.shape)} and {tuple(b.shape)}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"need at least 2 samples per set for a covariance, got {len(a)} and {len(b)}")
    a, b = a.double(), b.double()
    return frechet_distance_gaussian(a.mean(0), torch.cov(a.T), b.mean(0), torch.cov(b.T))


def class_consistency(model: FeatureClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of ``images`` (in [0, 1]) that ``model`` classifies as their conditioning ``labels``."""
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    return float((predict(model, images) == labels.to(torch.int64).cpu()).double().mean())


def held_out_split(config: ClassifierConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(held-out images, labels, training images, labels) of the classifier's split, images in [0, 1].

    Training images are None for CIFAR-10 (``train_count`` 0): the caller reads the train split itself.
    """
    from .zoo import load_cifar10, load_mnist_test

    x, y = load_mnist_test() if config.dataset == "mnist" else load_cifar10(config.split)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(config.perm_seed))
    train, held = perm[: config.train_count], perm[config.train_count :]
    if config.train_count:
        return x[held], y[held], x[train], y[train]
    return x[held], y[held], None, None


@functools.lru_cache(maxsize=4)
def _real_sets(classifier: str) -> tuple[FeatureClassifier, torch.Tensor, torch.Tensor]:
    """(classifier, features of the real reference set, floor-pool images) — computed once per process."""
    model = load_classifier(classifier)
    cfg = model.config
    held, _, _, _ = held_out_split(cfg)
    return model, features(model, held[: cfg.reference_count]), held[cfg.reference_count : cfg.reference_count + cfg.floor_count]


@dataclass(frozen=True)
class FDScore:
    """Distribution metrics of one set of samples (None where not applicable)."""

    fd_real: float
    fd_fp32: float
    class_consistency: float | None


class DistributionMetric:
    """FD against a classifier's held-out real reference set and against FP32 samples; class consistency.

    ``fp32`` are the FP32 model's samples (in [0, 1]) from the evaluation noise; ``labels`` their
    conditioning classes (None for unconditional models). The floors for ``n = len(fp32)`` samples:
    ``fp32_fd_real`` (FP32 samples vs real) and ``real_fd_real`` (``n`` other held-out real images vs the
    same reference; None when fewer than ``n`` remain).
    """

    def __init__(self, classifier: str, fp32: torch.Tensor, labels: torch.Tensor | None = None):
        self.model, self.real, floor = _real_sets(classifier)
        self.name, self.n, self.labels = classifier, len(fp32), labels
        self.real_fd_real = frechet_distance(features(self.model, floor[: self.n]), self.real) if len(floor) >= self.n else None
        self.fp32 = features(self.model, fp32)
        self.fp32_fd_real = frechet_distance(self.fp32, self.real)
        self.fp32_class_consistency = class_consistency(self.model, fp32, labels) if labels is not None else None

    def score(self, samples: torch.Tensor) -> FDScore:
        """FD of ``samples`` (in [0, 1], same noise as the FP32 ones) vs real and vs FP32; class consistency."""
        if len(samples) != self.n:
            raise ValueError(f"expected {self.n} samples (as many as FP32 ones), got {len(samples)}")
        f = features(self.model, samples)
        cc = class_consistency(self.model, samples, self.labels) if self.labels is not None else None
        return FDScore(frechet_distance(f, self.real), frechet_distance(f, self.fp32), cc)


def fd_reference(classifier: str, fp32: torch.Tensor, labels: torch.Tensor | None = None) -> DistributionMetric:
    """The distribution metric of one evaluation case (see ``DistributionMetric``)."""
    return DistributionMetric(classifier, fp32, labels)


def fd_fields(dist: DistributionMetric | None, samples: torch.Tensor) -> dict:
    """The ``EvalResult`` fields of ``samples`` (in [0, 1]); empty without a classifier."""
    if dist is None:
        return {}
    score = dist.score(samples)
    return {
        "fd_real": score.fd_real, "fd_fp32": score.fd_fp32, "class_consistency": score.class_consistency,
        "fd_classifier": dist.name, "fd_samples": dist.n, "fp32_fd_real": dist.fp32_fd_real,
        "real_fd_real": dist.real_fd_real, "fp32_class_consistency": dist.fp32_class_consistency,
    }


def fd_report_lines(results: list) -> list[str]:
    """Markdown explaining the FD columns, with one row of floors per model (``EvalResult`` rows)."""
    firsts = {r.model: r for r in results if r.fd_classifier is not None}
    if not firsts:
        return []
    opt = lambda v, d=2: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
    lines = [
        "",
        "FD: Fréchet distance between Gaussians fitted to the 64-d penultimate features of the project's own small",
        "classifiers (`qcompile/assets/classifiers/`, trained by `examples/train_classifier.py`; *not* FID, not",
        "comparable with published FID values), of a variant's final samples against held-out real images",
        "(\"vs real\") and against the FP32 samples from the same noise (\"vs FP32\"). Class consistency: fraction of",
        "samples of a class-conditional model that the classifier assigns to their conditioning class. With few",
        "samples FD is biased upward and noisy: compare a row with its model's floors below.",
        "",
        "| model | classifier | samples | real reference images | FD FP32 vs real | FD real vs real (same sample count) | FP32 class cons. |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for model, r in firsts.items():
        cfg = classifier_config(r.fd_classifier)
        lines.append(
            f"| {model} | {r.fd_classifier} | {r.fd_samples} | {cfg.reference_count} | {opt(r.fp32_fd_real)} | "
            f"{opt(r.real_fd_real)} | {opt(r.fp32_class_consistency, 3)} |"
        )
    return lines

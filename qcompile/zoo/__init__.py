"""Trained reference models ("the zoo") for tests, examples and benchmarks.

Two small trained diffusion models, re-implemented in plain PyTorch, whose weights are read at run
time from the project's ``shared`` folder (never copied into the repository):

* ``MnistUNet`` / ``load_mnist_unet``: pixel-space DDPM UNet (epsilon prediction), from
  ``Franfee/DM-DDPM-MNIST-ImageGen`` (MIT, Copyright (c) 2023 Franfee (FanAnfei)).
* ``MnistViT`` / ``load_mnist_vit``: class-conditional rectified-flow ViT (x-prediction), from
  ``sofia-dominguezc/MNIST-diffusion`` (MIT, Copyright (c) 2025 Sofia Dominguez).

plus their samplers (``ddim_sample``, ``ddpm_sample``, ``flow_sample``) and a tiny MNIST test-set
reader (``load_mnist_test``).

The ``shared`` folder is located by ``shared_dir()``: the ``QDIFF_SHARED`` environment variable if
set, else ``<repository root>/../shared``. This subpackage depends on no other ``qcompile`` module.
"""

from __future__ import annotations

import os
from pathlib import Path

SHARED_ENV_VAR = "QDIFF_SHARED"


def _repo_root() -> Path:
    """The directory that holds the ``qcompile`` package directory."""
    return Path(__file__).resolve().parents[2]


def _default_shared() -> Path:
    return _repo_root().parent / "shared"


def shared_dir() -> Path | None:
    """Return the ``shared`` data folder, or ``None`` when it cannot be found.

    Order: ``$QDIFF_SHARED`` if set (returned only if it is an existing directory), else
    ``<repo root>/../shared`` where the repo root is the parent of the ``qcompile`` package
    directory.
    """
    env = os.environ.get(SHARED_ENV_VAR)
    if env:
        path = Path(env).expanduser()
        return path.resolve() if path.is_dir() else None
    path = _default_shared()
    return path if path.is_dir() else None


def require_shared(subpath: str | os.PathLike[str] = "") -> Path:
    """Return ``shared_dir() / subpath``; raise ``FileNotFoundError`` with a clear hint if missing."""
    base = shared_dir()
    if base is None:
        env = os.environ.get(SHARED_ENV_VAR)
        looked = (
            f"${SHARED_ENV_VAR}={env!r} (not a directory)"
            if env
            else str(_default_shared())
        )
        raise FileNotFoundError(
            f"qdiff shared data folder not found (looked at {looked}); needed for {str(subpath)!r}. "
            f"Set the environment variable {SHARED_ENV_VAR} to the folder that holds "
            f"'models/' and 'data/' (e.g. export {SHARED_ENV_VAR}=/path/to/shared)."
        )
    path = base / subpath
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist (shared folder {base}). Point {SHARED_ENV_VAR} at a complete "
            f"copy of the shared folder (e.g. export {SHARED_ENV_VAR}=/path/to/shared)."
        )
    return path


from .data import load_cifar10, load_mnist_test  # noqa: E402
from .mnist_unet import MnistUNet, load_mnist_unet  # noqa: E402
from .mnist_vit import MnistViT, load_mnist_vit  # noqa: E402
from .samplers import ddim_sample, ddim_timesteps, ddpm_sample, flow_sample  # noqa: E402

__all__ = [
    "SHARED_ENV_VAR",
    "shared_dir",
    "require_shared",
    "load_mnist_test",
    "load_cifar10",
    "MnistUNet",
    "load_mnist_unet",
    "MnistViT",
    "load_mnist_vit",
    "ddim_sample",
    "ddim_timesteps",
    "ddpm_sample",
    "flow_sample",
]

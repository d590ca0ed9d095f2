"""The bundled trained defaults (shipped in the package, loaded from a local path, no hub).

* ``cifar10_ddpm``: diffusers ``UNet2DModel`` DDPM on CIFAR-10 32x32 (eps-prediction, linear betas,
  attention at 16x16, concat skips), a ``DDPMPipeline`` folder.
* ``cifar10_dit``: class-conditional diffusers ``DiTTransformer2DModel`` (pixel space, patch 2,
  labels 0-9, 10 = null label for classifier-free guidance) and its scheduler config.

How they were trained: docs/models.md (``examples/train_cifar_ddpm.py`` on an H100).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from ..metrics import output_tensor

ASSETS = Path(__file__).resolve().parents[1] / "assets"


def bundled_dir(name: str) -> Path:
    """The folder of a bundled model (``cifar10_ddpm`` or ``cifar10_dit``)."""
    path = ASSETS / name
    if not path.is_dir():
        raise FileNotFoundError(f"bundled model '{name}' not found at {path} (choose cifar10_ddpm or cifar10_dit)")
    return path


def load_unet(folder: str | Path) -> torch.nn.Module:
    """``UNet2DModel`` in float32, eval mode, from a pipeline folder (``<folder>/unet``) or a model folder."""
    from diffusers import UNet2DModel

    folder = Path(folder)
    sub = folder / "unet" if (folder / "unet").is_dir() else folder
    return UNet2DModel.from_pretrained(str(sub)).float().eval()


def load_cifar10_dit() -> torch.nn.Module:
    """The bundled class-conditional DiT in float32, eval mode."""
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel.from_pretrained(str(bundled_dir("cifar10_dit") / "transformer")).float().eval()


def ddim_sampler(folder: str | Path, num_steps: int = 50) -> Callable[[Any, torch.Tensor], torch.Tensor]:
    """A DDIM (eta 0) sampler for an eps-prediction UNet, with the folder's scheduler config.

    Returns ``sample(denoiser, noise)``; the denoiser is called as ``denoiser(x, t)`` with ``t`` a
    (B,) int64 tensor and may return a tensor or a diffusers output (``.sample``).
    """
    from diffusers import DDIMScheduler

    folder = Path(folder)
    sched_dir = folder / "scheduler" if (folder / "scheduler").is_dir() else folder
    config = DDIMScheduler.load_config(str(sched_dir))

    def sample(denoiser: Any, noise: torch.Tensor) -> torch.Tensor:
        sched = DDIMScheduler.from_config(config)
        sched.set_timesteps(num_steps)
        x = noise
        for t in sched.timesteps:
            out = denoiser(x, torch.full((x.shape[0],), int(t), device=x.device))
            eps = output_tensor(out)
            x = sched.step(eps, t, x).prev_sample
        return x

    return sample


def dit_sampler(num_steps: int = 50, guidance: float = 2.0, null_label: int = 10) -> Callable[[Any, torch.Tensor], torch.Tensor]:
    """DDIM (eta 0) with classifier-free guidance for the bundled DiT; labels cycle through 0..9.

    Conditional and unconditional predictions come from one 2B-batch call
    ``denoiser(x, timestep=t, class_labels=y)`` per step, so the batch size never changes.
    """
    from diffusers import DDIMScheduler

    config = DDIMScheduler.load_config(str(bundled_dir("cifar10_dit") / "scheduler"))

    def sample(denoiser: Any, noise: torch.Tensor) -> torch.Tensor:
        sched = DDIMScheduler.from_config(config)
        sched.set_timesteps(num_steps)
        x, n = noise, noise.shape[0]
        y = torch.cat([torch.arange(n) % 10, torch.full((n,), null_label)]).to(noise.device)
        for t in sched.timesteps:
            out = denoiser(torch.cat([x, x]), timestep=torch.full((2 * n,), int(t), device=x.device), class_labels=y)
            cond, uncond = output_tensor(out).chunk(2)
            x = sched.step(uncond + guidance * (cond - uncond), t, x).prev_sample
        return x

    return sample

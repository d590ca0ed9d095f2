"""Quality metrics: SQNR, PSNR and SSIM (pure PyTorch)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F


def output_tensor(out: Any) -> torch.Tensor:
    """A denoiser's prediction from what it returned: a tensor, a tuple's / list's first entry, a diffusers output's
    ``sample`` (or its first field)."""
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor):
        out = out.sample if hasattr(out, "sample") else out.to_tuple()[0] if hasattr(out, "to_tuple") else out
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"cannot find the prediction tensor in a {type(out).__name__}")
    return out


def sqnr_db(reference: torch.Tensor, test: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(|ref|^2 / |ref - test|^2)`` in dB (inf if equal)."""
    ref = reference.detach().double()
    noise = (ref - test.detach().double()).pow(2).sum().item()
    signal = ref.pow(2).sum().item()
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def psnr_db(reference: torch.Tensor, test: torch.Tensor, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB for images with values spanning ``data_range``."""
    mse = (reference.detach().double() - test.detach().double()).pow(2).mean().item()
    return math.inf if mse == 0.0 else 10.0 * math.log10(data_range**2 / mse)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim(reference: torch.Tensor, test: torch.Tensor, data_range: float = 1.0) -> float:
    """Mean SSIM (Wang et al. 2004, 11x11 Gaussian window, sigma 1.5) over a batch (N, C, H, W)."""
    x, y = reference.detach().double(), test.detach().double()
    c = x.shape[1]
    w = _gaussian_window().to(x.device).expand(c, 1, 11, 11)
    mu_x, mu_y = F.conv2d(x, w, groups=c), F.conv2d(y, w, groups=c)
    sxx = F.conv2d(x * x, w, groups=c) - mu_x**2
    syy = F.conv2d(y * y, w, groups=c) - mu_y**2
    sxy = F.conv2d(x * y, w, groups=c) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return s.mean().item()

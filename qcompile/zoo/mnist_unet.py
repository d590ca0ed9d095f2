"""A small pixel-space DDPM UNet for MNIST (epsilon prediction), re-implemented in PyTorch.

This module is our own re-implementation of the network whose trained weights live in
``../shared/models/mnist_unet_ddpm`` (the weights are read from there at run time and are never
copied into this repository). The architecture follows the description in that folder's README.

Attribution: the trained weights and the original network design come from the public GitHub
repository ``Franfee/DM-DDPM-MNIST-ImageGen`` (commit ff8b533b), released under the MIT licence,
Copyright (c) 2023 Franfee (FanAnfei).

Network summary (``MnistUNet``):

* ``x`` (B, 1, 28, 28), ``t`` int64 timesteps (B, 1) in 0..999.
* ``pe.embedding``: a fixed 1000 x 128 sinusoidal table (interleaved sin/cos) looked up as an
  ``nn.Embedding`` -> (B, 1, 128); every stage projects it to its channel count and adds it as
  (B, C, 1, 1) to the stage input.
* three encoder stages (channels 10, 20, 40 at 28, 14, 7 pixels), each two ``UnetBlock`` s and a
  2x2 stride-2 conv; a middle stage at 3x3 (40 -> 80 channels); three decoder stages, each a 2x2
  stride-2 transposed conv, zero padding up to the skip's size, ``cat((skip, x), 1)`` and two
  ``UnetBlock`` s; a final 3x3 conv to one channel (the predicted noise).

The model's data range is [0, 1] (background 0, stroke 1); see ``samplers.py``.

The forward pass is plain tensor code with no data-dependent Python control flow, so it traces
with ``torch.compile(..., fullgraph=True)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import require_shared

__all__ = ["MnistUNet", "UnetBlock", "SinusoidalTimeTable", "load_mnist_unet", "MNIST_UNET_SUBDIR"]

MNIST_UNET_SUBDIR = "models/mnist_unet_ddpm"


def _sinusoidal_table(num_positions: int, dim: int) -> torch.Tensor:
    """(num_positions, dim) table: column 2i holds sin(p / 10000**(2i/dim)), column 2i+1 the cos."""
    pos = torch.arange(num_positions, dtype=torch.float32)[:, None]
    two_i = torch.arange(0, dim, 2, dtype=torch.float32)[None, :]
    angle = pos / torch.pow(torch.tensor(10000.0), two_i / dim)
    table = torch.stack((torch.sin(angle), torch.cos(angle)), dim=2)
    return table.reshape(num_positions, dim)


class SinusoidalTimeTable(nn.Module):
    """Fixed sinusoidal timestep table used through an ``nn.Embedding`` lookup (not trained)."""

    def __init__(self, num_positions: int, dim: int):
        super().__init__()
        if dim % 2:
            raise ValueError(f"embedding dim must be even, got {dim}")
        self.embedding = nn.Embedding(num_positions, dim)
        with torch.no_grad():
            self.embedding.weight.copy_(_sinusoidal_table(num_positions, dim))
        self.embedding.requires_grad_(False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.embedding(t)


class UnetBlock(nn.Module):
    """LayerNorm over (C, H, W) -> conv3x3 -> ReLU -> conv3x3, plus a residual of the block input
    (1x1 conv when the channel count changes, identity otherwise), then ReLU of the sum."""

    def __init__(self, shape: tuple[int, int, int], in_c: int, out_c: int):
        super().__init__()
        self.ln = nn.LayerNorm(shape)
        self.conv1 = nn.Conv2d(in_c, out_c, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(out_c, out_c, kernel_size=3, padding=1)
        self.residual_conv = nn.Conv2d(in_c, out_c, kernel_size=1) if in_c != out_c else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln(x)
        h = F.relu(self.conv1(h))
        h = self.conv2(h)
        return F.relu(h + self.residual_conv(x))


def _stage(shape_in: tuple[int, int, int], in_c: int, out_c: int) -> nn.Sequential:
    _, height, width = shape_in
    return nn.Sequential(
        UnetBlock((in_c, height, width), in_c, out_c),
        UnetBlock((out_c, height, width), out_c, out_c),
    )


class MnistUNet(nn.Module):
    """Epsilon-prediction UNet; ``forward(x, t)`` with ``x`` (B, 1, 28, 28), ``t`` int64 (B, 1)."""

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        channels: tuple[int, ...] = (10, 20, 40, 80),
        time_dim: int = 128,
        image_shape: tuple[int, int, int] = (1, 28, 28),
    ):
        super().__init__()
        in_ch, height, width = image_shape
        n_levels = len(channels)
        heights = [height // 2**i for i in range(n_levels)]
        widths = [width // 2**i for i in range(n_levels)]

        self.pe = SinusoidalTimeTable(num_train_timesteps, time_dim)
        # registration order = state_dict order of the original checkpoint (keys.txt)
        self.encoders = nn.ModuleList()
        self.decoders = nn.ModuleList()
        self.pe_linears_en = nn.ModuleList()
        self.pe_linears_de = nn.ModuleList()
        self.downs = nn.ModuleList()
        self.ups = nn.ModuleList()

        prev = in_ch
        for level, ch in enumerate(channels[:-1]):
            self.pe_linears_en.append(
                nn.Sequential(nn.Linear(time_dim, prev), nn.ReLU(), nn.Linear(prev, prev))
            )
            self.encoders.append(_stage((prev, heights[level], widths[level]), prev, ch))
            self.downs.append(nn.Conv2d(ch, ch, kernel_size=2, stride=2))
            prev = ch

        self.pe_mid = nn.Linear(time_dim, prev)
        self.mid = _stage((prev, heights[-1], widths[-1]), prev, channels[-1])
        prev = channels[-1]

        for level in range(n_levels - 2, -1, -1):
            ch = channels[level]
            # the time projection is added after the concat, i.e. to 2 * ch = prev channels
            self.pe_linears_de.append(nn.Linear(time_dim, prev))
            self.ups.append(nn.ConvTranspose2d(prev, ch, kernel_size=2, stride=2))
            self.decoders.append(_stage((2 * ch, heights[level], widths[level]), 2 * ch, ch))
            prev = ch

        self.conv_out = nn.Conv2d(prev, in_ch, kernel_size=3, padding=1)

    @staticmethod
    def _as_bias(emb: torch.Tensor, batch: int) -> torch.Tensor:
        return emb.reshape(batch, -1, 1, 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        temb = self.pe(t)  # (B, 1, time_dim)

        skips = []
        for proj, encoder, down in zip(self.pe_linears_en, self.encoders, self.downs):
            x = encoder(x + self._as_bias(proj(temb), batch))
            skips.append(x)
            x = down(x)

        x = self.mid(x + self._as_bias(self.pe_mid(temb), batch))

        for proj, up, decoder, skip in zip(self.pe_linears_de, self.ups, self.decoders, reversed(skips)):
            x = up(x)
            pad_h = skip.shape[2] - x.shape[2]
            pad_w = skip.shape[3] - x.shape[3]
            # F.pad order: (W left, W right, H top, H bottom)
            x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
            x = torch.cat((skip, x), dim=1)
            x = decoder(x + self._as_bias(proj(temb), batch))

        return self.conv_out(x)


def load_mnist_unet(device: str | torch.device = "cpu") -> MnistUNet:
    """Build ``MnistUNet`` and strictly load the trained weights from ``<shared>/models/mnist_unet_ddpm``.

    Raises ``FileNotFoundError`` when the shared folder (or the weights file) cannot be found.
    Returns the model in eval mode on ``device``.
    """
    from safetensors.torch import load_file

    path = require_shared(f"{MNIST_UNET_SUBDIR}/model.safetensors")
    model = MnistUNet()
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.to(device).eval()


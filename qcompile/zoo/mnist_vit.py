"""A small class-conditional ViT for MNIST trained with rectified flow (x-prediction).

This module is our own re-implementation of the network whose trained weights live in
``../shared/models/mnist_vit_flow`` (weights and ``config.json`` are read from there at run time
and never copied into this repository). The architecture follows that folder's README.

Attribution: the trained weights and the original network design come from the public GitHub
repository ``sofia-dominguezc/MNIST-diffusion`` (commit 88bc0580), released under the MIT licence,
Copyright (c) 2025 Sofia Dominguez.

Network summary (``MnistViT``), with the default config (patch 7, dim 64, 4 heads, 4 layers):

* ``x`` (B, 1, 28, 28) -> ``patch_embed`` (7x7 stride-7 conv) -> 16 tokens of width 64, plus
  ``pos_embed``.
* ``t`` (any shape with B elements, float in [0, 1]) -> 128 sinusoidal features
  ``cat(sin(t f), cos(t f))`` with ``f_k = exp(-log(10000) k / 63)`` -> 2 tokens.
* ``y`` (B,) int labels, ``-1`` = no label (mapped to row ``n_classes`` of ``y_encoder``) ->
  ``Embedding(11, 128)`` -> 2 tokens.
* 20 tokens through 4 stock ``nn.TransformerEncoderLayer`` (post-norm, GELU, batch_first);
  the last 4 tokens are dropped, the 16 patch tokens are folded back to (B, 64, 4, 4) and
  ``unpatch`` (7x7 stride-7 transposed conv) gives the predicted clean image.

The encoder layers are deliberately stock PyTorch modules: the attention input projection stays
the raw ``in_proj_weight`` parameter, and in eval mode without autograd PyTorch may route a layer
through its fused "fast path" kernel (``torch._transformer_encoder_layer_fwd``). This also holds
under ``torch.compile``: with ``torch.no_grad()`` (as in the samplers) Dynamo captures one opaque
``aten._transformer_encoder_layer_fwd`` node per layer (no linear/matmul nodes visible); with grad
enabled, or after ``torch.backends.mha.set_fastpath_enabled(False)``, the graph holds the
decomposed ops (``addmm``/``mm``, ``_scaled_dot_product_*attention``, ``native_layer_norm``, ``gelu``).
Either way the model compiles with ``fullgraph=True`` (no graph breaks).
"""

from __future__ import annotations

import json

import torch
from torch import nn

from . import require_shared

__all__ = ["MnistViT", "load_mnist_vit", "MNIST_VIT_SUBDIR"]

MNIST_VIT_SUBDIR = "models/mnist_vit_flow"


class MnistViT(nn.Module):
    """Rectified-flow x-prediction ViT; ``forward(x, t, y)`` -> predicted clean image (B, 1, 28, 28)."""

    def __init__(
        self,
        in_channels: int = 1,
        image_size: tuple[int, int] | list[int] = (28, 28),
        patch_size: int = 7,
        dim: int = 64,
        n_heads: int = 4,
        n_layers: int = 4,
        mlp_ratio: float = 4.0,
        n_classes: int = 10,
    ):
        super().__init__()
        height, width = image_size
        if height % patch_size or width % patch_size:
            raise ValueError(f"image size {tuple(image_size)} is not a multiple of patch {patch_size}")
        self.n_classes = n_classes
        self.dim = dim
        self.grid = (height // patch_size, width // patch_size)
        n_patches = self.grid[0] * self.grid[1]

        self.patch_embed = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, n_patches, dim))
        nn.init.normal_(self.pos_embed)
        self.transformer = nn.Sequential(
            *[
                nn.TransformerEncoderLayer(
                    d_model=dim,
                    nhead=n_heads,
                    dim_feedforward=int(dim * mlp_ratio),
                    batch_first=True,
                    activation="gelu",
                )
                for _ in range(n_layers)
            ]
        )
        self.unpatch = nn.ConvTranspose2d(dim, in_channels, kernel_size=patch_size, stride=patch_size)
        self.y_encoder = nn.Embedding(n_classes + 1, 2 * dim)

        # frequencies of the 2*dim-feature time embedding (a constant, not part of the state_dict)
        half = dim
        step = torch.log(torch.tensor(10000.0)) / (half - 1)
        freqs = torch.exp(torch.arange(half) * -step)
        self.register_buffer("time_freqs", freqs, persistent=False)

    def time_tokens(self, t: torch.Tensor, batch: int) -> torch.Tensor:
        angles = t.reshape(-1).to(self.time_freqs.dtype)[:, None] * self.time_freqs[None, :]
        emb = torch.cat((torch.sin(angles), torch.cos(angles)), dim=-1)  # (B, 2*dim)
        return emb.reshape(batch, 2, self.dim)

    def label_tokens(self, y: torch.Tensor, batch: int) -> torch.Tensor:
        y = torch.where(y < 0, torch.full_like(y, self.n_classes), y)  # -1 -> "no label" row
        return self.y_encoder(y).reshape(batch, 2, self.dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        h = self.patch_embed(x)  # (B, dim, gh, gw)
        h = h.flatten(2).transpose(1, 2) + self.pos_embed  # (B, n_patches, dim)
        h = torch.cat((h, self.time_tokens(t, batch).to(h.dtype), self.label_tokens(y, batch).to(h.dtype)), dim=1)
        h = self.transformer(h)
        h = h[:, :-4, :]
        h = h.transpose(1, 2).reshape(batch, self.dim, self.grid[0], self.grid[1])
        return self.unpatch(h)


def load_mnist_vit(device: str | torch.device = "cpu") -> MnistViT:
    """Build ``MnistViT`` from ``<shared>/models/mnist_vit_flow/config.json`` and strictly load its
    trained weights. Raises ``FileNotFoundError`` when the shared folder cannot be found.
    Returns the model in eval mode on ``device``."""
    from safetensors.torch import load_file

    config = json.loads(require_shared(f"{MNIST_VIT_SUBDIR}/config.json").read_text())
    weights = require_shared(f"{MNIST_VIT_SUBDIR}/model.safetensors")
    model = MnistViT(**config)
    model.load_state_dict(load_file(str(weights)), strict=True)
    return model.to(device).eval()

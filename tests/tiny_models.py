"""Tiny random-weight diffusers denoisers for fast CPU tests.

Every factory seeds ``torch.manual_seed`` itself, builds the model in float32 / eval mode and
returns a :class:`TinyCase` whose ``model(*case.args, **case.kwargs)`` runs one denoiser step on a
batch of 2 (``return_dict=False`` is always in ``kwargs``, so the model returns a tuple and
``case.output(out)`` is ``out[0]``).  ``case.make_inputs(batch_size, seed)`` rebuilds inputs of
another batch size (e.g. for shape-change / recompilation tests).

Timesteps are always passed as tensors of shape ``(batch,)`` (a Python int would make Dynamo
specialize on its value and recompile for every step):

=====================  =========================  ==============================================
factory                timestep argument          dtype / values
=====================  =========================  ==============================================
tiny_unet2d            ``timestep`` (positional)  int64, in [0, 1000)
tiny_unet2d_condition  ``timestep`` (positional)  int64, in [0, 1000)
tiny_dit               ``timestep`` (keyword)     int64, in [0, 1000)
tiny_pixart            ``timestep`` (keyword)     int64, in [0, 1000)
tiny_sd3               ``timestep`` (keyword)     float32, in [0, 1000) (flow-matching sigmas*1000)
=====================  =========================  ==============================================

With ``torch.set_num_threads(1)`` each eager forward takes 1-11 ms on CPU (unet2d ~6 ms,
unet2d_condition ~10 ms, the transformers ~1.5 ms); building a model takes ~10-30 ms after the
first diffusers import.  NB: with the default 2 intra-op threads on a 2-core machine that is also
running something else, OpenMP spin-waiting makes the same forwards 100-1000x slower (0.3-2 s), so
CPU tests should call ``torch.set_num_threads(1)`` (e.g. in a conftest fixture).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

__all__ = [
    "TinyCase",
    "tiny_unet2d",
    "tiny_unet2d_condition",
    "tiny_dit",
    "tiny_pixart",
    "tiny_sd3",
    "ALL_FACTORIES",
    "all_cases",
]

BATCH = 2


@dataclass
class TinyCase:
    """A tiny denoiser and one call's inputs."""

    name: str
    model: torch.nn.Module
    args: tuple
    kwargs: dict
    timestep_arg: str  # name of the timestep parameter in ``model.forward``
    make_inputs: Callable[..., tuple[tuple, dict]] = field(repr=False, default=None)

    @staticmethod
    def output(model_out: Any) -> torch.Tensor:
        """The denoiser's output tensor from whatever the model returned."""
        if isinstance(model_out, torch.Tensor):
            return model_out
        if isinstance(model_out, (tuple, list)):
            return model_out[0]
        return model_out.sample  # a diffusers output dataclass (return_dict=True)

    @property
    def timestep(self) -> torch.Tensor:
        """The timestep tensor of this case's inputs."""
        if self.timestep_arg in self.kwargs:
            return self.kwargs[self.timestep_arg]
        return self.args[1]  # UNets: forward(sample, timestep, ...)

    def run(self, model: torch.nn.Module | None = None) -> torch.Tensor:
        """Call ``model`` (default: ``self.model``) on the inputs; returns the output tensor."""
        m = self.model if model is None else model
        return self.output(m(*self.args, **self.kwargs))

    def with_batch(self, batch_size: int, seed: int = 1) -> "TinyCase":
        """The same model with fresh inputs of another batch size."""
        args, kwargs = self.make_inputs(batch_size, seed)
        return TinyCase(self.name, self.model, args, kwargs, self.timestep_arg, self.make_inputs)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _finish(model: torch.nn.Module) -> torch.nn.Module:
    # Built under the default dtype; ModelMixin.to(dtype) logs a warning, so convert only if needed.
    if any(p.dtype != torch.float32 for p in model.parameters()):
        model = model.to(torch.float32)
    model.eval()
    model.requires_grad_(False)
    return model


def _int_timesteps(g: torch.Generator, b: int) -> torch.Tensor:
    return torch.randint(0, 1000, (b,), generator=g, dtype=torch.int64)


# --------------------------------------------------------------------------------------------
# UNet2DModel: pixel-space DDPM-like
# --------------------------------------------------------------------------------------------


def tiny_unet2d(seed: int = 0) -> TinyCase:
    """``UNet2DModel``, 3x16x16 pixels, channels (32, 64), one attention down/up block."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    model = UNet2DModel(
        sample_size=16,
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=16,
    )
    model = _finish(model)

    def make_inputs(b: int = BATCH, s: int = seed):
        g = _gen(1000 + s)
        x = torch.randn(b, 3, 16, 16, generator=g)
        t = _int_timesteps(g, b)
        return (x, t), {"return_dict": False}

    args, kwargs = make_inputs()
    return TinyCase("unet2d", model, args, kwargs, "timestep", make_inputs)


# --------------------------------------------------------------------------------------------
# UNet2DConditionModel: Stable-Diffusion-like latent UNet with cross attention
# --------------------------------------------------------------------------------------------


def tiny_unet2d_condition(seed: int = 0) -> TinyCase:
    """``UNet2DConditionModel``, 4x16x16 latents, channels (32, 64), text states (B, 8, 32)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    model = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=32,
        attention_head_dim=2,  # (legacy naming) = number of heads
    )
    model = _finish(model)

    def make_inputs(b: int = BATCH, s: int = seed):
        g = _gen(2000 + s)
        x = torch.randn(b, 4, 16, 16, generator=g)
        t = _int_timesteps(g, b)
        ctx = torch.randn(b, 8, 32, generator=g)
        return (x, t), {"encoder_hidden_states": ctx, "return_dict": False}

    args, kwargs = make_inputs()
    return TinyCase("unet2d_condition", model, args, kwargs, "timestep", make_inputs)


# --------------------------------------------------------------------------------------------
# DiT: class-conditional transformer, adaLN-zero
# --------------------------------------------------------------------------------------------


def tiny_dit(seed: int = 0, head_dim: int = 16, name: str = "dit", input_seed: int = 3000, heads: int = 2,
             size: int = 16) -> TinyCase:
    """``DiTTransformer2DModel``, 4 x ``size`` x ``size`` latents (default 16: 64 tokens), patch 2, 2 layers x ``heads``
    (default 2) x ``head_dim``."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    model = DiTTransformer2DModel(
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        sample_size=size,
        patch_size=2,
        num_embeds_ada_norm=1000,
    )
    model = _finish(model)

    def make_inputs(b: int = BATCH, s: int = seed):
        g = _gen(input_seed + s)
        x = torch.randn(b, 4, size, size, generator=g)
        t = _int_timesteps(g, b)
        labels = torch.randint(0, 1000, (b,), generator=g, dtype=torch.int64)
        return (x,), {"timestep": t, "class_labels": labels, "return_dict": False}

    args, kwargs = make_inputs()
    return TinyCase(name, model, args, kwargs, "timestep", make_inputs)


# --------------------------------------------------------------------------------------------
# PixArt-alpha: text-conditional transformer, adaLN-single + cross attention
# --------------------------------------------------------------------------------------------


def tiny_pixart(seed: int = 0) -> TinyCase:
    """``PixArtTransformer2DModel``, 4x16x16 latents, 2 layers, captions (B, 8, 32)."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    model = PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=8,  # learned sigma, like PixArt-alpha
        num_layers=2,
        norm_num_groups=8,
        cross_attention_dim=32,
        sample_size=16,
        patch_size=2,
        caption_channels=32,
        use_additional_conditions=False,
    )
    model = _finish(model)

    def make_inputs(b: int = BATCH, s: int = seed):
        g = _gen(4000 + s)
        x = torch.randn(b, 4, 16, 16, generator=g)
        ctx = torch.randn(b, 8, 32, generator=g)
        t = _int_timesteps(g, b)
        return (x,), {
            "encoder_hidden_states": ctx,
            "timestep": t,
            "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
            "return_dict": False,
        }

    args, kwargs = make_inputs()
    return TinyCase("pixart", model, args, kwargs, "timestep", make_inputs)


# --------------------------------------------------------------------------------------------
# SD3 MMDiT: joint text/image attention
# --------------------------------------------------------------------------------------------


def tiny_sd3(seed: int = 0) -> TinyCase:
    """``SD3Transformer2DModel``, 4x16x16 latents, patch 2, 2 joint layers, text (B, 8, 32)."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    model = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        caption_projection_dim=32,  # must equal heads * head_dim
        pooled_projection_dim=64,
        out_channels=4,
        pos_embed_max_size=16,
    )
    model = _finish(model)

    def make_inputs(b: int = BATCH, s: int = seed):
        g = _gen(5000 + s)
        x = torch.randn(b, 4, 16, 16, generator=g)
        ctx = torch.randn(b, 8, 32, generator=g)
        pooled = torch.randn(b, 64, generator=g)
        t = torch.rand(b, generator=g) * 1000.0
        return (x,), {
            "encoder_hidden_states": ctx,
            "pooled_projections": pooled,
            "timestep": t,
            "return_dict": False,
        }

    args, kwargs = make_inputs()
    return TinyCase("sd3", model, args, kwargs, "timestep", make_inputs)


ALL_FACTORIES: dict[str, Callable[..., TinyCase]] = {
    "unet2d": tiny_unet2d,
    "unet2d_condition": tiny_unet2d_condition,
    "dit": tiny_dit,
    "pixart": tiny_pixart,
    "sd3": tiny_sd3,
}


def all_cases(seed: int = 0) -> list[TinyCase]:
    return [f(seed) for f in ALL_FACTORIES.values()]


def tiny_dit_attn(seed: int = 0) -> TinyCase:
    """``tiny_dit`` with heads of 32 (2 layers x 2 heads x 32): head dims the fp8 attention kernel takes (32-160).
    Not in ``ALL_FACTORIES``."""
    return tiny_dit(seed, head_dim=32, name="dit_attn", input_seed=6000)

"""Samplers for the zoo models.

* ``ddim_sample`` / ``ddpm_sample``: for the epsilon-prediction ``MnistUNet`` (DDPM training with
  T = 1000 and betas linear from 1e-4 to 0.02). They call ``model(x, t)`` with ``t`` an int64
  tensor of shape (B, 1) on ``x``'s device.
* ``flow_sample``: rectified-flow Euler sampler with classifier-free guidance for the x-prediction
  ``MnistViT``; calls ``model(x, t, y)`` with ``t`` a float32 tensor of shape (2B,).

All samplers call the model with positional arguments only, under ``torch.no_grad()``, with a
constant batch size at every step (so a compiled model is traced once), and return the final
sample *unclipped*. Clip to the data range only for display.

Data range, checked by sampling (see tests/zoo/test_mnist_models.py): both models work in [0, 1]
(background 0, stroke 1), like MNIST from ``load_mnist_test``. For the UNet this agrees with its
README, although the original repository's current data loader maps MNIST to [-1, 1]; the
released checkpoint's samples clearly have background ~0 and strokes ~1, and its
``reference_samples.png`` has a grey background because it was displayed as ``(x + 1) / 2``.
DDIM samples without x0 clipping are clean digits, but a few isolated pixels (~0.2%) can land far
outside [0, 1] (down to about -19); ``clip_x0=(0, 1)`` (or diffusers' default ``(-1, 1)``) removes
them. The ViT's ``flow_sample`` reproduces its ``reference_samples.png`` to uint8 rounding.

These are re-implementations of standard algorithms (DDPM, Ho et al. 2020; DDIM, Song et al.
2021; rectified flow with CFG as described in ``shared/models/mnist_vit_flow/README.md``); no code
is copied from the model repositories.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = [
    "linear_alphas_cumprod",
    "ddim_timesteps",
    "ddim_sample",
    "ddpm_sample",
    "flow_sample",
    "reference_guidance",
]


def _progress(iterable, enabled: bool, desc: str):
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a declared dependency
        return iterable
    return tqdm(iterable, desc=desc)


def _randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=torch.float32).to(
        device=x.device, dtype=x.dtype
    )


def linear_alphas_cumprod(
    num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02
) -> Tensor:
    """float32 cumulative products of ``1 - beta_t`` for linear betas, computed like diffusers'
    ``DDPMScheduler`` / ``DDIMScheduler`` (``beta_schedule="linear"``) and the original trainer."""
    betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    return torch.cumprod(1.0 - betas, dim=0)


def ddim_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """Descending timesteps with diffusers' default ``timestep_spacing="leading"``, ``steps_offset=0``:
    ``[k * (T // num_steps) for k in range(num_steps)]`` reversed, e.g. 980, 960, ..., 0 for 50 steps."""
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_train_timesteps}], got {num_steps}")
    ratio = num_train_timesteps // num_steps
    return [k * ratio for k in range(num_steps - 1, -1, -1)]


def _int_timestep(t: int, x: Tensor) -> Tensor:
    return torch.full((x.shape[0], 1), t, dtype=torch.int64, device=x.device)


@torch.no_grad()
def ddim_sample(
    model: Callable[[Tensor, Tensor], Tensor],
    noise: Tensor,
    num_steps: int = 50,
    eta: float = 0.0,
    num_train_timesteps: int = 1000,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    generator: torch.Generator | None = None,
    progress: bool = False,
    clip_x0: tuple[float, float] | None = None,
) -> Tensor:
    """DDIM sampling for an epsilon-prediction model (deterministic for ``eta=0``).

    Conventions (matching diffusers' ``DDIMScheduler`` with the same betas, ``clip_sample=False``,
    ``set_alpha_to_one=True``, ``timestep_spacing="leading"``, ``steps_offset=0``):

    * timesteps ``ddim_timesteps(num_steps)``: 980, 960, ..., 20, 0 for 50 steps (T = 1000);
    * each step goes from ``t`` to ``t - T // num_steps``; the last step (from t = 0) uses
      ``alpha_bar_prev = 1``, so the returned value is the model's clean-image estimate;
    * ``x0_pred = (x - sqrt(1 - a_t) eps) / sqrt(a_t)``, optionally clamped to ``clip_x0``
      (default: no clamp; the original DDPM trainer clamped x0 to [-1, 1]);
    * ``eta > 0`` adds DDIM's stochastic term, drawn from ``generator``.

    ``noise`` is the initial x_T (B, C, H, W). Returns the final sample, not clipped, in the
    model's data range ([0, 1] for ``MnistUNet``). Checked against diffusers 0.42.1: max abs
    difference 7.6e-6 vs ``DDIMScheduler(clip_sample=False)`` and 1.1e-5 with
    ``clip_x0=(-1, 1)`` vs the default ``DDIMScheduler()`` (50 steps, 20 samples).
    """
    alphas_cumprod = linear_alphas_cumprod(num_train_timesteps, beta_start, beta_end).tolist()
    ratio = num_train_timesteps // num_steps
    x = noise
    for t in _progress(ddim_timesteps(num_steps, num_train_timesteps), progress, "DDIM"):
        a_t = alphas_cumprod[t]
        a_prev = alphas_cumprod[t - ratio] if t - ratio >= 0 else 1.0
        eps = model(x, _int_timestep(t, x))
        x0 = (x - (1.0 - a_t) ** 0.5 * eps) / a_t**0.5
        if clip_x0 is not None:
            x0 = x0.clamp(*clip_x0)
        std = eta * ((1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev)) ** 0.5
        x = a_prev**0.5 * x0 + max(1.0 - a_prev - std**2, 0.0) ** 0.5 * eps
        if std > 0.0:
            x = x + std * _randn_like(x, generator)
    return x


@torch.no_grad()
def ddpm_sample(
    model: Callable[[Tensor, Tensor], Tensor],
    noise: Tensor,
    num_steps: int = 1000,
    num_train_timesteps: int = 1000,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    variance: str = "beta",
    clip_x0: tuple[float, float] | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> Tensor:
    """Ancestral DDPM sampling for an epsilon-prediction model.

    With ``num_steps == num_train_timesteps`` (the default) this is the original DDPM sampler over
    t = 999, ..., 0. Fewer steps use the leading-spaced subsequence ``ddim_timesteps(num_steps)``
    with effective ``beta = 1 - a_t / a_prev`` (as diffusers' ``DDPMScheduler`` does).

    Each step: ``x0 = (x - sqrt(1 - a_t) eps) / sqrt(a_t)`` (optionally clamped to ``clip_x0``),
    posterior mean ``sqrt(a_prev) beta / (1 - a_t) x0 + sqrt(1 - beta) (1 - a_prev) / (1 - a_t) x``
    (identical to ``(x - beta / sqrt(1 - a_t) eps) / sqrt(1 - beta)`` when unclamped), plus
    ``sqrt(var) z`` for t > 0, where ``var`` is ``beta`` (``variance="beta"``, the original
    trainer's default ``simple_var=True``, diffusers' "fixed_large") or the posterior variance
    ``beta (1 - a_prev) / (1 - a_t)`` (``variance="posterior"``, diffusers' "fixed_small").
    ``z`` comes from ``generator``. Returns the final sample, not clipped.
    """
    if variance not in ("beta", "posterior"):
        raise ValueError(f"variance must be 'beta' or 'posterior', got {variance!r}")
    alphas_cumprod = linear_alphas_cumprod(num_train_timesteps, beta_start, beta_end).tolist()
    ratio = num_train_timesteps // num_steps
    x = noise
    for t in _progress(ddim_timesteps(num_steps, num_train_timesteps), progress, "DDPM"):
        a_t = alphas_cumprod[t]
        a_prev = alphas_cumprod[t - ratio] if t - ratio >= 0 else 1.0
        beta = 1.0 - a_t / a_prev
        eps = model(x, _int_timestep(t, x))
        x0 = (x - (1.0 - a_t) ** 0.5 * eps) / a_t**0.5
        if clip_x0 is not None:
            x0 = x0.clamp(*clip_x0)
        mean = (a_prev**0.5 * beta / (1.0 - a_t)) * x0 + ((1.0 - beta) ** 0.5 * (1.0 - a_prev) / (1.0 - a_t)) * x
        if t > 0:
            var = beta if variance == "beta" else beta * (1.0 - a_prev) / (1.0 - a_t)
            x = mean + var**0.5 * _randn_like(x, generator)
        else:
            x = mean
    return x


def reference_guidance(t: float, weight: float = 2.0, interval: tuple[float, float] = (0.3, 0.7)) -> float:
    """The reference CFG schedule: ``weight`` for ``interval[0] < t < interval[1]``, else 1.
    The comparison is made in float32, like the reference implementation's tensor comparison."""
    t32 = torch.tensor(t, dtype=torch.float32)
    inside = bool((torch.tensor(interval[0], dtype=torch.float32) < t32) & (t32 < torch.tensor(interval[1], dtype=torch.float32)))
    return float(weight) if inside else 1.0


@torch.no_grad()
def flow_sample(
    model: Callable[[Tensor, Tensor, Tensor], Tensor],
    noise: Tensor,
    labels: Tensor | Sequence[int] | None = None,
    num_steps: int = 50,
    guidance: float | Callable[[float], float] = 2.0,
    guidance_interval: tuple[float, float] = (0.3, 0.7),
    progress: bool = False,
) -> Tensor:
    """Rectified-flow Euler sampler with classifier-free guidance for an x-prediction model.

    ``x_t = (1 - t) noise + t data``; ``t`` runs over ``torch.linspace(0, 1, num_steps + 1)``
    (float32) without its last point, so the model is never evaluated at t = 1. At each step

        v_c = (model(x, t, y) - x) / (1 - t),   v_u = (model(x, t, -1) - x) / (1 - t),
        v = w v_c + (1 - w) v_u,                x <- x + v * (t_next - t),

    where ``w = guidance`` for ``guidance_interval[0] < t < guidance_interval[1]`` (compared in
    float32) and 1 elsewhere (the reference: w = 2 on (0.3, 0.7)); ``guidance`` may instead be a
    callable ``t -> w``. Conditional and unconditional predictions come from ONE model call on a
    2B batch ``cat(x, x)`` with labels ``cat(y, -1)`` and ``t`` a float32 tensor of shape (2B,).
    With ``labels=None`` the model is called once per step on the B-batch with labels -1 (no
    guidance). Returns the final x (data range [0, 1] for ``MnistViT``), not clipped.
    """
    x = noise
    batch = x.shape[0]
    device = x.device
    ts = torch.linspace(0.0, 1.0, num_steps + 1, dtype=torch.float32)
    dts = (ts[1:] - ts[:-1]).tolist()
    t_values = ts[:-1].tolist()
    if callable(guidance):
        weights = [float(guidance(t)) for t in t_values]
    else:
        weights = [reference_guidance(t, guidance, guidance_interval) for t in t_values]

    if labels is None:
        y = torch.full((batch,), -1, dtype=torch.int64, device=device)
        rows = batch
    else:
        y = torch.as_tensor(labels, dtype=torch.int64, device=device).reshape(batch)
        y = torch.cat((y, torch.full_like(y, -1)))
        rows = 2 * batch

    for t, dt, w in _progress(list(zip(t_values, dts, weights)), progress, "flow"):
        t_in = torch.full((rows,), t, dtype=torch.float32, device=device)
        if labels is None:
            v = (model(x, t_in, y) - x) / (1.0 - t)
        else:
            pred = model(torch.cat((x, x)), t_in, y)
            v_cond = (pred[:batch] - x) / (1.0 - t)
            v_uncond = (pred[batch:] - x) / (1.0 - t)
            v = w * v_cond + (1.0 - w) * v_uncond
        x = x + v * dt
    return x

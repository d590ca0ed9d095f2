"""Quantized weight storage: symmetric per-output-channel or group-wise, INT8 / INT6 / INT5 / INT4 / FP8 e4m3.

Weights are kept in a GEMM layout: a matrix of ``(out_features, K)`` where ``K`` is everything a
single output reduces over (``in_features``, or ``in_channels/groups * kh * kw`` for convs, in
PyTorch's weight order). INT4 is packed two per byte; K is zero-padded to a whole number of groups.

A *split* weight (split-shortcut quantization, ``splits`` = input-channel split points) is stored
as K segments, one per input-channel slice, each quantized on its own: per-channel formats get one
scale per output channel per slice, group-wise formats restart their groups at every slice
boundary (each segment zero-padded to whole groups), so no scale ever spans two slices. Where the
boundaries fall on group boundaries this is exactly the unsplit layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .formats import (
    FP8_DTYPE,
    dequantize_fp8,
    dequantize_int,
    int_range,
    pack_int4,
    qmax_of,
    quantize_fp8,
    quantize_int,
    unpack_int4,
)

CLIP_CANDIDATES = 20  # ratios searched between 1.0 and min_clip


def to_matrix(w: torch.Tensor, kind: str) -> torch.Tensor:
    """A weight in GEMM layout ``(out_features, K)``. ``kind`` is an OpKind value."""
    if kind == "conv_transpose":  # (in, out, *k) -> (out, in * prod(k)); groups == 1 only
        w = w.transpose(0, 1)
    return w.reshape(w.shape[0], -1)


def from_matrix(m: torch.Tensor, kind: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`to_matrix` for a weight of original ``shape``."""
    if kind == "conv_transpose":
        return m.reshape(shape[1], shape[0], *shape[2:]).transpose(0, 1)
    return m.reshape(shape)


@dataclass
class QuantizedWeight:
    """A quantized weight: storage tensor, float32 scales and what is needed to undo the layout."""

    fmt: str  # Format value
    data: torch.Tensor  # int8 (INT8, INT6 in [-32, 31], INT5 in [-16, 15]), uint8 packed (INT4) or float8_e4m3fn (FP8), (out, K[pad])
    scale: torch.Tensor  # float32 (out, n_groups); n_groups == 1 for per-channel
    shape: tuple[int, ...]  # the original weight's shape
    kind: str  # OpKind value (layout)
    group_size: int | None = None
    splits: tuple[int, ...] | None = None  # input-channel split points [0, c1, ..., C]: scales per slice

    @property
    def k(self) -> int:
        return math.prod(self.shape) // self.out_features

    @property
    def out_features(self) -> int:
        return self.shape[1] if self.kind == "conv_transpose" else self.shape[0]

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + self.scale.numel() * self.scale.element_size()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight this stands for, in its original shape and layout."""
        return dequantize_weight(self.data, self.scale, self.fmt, self.group_size, self.shape, self.kind, self.splits).to(dtype)


def padded_k(k: int, fmt: str, group_size: int | None) -> int:
    """K after padding to whole groups (and to an even count for packed int4)."""
    if group_size is not None:
        return -(-k // group_size) * group_size
    return k + (k % 2) if fmt == "int4" else k


def k_bounds(splits: tuple[int, ...] | None, k: int) -> list[int]:
    """K-axis boundaries of the segments of input-channel split points (``[0, k]`` unsplit)."""
    if splits is None:
        return [0, k]
    channels = splits[-1]
    if splits[0] != 0 or channels <= 0 or k % channels or any(b <= a for a, b in zip(splits, splits[1:])):
        raise ValueError(f"invalid split points {tuple(splits)} for a weight reducing over K={k}")
    taps = k // channels
    return [p * taps for p in splits]


def storage_shape(fmt: str, out_features: int, k: int, group_size: int | None, splits: tuple[int, ...] | None = None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of (data, scale) for a weight with ``out_features`` rows reducing over ``k``."""
    bounds = k_bounds(splits, k)
    kp = n_groups = 0
    for a, b in zip(bounds, bounds[1:]):
        seg = padded_k(b - a, fmt, group_size)
        kp += seg
        n_groups += seg // group_size if group_size is not None else 1
    return (out_features, kp // 2 if fmt == "int4" else kp), (out_features, n_groups)


def _grouped(m: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """(out, Kpad) -> (out, n_groups, group)."""
    g = m.shape[1] if group_size is None else group_size
    return m.reshape(m.shape[0], -1, g)


def _encode(m: torch.Tensor, scale: torch.Tensor, fmt: str) -> torch.Tensor:
    """Quantize grouped values ``m`` (out, G, g) with ``scale`` (out, G, 1) to storage values."""
    if fmt == "fp8_e4m3":
        return quantize_fp8(m, scale)
    qmin, qmax = int_range(fmt, True)
    return quantize_int(m, scale, 0, qmin, qmax)


def _decode(q: torch.Tensor, scale: torch.Tensor, fmt: str) -> torch.Tensor:
    return dequantize_fp8(q, scale) if fmt == "fp8_e4m3" else dequantize_int(q, scale)


def quantize_weight(
    w: torch.Tensor, fmt: str, kind: str, group_size: int | None = None, clip_search: bool = True,
    importance: torch.Tensor | None = None, min_clip: float = 0.8, splits: tuple[int, ...] | None = None,
    hessian: torch.Tensor | None = None, rounding: str = "gptq", iters: int = 300,
) -> QuantizedWeight:
    """Quantize a float weight symmetrically, choosing each channel/group's clipping.

    With ``clip_search`` each row (or group) takes the clipping ratio in ``[min_clip, 1]`` of its
    absolute maximum that minimizes the squared weight error, weighted per input feature by
    ``importance`` when given (the variance of that feature's input: then the error minimized is
    the output error's variance, ``sum_k dW_k^2 var(x_k)``); otherwise the maximum itself.
    ``importance`` has one value per input channel (``K / prod(kernel)`` of them). ``splits``
    (input-channel split points) quantizes each slice's K segment with its own scales. With ``hessian``
    (``E[x x^T]`` of a linear's input, or its covariance, (K, K); integer formats, unsplit) the scales are chosen
    as above and the values are then rounded by :func:`gptq_round` (``rounding="gptq"``) or :func:`learned_round`
    (``rounding="learned"``, ``iters`` steps).
    """
    if not w.is_floating_point():
        raise TypeError(f"cannot quantize a {w.dtype} weight")
    m = to_matrix(w.detach().float(), kind)
    k = m.shape[1]
    weight_of_error = torch.ones(k, device=m.device) if importance is None else _per_k(importance.to(m.device), k)
    bounds = k_bounds(None if splits is None else tuple(splits), k)
    qs, scales = [], []
    for a, b in zip(bounds, bounds[1:]):
        q, scale = _quantize_segment(m[:, a:b], weight_of_error[a:b], fmt, group_size, clip_search, min_clip)
        qs.append(q)
        scales.append(scale)
    q = torch.cat(qs, dim=1) if len(qs) > 1 else qs[0]
    scale = torch.cat(scales, dim=1) if len(scales) > 1 else scales[0]
    if hessian is not None:
        if splits is not None or kind != "linear" or fmt == "fp8_e4m3":
            raise ValueError(f"{rounding} rounding takes unsplit linear weights in an integer format, got {kind} {fmt} splits={splits}")
        if rounding == "gptq":
            q = gptq_round(m, scale, fmt, group_size, hessian.to(m.device))
        elif rounding == "learned":
            q = best_rounding(m, scale, fmt, group_size, hessian.to(m.device), iters)
        else:
            raise ValueError(f"unknown rounding {rounding!r} with a Hessian; choose gptq or learned")
    data = pack_int4(q) if fmt == "int4" else q
    return QuantizedWeight(fmt, data, scale.contiguous(), tuple(w.shape), kind, group_size, None if splits is None else tuple(splits))


def _quantize_segment(m: torch.Tensor, weight_of_error: torch.Tensor, fmt: str, group_size: int | None, clip_search: bool, min_clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8-stored values (out, Kpad), scales (out, n_groups)) of one K segment of a weight matrix."""
    k = m.shape[1]
    kp = padded_k(k, fmt, group_size)
    if kp != k:
        m = torch.nn.functional.pad(m, (0, kp - k))
        weight_of_error = torch.nn.functional.pad(weight_of_error, (0, kp - k))
    g = _grouped(m, group_size)
    wg = _grouped(weight_of_error[None, :], group_size)
    amax = g.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12)
    qmax = qmax_of(fmt)
    ratios = torch.linspace(1.0, min_clip, CLIP_CANDIDATES) if clip_search else torch.ones(1)  # Python floats below
    best_scale = amax / qmax
    best_err = torch.full_like(amax, float("inf"))
    for r in ratios.tolist():
        scale = amax * r / qmax
        err = ((_decode(_encode(g, scale, fmt), scale, fmt) - g).pow(2) * wg).sum(dim=-1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
    q = _encode(g, best_scale, fmt).reshape(m.shape[0], kp)
    return q, best_scale.reshape(m.shape[0], -1)


def gptq_round(m: torch.Tensor, scale: torch.Tensor, fmt: str, group_size: int | None, hessian: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """Integer values (out, Kpad) of ``m`` (out, K) on fixed ``scale`` grids, rounded one input column at a time
    with the rounding error of each column spread over the columns not yet rounded through the inverse input
    Hessian (optimal brain quantization, as GPTQ, Frantar et al. 2022), minimizing ``|(W_hat - W) x|^2`` over the
    calibration inputs instead of ``|W_hat - W|^2``. ``hessian`` is ``E[x x^T]``; ``damp`` x its mean diagonal is added.
    """
    out, k = m.shape
    qmin, qmax = int_range(fmt, True)
    h = hessian.double().clone()
    dead = torch.diagonal(h) <= 0
    h[dead, dead] = 1.0
    h += damp * torch.diagonal(h).mean() * torch.eye(k, dtype=h.dtype, device=h.device)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    w = m.double().clone()
    w[:, dead] = 0.0
    per_col = scale.double().repeat_interleave(group_size if group_size is not None else k, dim=1)[:, :k]
    q = torch.empty(out, k, dtype=torch.int8, device=m.device)
    for i in range(k):
        col = w[:, i]
        qi = torch.round(col / per_col[:, i]).clamp(qmin, qmax)
        q[:, i] = qi.to(torch.int8)
        err = (col - qi * per_col[:, i]) / hinv[i, i]
        w[:, i + 1 :] -= err[:, None] * hinv[i, i + 1 :][None, :]
    kp = padded_k(k, fmt, group_size)
    return torch.nn.functional.pad(q, (0, kp - k)) if kp != k else q


ZETA, GAMMA = 1.1, -0.1  # stretch of the rectified sigmoid (AdaRound): h(v) reaches 0 and 1 exactly


def _rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return (torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def learned_round(
    m: torch.Tensor, scale: torch.Tensor, fmt: str, group_size: int | None, hessian: torch.Tensor, iters: int = 300,
    reg: float = 30.0, lr: float = 0.03, warmup: float = 0.2, init: torch.Tensor | None = None,
) -> torch.Tensor:
    """Integer values (out, Kpad) of ``m`` (out, K) on fixed ``scale`` grids with each value rounded down or up as
    learned by minimizing the layer's output error ``tr(dW H dW^T)`` over the calibration inputs (``H = E[x x^T]``
    or, where bias correction removes the mean error, the input covariance; (K, K)): AdaRound (Nagel et al. 2020;
    own implementation). Each value is ``floor(w / s) + h(v)`` with ``h`` a rectified sigmoid of a free variable
    ``v``; Adam runs ``iters`` full-batch steps (the Hessian holds every calibration input) on the output error,
    relative to that of nearest rounding, plus ``reg`` x a term pushing ``h`` to 0 or 1 (off for the first
    ``warmup`` share of the steps, its exponent annealed from 20 to 2). The result is ``floor + (h >= 0.5)``,
    clamped to the grid. With ``init`` (integer values, e.g. from :func:`gptq_round`, which may lie beyond the
    floor or ceiling) each value chooses between ``init`` and its neighbour towards ``w / s`` instead, starting at
    ``init``. Cost: ``iters`` x ~6 ``out x K x K`` multiply-adds.
    """
    out, k = m.shape
    qmin, qmax = int_range(fmt, True)
    per_col = scale.float().repeat_interleave(group_size if group_size is not None else k, dim=1)[:, :k]
    x = m.float() / per_col
    if init is None:  # choose between floor and ceiling, starting at the fractional part
        base = torch.floor(x)
        start = x - base
    else:  # choose between init and its neighbour towards the weight, starting at init
        init = init[:, :k].float()
        base = torch.where(x >= init, init, init - 1.0)
        start = init - base
    target = ((start.clamp(0.0, 1.0) - GAMMA) / (ZETA - GAMMA)).clamp(1e-4, 1 - 1e-4)
    v = torch.log(target / (1 - target)).requires_grad_()
    h = hessian.float().to(m.device)
    nearest = (torch.round(x).clamp(qmin, qmax) * per_col - m.float())
    norm = float((nearest @ h * nearest).sum().clamp_min(1e-30))  # the output error of nearest rounding: 1
    opt = torch.optim.Adam([v], lr=lr)
    start_reg = int(warmup * iters)
    with torch.enable_grad():
        for i in range(iters):
            soft = (base + _rectified_sigmoid(v)).clamp(qmin, qmax) * per_col
            dw = soft - m.float()
            loss = (dw @ h * dw).sum() / norm
            if i >= start_reg:
                beta = 2.0 + 18.0 * (1.0 - (i - start_reg) / max(iters - start_reg, 1))
                loss = loss + reg * (1.0 - (2.0 * _rectified_sigmoid(v) - 1.0).abs().pow(beta)).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    q = (base + (_rectified_sigmoid(v.detach()) >= 0.5).float()).clamp(qmin, qmax).to(torch.int8)
    kp = padded_k(k, fmt, group_size)
    return torch.nn.functional.pad(q, (0, kp - k)) if kp != k else q


def rounding_error(m: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, group_size: int | None, hessian: torch.Tensor) -> float:
    """``tr(dW H dW^T)`` of integer values ``q`` (out, Kpad) on ``scale`` grids against ``m`` (out, K)."""
    k = m.shape[1]
    per_col = scale.double().repeat_interleave(group_size if group_size is not None else k, dim=1)[:, :k]
    dw = q[:, :k].double() * per_col - m.double()
    return float((dw @ hessian.double() * dw).sum())


def best_rounding(m: torch.Tensor, scale: torch.Tensor, fmt: str, group_size: int | None, hessian: torch.Tensor, iters: int) -> torch.Tensor:
    """Learned rounding as qdiff plans it: :func:`gptq_round`, :func:`learned_round` between floor and ceiling, and
    :func:`learned_round` around the GPTQ values (``iters`` steps each); the one with the least output error
    ``tr(dW H dW^T)`` on the calibration inputs is kept. AdaRound's floor / ceiling choice is the better one
    where the Hessian is well conditioned, GPTQ's compensation (which may move a value past them) where input
    features are strongly correlated; the third refines the latter."""
    q_gptq = gptq_round(m, scale, fmt, group_size, hessian)
    options = [q_gptq, learned_round(m, scale, fmt, group_size, hessian, iters), learned_round(m, scale, fmt, group_size, hessian, iters, init=q_gptq)]
    return min(options, key=lambda q: rounding_error(m, q, scale, group_size, hessian))


def _per_k(importance: torch.Tensor, k: int) -> torch.Tensor:
    """Per-input-channel importance expanded to the K axis of the GEMM layout (mean 1)."""
    taps = k // importance.numel()
    per_k = importance.float().clamp_min(0).repeat_interleave(taps)
    return per_k / per_k.mean().clamp_min(1e-30)


def dequantize_weight(data: torch.Tensor, scale: torch.Tensor, fmt: str, group_size: int | None, shape: tuple[int, ...], kind: str, splits: tuple[int, ...] | None = None) -> torch.Tensor:
    """Float32 weight of original ``shape`` from storage ``data`` and ``scale`` (segments per ``splits``)."""
    if fmt == "int4":
        q = unpack_int4(data)
    elif fmt == "fp8_e4m3":
        q = data.view(FP8_DTYPE) if data.dtype != FP8_DTYPE else data
    else:
        q = data
    out = q.shape[0]
    k = math.prod(shape) // out
    if splits is None:
        g = _grouped(q, group_size)
        m = _decode(g, scale.reshape(out, -1, 1), fmt).reshape(out, -1)[:, :k]
    else:
        bounds, parts, qo, so = k_bounds(tuple(splits), k), [], 0, 0
        for a, b in zip(bounds, bounds[1:]):
            kp = padded_k(b - a, fmt, group_size)
            n_groups = kp // group_size if group_size is not None else 1
            seg = _decode(_grouped(q[:, qo : qo + kp], group_size), scale[:, so : so + n_groups].reshape(out, -1, 1), fmt)
            parts.append(seg.reshape(out, -1)[:, : b - a])
            qo, so = qo + kp, so + n_groups
        m = torch.cat(parts, dim=1)
    return from_matrix(m, kind, tuple(shape))


def bias_correction(w: torch.Tensor, qw: QuantizedWeight, input_mean: torch.Tensor, stride: tuple[int, ...] | int = 1, groups: int = 1) -> torch.Tensor:
    """Per-output-channel bias that cancels the mean output shift of a weight's quantization error.

    For an input with per-feature mean ``m`` the expected output error of ``W_hat`` is
    ``(W_hat - W) m`` (summed over kernel taps for convolutions); adding its negative to the bias
    removes the systematic part of the error (Nagel et al., "Data-Free Quantization", 2019).
    Transposed convolutions spread taps over ``prod(stride)`` output positions, so their tap sum
    is divided by it. Edge effects of padding are ignored.
    """
    err = qw.dequantize(torch.float64) - w.detach().double()
    m = input_mean.double().to(err.device)
    if qw.kind == "linear":
        shift = err @ m
    elif qw.kind == "conv_transpose":  # (in, out, *k)
        taps = err.sum(dim=tuple(range(2, err.dim())))  # (in, out)
        strides = stride if isinstance(stride, (tuple, list)) else (stride,) * (err.dim() - 2)
        shift = (m @ taps) / math.prod(strides)
    else:  # (out, in/groups, *k)
        taps = err.sum(dim=tuple(range(2, err.dim())))  # (out, in/groups)
        per_group = m.reshape(groups, -1)  # (groups, in/groups)
        out_group = torch.arange(taps.shape[0], device=taps.device) // (taps.shape[0] // groups)
        shift = (taps * per_group[out_group]).sum(dim=1)
    return (-shift).float()


def _input_axis(kind: str) -> int:
    return 0 if kind == "conv_transpose" else 1


def smoothing_factors(act_absmax: torch.Tensor, w: torch.Tensor, kind: str, alpha: float) -> torch.Tensor:
    """SmoothQuant factors ``s_c = max|x_c|^alpha / max|W_c|^(1-alpha)`` per input channel.

    Dividing the activation by ``s`` and multiplying the weight's input channel by ``s`` leaves
    the product unchanged and moves activation outliers into the weight (Xiao et al., 2023).
    """
    axis = _input_axis(kind)
    w_absmax = w.detach().abs().float().amax(dim=[d for d in range(w.dim()) if d != axis])
    s = act_absmax.float().to(w_absmax.device).clamp_min(1e-8).pow(alpha) / w_absmax.clamp_min(1e-8).pow(1 - alpha)
    return torch.where(act_absmax.to(s.device) > 0, s, torch.ones_like(s)).clamp(1e-4, 1e4)


def smooth_weight(w: torch.Tensor, kind: str, factors: torch.Tensor) -> torch.Tensor:
    """The weight with input channel ``c`` multiplied by ``factors[c]``."""
    axis = _input_axis(kind)
    shape = [1] * w.dim()
    shape[axis] = -1
    return w * factors.to(w.device, w.dtype).reshape(shape)

"""Reference lowering: quantized linear / conv ops in pure PyTorch.

The converted graph calls these functions. Activations are really quantized to int8 / fp8
tensors and weights are stored quantized (see :mod:`.weights`); the matmul or convolution itself
runs in the activation's float dtype on dequantized operands. It runs on CPU and GPU, eagerly or
traced through Inductor, and is the ground truth every Triton kernel is tested against.

Split ops (``splits`` = input-channel split points ``[0, c1, ..., C]``): the input's channel slice
``[p_i, p_i+1)`` is quantized with ``a_scale[i]`` / ``a_zp[i]``, and the weight holds scales per
slice (see :mod:`.weights`). With equal scales for every slice this is exactly the unsplit op.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .formats import dequantize_fp8, dequantize_int, int_range, quantize_fp8, quantize_int
from .heads import HeadsLayout, reference_heads
from .weights import dequantize_weight


def quantize_activation(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, fmt: str, symmetric: bool) -> torch.Tensor:
    """Static per-tensor activation quantization to int8 or float8_e4m3fn storage."""
    if fmt == "fp8_e4m3":
        return quantize_fp8(x, scale)
    qmin, qmax = int_range(fmt, symmetric)
    return quantize_int(x, scale, zero_point, qmin, qmax)


def dequantize_activation(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`quantize_activation`, cast to ``dtype``."""
    if q.dtype == torch.float8_e4m3fn:
        return dequantize_fp8(q, scale).to(dtype)
    return dequantize_int(q, scale, zero_point).to(dtype)


def per_slice(v: torch.Tensor, splits: tuple[int, ...], ndim: int, channel_dim: int) -> torch.Tensor:
    """One value per slice -> one per channel, shaped to broadcast along ``channel_dim`` of an ``ndim`` tensor."""
    if v.numel() != len(splits) - 1:
        raise ValueError(f"{v.numel()} per-slice quantization parameters for {len(splits) - 1} slices (split points {tuple(splits)})")
    per_channel = torch.cat([v[i : i + 1].expand(b - a) for i, (a, b) in enumerate(zip(splits, splits[1:]))])
    shape = [1] * ndim
    shape[channel_dim] = -1
    return per_channel.reshape(shape)


OUTLIER_QMAX = 127  # the outlier part is symmetric int8


def split_outliers(x: torch.Tensor, a_scale: torch.Tensor, a_zp: torch.Tensor, fmt: str, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_in, x_out)`` in float32 with ``x_in + x_out == x`` exactly: ``x_in`` is ``x`` clamped to the range the
    inlier quantizer represents, ``x_out`` the (sparse) rest."""
    qmin, qmax = int_range(fmt, symmetric)
    xf = x.float()
    x_in = torch.minimum(torch.maximum(xf, (qmin - a_zp) * a_scale), (qmax - a_zp) * a_scale)
    return x_in, xf - x_in


def quantize_outliers(x_out: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The outlier part's int8 codes (symmetric; where ``scale`` is 0 the codes are 0)."""
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round(x_out / safe).clamp(-OUTLIER_QMAX, OUTLIER_QMAX)
    return torch.where(scale > 0, codes, torch.zeros_like(codes)).to(torch.int8)


def _maybe_quantize_input(x, a_scale, a_zp, afmt, asym, act_smooth=None, channel_dim=-1, splits=None, outlier_scale=None):
    if afmt is None:
        return x
    if act_smooth is not None:  # x / s per input channel (the weight holds W * s)
        shape = [1] * x.dim()
        shape[channel_dim] = -1
        x = x * act_smooth.to(x.dtype).reshape(shape)
    if splits is not None:  # one quantizer per channel slice
        a_scale, a_zp = per_slice(a_scale, splits, x.dim(), channel_dim), per_slice(a_zp, splits, x.dim(), channel_dim)
        if outlier_scale is not None:
            outlier_scale = per_slice(outlier_scale, splits, x.dim(), channel_dim)
    xq = dequantize_activation(quantize_activation(x, a_scale, a_zp, afmt, not asym), a_scale, a_zp, x.dtype)
    if outlier_scale is None:
        return xq
    if afmt != "int8":
        raise ValueError(f"an outlier split needs int8 activations, got {afmt!r}")
    _, x_out = split_outliers(x, a_scale, a_zp, afmt, not asym)
    return xq + dequantize_int(quantize_outliers(x_out, outlier_scale), outlier_scale).to(x.dtype)


def _bias(bias, bias_corr, dtype):
    if bias_corr is not None:
        bias = bias_corr if bias is None else bias + bias_corr
    return None if bias is None else bias.to(dtype)


def qlinear(x, wdata, wscale, bias, a_scale, a_zp, *, wfmt, group_size, weight_shape, afmt=None, asym=False, bias_corr=None, act_smooth=None, splits=None,
            outlier_scale=None):
    """``F.linear`` with a quantized weight and (unless ``afmt`` is None) a quantized input.

    ``bias_corr`` (per output feature) is added to the bias: the calibrated correction of the
    weight quantization's mean output shift. ``act_smooth`` (per input feature, the inverse
    smoothing factors) scales the input before it is quantized. ``splits``: input-feature split
    points; ``a_scale`` / ``a_zp`` then hold one value per slice and the weight scales per slice.
    ``outlier_scale``: the outlier split's second quantizer (see the module docstring; per slice for split ops).
    """
    x = _maybe_quantize_input(x, a_scale, a_zp, afmt, asym, act_smooth, -1, splits, outlier_scale)
    w = dequantize_weight(wdata, wscale, wfmt, group_size, weight_shape, "linear", splits).to(x.dtype)
    return F.linear(x, w, _bias(bias, bias_corr, x.dtype))


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def qconv(x, wdata, wscale, bias, a_scale, a_zp, *, wfmt, group_size, weight_shape, kind, stride, padding, dilation, groups, output_padding=0, afmt=None, asym=False, bias_corr=None, act_smooth=None, splits=None, outlier_scale=None):
    """A (transposed) convolution with a quantized weight and optionally a quantized input (``splits``, ``outlier_scale``: as :func:`qlinear`)."""
    x = _maybe_quantize_input(x, a_scale, a_zp, afmt, asym, act_smooth, 1, splits, outlier_scale)
    w = dequantize_weight(wdata, wscale, wfmt, group_size, weight_shape, kind, splits).to(x.dtype)
    b = _bias(bias, bias_corr, x.dtype)
    nd = len(weight_shape) - 2
    if kind == "conv_transpose":
        return _CONV_T[nd](x, w, b, stride, padding, output_padding, groups, dilation)
    return _CONV[nd](x, w, b, stride, padding, dilation, groups)


ATTN_P_SCALE = 448.0  # softmax probabilities are quantized as 448 * P: the whole e4m3 range
# exp2_codes: 8 * (2**f - 1 - f) for f = f0 + 1/2, a quadratic in f0 (least squares on [-1/2, 1/2]), plus 60
EXP2_CODE_POLY = (2.74125083, -0.06332679, 59.31312284)


def exp2_codes(u: torch.Tensor) -> torch.Tensor:
    """e4m3 codes (float8_e4m3fn) of ``2**(u + 1/2)`` for fp32 ``u <= log2 448 - 1/2``, built from the exponent as the fp8
    attention kernel's ``bits`` softmax does (no exp2, no float -> fp8 conversion): with ``r = round(u)``, ``f0 = u - r``,
    the code is ``round(max(8 u + c2 f0**2 + c1 f0 + c0, 0))`` (:data:`EXP2_CODE_POLY`): exponent field and mantissa of
    ``2**(u + 1/2)`` in one integer. The nearest code but for ~1 % of values (one code off); below 2**-6 (subnormal codes)
    the absolute error stays under 2**-6."""
    u = u.float()
    f0 = u - torch.round(u)
    c2, c1, c0 = EXP2_CODE_POLY
    g = torch.clamp(u * 8.0 + ((c2 * f0 + c1) * f0 + c0), min=0.0)
    return torch.round(g).to(torch.uint8).view(torch.float8_e4m3fn)


ATTN_SOFTMAX_MODES = ("ex2", "ex2-lv", "bits", "half")  # the fp8 attention kernel's (attention_probs)


def default_attention_softmax(dv: int) -> str:
    """The fp8 attention kernel's softmax mode for value head dim ``dv`` by default: ``ex2-lv`` where V's second
    head-dim part has a padding column for the row sums (D = 72: 64 + 16 columns for 72, D = 40: 32 + 16; measured
    2.8-4.7 % faster than ``ex2`` at DiT-XL/2 / PixArt-alpha shapes, docs/kernels.md), else ``ex2`` (power-of-two D,
    80 = 64 + 16, 160 = 128 + 32)."""
    d0 = 1 << (dv.bit_length() - 1)
    rest = dv - d0
    return "ex2-lv" if rest and max(16, 1 << (rest - 1).bit_length()) > rest else "ex2"


def attention_probs(s: torch.Tensor, m: torch.Tensor, softmax: str = "ex2") -> tuple[torch.Tensor, torch.Tensor]:
    """``P = 448 * exp2(s - m)`` for base-2 scores ``s`` and row maxima ``m``: ``(P8, l)``, P's e4m3 codes as fp32 and
    the row sums the kernel divides by, for the fp8 attention kernel's softmax modes (``fp8_attention.SOFTMAX_MODES``):
    ``ex2`` rounds P to nearest and sums the unquantized P; ``ex2-lv`` sums the quantized P instead (the kernel's ones
    column in V); ``bits`` takes :func:`exp2_codes` and sums them; ``half`` even key columns as ``ex2-lv``, odd ones as
    ``bits``."""
    if softmax not in ATTN_SOFTMAX_MODES:
        raise ValueError(f"unknown softmax mode {softmax!r}")
    u = s - m + math.log2(ATTN_P_SCALE)
    p = torch.exp2(u)
    p8 = p.clamp(max=ATTN_P_SCALE).to(torch.float8_e4m3fn).float()
    if softmax == "ex2":
        return p8, p.sum(-1, keepdim=True)
    if softmax in ("bits", "half"):
        bits = exp2_codes(u - 0.5).float()
        p8 = bits if softmax == "bits" else torch.where(torch.arange(u.shape[-1], device=u.device) % 2 == 1, bits, p8)
    return p8, p8.sum(-1, keepdim=True)


def qattention(q, k, v, q_scale, k_scale, v_scale, sm_scale=None, out_dtype=None, out_scale=None, softmax=None):
    """Non-causal ``softmax(q k^T * sm_scale) v`` of (B, H, S, D) tensors with fp8 e4m3 q, k, v and probabilities, the
    arithmetic of ``qdiff::fp8_attention`` (:mod:`.kernels.fp8_attention`).

    q, k, v are quantized with their static per-tensor scales (or are float8_e4m3fn codes already quantized with them).
    Scores in fp32 are taken in base 2, ``S = (q8 k8^T) * q_scale * k_scale * sm_scale * log2 e``; with the row max
    ``m``, ``P = exp2(S - m + log2 448)`` (in [0, 448]) is quantized to e4m3 for ``P8 v8``, the row sum ``l`` adds the
    unquantized fp32 P, and ``O = (P8 v8) * v_scale / l`` in ``out_dtype`` (default q's dtype; bf16 for fp8 inputs).

    Where the kernel differs: it quantizes P tile by tile relative to the *running* row max (online softmax), rescaling
    the accumulated sum when the max grows, while this uses the final max. ``out_scale``: the output as float8_e4m3fn
    codes quantized with it (the output projection's static scale), as ``qdiff::fp8_attention`` writes them. e4m3 rounding is relative, so the error is
    statistically the same, but codes differ after a rescale (and tiny P flush to zero at different points); with all
    keys in one key tile both are the same up to fp32 summation order and the GPU's ``ex2.approx``. ``softmax``: the
    kernel's softmax mode (:func:`attention_probs`; ``ex2`` as above; default the kernel's,
    :func:`default_attention_softmax`: ``ex2-lv`` at D = 72 / 40, where ``l`` sums the quantized P).
    """
    if out_dtype is None:
        out_dtype = torch.bfloat16 if q.dtype == torch.float8_e4m3fn else q.dtype
    if sm_scale is None:
        sm_scale = q.shape[-1] ** -0.5

    def codes(x, scale):
        return (x if x.dtype == torch.float8_e4m3fn else quantize_fp8(x, scale)).float()

    q8, k8, v8 = codes(q, q_scale), codes(k, k_scale), codes(v, v_scale)
    s = (q8 @ k8.transpose(-1, -2)) * (q_scale.float() * k_scale.float() * sm_scale * 1.4426950408889634)
    p8, l = attention_probs(s, s.amax(-1, keepdim=True), softmax or default_attention_softmax(v.shape[-1]))
    out = (p8 @ v8) * (v_scale.float() / l)
    return out.to(out_dtype) if out_scale is None else quantize_fp8(out, out_scale)


def qlinear_heads(x, wdata, wscale, bias, a_scale, a_zp, *, heads: tuple[int, ...], out_scale, **linear_kwargs):
    """A q / k / v projection (:func:`qlinear`'s arguments) whose output is quantized per column with ``out_scale[n]``
    and laid out as fp8 attention heads (``HeadsLayout(*heads)``, :mod:`.heads`): what ``qdiff::fp8_linear_heads``
    computes."""
    y = qlinear(x, wdata, wscale, bias, a_scale, a_zp, **linear_kwargs)
    return reference_heads(y.reshape(-1, y.shape[-1]), out_scale, HeadsLayout(*heads))


def add_norm_modulate_fp8(h: torch.Tensor, y: torch.Tensor | None, gate: torch.Tensor | None, scale: torch.Tensor,
                          shift: torch.Tensor, a_scale: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of :func:`.kernels.norm_quant.add_norm_modulate_fp8`: ``x = h + gate[b] * y`` in fp32 rounded to h's
    dtype (the first output; empty without ``y``), then ``LayerNorm(x) * (1 + scale[b]) + shift[b]`` in fp32 quantized
    to e4m3 with the static scale. h, y: (B, S, C); gate / scale / shift: (B, C) or (B, 1, C)."""
    B, S, C = h.shape

    def per_batch(t: torch.Tensor) -> torch.Tensor:
        return t.float().reshape(B, 1, C)

    x = h.float()
    h_out = h.new_empty((0,))
    if y is not None:
        h_out = (x + y.float() * (per_batch(gate) if gate is not None else 1.0)).to(h.dtype)
        x = h_out.float()
    m = F.layer_norm(x, (C,), eps=eps) * (1.0 + per_batch(scale)) + per_batch(shift)
    return h_out, quantize_fp8(m, a_scale)


def qembedding(indices: torch.Tensor, data: torch.Tensor, scale: torch.Tensor, *, out_dtype: torch.dtype) -> torch.Tensor:
    """Rows ``indices`` of an int8 lookup table ``data`` (V, D) with one fp32 scale per row ``scale`` (V, 1), in
    ``out_dtype``: what ``F.embedding(indices, table)`` reads, from the quantized table (Inductor fuses it into one gather)."""
    return (data[indices].float() * scale[indices]).to(out_dtype)

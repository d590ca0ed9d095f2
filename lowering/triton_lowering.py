"""Triton lowering: drop-in replacements of :func:`.reference.qlinear` / :func:`.reference.qconv`.

Each call goes to a Triton kernel (:mod:`.kernels`) when one supports its formats, dtype and
device, and to the pure-PyTorch reference otherwise, so results are never silently wrong:

| weight | activation | kernel |
| --- | --- | --- |
| fp8_e4m3 | fp8_e4m3 | ``qdiff::fp8_linear`` |
| int8 | int8 (sym. or asym.) | ``qdiff::int8_linear`` |
| int4 (per channel or groups of 32k) | int8 / fp8_e4m3 | ``qdiff::w4a8_linear`` |
| int4 / int8 | none | ``qdiff::weight_only_linear`` |
| conv 1x1, stride 1, no padding | as linear | the linear kernels on the channels-last view |
| conv 2-D, groups 1, C_in % 16 == 0, fp8/fp8, engine ``im2col`` (per shape under ``QDIFF_CONV_ENGINE=auto``, the default: :func:`.conv_im2col.auto_engine`) | | fp8 quantization fused into the producer, ``qdiff::im2col`` columns + ``qdiff::fp8_linear_prequant`` (:mod:`.conv_im2col`) |
| conv 2-D, groups 1, C_in % 16 == 0, fp8/fp8, engine ``direct`` (many pixels, narrow outputs under ``auto``) | | fp8 quantization fused into the producer, ``qdiff::conv2d_fp8_prequant`` (implicit GEMM on the fp8 NHWC activation, no columns) |
| conv 2-D, groups 1, C_in % 16 == 0, int8/int8 (fp8 with ``QDIFF_CONV_ENGINE=implicit``) | | ``qdiff::conv2d_w8a8`` (implicit GEMM, quantizing in the prologue) |
| split op (``splits``, <= 4 slices): fp8 / int8 per channel | fp8_e4m3 / int8 (sym. or asym.), same pair | the same three kernels' split path |

Split ops (split-shortcut quantization) run the W8A8 kernels with ``NS`` > 1: the K loop visits the input-channel
slices in order (tiles straddling a slice bound are masked to the slice), quantizes the input in the prologue with the
slice's scale (and zero point) and adds the slice's product to the fp32 result times the slice's activation scale and
per-output-channel weight scale. Split ops in other formats
(W4A8, weight-only, more than 4 slices) run the reference and are named by :func:`fallback_reason`, as are
outlier-split inputs (``outlier_scale``), which have no kernel yet. Everything else (transposed / grouped / 1-D / 3-D
convs, weight-only convs other than 1x1, mixed fp8-int8 pairs, fp8 weight-only, float64 inputs, ...) runs the reference. Kernels run on CUDA
tensors, and on CPU tensors only when Triton runs in its interpreter (``TRITON_INTERPRET=1``, tests).
A symmetric int8 quantizer's zero point is 0 by construction (``observers.qparams_from_range``) and is
not read.
"""

from __future__ import annotations

import warnings

import torch

from . import reference
from . import conv_im2col
from .conv_im2col import conv2d_fp8_direct, conv2d_fp8_im2col, fp8_engine
from ..switches import env_switch
from .heads import HeadsLayout
from .kernels._common import FLOAT_DTYPES, MAX_SLICES, TORCH_ACTIVATIONS, kernels_usable_on
from .kernels.conv import conv2d_w8a8
from .kernels.fp8_linear import fp8_linear, fp8_linear_prequant, quantize_input_fp8
from .kernels.int8_linear import int8_linear, weight_colsum
from .kernels.w4_linear import supports_group, w4a8_linear, weight_only_linear
from .weights import k_bounds


# (weight, activation) formats whose kernels take split ops (per-slice scales inside the K loop)
SPLIT_PAIRS = (("fp8_e4m3", "fp8_e4m3"), ("int8", "int8"))


def split_unsupported(wfmt: str, afmt: str | None, group_size: int | None, splits) -> str | None:
    """Why a split op (``splits``: input-channel split points) has no kernel, or None (also for unsplit ops)."""
    if splits is None:
        return None
    if len(splits) - 1 > MAX_SLICES:
        return f"split into {len(splits) - 1} input slices (the split kernels take at most {MAX_SLICES}): runs the reference lowering"
    if (wfmt, afmt) not in SPLIT_PAIRS or group_size is not None:
        what = f"{wfmt} weight-only" if afmt is None else f"{wfmt} weight / {afmt} activation"
        return f"split op ({what}; split kernels are W8A8 fp8 / int8 only): runs the reference lowering"
    return None


def linear_route(x: torch.Tensor, *, wfmt: str, afmt: str | None, group_size: int | None, dtype: torch.dtype | None = None,
                 splits=None) -> str | None:
    """The kernel a linear with these formats runs on (``fp8``, ``int8``, ``w4a8``, ``weight_only``), or None.

    ``dtype``: route as for an input of this float dtype (an fp8 input stands for its float ``out_dtype``).
    ``splits``: a split op's input-feature split points (only the W8A8 kernels take them)."""
    if not isinstance(x, torch.Tensor) or (dtype or x.dtype) not in FLOAT_DTYPES or not kernels_usable_on(x.device):
        return None
    if split_unsupported(wfmt, afmt, group_size, splits) is not None:
        return None
    if wfmt == "int4" and not supports_group(group_size):
        return None
    if afmt is None:
        return "weight_only" if wfmt in ("int4", "int8") and (wfmt == "int4" or group_size is None) else None
    if wfmt == "int4" and afmt in ("int8", "fp8_e4m3"):
        return "w4a8"
    if (wfmt, afmt) == ("fp8_e4m3", "fp8_e4m3"):
        return "fp8"
    if (wfmt, afmt) == ("int8", "int8") and group_size is None:
        return "int8"
    return None


FP8 = torch.float8_e4m3fn
# Where a float input of an fp8 GEMM is quantized: "producer" (plain aten pointwise ops before the GEMM, which
# Inductor fuses into the kernel producing the input; the GEMM reads 1-byte A) or "prologue" (inside the GEMM).
# ``passes.act_quant`` chooses per op; this is the default for calls it did not mark. QDIFF_FP8_ACT_QUANT
# (prologue / producer / auto) overrides the pass's choice, for A/B measurements.
FP8_ACT_QUANT_DEFAULT = "prologue"
X_QUANT_MODES = ("prologue", "producer")


def _linear(route, x, wdata, wscale, bias, a_scale, a_zp, *, wfmt, group_size, afmt, asym, bias_corr, act_smooth, act,
            x_quant=None, out_scale=None, out_dtype=None, colsum=None, splits=None):
    zp = a_zp if (asym and afmt == "int8") else None
    if route == "fp8":
        w = wdata.view(FP8)
        if splits is not None:  # per-slice scales: always quantized in the prologue (passes.act_quant skips split ops)
            return fp8_linear(x, w, wscale, bias, a_scale, act_smooth, act, bias_corr, out_scale, splits=splits)
        if x.dtype == FP8:  # quantized by the previous GEMM's epilogue
            return fp8_linear_prequant(x, w, wscale, bias, a_scale, out_dtype, act, bias_corr, out_scale)
        if (x_quant or FP8_ACT_QUANT_DEFAULT) == "producer":
            xq = quantize_input_fp8(x, a_scale, act_smooth)
            return fp8_linear_prequant(xq, w, wscale, bias, a_scale, x.dtype, act, bias_corr, out_scale)
        return fp8_linear(x, w, wscale, bias, a_scale, act_smooth, act, bias_corr, out_scale)
    if route == "int8":
        return int8_linear(x, wdata, wscale, bias, a_scale, zp, act_smooth, act, bias_corr, colsum if zp is not None else None,
                           splits=splits)
    if route == "w4a8":
        return w4a8_linear(x, wdata, wscale, bias, a_scale, zp, group_size=group_size, afmt=afmt, act_smooth=act_smooth,
                           act=act, bias_corr=bias_corr)
    return weight_only_linear(x, wdata, wscale, bias, wfmt=wfmt, group_size=group_size, act=act, bias_corr=bias_corr)


def qlinear(x, wdata, wscale, bias, a_scale, a_zp, *, wfmt, group_size, weight_shape, afmt=None, asym=False, bias_corr=None, act_smooth=None,
            splits=None, outlier_scale=None, x_quant=None, out_scale=None, out_dtype=None, colsum=None):
    """:func:`.reference.qlinear` on a Triton kernel where one applies (same arguments, same result up to rounding).

    Split ops (``splits``: per-slice activation and weight scales) run the W8A8 kernels' split path (fp8 / int8; other
    formats the reference); outlier-split inputs (``outlier_scale``) run the reference: no kernel takes them yet.
    fp8 GEMMs only (set by ``passes.act_quant``): ``x_quant`` ("prologue" / "producer") places the input's
    quantization; ``out_scale`` returns float8_e4m3fn quantized with the next fp8 GEMM's scale; an fp8 ``x``
    (from such a GEMM) is taken as quantized with ``a_scale``, and ``out_dtype`` is then the output dtype.
    ``colsum``: the int8 weight's column sums (:func:`aux_buffers`), for asymmetric int8 activations."""
    return qlinear_fused(x, wdata, wscale, bias, a_scale, a_zp, wfmt=wfmt, group_size=group_size, weight_shape=weight_shape,
                         afmt=afmt, asym=asym, bias_corr=bias_corr, act_smooth=act_smooth, splits=splits, x_quant=x_quant,
                         out_scale=out_scale, out_dtype=out_dtype, colsum=colsum, outlier_scale=outlier_scale)


def qlinear_fused(x, wdata, wscale, bias, a_scale, a_zp, *, wfmt, group_size, weight_shape, afmt=None, asym=False,
                  bias_corr=None, act_smooth=None, act="none", splits=None, x_quant=None, out_scale=None, out_dtype=None, colsum=None,
                  outlier_scale=None):
    """:func:`qlinear` followed by ``act`` (``none`` / ``silu`` / ``gelu_tanh``), fused into the kernel's epilogue."""
    if act not in TORCH_ACTIVATIONS:
        raise ValueError(f"unknown activation {act!r}; choose one of {', '.join(TORCH_ACTIVATIONS)}")
    if len(weight_shape) != 2 or x.shape[-1] != weight_shape[1]:
        raise ValueError(f"linear input of shape {tuple(x.shape)} does not match weight shape {tuple(weight_shape)}")
    if x_quant is not None and x_quant not in X_QUANT_MODES:
        raise ValueError(f"x_quant must be one of {X_QUANT_MODES}, got {x_quant!r}")
    fp8_in = isinstance(x, torch.Tensor) and x.dtype == FP8
    if fp8_in and (afmt != "fp8_e4m3" or out_dtype not in FLOAT_DTYPES):
        raise ValueError(f"an fp8 input needs an fp8 activation format and a float out_dtype, got afmt={afmt!r}, out_dtype={out_dtype}")
    if out_scale is not None and (wfmt, afmt) != ("fp8_e4m3", "fp8_e4m3"):
        raise ValueError(f"out_scale (fp8 output) is for fp8 GEMMs, got weight {wfmt} / activation {afmt}")
    if fp8_in and splits is not None:
        raise ValueError(f"a split op takes a float input (one quantizer per slice), got float8_e4m3fn (split points {tuple(splits)})")
    route = None if outlier_scale is not None else linear_route(
        x, wfmt=wfmt, afmt=afmt, group_size=group_size, dtype=out_dtype if fp8_in else None, splits=splits)  # fp8: as its float input
    if route is None:
        if fp8_in:  # exact: the reference re-quantizes the dequantized codes to the same codes
            x = reference.dequantize_activation(x, a_scale, a_zp, out_dtype)
        y = reference.qlinear(x, wdata, wscale, bias, a_scale, a_zp, wfmt=wfmt, group_size=group_size, weight_shape=weight_shape,
                              afmt=afmt, asym=asym, bias_corr=bias_corr, act_smooth=act_smooth, splits=splits, outlier_scale=outlier_scale)
        y = TORCH_ACTIVATIONS[act](y)
        return y if out_scale is None else quantize_input_fp8(y, out_scale)
    return _linear(route, x, wdata, wscale, bias, a_scale, a_zp, wfmt=wfmt, group_size=group_size, afmt=afmt, asym=asym,
                   bias_corr=bias_corr, act_smooth=act_smooth, act=act, x_quant=x_quant, out_scale=out_scale, out_dtype=out_dtype,
                   colsum=colsum, splits=splits)


def pair(v, n: int = 2) -> tuple[int, ...] | None:
    """``v`` as an ``n``-tuple of ints (an int repeated, a 1-tuple repeated), or None."""
    if isinstance(v, int):
        return (v,) * n
    if isinstance(v, (tuple, list)) and all(isinstance(e, int) for e in v):
        return tuple(v) * n if len(v) == 1 else (tuple(v) if len(v) == n else None)
    return None


def numeric_padding(padding, kernel: tuple[int, int], dilation: tuple[int, int]) -> tuple[int, int] | None:
    """Numeric symmetric padding, or None (asymmetric 'same' padding is left to the reference)."""
    if padding == "valid":
        return (0, 0)
    if padding == "same":
        total = [d * (k - 1) for k, d in zip(kernel, dilation)]
        return None if any(t % 2 for t in total) else tuple(t // 2 for t in total)
    return pair(padding)


# Implicit-GEMM convs need input channels in multiples of 16 (16-byte aligned channels-last rows);
# others (e.g. a UNet's 4-channel input conv) stay on the reference, i.e. cuDNN. Checked by compiling
# the kernel for sm_90 ahead of time: unaligned strides spill registers and disable pipelining.
IMPLICIT_CONV_CHANNEL_MULTIPLE = 16


def conv_route(x: torch.Tensor, *, wfmt: str, afmt: str | None, group_size: int | None, weight_shape, kind: str,
               stride, padding, dilation, groups, splits=None) -> tuple[str, tuple] | None:
    """``("gemm", (linear route,))`` for 1x1 convs; for other fp8 / fp8 convs the engine of
    :func:`.conv_im2col.conv_engine` (``"im2col"``, ``"direct"`` or ``"implicit"``) with ``(stride, padding, dilation)``;
    ``("implicit", ...)`` for int8 / int8; None: the reference.

    ``splits``: a split op's input-channel split points (W8A8 fp8 / int8 only, as :func:`linear_route`)."""
    if kind != "conv" or len(weight_shape) != 4 or groups != 1 or not isinstance(x, torch.Tensor) or x.dim() != 4:
        return None
    st, dil = pair(stride), pair(dilation)
    if st is None or dil is None:
        return None
    pad = numeric_padding(padding, tuple(weight_shape[2:]), dil)
    if pad is None or x.shape[1] != weight_shape[1]:
        return None
    if tuple(weight_shape[2:]) == (1, 1) and st == (1, 1) and pad == (0, 0):
        route = linear_route(x, wfmt=wfmt, afmt=afmt, group_size=group_size, splits=splits)
        return None if route is None else ("gemm", (route,))
    if (wfmt, afmt) not in (("fp8_e4m3", "fp8_e4m3"), ("int8", "int8")) or group_size is not None:
        return None
    if split_unsupported(wfmt, afmt, group_size, splits) is not None:
        return None
    if x.dtype not in FLOAT_DTYPES or not kernels_usable_on(x.device):
        return None
    if x.shape[1] % IMPLICIT_CONV_CHANNEL_MULTIPLE:
        return None  # unaligned channel strides defeat vectorized loads and pipelining: cuDNN is faster
    params = (st, pad, dil)
    if (wfmt, afmt) != ("fp8_e4m3", "fp8_e4m3"):
        return ("implicit", params)
    return (conv_im2col.conv_engine(x.shape, weight_shape, *params), params)  # (a symbolic batch guards on its bounds)


def qconv(x, wdata, wscale, bias, a_scale, a_zp, *, wfmt, group_size, weight_shape, kind, stride, padding, dilation, groups,
          output_padding=0, afmt=None, asym=False, bias_corr=None, act_smooth=None, splits=None, outlier_scale=None, colsum=None,
          weight_layout=None):
    """:func:`.reference.qconv` on a Triton kernel where one applies; the output is channels-last (split ops: the W8A8
    kernels' split path; outlier-split ops: the reference).

    ``colsum``: the int8 weight's column sums (:func:`aux_buffers`; per slice for split ops), for asymmetric int8 activations.
    ``weight_layout``: ``"columns"`` when ``wdata`` was stored in im2col column order (:func:`stored_weight`; the order the
    ``im2col`` and ``direct`` routes read), else the plan's channel-major order (the reference and ``implicit`` routes')."""
    route = None if outlier_scale is not None else conv_route(
        x, wfmt=wfmt, afmt=afmt, group_size=group_size, weight_shape=weight_shape, kind=kind, stride=stride, padding=padding,
        dilation=dilation, groups=groups, splits=splits)
    if weight_layout not in (None, conv_im2col.COLUMNS_LAYOUT):
        raise ValueError(f"unknown conv weight layout {weight_layout!r}")
    wanted = conv_im2col.COLUMNS_LAYOUT if route is not None and route[0] in ("im2col", "direct") else None
    if weight_layout != wanted:  # per call: a weight stored for another route (converted graphs store the im2col route's)
        reorder = conv_im2col.columns_weight if wanted else conv_im2col.plan_weight
        wdata = reorder(wdata, tuple(weight_shape), splits)
    if route is None:
        return reference.qconv(x, wdata, wscale, bias, a_scale, a_zp, wfmt=wfmt, group_size=group_size, weight_shape=weight_shape,
                               kind=kind, stride=stride, padding=padding, dilation=dilation, groups=groups,
                               output_padding=output_padding, afmt=afmt, asym=asym, bias_corr=bias_corr, act_smooth=act_smooth,
                               splits=splits, outlier_scale=outlier_scale)
    how, params = route
    if how == "gemm":
        nhwc = x.permute(0, 2, 3, 1)  # a view when x is channels-last
        y = _linear(params[0], nhwc, wdata, wscale, bias, a_scale, a_zp, wfmt=wfmt, group_size=group_size, afmt=afmt, asym=asym,
                    bias_corr=bias_corr, act_smooth=act_smooth, act="none", colsum=colsum, splits=splits)
        return y.permute(0, 3, 1, 2)
    st, pad, dil = params
    if how == "direct":
        return conv2d_fp8_direct(x, wdata.view(torch.float8_e4m3fn), wscale, bias, a_scale, weight_shape=tuple(weight_shape), stride=st,
                                 padding=pad, dilation=dil, act_smooth=act_smooth, bias_corr=bias_corr, splits=splits)
    if how == "im2col":
        return conv2d_fp8_im2col(x, wdata.view(torch.float8_e4m3fn), wscale, bias, a_scale, weight_shape=tuple(weight_shape), stride=st,
                                 padding=pad, dilation=dil, act_smooth=act_smooth, bias_corr=bias_corr, splits=splits)
    zp = a_zp if (asym and afmt == "int8") else None
    w = wdata.view(torch.float8_e4m3fn) if wfmt == "fp8_e4m3" else wdata
    return conv2d_w8a8(x, w, wscale, bias, a_scale, zp, weight_shape=tuple(weight_shape), stride=st, padding=pad, dilation=dil,
                       act_smooth=act_smooth, bias_corr=bias_corr, colsum=colsum, splits=splits)


def fallback_reason(q) -> str | None:
    """Why a converted op (``QuantizedOp``) runs the reference under this lowering whatever its shapes, or None."""
    if q.act_fmt is not None and q.act_outlier_scale is not None:
        return "outlier-split input (no Triton kernel yet): runs the reference lowering"
    w = q.weight
    return split_unsupported(w.fmt, q.act_fmt, w.group_size, w.splits)


def stored_weight(q, kind: str) -> tuple[torch.Tensor, str] | None:
    """W8A8-FP8 convs with a spatial kernel store their weight in im2col column order (:mod:`.conv_im2col`), read as
    stored by the GEMM of the ``im2col`` engine and by the ``direct`` engine's kernel; None for the rest (and with
    ``QDIFF_CONV_ENGINE=implicit``)."""
    w = q.weight
    spatial = kind == "conv" and len(w.shape) == 4 and tuple(w.shape[2:]) != (1, 1) and w.shape[1] % IMPLICIT_CONV_CHANNEL_MULTIPLE == 0
    fp8 = (w.fmt, q.act_fmt) == ("fp8_e4m3", "fp8_e4m3") and w.group_size is None and q.act_outlier_scale is None
    if not (spatial and fp8 and fp8_engine() != "implicit") or split_unsupported(w.fmt, q.act_fmt, w.group_size, w.splits):
        return None
    return conv_im2col.columns_weight(w.data, tuple(w.shape), w.splits), conv_im2col.COLUMNS_LAYOUT


def aux_buffers(q, kind: str) -> dict[str, torch.Tensor]:
    """Per-op tensors computed once at conversion (``Lowering.aux``): the int8 weight's column sums for an
    asymmetric int8 activation quantizer (its zero-point term), instead of a reduction over the weight per call."""
    w = q.weight
    if q.act_fmt == "int8" and not q.act_symmetric and w.fmt == "int8" and w.group_size is None and q.act_outlier_scale is None:
        if w.splits is not None and split_unsupported(w.fmt, q.act_fmt, w.group_size, w.splits) is not None:
            return {}
        bounds = None if w.splits is None else k_bounds(w.splits, w.k)  # split op: one sum per slice, (N, slices)
        return {"colsum": weight_colsum(w.data, bounds)}
    return {}


def attention_route(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why ``qdiff::fp8_attention`` cannot take these q / k / v (they then run :func:`.reference.qattention`), or None.

    Each of q / k / v is float (quantized here) or already float8_e4m3fn, written by its projection
    (``passes.attention_heads``): fp8 heads, q / k padded to :func:`.kernels.fp8_attention.qk_width` of V's head dim,
    or plain fp8 output of V's head dim (the kernel pads q / k in registers)."""
    from .kernels.fp8_attention import MAX_HEAD_DIM, MIN_HEAD_DIM, qk_width

    if not kernels_usable_on(q.device):
        return f"device {q.device} (kernels need CUDA, or CPU in the Triton interpreter)"
    floats = {t.dtype for t in (q, k, v) if t.dtype != FP8}
    if len(floats) > 1 or not floats <= set(FLOAT_DTYPES):
        return f"dtypes {q.dtype} / {k.dtype} / {v.dtype}"
    d = v.shape[-1] if v.dim() == 4 else 0
    # fp8 q / k: heads already padded to the kernel's width, or plain fp8 projection output (padded in registers)
    widths_ok = all(t.shape[3] in ((d, qk_width(d)) if t.dtype == FP8 else (d,)) for t in (q, k))
    if q.dim() != 4 or k.dim() != 4 or k.shape[:3] != v.shape[:3] or k.shape[:2] != q.shape[:2] or not widths_ok:
        return f"shapes {tuple(q.shape)} / {tuple(k.shape)} / {tuple(v.shape)}"
    if not (MIN_HEAD_DIM <= d <= MAX_HEAD_DIM and d % 8 == 0) or k.shape[2] == 0:
        return f"head dim {d} or no keys"
    return None


V_ONES_ENV = "QDIFF_ATTN_V_ONES"


def v_ones_enabled() -> bool:
    """Whether the attention lowering's V copy carries the kernel's ones row (``$QDIFF_ATTN_V_ONES``, 0 / 1; off by
    default: built after the device budget of 2026-12-04 and not yet run compiled on a GPU)."""
    return bool(env_switch(V_ONES_ENV, False))


def qattention(q, k, v, q_scale, k_scale, v_scale, sm_scale=None, out_dtype=None, out_scale=None):
    """:func:`.reference.qattention`'s signature (the converted graph's attention call): ``qdiff::fp8_attention`` where
    :func:`attention_route` allows, else the reference. q / k / v are quantized before the kernel by plain aten ops
    (:func:`.kernels.fp8_attention.quantize_heads`, fused by Inductor into one pass over the producer's output), V stored
    with its keys contiguous: once per tensor instead of once per query tile in the kernel, and the kernel's fp8
    ``P @ V`` reads V without a transpose (docs/kernels.md, "fp8 attention v2"). q / k / v already float8_e4m3fn (fp8
    heads or plain fp8 output written by their projection, ``passes.attention_heads``) go to the kernel as they are,
    q / k as views of the projection's output (the kernel zero-pads their head dim in registers, ``qk_parts``), V
    copied with its keys contiguous (a no-op for heads; with ``$QDIFF_ATTN_V_ONES=1`` the copy also carries the
    kernel's ones column, :func:`v_ones_enabled`);
    fp8 q needs ``sm_scale`` and ``out_dtype``. ``out_scale``:
    float8_e4m3fn output for the output projection (``passes.act_quant``)."""
    from .kernels.fp8_attention import fp8_attention, keys_contiguous, keys_contiguous_codes, ones_row_width, quantize_heads

    if q.dtype == FP8 and (sm_scale is None or out_dtype is None):
        raise ValueError("fp8 q heads (padded by their projection) need an explicit sm_scale and out_dtype")
    if (why := attention_route(q, k, v)) is not None:
        if kernels_usable_on(q.device):  # (not merely a device without kernels: a slow path the user should see)
            warnings.warn(f"qdiff: attention of q / k / v {tuple(q.shape)} / {tuple(k.shape)} / {tuple(v.shape)} "
                          f"({q.dtype} / {k.dtype} / {v.dtype}) runs the reference attention, which materializes the "
                          f"scores: {why}", stacklevel=2)
        return reference.qattention(q, k, v, q_scale, k_scale, v_scale, sm_scale, out_dtype, out_scale)
    q8 = q if q.dtype == FP8 else quantize_heads(q, q_scale)
    k8 = k if k.dtype == FP8 else quantize_heads(k, k_scale)
    # V's copy by keys also holds the ones row after its head dim where the second part has a padding column (D = 72 / 40:
    # the row sums of the default softmax, ex2-lv, read it); V written by keys by its projection (heads layout) has none
    # (off by default until timed on the GPU: V_ONES_ENV, docs/kernels.md "The ones row in V's storage")
    ones = v_ones_enabled() and ones_row_width(v.shape[-1]) is not None and not (v.dtype == FP8 and keys_contiguous(v))
    v8 = keys_contiguous_codes(v, ones) if v.dtype == FP8 else quantize_heads(v, v_scale, keys_contiguous=True, ones_row=ones)
    return fp8_attention(q8, k8, v8, q_scale, k_scale, v_scale, q.shape[-1] ** -0.5 if sm_scale is None else sm_scale,
                         out_dtype=out_dtype or q.dtype, out_scale=out_scale, v_ones_dim=v.shape[-1] if ones else 0)


def heads_unsupported(m: int, n: int, k: int) -> str | None:
    """Why an (m, k) x (n, k) projection should not write fp8 heads with ``qdiff::fp8_linear_heads``, or None: only
    the persistent TMA kernel's heads epilogue is right on an H200 (2026-12-02, triton 3.6; the tiled kernel's lost V
    entries there, docs/kernels.md "fp8 heads from the projection"), so only GEMMs on that route (fp8 input,
    M >= 1024, N, K >= 512) take it."""
    from .kernels import fp8_tma

    if fp8_tma.tma_eligible(m, n, k, k, 0, has_tma=True, capability=(9, 0)):
        return None
    return (f"{m} x {k} x {n} is not on the persistent TMA route (M >= {fp8_tma.TMA_MIN_M}, N, K >= {fp8_tma.TMA_MIN_NK}), "
            "whose heads epilogue alone is right on the GPU")


def qlinear_heads(x, wdata, wscale, bias, a_scale, a_zp, *, heads, out_scale, wfmt, group_size, weight_shape, afmt=None, asym=False,
                  bias_corr=None, act_smooth=None, x_quant=None):
    """:func:`.reference.qlinear_heads` (a q / k / v projection written as fp8 attention heads, ``heads``: the
    :meth:`.heads.HeadsLayout.fields`) on
    ``qdiff::fp8_linear_heads`` where the fp8 kernel takes it, else the reference. ``x_quant``: as :func:`qlinear`."""
    from .kernels.fp8_linear import fp8_linear_heads

    on_gpu_tiled = x.device.type == "cuda" and heads_unsupported(x.numel() // x.shape[-1], weight_shape[0], weight_shape[1]) is not None
    if linear_route(x, wfmt=wfmt, afmt=afmt, group_size=group_size) != "fp8" or act_smooth is not None or on_gpu_tiled:
        return reference.qlinear_heads(x, wdata, wscale, bias, a_scale, a_zp, heads=heads, out_scale=out_scale, wfmt=wfmt,
                                       group_size=group_size, weight_shape=weight_shape, afmt=afmt, asym=asym, bias_corr=bias_corr,
                                       act_smooth=act_smooth)
    if (x_quant or FP8_ACT_QUANT_DEFAULT) == "producer":
        x = quantize_input_fp8(x, a_scale)
    return fp8_linear_heads(x, wdata.view(FP8), wscale, bias, a_scale, out_scale, HeadsLayout(*heads), bias_corr)

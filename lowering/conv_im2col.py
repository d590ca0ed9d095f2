"""W8A8-FP8 2-D convolution as an explicit im2col matrix times the weight, on the fp8 GEMM kernels.

Column order: slice by slice (a split op's input-channel slices; one slice otherwise), and within a slice tap-major
(``tap * C_slice + c``). Read from a channels-last input, a column row is then ``KH*KW`` contiguous runs of
channels, so the kernel that writes the columns reads and writes along channels, both coalesced (channel-major
columns, ``c * KH * KW + tap`` as ``F.unfold`` gives, read the input with stride ``C`` and wrote with stride
``KH*KW``: on an H200, 2026-12-01, those kernels took 3.4 of the bundled UNet's 4.8 ms step; what the new order
measured: docs/kernels.md v6). The weight is stored in
the same order once, at conversion (:func:`columns_weight`, through ``Lowering.stored_weight``: the plan keeps its
channel-major layout), and a split op's slices stay contiguous K ranges (``split point * KH * KW``), exactly what the
linear kernels' split path takes. Other routes of such an op (the reference, the implicit kernel) restore the plan's
layout per call (:func:`plan_weight`).

Columns (``QDIFF_IM2COL_WRITER``, :func:`column_writer`):

* ``kernel`` (default): smoothing and the static fp8 quantization are aten pointwise ops on the channels-last view,
  which Inductor fuses into the producer's kernel (GroupNorm + SiLU in a UNet): it writes the fp8 activation once,
  ``(B, H, W, C)``; ``qdiff::im2col`` (:mod:`.kernels.im2col`) then copies it into the ``(M, K)`` columns in 2-D tiles;
* ``inductor``: smoothing, im2col (pad / unfold views) and the quantization all as aten ops, so Inductor writes the
  columns in one flat kernel fused with the producer. That kernel recomputes the producer's work for each of the
  ``KH*KW`` copies of every value and indexes per byte: 3.47 of the bundled UNet's 4.78 ms step on an H200
  (2026-12-01; docs/kernels.md v7).

A split op's slices are quantized each with its own scale (a per-channel scale vector, fused the same way). The GEMM is
``qdiff::fp8_linear_prequant`` (the persistent TMA kernel for large unsplit shapes), bias in its epilogue; for a split op
its split path rescales the accumulator at slice bounds.

Why not the implicit-GEMM kernel (:mod:`.kernels.conv`): on an H200 (2026-12-01, ``examples/op_engines.py --ops conv --timing plain``, SD 1.5
3x3 conv shapes, batch 2) the fp8 GEMM on explicit columns took 0.3-0.45x of the implicit kernel's time at every shape
(e.g. 34.1 vs 100.8 us at 1280 -> 1280, 16x16), the separately launched im2col 14-35 us more; fused into the producer,
the columns cost one write and one read of ``KH*KW`` times the (1-byte) input. The ``direct`` engine
(:func:`conv2d_fp8_direct`) runs an implicit GEMM on the producer's fp8 activation instead (no columns); the default
``QDIFF_CONV_ENGINE=auto`` picks between the two per conv shape (:func:`auto_engine`) and takes the direct engine for
convs whose column matrix would exceed :data:`MAX_COLUMN_BYTES` (a bound on the temporary memory).
``QDIFF_CONV_ENGINE=implicit`` selects the older implicit kernel quantizing in its prologue (A/B measurements); int8
convs always take it (no int8 kernel takes a pre-quantized input), and so do oversized convs under a forced ``im2col``.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .kernels.im2col import gather_columns
from .kernels.conv import conv2d_fp8_prequant, conv_out_size
from .kernels.fp8_linear import fp8_linear_prequant, quantize_input_fp8, quantize_slices_fp8

ENGINE_ENV = "QDIFF_CONV_ENGINE"
ENGINES = ("auto", "im2col", "implicit", "direct")
WRITER_ENV = "QDIFF_IM2COL_WRITER"
WRITERS = ("kernel", "inductor")
# Larger column matrices are never written (auto: the direct kernel; im2col forced: the implicit one): SD 1.5 at 512 px needs at most 71 MB
# (the 960 -> 320 split conv at 64x64), a 1024 px model or a large batch can need several GB.
MAX_COLUMN_BYTES = 512 * 2**20


def fp8_engine() -> str:
    """The engine switch of fp8 / fp8 2-D convs: ``QDIFF_CONV_ENGINE`` (``auto``, the default: :func:`auto_engine` per
    shape; ``im2col``, ``implicit`` or ``direct`` for every conv)."""
    engine = os.environ.get(ENGINE_ENV, "auto")
    if engine not in ENGINES:
        raise ValueError(f"{ENGINE_ENV} must be one of {', '.join(ENGINES)}, got {engine!r}")
    return engine


# ``auto``: the direct engine where it beat gather + GEMM on an H200 (2026-12-02, ``examples/op_engines.py --ops conv``,
# CUDA-graph timing, 6 bundled-UNet and 19 SD 1.5 3x3 shapes; docs/kernels.md v9): many output pixels and few output
# channels, where the columns' extra write and read cost more than the direct kernel's slower K loop (bundled UNet,
# batch 64: 27.0 vs 27.5 + 33.5 us at 128 -> 128, 32x32; SD's 960 -> 320 at 64x64: 71.7 vs 26.3 + 60.2 us). With wide
# outputs or few pixels the TMA GEMM on columns wins (SD's 1280 -> 1280 at 16x16: 56.3 vs 3.4 + 21.0 us).
AUTO_DIRECT_MIN_PIXELS = 8192  # output pixels (B * OH * OW, the GEMM's M)
AUTO_DIRECT_MAX_NARROW_N = 128  # output channels taken direct whatever the input channels
AUTO_DIRECT_MIN_C_OVER_N = 2  # wider outputs: direct when C_in >= 2 * N (the column matrix is large against the output)


def auto_engine(input_shape, weight_shape, stride, padding, dilation) -> str:
    """``direct`` or ``im2col`` for one fp8 conv under ``QDIFF_CONV_ENGINE=auto``: direct for at least
    :data:`AUTO_DIRECT_MIN_PIXELS` output pixels with ``N <= 128`` or ``C_in >= 2 N``, and whenever the column matrix
    would exceed :data:`MAX_COLUMN_BYTES`; im2col otherwise. (A symbolic batch guards on the pixel bound.)"""
    m, k = column_shape(input_shape, weight_shape, stride, padding, dilation)
    n, c = weight_shape[0], weight_shape[1]
    if m * k > MAX_COLUMN_BYTES:  # (column_bytes: one fp8 byte per element)
        return "direct"
    if m >= AUTO_DIRECT_MIN_PIXELS and (n <= AUTO_DIRECT_MAX_NARROW_N or c >= AUTO_DIRECT_MIN_C_OVER_N * n):
        return "direct"
    return "im2col"


def conv_engine(input_shape, weight_shape, stride, padding, dilation) -> str:
    """The engine that runs one fp8 / fp8 2-D conv: ``im2col``, ``direct`` or ``implicit``, from :func:`fp8_engine`
    (``auto``: :func:`auto_engine`; ``im2col`` with a column matrix over :data:`MAX_COLUMN_BYTES`: ``implicit``)."""
    engine = fp8_engine()
    if engine == "auto":
        return auto_engine(input_shape, weight_shape, stride, padding, dilation)
    if engine == "im2col" and column_bytes(input_shape, weight_shape, stride, padding, dilation) > MAX_COLUMN_BYTES:
        return "implicit"
    return engine


def column_writer() -> str:
    """Who writes an im2col conv's columns: ``QDIFF_IM2COL_WRITER`` (``kernel``, the default, or ``inductor``)."""
    writer = os.environ.get(WRITER_ENV, "kernel")
    if writer not in WRITERS:
        raise ValueError(f"{WRITER_ENV} must be one of {', '.join(WRITERS)}, got {writer!r}")
    return writer


def column_shape(input_shape, weight_shape, stride, padding, dilation) -> tuple[int, int]:
    """``(M, K)`` of the im2col matrix of an input of ``input_shape`` (B, C, H, W): one row per output pixel."""
    n, c, kh, kw = weight_shape
    oh = conv_out_size(input_shape[2], kh, stride[0], padding[0], dilation[0])
    ow = conv_out_size(input_shape[3], kw, stride[1], padding[1], dilation[1])
    return input_shape[0] * oh * ow, c * kh * kw


def column_bytes(input_shape, weight_shape, stride, padding, dilation) -> int:
    """Bytes of the (fp8) im2col matrix of an input of ``input_shape``."""
    m, k = column_shape(input_shape, weight_shape, stride, padding, dilation)
    return m * k


COLUMNS_LAYOUT = "columns"  # ``weight_layout`` of a conv weight stored by :func:`columns_weight`


def _slices(c: int, splits: tuple[int, ...] | None) -> list[tuple[int, int]]:
    bounds = (0, c) if splits is None else tuple(splits)
    return list(zip(bounds[:-1], bounds[1:]))


def _cat_k(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def columns_weight(wdata: torch.Tensor, weight_shape: tuple[int, ...], splits: tuple[int, ...] | None = None) -> torch.Tensor:
    """The plan's conv weight ``(N, C*KH*KW)`` (channel-major) in the column order of :func:`im2col` (contiguous)."""
    n, c, kh, kw = weight_shape
    w = wdata.reshape(n, c, kh, kw).permute(0, 2, 3, 1)  # (N, KH, KW, C)
    return _cat_k([w[..., a:b].reshape(n, -1) for a, b in _slices(c, splits)]).contiguous()


def plan_weight(wcols: torch.Tensor, weight_shape: tuple[int, ...], splits: tuple[int, ...] | None = None) -> torch.Tensor:
    """The inverse of :func:`columns_weight`: the plan's channel-major ``(N, C*KH*KW)``."""
    n, c, kh, kw = weight_shape
    parts, k0 = [], 0
    for a, b in _slices(c, splits):
        k1 = k0 + kh * kw * (b - a)
        parts.append(wcols[:, k0:k1].reshape(n, kh, kw, b - a))
        k0 = k1
    return torch.cat(parts, dim=3).permute(0, 3, 1, 2).reshape(n, c * kh * kw).contiguous()


def im2col(x: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
           dilation: tuple[int, int], splits: tuple[int, ...] | None = None) -> torch.Tensor:
    """``(B*OH*OW, C*KH*KW)`` patches of ``x`` (B, C, H, W), zero padding, in :func:`columns_weight`'s order.

    Views (channels-last, pad, two ``unfold``) and one copy, so Inductor writes the columns in one kernel fused with
    ``x``'s producer."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    B, C, H, W = x.shape
    xp = F.pad(x.permute(0, 2, 3, 1), (0, 0, pw, pw, ph, ph))  # (B, H + 2ph, W + 2pw, C)
    # windows of the dilated extent, every dilation-th element: (B, OH, OW, C, KH, KW)
    win = xp.unfold(1, (kh - 1) * dh + 1, sh)[..., ::dh].unfold(2, (kw - 1) * dw + 1, sw)[..., ::dw]
    taps = win.permute(0, 1, 2, 4, 5, 3)  # (B, OH, OW, KH, KW, C)
    m = taps.shape[0] * taps.shape[1] * taps.shape[2]
    return _cat_k([taps[..., a:b].reshape(m, -1) for a, b in _slices(C, splits)])


def quantized_nhwc(x: torch.Tensor, a_scale: torch.Tensor, act_smooth: torch.Tensor | None = None,
                   splits: tuple[int, ...] | None = None) -> torch.Tensor:
    """``x`` (B, C, H, W) smoothed and statically quantized to fp8 (per slice of ``splits``: each with its
    ``a_scale`` entry) as aten pointwise ops on the channels-last view, contiguous ``(B, H, W, C)``: under
    ``torch.compile`` Inductor fuses it into ``x``'s producer, which then writes the fp8 activation once."""
    if act_smooth is not None:  # x * s per input channel, before quantization (as the reference)
        x = x * act_smooth.to(x.dtype).reshape(1, x.shape[1], 1, 1)
    nhwc = x.permute(0, 2, 3, 1)
    xq = quantize_input_fp8(nhwc, a_scale) if splits is None else quantize_slices_fp8(nhwc, a_scale, tuple(splits))
    return xq.contiguous()


def conv2d_fp8_im2col(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None, a_scale: torch.Tensor, *,
                      weight_shape: tuple[int, ...], stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int],
                      act_smooth: torch.Tensor | None = None, bias_corr: torch.Tensor | None = None,
                      splits: tuple[int, ...] | None = None) -> torch.Tensor:
    """W8A8-FP8 conv2d of ``x`` (B, C, H, W) with the fp8 weight ``w`` (N, C*KH*KW) in column order
    (:func:`columns_weight`).

    ``w_scale``: per output channel, or (N, slices) for a split op (``splits``: input-channel split points, with one
    ``a_scale`` per slice). Returns NCHW with channels-last strides (the GEMM's ``(M, N)`` output viewed)."""
    n, c, kh, kw = weight_shape
    B, _, H, W = x.shape
    k_splits = None if splits is None else tuple(p * kh * kw for p in splits)
    if column_writer() == "kernel":  # quantize once (fused into the producer), then gather the fp8 bytes
        xq = quantized_nhwc(x, a_scale, act_smooth, splits)
        cols = gather_columns(xq, (kh, kw), stride, padding, dilation, splits)
    else:
        if act_smooth is not None:  # x * s per input channel, before quantization (as the reference)
            x = x * act_smooth.to(x.dtype).reshape(1, c, 1, 1)
        cols = im2col(x, (kh, kw), stride, padding, dilation, splits)
        # a split op's slice s is the K range [p_s * KH * KW, p_s+1 * KH * KW), quantized with its scale
        cols = quantize_input_fp8(cols, a_scale) if splits is None else quantize_slices_fp8(cols, a_scale, k_splits)
    w2 = w.reshape(n, c * kh * kw)
    y = fp8_linear_prequant(cols, w2, w_scale, bias, a_scale, x.dtype, bias_corr=bias_corr, splits=None if splits is None else k_splits)
    oh = conv_out_size(H, kh, stride[0], padding[0], dilation[0])
    ow = conv_out_size(W, kw, stride[1], padding[1], dilation[1])
    return y.view(B, oh, ow, n).permute(0, 3, 1, 2)


def conv2d_fp8_direct(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None, a_scale: torch.Tensor, *,
                      weight_shape: tuple[int, ...], stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int],
                      act_smooth: torch.Tensor | None = None, bias_corr: torch.Tensor | None = None,
                      splits: tuple[int, ...] | None = None) -> torch.Tensor:
    """The ``direct`` engine: :func:`conv2d_fp8_im2col`'s arguments (``w`` in the same column order), the producer's
    fp8 activation (:func:`quantized_nhwc`) read by ``qdiff::conv2d_fp8_prequant``, an implicit GEMM over it (no
    column matrix). Returns NCHW with channels-last strides."""
    n, c, kh, kw = weight_shape
    xq = quantized_nhwc(x, a_scale, act_smooth, splits)
    y = conv2d_fp8_prequant(xq, w.reshape(n, c * kh * kw), w_scale, bias, a_scale, x.dtype, kernel=(kh, kw), stride=stride,
                            padding=padding, dilation=dilation, bias_corr=bias_corr, splits=splits)
    return y.permute(0, 3, 1, 2)

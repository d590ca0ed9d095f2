"""im2col of an fp8 (or any 1-/2-byte) channels-last activation: a pure gather copy into the column matrix.

``cols[m, base_s + tap * C_s + c] = x[b, oh * SH - PH + i * DH, ow * SW - PW + j * DW, c0_s + c]`` (zero outside the
image), for output pixel ``m = (b, oh, ow)``, tap ``(i, j)`` and channel ``c`` of slice ``s`` (``[c0_s, c0_s + C_s)``;
one slice unless the op is split). This is :func:`qcompile.lowering.conv_im2col.im2col`'s column order, which
:func:`.reference` computes with aten views (the reference of this kernel: byte-for-byte equal).

Why a kernel and not the aten views Inductor fuses: fused into the producer, the column kernel recomputes the
producer's pointwise work (GroupNorm apply, SiLU, the fp8 quantization: an ``exp`` and two divisions) for each of the
``KH*KW`` copies of every input value, with per-byte index arithmetic, in a flat 1-D kernel; on an H200 (2026-12-01,
``examples/profile_step.py bundled-cifar10-ddpm qdiff-w8a8-fp8``) those kernels took 3.47 of the bundled UNet's 4.78 ms
step, at 0.3-0.7 TB/s of column writes. Here the producer quantizes each input value once (one fp8 NHWC tensor,
``1/(KH*KW)`` of the columns), and this kernel copies 2-D tiles (``BLOCK_M`` pixels x ``BLOCK_C`` channels of one tap):
the index arithmetic is per row, loads and stores run along channels.

Grid: ``(cdiv(M, BLOCK_M), KH*KW, cdiv(C_s, BLOCK_C))``, one launch per slice.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ._common import INTERPRET, autotuned, check_launchable, direct, eager_call
from .conv import conv_out_size


@triton.jit
def im2col_kernel(
    x_ptr, out_ptr,
    M, OH, OW, H, W,
    stride_xb, stride_xh, stride_xw, stride_xc, stride_om,
    c0, C_LEN, col_base,
    KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    DH: tl.constexpr, DW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_m = tl.program_id(0)
    tap = tl.program_id(1)
    pid_c = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ow = rm % OW
    t = rm // OW
    oh = t % OH
    b = t // OH
    i = tap // KW
    j = tap % KW
    h = oh * SH - PH + i * DH
    w = ow * SW - PW + j * DW
    row_in = rm < M
    inside = row_in & (h >= 0) & (h < H) & (w >= 0) & (w < W)
    rc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_in = rc < C_LEN
    src = x_ptr + (b * stride_xb + h * stride_xh + w * stride_xw)[:, None] + ((c0 + rc) * stride_xc)[None, :]
    v = tl.load(src, mask=inside[:, None] & c_in[None, :], other=0.0)
    dst = out_ptr + (rm * stride_om)[:, None] + (col_base + tap * C_LEN + rc)[None, :]
    tl.store(dst, v, mask=row_in[:, None] & c_in[None, :])


def _config(bm: int, bc: int, warps: int) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_C": bc}, num_warps=warps, num_stages=1)


# 1-byte tiles of 4-16 KiB: a warp's row segment is 32-128 contiguous bytes
CONFIGS = [_config(64, 64, 4), _config(128, 64, 4), _config(64, 128, 4), _config(128, 128, 8), _config(256, 64, 8)]
_im2col = autotuned(im2col_kernel, CONFIGS, ["M", "C_LEN", "stride_om"], interpret_config=_config(16, 16, 4))


def _slices(c: int, splits) -> list[tuple[int, int]]:
    bounds = (0, c) if splits is None else tuple(int(p) for p in splits)
    return list(zip(bounds[:-1], bounds[1:]))


def _check(x: torch.Tensor, kernel, stride, padding, dilation, splits) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"im2col: x must be a 4-D channels-last (B, H, W, C) tensor, got {getattr(x, 'shape', type(x))}")
    if x.element_size() > 2:
        raise TypeError(f"im2col: x must be a 1- or 2-byte dtype (the quantized activation), got {x.dtype}")
    for name, v in (("kernel", kernel), ("stride", stride), ("padding", padding), ("dilation", dilation)):
        if len(v) != 2 or any(int(e) < (0 if name == "padding" else 1) for e in v):
            raise ValueError(f"im2col: {name} must be two {'non-negative' if name == 'padding' else 'positive'} ints, got {tuple(v)}")
    c = x.shape[3]
    bounds = (0, c) if splits is None else tuple(splits)
    if bounds[0] != 0 or bounds[-1] != c or any(a >= b for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"im2col: splits must rise from 0 to C = {c}, got {tuple(bounds)}")


def _launch(x, kernel, stride, padding, dilation, splits, wrap) -> torch.Tensor:
    _check(x, kernel, stride, padding, dilation, splits)
    check_launchable(x)
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    B, H, W, C = x.shape
    oh, ow = conv_out_size(H, kh, sh, ph, dh), conv_out_size(W, kw, sw, pw, dw)
    M, K, T = B * oh * ow, C * kh * kw, kh * kw
    if max(M * K, x.numel()) >= 2**31:
        raise ValueError(f"im2col: {M} x {K} columns exceed the kernel's 32-bit offsets")
    out = torch.empty((M, K), device=x.device, dtype=x.dtype)
    if M == 0:
        return out
    for c0, c1 in _slices(C, splits):
        c_len = c1 - c0

        def grid(meta, c_len=c_len):
            return (triton.cdiv(M, meta["BLOCK_M"]), T, triton.cdiv(c_len, meta["BLOCK_C"]))

        wrap(_im2col)[grid](
            x, out, M, oh, ow, H, W, x.stride(0), x.stride(1), x.stride(2), x.stride(3), out.stride(0),
            c0, c_len, c0 * T, KW=kw, SH=sh, SW=sw, PH=ph, PW=pw, DH=dh, DW=dw,
        )
    return out


@triton_op("qdiff::im2col", mutates_args=())
def im2col_op(x: torch.Tensor, kernel: list[int], stride: list[int], padding: list[int], dilation: list[int],
              splits: list[int] | None = None) -> torch.Tensor:
    """Column matrix ``(B*OH*OW, C*KH*KW)`` of ``x`` (B, H, W, C), slices of ``splits`` each tap-major."""
    return _launch(x, kernel, stride, padding, dilation, splits, wrap_triton)


@im2col_op.register_fake
def _(x, kernel, stride, padding, dilation, splits=None):
    B, H, W, C = x.shape
    oh = conv_out_size(H, kernel[0], stride[0], padding[0], dilation[0])
    ow = conv_out_size(W, kernel[1], stride[1], padding[1], dilation[1])
    return x.new_empty((B * oh * ow, C * kernel[0] * kernel[1]))


def gather_columns(x: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
           dilation: tuple[int, int], splits: tuple[int, ...] | None = None) -> torch.Tensor:
    """The column matrix of the channels-last activation ``x`` (B, H, W, C) (any strides; contiguous channels are
    coalesced), in :func:`reference`'s order. Eager calls launch directly; traced ones call ``torch.ops.qdiff.im2col``."""
    args = (x, [int(e) for e in kernel], [int(e) for e in stride], [int(e) for e in padding], [int(e) for e in dilation],
            None if splits is None else [int(p) for p in splits])
    if eager_call(x):
        return _launch(*args, wrap=direct)
    return torch.ops.qdiff.im2col(*args)


def reference(x: torch.Tensor, kernel, stride, padding, dilation, splits=None) -> torch.Tensor:
    """Pure-PyTorch columns of ``x`` (B, H, W, C): :func:`qcompile.lowering.conv_im2col.im2col` on the NCHW view."""
    from ..conv_im2col import im2col as aten_im2col

    if x.dtype.itemsize == 1 and x.is_floating_point():  # (pad / unfold on fp8 need not exist on every backend: bytes)
        return aten_im2col(x.view(torch.uint8).permute(0, 3, 1, 2), kernel, stride, padding, dilation, splits).view(x.dtype)
    return aten_im2col(x.permute(0, 3, 1, 2), kernel, stride, padding, dilation, splits)


__all__ = ["gather_columns", "im2col_kernel", "reference", "INTERPRET"]

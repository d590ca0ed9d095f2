"""W8A8 2-D convolution (groups = 1) as an implicit GEMM over a channels-last input.

GEMM view: ``M = B * OH * OW`` output pixels, ``N`` output channels, ``K = KH * KW * C`` taps times
input channels. The K loop walks taps (outer) and channel blocks (inner): each A tile is
``x[b, oh*s - p + i*d, ow*s - p + j*d, c0:c0+BLOCK_K]``, contiguous in C for a channels-last
input, with out-of-image positions loaded as 0 (zero padding; for an asymmetric int8 quantizer a 0
quantizes to the zero point exactly, so it contributes nothing after the zero-point term). The
activation is quantized in the prologue (fp8 e4m3 or int8) as in the linear kernels; the weight is
used in tap-major order ``(N, KH, KW, C)`` (the wrapper reorders the plan's ``(N, C*KH*KW)``
layout). The output is written as ``(B*OH*OW, N)``, i.e. an NHWC tensor; callers get it back as a
channels-last NCHW view. Split ops (``splits`` over the input channels, constexpr ``NS`` > 1): per slice, the taps x
the channel blocks overlapping the slice (masked to it), quantized with the slice's quantizer, the partial product
added to the fp32 accumulator times the slice's activation and per-output-channel weight scales.

Split-K (constexpr ``SPLIT_K`` > 1, chosen by :func:`split_k_rule` when the output tile grid is too small to fill the
GPU): a second grid axis partitions the K loop (unsplit: contiguous ranges of the ``taps x channel blocks`` steps; split
ops: contiguous ranges of taps, every slice's channel blocks in each, so a slice's rescaling stays inside one program).
Each program writes its partial sum in final units (after the activation and weight scales; the int8 zero-point
term only in partition 0) to an fp32 workspace ``(SPLIT_K, M, N)``; :func:`conv_splitk_reduce_kernel` sums the
partitions, adds the bias, applies the activation and writes the output. ``SPLIT_K = 1`` is the single-kernel path.

Pre-quantized input (constexpr ``X_FP8``, the op ``qdiff::conv2d_fp8_prequant``, ``QDIFF_CONV_ENGINE=direct``): ``x``
holds float8_e4m3fn codes that its producer quantized with ``a_scale`` (split ops: each slice with its own, after
smoothing), so the A tile goes to ``tl.dot`` as loaded, fp8 (no conversion, smoothing or quantization in the loop); the
epilogue, the split path's per-slice rescale and split-K are unchanged. Its weight is in im2col column order
(constexpr ``W_COLUMNS``: slice by slice, tap-major within a slice, :func:`qcompile.lowering.conv_im2col.columns_weight`;
for an unsplit op that is the tap-major order), so the direct and im2col engines share one stored weight.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ._common import (
    FLOAT_DTYPES,
    INTERPRET,
    activation_code,
    autotuned,
    check_launchable,
    check_int8_quant_params,
    check_tensor,
    config,
    direct,
    eager_call,
    fused_bias,
    quantize_fp8,
    quantize_int8,
    slice_bound,
    slice_quantizer,
    split_args,
    store_output,
    tile_ids,
)
from .int8_linear import weight_colsum


@triton.jit
def k_range(total, SPLIT_K: tl.constexpr):
    """``[lo, hi)``: this program's contiguous share of ``total`` K-loop units (partition ``program_id(1)`` of
    ``SPLIT_K``; all of them when ``SPLIT_K == 1``)."""
    lo = 0
    hi = total
    if SPLIT_K > 1:
        pid = tl.program_id(1)
        lo = total * pid // SPLIT_K
        hi = total * (pid + 1) // SPLIT_K
    return lo, hi


@triton.jit
def first_zp(zp, SPLIT_K: tl.constexpr):
    """The zero point whose ``zp * colsum`` term this program removes: the whole term in partition 0, none elsewhere."""
    if SPLIT_K > 1:
        zp = tl.where(tl.program_id(1) == 0, zp, 0)
    return zp


@triton.jit
def partition_out(out_ptr, M, N, SPLIT_K: tl.constexpr):
    """Where this program stores: the output, or (``SPLIT_K`` > 1) its partition's fp32 ``(M, N)`` workspace slab."""
    if SPLIT_K > 1:
        out_ptr += tl.program_id(1) * M * N
    return out_ptr


@triton.jit
def conv2d_kernel(
    x_ptr, w_ptr, ws_ptr, colsum_ptr, bias_ptr, as_ptr, zp_ptr, smooth_ptr, out_ptr,
    B, H, W, C, OH, OW, N, KW, TAPS,
    sxb, sxc, sxh, sxw, stride_wn, stride_om, stride_on,
    SH, SW, PH, PW, DH, DW, B1, B2, B3,
    A_FP8: tl.constexpr, X_FP8: tl.constexpr, W_COLUMNS: tl.constexpr, QMIN: tl.constexpr, QMAX: tl.constexpr, ASYM: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SMOOTH: tl.constexpr, ACT: tl.constexpr, EVEN_C: tl.constexpr, NS: tl.constexpr,
    SPLIT_K: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    M = B * OH * OW
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm_l = rm % M
    rn_l = tl.max_contiguous(tl.multiple_of(rn % N, BLOCK_N), BLOCK_N)
    ow = rm_l % OW
    oh = (rm_l // OW) % OH
    b = rm_l // (OW * OH)
    ih0 = oh * SH - PH
    iw0 = ow * SW - PW
    x_rows = x_ptr + b.to(tl.int64) * sxb
    rc = tl.arange(0, BLOCK_K)
    if NS > 1:  # split op: input channels [B_s, B_s+1) have their own quantizer, weight scales (N, NS), colsums (N, NS)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for s in tl.static_range(NS):
            lo = slice_bound(s, NS, C, B1, B2, B3)
            hi = slice_bound(s + 1, NS, C, B1, B2, B3)
            s_scale, s_inv, s_zp, s_zp_f = slice_quantizer(as_ptr, zp_ptr, s, ASYM)
            c = s_scale * tl.load(ws_ptr + rn_l * NS + s)
            if A_FP8:  # one fp32 accumulator, in units of this slice's scales (as fp8_linear_kernel)
                if s > 0:
                    acc = acc * tl.math.div_rn(c_prev, c)[None, :]  # noqa: F821 (set by the previous, unrolled, slice)
            else:  # exact int32 partial product per slice (split configs keep both accumulators in registers)
                part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
            cb0 = lo // BLOCK_K
            nb = tl.cdiv(hi, BLOCK_K) - cb0  # channel blocks overlapping the slice (straddling ones masked to it)
            t_lo, t_hi = k_range(TAPS, SPLIT_K)  # this partition's taps (every slice's channel blocks in each)
            for ks in range(0, (t_hi - t_lo) * nb):
                tap = t_lo + ks // nb
                cc = (cb0 + ks % nb) * BLOCK_K + rc
                c_ok = (cc >= lo) & (cc < hi)
                ih = ih0 + (tap // KW) * DH
                iw = iw0 + (tap % KW) * DW
                inside = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                a_ptrs = x_rows[:, None] + (ih * sxh + iw * sxw)[:, None] + cc[None, :] * sxc
                if W_COLUMNS:  # column order: the slice's K range starts at lo * TAPS, tap-major within it
                    w_ptrs = w_ptr + rn_l[None, :] * stride_wn + (lo * TAPS + tap * (hi - lo) + (cc - lo))[:, None]
                else:
                    w_ptrs = w_ptr + rn_l[None, :] * stride_wn + (tap * C + cc)[:, None]
                if EVEN_C:  # every bound on a channel-block edge (the wrapper's EVEN_C covers the split points)
                    a = tl.load(a_ptrs, mask=inside[:, None], other=0.0)
                    wt = tl.load(w_ptrs)
                else:
                    a = tl.load(a_ptrs, mask=inside[:, None] & c_ok[None, :], other=0.0)
                    wt = tl.load(w_ptrs, mask=c_ok[:, None], other=0.0)
                if X_FP8:  # the slice's fp8 codes, quantized by the producer with this slice's scale
                    acc = tl.dot(a, wt, acc)
                else:
                    a = a.to(tl.float32)
                    if HAS_SMOOTH:
                        a = a * tl.load(smooth_ptr + cc, mask=c_ok, other=0.0)[None, :]
                    if A_FP8:
                        acc = tl.dot(quantize_fp8(a * s_inv, INTERPRET), wt, acc)
                    else:
                        part = tl.dot(quantize_int8(a * s_inv, s_zp_f, QMIN, QMAX, INTERPRET), wt, part, out_dtype=tl.int32)
            if A_FP8:
                c_prev = c
            else:
                if ASYM:
                    part = part - first_zp(s_zp, SPLIT_K) * tl.load(colsum_ptr + rn_l * NS + s)[None, :]
                acc += part.to(tl.float32) * c[None, :]
        if A_FP8:
            acc = acc * c_prev[None, :]
        store_output(acc, rm, rn, M, N, partition_out(out_ptr, M, N, SPLIT_K), stride_om, stride_on, ws_ptr, bias_ptr, 1.0,
                     HAS_BIAS, False, ACT)
    else:
        a_scale, inv_scale, zp, zp_f = slice_quantizer(as_ptr, zp_ptr, 0, ASYM)  # an unsplit op: one slice
        if A_FP8:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        c_blocks = tl.cdiv(C, BLOCK_K)
        ks_lo, ks_hi = k_range(TAPS * c_blocks, SPLIT_K)
        for ks in range(ks_lo, ks_hi):
            tap = ks // c_blocks
            cc = (ks % c_blocks) * BLOCK_K + rc
            ih = ih0 + (tap // KW) * DH
            iw = iw0 + (tap % KW) * DW
            inside = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            a_ptrs = x_rows[:, None] + (ih * sxh + iw * sxw)[:, None] + cc[None, :] * sxc
            w_ptrs = w_ptr + rn_l[None, :] * stride_wn + (tap * C + cc)[:, None]
            if EVEN_C:
                a = tl.load(a_ptrs, mask=inside[:, None], other=0.0)
                wt = tl.load(w_ptrs)
            else:
                c_ok = cc < C
                a = tl.load(a_ptrs, mask=inside[:, None] & c_ok[None, :], other=0.0)
                wt = tl.load(w_ptrs, mask=c_ok[:, None], other=0.0)
            if X_FP8:  # fp8 codes quantized by the producer: straight into the dot
                acc = tl.dot(a, wt, acc)
            else:
                a = a.to(tl.float32)
                if HAS_SMOOTH:
                    a = a * tl.load(smooth_ptr + cc, mask=cc < C, other=0.0)[None, :]
                if A_FP8:
                    acc = tl.dot(quantize_fp8(a * inv_scale, INTERPRET), wt, acc)
                else:
                    acc = tl.dot(quantize_int8(a * inv_scale, zp_f, QMIN, QMAX, INTERPRET), wt, acc, out_dtype=tl.int32)
        if ASYM:
            acc = acc - first_zp(zp, SPLIT_K) * tl.load(colsum_ptr + rn, mask=rn < N, other=0)[None, :]
        store_output(acc.to(tl.float32), rm, rn, M, N, partition_out(out_ptr, M, N, SPLIT_K), stride_om, stride_on, ws_ptr, bias_ptr,
                     a_scale, HAS_BIAS, True, ACT)


@triton.jit
def conv_splitk_reduce_kernel(
    part_ptr, bias_ptr, out_ptr, M, N, stride_om, stride_on,
    SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """``out[m, n] = act(sum_s part[s, m, n] + bias[n])``: the split-K partitions (fp32, contiguous ``(SPLIT_K, M, N)``,
    already in final units) summed in order, then the conv kernel's own epilogue (scale 1)."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rm[:, None] < M) & (rn < N)[None, :]
    ptrs = part_ptr + rm[:, None] * N + rn[None, :]
    y = tl.load(ptrs, mask=mask, other=0.0)
    for s in tl.static_range(1, SPLIT_K):
        y += tl.load(ptrs + s * M * N, mask=mask, other=0.0)
    store_output(y, rm, rn, M, N, out_ptr, stride_om, stride_on, bias_ptr, bias_ptr, 1.0, HAS_BIAS, False, ACT)


LARGE_M_CONFIGS = [
    config(128, 128, 64, 4, 4),
    config(128, 128, 128, 3, 8),
    config(128, 256, 64, 3, 8),
    config(64, 128, 64, 4, 4),
    config(128, 64, 64, 4, 4),
]
SMALL_M_CONFIGS = [
    config(32, 64, 64, 4, 4),
    config(64, 64, 64, 4, 4),
]
# split ops (NS > 1) at M > SMALL_M: per-slice scales in the K loop (int8: an fp32 accumulator beside each slice's
# exact int32 one) spill on sm_90 with most tiles above (aot_check); these compile without spills.
SPLIT_FP8_CONFIGS = [
    config(128, 256, 64, 3, 8),
    config(64, 256, 64, 3, 8),
    config(64, 256, 128, 3, 8),
    config(64, 128, 64, 4, 4),
]
SPLIT_INT8_CONFIGS = [
    config(64, 256, 64, 3, 8),
    config(64, 128, 64, 4, 4),
    config(64, 64, 64, 4, 4),
]
SMALL_M = 256
_KEY = ["B", "H", "W", "C", "N", "TAPS", "A_FP8", "X_FP8", "ASYM", "HAS_SMOOTH", "ACT", "NS", "SPLIT_K"]
_C_MULTIPLE = max(c.kwargs["BLOCK_K"] for c in LARGE_M_CONFIGS + SMALL_M_CONFIGS + SPLIT_FP8_CONFIGS + SPLIT_INT8_CONFIGS)
_large = autotuned(conv2d_kernel, LARGE_M_CONFIGS, _KEY)
_small = autotuned(conv2d_kernel, SMALL_M_CONFIGS, _KEY)
_large_split_fp8 = autotuned(conv2d_kernel, SPLIT_FP8_CONFIGS, _KEY)
_large_split_int8 = autotuned(conv2d_kernel, SPLIT_INT8_CONFIGS, _KEY)
REDUCE_BLOCK = (32, 128)  # (BLOCK_M, BLOCK_N) of the split-K reduce (4 warps: 32 contiguous fp32 per thread)


def conv_out_size(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


# Split-K: a fixed rule (not autotuned, so the workspace size is known before the autotuner picks a tile).
SPLITK_TILE = 128  # tiles counted as 128 x 128 (the configs' usual output tile)
SPLITK_MAX = 8
SPLITK_MIN_STEPS = 4  # K-loop iterations (of BLOCK_K = _C_MULTIPLE channels) each partition keeps at least
SPLITK_ENV = "QDIFF_CONV_SPLITK"  # "1": split by the rule below (read at every call); off by default, see conv_split_k
INTERPRET_SMS = 132  # the interpreter's stand-in SM count (an H100 / H200), so small test shapes take the split path


def split_k_rule(M: int, N: int, k_steps: int, sms: int, max_split: int = SPLITK_MAX) -> int:
    """Number of K partitions for an ``M x N`` output whose K loop has ``k_steps`` iterations, on ``sms`` SMs.

    ``min(SPLITK_MAX, SMs // tiles)`` with ``tiles = cdiv(M, 128) * cdiv(N, 128)``, limited so that each partition
    walks at least :data:`SPLITK_MIN_STEPS` iterations, to ``max_split`` and to a workspace of fewer than 2**31
    elements; 1 (no split) when the grid already fills the GPU. The answer is found by comparisons only, so a symbolic
    ``M`` (a dynamic batch under ``torch.compile``) adds guards on these bounds and the result stays a Python int."""
    tiles = triton.cdiv(M, SPLITK_TILE) * triton.cdiv(N, SPLITK_TILE)
    for split in range(min(SPLITK_MAX, max_split), 1, -1):
        if split * tiles <= sms and split * SPLITK_MIN_STEPS <= k_steps and split * M * N < 2**31:
            return split
    return 1


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    """SMs of ``device`` (queried once per device); :data:`INTERPRET_SMS` off CUDA (the interpreter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return INTERPRET_SMS


def conv_split_k(M: int, N: int, C: int, taps: int, ns: int, device: torch.device) -> int:
    """The split-K factor of a conv launch: :func:`split_k_rule` with K steps of the largest ``BLOCK_K``; split ops
    (``ns`` > 1) partition taps, so at most ``taps`` partitions. Off (1) unless ``QDIFF_CONV_SPLITK=1``: measured on an
    H200 (2026-12-01, SD 1.5 16x16 / 8x8 conv shapes, docs/kernels.md) the split launches were slower than one kernel
    at every fp8 shape (1.0-1.6x) and at 3 of 4 int8 shapes; the reduce pass and the workspace traffic cost more than
    the extra programs gain with these tiles."""
    if os.environ.get(SPLITK_ENV, "0") != "1":
        return 1
    return split_k_rule(M, N, taps * triton.cdiv(C, _C_MULTIPLE), _sm_count(device), taps if ns > 1 else SPLITK_MAX)


def _conv2d_w8a8(x, w, w_scale, colsum, bias, a_scale, a_zp, act_smooth, kh, kw, stride, padding, dilation, act, splits=None,
                 wrap=wrap_triton):
    check_tensor(x, "x", FLOAT_DTYPES, dim=4)
    check_tensor(w, "weight", (torch.float8_e4m3fn, torch.int8), dim=2)
    return _launch(x, w, w_scale, colsum, bias, a_scale, a_zp, act_smooth, kh, kw, stride, padding, dilation, act, splits,
                   x.dtype, False, wrap)


XQ_NAME = "xq (the producer-quantized activation, (B, H, W, C))"


def _conv2d_fp8_prequant(xq, w, w_scale, bias, a_scale, kh, kw, stride, padding, dilation, act, out_dtype, splits=None,
                         wrap=wrap_triton):
    check_tensor(xq, XQ_NAME, (torch.float8_e4m3fn,), dim=4)
    check_tensor(w, "weight", (torch.float8_e4m3fn,), dim=2)
    if out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be one of {[str(d) for d in FLOAT_DTYPES]}, got {out_dtype}")
    # the kernel indexes an NCHW view (any strides): a view of the NHWC tensor
    return _launch(xq.permute(0, 3, 1, 2), w, w_scale, None, bias, a_scale, None, None, kh, kw, stride, padding, dilation, act,
                   splits, out_dtype, True, wrap)


def _launch(x, w, w_scale, colsum, bias, a_scale, a_zp, act_smooth, kh, kw, stride, padding, dilation, act, splits,
            out_dtype, x_fp8, wrap):
    """Check the shapes and quantizer arguments shared by both ops and launch :func:`conv2d_kernel` (and the split-K
    reduce): ``x`` an NCHW view (any strides), fp8 codes when ``x_fp8`` (then ``w`` is in im2col column order)."""
    a_fp8 = w.dtype == torch.float8_e4m3fn
    B, C, H, W = x.shape
    N = w.shape[0]
    if w.shape[1] != kh * kw * C:
        raise ValueError(f"weight has {w.shape[1]} columns, expected KH*KW*C = {kh}*{kw}*{C}")
    ns, b1, b2, b3 = split_args(splits, C, "input channels")
    asym = a_zp is not None
    if asym and a_fp8:
        raise ValueError("fp8 activations have no zero point")
    check_int8_quant_params(w_scale, a_scale, a_zp, N, ns if splits is not None else None)
    if bias is not None:
        check_tensor(bias, "bias", (torch.float32,), shape=(N,))
    if asym:
        if colsum is None:
            raise ValueError("an asymmetric activation quantizer needs the weight's column sums")
        check_tensor(colsum, "colsum", (torch.int32,), shape=(N,) if splits is None else (N, ns))
        if not colsum.is_contiguous():
            raise ValueError("colsum must be contiguous")
    if act_smooth is not None:
        check_tensor(act_smooth, "act_smooth", (torch.float32,), shape=(C,))
    if not w.is_contiguous():
        raise ValueError("weight must be contiguous")
    if len(stride) != 2 or len(padding) != 2 or len(dilation) != 2:
        raise ValueError(f"2-D convolution needs two strides, paddings and dilations, got {stride}, {padding}, {dilation}")
    check_launchable(x, w, w_scale, a_scale)
    OH = conv_out_size(H, kh, stride[0], padding[0], dilation[0])
    OW = conv_out_size(W, kw, stride[1], padding[1], dilation[1])
    if OH <= 0 or OW <= 0:
        raise ValueError(f"convolution output would be empty ({OH}x{OW}) for input {H}x{W}")
    M = B * OH * OW
    out = torch.empty((M, N), device=x.device, dtype=out_dtype)
    if M == 0:
        return out
    kernel = _small if M <= SMALL_M else _large if ns == 1 else _large_split_fp8 if a_fp8 else _large_split_int8
    split = conv_split_k(M, N, C, kh * kw, ns, x.device)
    # split-K: partitions in final units to an fp32 workspace; bias and activation in the reduce kernel
    dst = out if split == 1 else torch.empty((split, M, N), device=x.device, dtype=torch.float32)

    def grid(meta):
        tiles = triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"])
        return (tiles,) if split == 1 else (tiles, split)

    wrap(kernel)[grid](
        x, w, w_scale, colsum if asym else w_scale, bias if bias is not None else w_scale, a_scale,
        a_zp if asym else a_scale, act_smooth if act_smooth is not None else w_scale, dst,
        B, H, W, C, OH, OW, N, kw, kh * kw,
        x.stride(0), x.stride(1), x.stride(2), x.stride(3), w.stride(0), dst.stride(-2), dst.stride(-1),
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1], b1, b2, b3,
        A_FP8=a_fp8, X_FP8=x_fp8, W_COLUMNS=x_fp8, QMIN=-128 if asym else -127, QMAX=127, ASYM=asym,
        HAS_BIAS=bias is not None and split == 1, HAS_SMOOTH=act_smooth is not None, ACT=act if split == 1 else 0,
        EVEN_C=all(p % _C_MULTIPLE == 0 for p in (C, b1, b2, b3)), NS=ns, SPLIT_K=split, INTERPRET=INTERPRET,
    )
    if split > 1:
        bm, bn = REDUCE_BLOCK
        wrap(conv_splitk_reduce_kernel)[(triton.cdiv(M, bm), triton.cdiv(N, bn))](
            dst, bias if bias is not None else dst, out, M, N, out.stride(0), out.stride(1),
            SPLIT_K=split, HAS_BIAS=bias is not None, ACT=act, BLOCK_M=bm, BLOCK_N=bn,
        )
    return out


@triton_op("qdiff::conv2d_w8a8", mutates_args=())
def conv2d_w8a8_op(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, colsum: torch.Tensor | None,
                   bias: torch.Tensor | None, a_scale: torch.Tensor, a_zp: torch.Tensor | None,
                   act_smooth: torch.Tensor | None, kh: int, kw: int, stride: list[int], padding: list[int],
                   dilation: list[int], act: int, splits: list[int] | None = None) -> torch.Tensor:
    """``x`` (B, C, H, W), any strides (channels-last is the fast one); ``w`` (N, KH*KW*C) tap-major,
    fp8 (fp8 activations) or int8 (int8 activations, asymmetric when ``a_zp`` is given).
    ``splits``: a split op's input-channel split points (``a_scale`` / ``a_zp`` per slice, ``w_scale`` / ``colsum``
    (N, slices)). Returns ``(B*OH*OW, N)``."""
    return _conv2d_w8a8(x, w, w_scale, colsum, bias, a_scale, a_zp, act_smooth, kh, kw, stride, padding, dilation, act, splits)


@conv2d_w8a8_op.register_fake
def _(x, w, w_scale, colsum, bias, a_scale, a_zp, act_smooth, kh, kw, stride, padding, dilation, act, splits=None):
    B, _, H, W = x.shape
    OH = conv_out_size(H, kh, stride[0], padding[0], dilation[0])
    OW = conv_out_size(W, kw, stride[1], padding[1], dilation[1])
    return x.new_empty((B * OH * OW, w.shape[0]))


@triton_op("qdiff::conv2d_fp8_prequant", mutates_args=())
def conv2d_fp8_prequant_op(xq: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                           a_scale: torch.Tensor, kh: int, kw: int, stride: list[int], padding: list[int], dilation: list[int],
                           act: int, out_dtype: torch.dtype, splits: list[int] | None = None) -> torch.Tensor:
    """``xq`` (B, H, W, C) float8_e4m3fn, already quantized by its producer with ``a_scale`` (split ops: slice ``s`` of
    the channels with ``a_scale[s]``), any strides (contiguous channels are the fast ones); ``w`` (N, KH*KW*C) fp8 in
    im2col column order (:func:`qcompile.lowering.conv_im2col.columns_weight`: tap-major, slice by slice for split ops).
    Returns ``(B*OH*OW, N)`` in ``out_dtype``."""
    return _conv2d_fp8_prequant(xq, w, w_scale, bias, a_scale, kh, kw, stride, padding, dilation, act, out_dtype, splits)


@conv2d_fp8_prequant_op.register_fake
def _(xq, w, w_scale, bias, a_scale, kh, kw, stride, padding, dilation, act, out_dtype, splits=None):
    B, H, W, _ = xq.shape
    OH = conv_out_size(H, kh, stride[0], padding[0], dilation[0])
    OW = conv_out_size(W, kw, stride[1], padding[1], dilation[1])
    return xq.new_empty((B * OH * OW, w.shape[0]), dtype=out_dtype)


def tap_major(wdata: torch.Tensor, weight_shape: tuple[int, ...]) -> torch.Tensor:
    """The plan's conv weight ``(N, C*KH*KW)`` reordered to ``(N, KH*KW*C)`` (contiguous)."""
    n, c, kh, kw = weight_shape
    return wdata.reshape(n, c, kh, kw).permute(0, 2, 3, 1).reshape(n, kh * kw * c).contiguous()


def conv2d_w8a8_args(x: torch.Tensor, wdata: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None, a_scale: torch.Tensor,
                     a_zp: torch.Tensor | None, *, weight_shape: tuple[int, ...], stride: tuple[int, int], padding: tuple[int, int],
                     dilation: tuple[int, int], act_smooth: torch.Tensor | None = None, act: str = "none",
                     bias_corr: torch.Tensor | None = None, colsum: torch.Tensor | None = None,
                     splits: tuple[int, ...] | None = None) -> tuple:
    """The ``conv2d_w8a8`` op's arguments for :func:`conv2d_w8a8`'s inputs (weight reordered tap-major, scales and
    column sums in the kernel's layout); timing the op on them measures the kernel launches alone."""
    n, c, kh, kw = weight_shape
    xc = x.contiguous(memory_format=torch.channels_last)
    w = tap_major(wdata, weight_shape)
    split = None if splits is None else [int(p) for p in splits]
    if a_zp is not None:
        a_zp = a_zp.to(torch.int32) if split is None else a_zp.to(torch.int32).reshape(-1)
        if colsum is None:  # (the Triton lowering passes it precomputed); the plan's layout is channel-major
            colsum = weight_colsum(wdata, None if split is None else [p * kh * kw for p in split])
    else:
        colsum = None
    s = None if act_smooth is None else act_smooth.float().reshape(-1)
    if split is None:
        args = (xc, w, w_scale.reshape(-1), colsum, fused_bias(bias, bias_corr, n), a_scale.float(), a_zp, s, kh, kw, list(stride),
                list(padding), list(dilation), activation_code(act))
    else:
        args = (xc, w, w_scale.reshape(n, -1), colsum, fused_bias(bias, bias_corr, n), a_scale.float().reshape(-1), a_zp, s, kh, kw,
                list(stride), list(padding), list(dilation), activation_code(act), split)
    return args


def conv2d_w8a8(x: torch.Tensor, wdata: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None, a_scale: torch.Tensor,
                a_zp: torch.Tensor | None, *, weight_shape: tuple[int, ...], stride: tuple[int, int], padding: tuple[int, int],
                dilation: tuple[int, int], act_smooth: torch.Tensor | None = None, act: str = "none",
                bias_corr: torch.Tensor | None = None, colsum: torch.Tensor | None = None,
                splits: tuple[int, ...] | None = None) -> torch.Tensor:
    """W8A8 conv2d (fp8 weight: fp8 activations; int8 weight: int8, asymmetric if ``a_zp``) -> NCHW (channels-last strides).

    ``splits`` (split op: input-channel split points): per-slice ``a_scale`` / ``a_zp``, ``w_scale`` (N, slices);
    ``colsum`` then holds one column sum per slice (N, slices)."""
    n, kh, kw = weight_shape[0], weight_shape[2], weight_shape[3]
    B, _, H, W = x.shape
    args = conv2d_w8a8_args(x, wdata, w_scale, bias, a_scale, a_zp, weight_shape=weight_shape, stride=stride, padding=padding,
                            dilation=dilation, act_smooth=act_smooth, act=act, bias_corr=bias_corr, colsum=colsum, splits=splits)
    out = _conv2d_w8a8(*args, wrap=direct) if eager_call(x) else torch.ops.qdiff.conv2d_w8a8(*args)
    OH = conv_out_size(H, kh, stride[0], padding[0], dilation[0])
    OW = conv_out_size(W, kw, stride[1], padding[1], dilation[1])
    return out.view(B, OH, OW, n).permute(0, 3, 1, 2)


def conv2d_fp8_prequant(xq: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None, a_scale: torch.Tensor,
                        out_dtype: torch.dtype, *, kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
                        dilation: tuple[int, int], act: str = "none", bias_corr: torch.Tensor | None = None,
                        splits: tuple[int, ...] | None = None) -> torch.Tensor:
    """W8A8-FP8 conv2d of ``xq`` (B, H, W, C), float8_e4m3fn codes quantized by the producer with ``a_scale``, as an
    implicit GEMM that feeds the fp8 tiles to the dot (no column matrix, no prologue quantization) -> (B, OH, OW, N).

    ``w``: (N, KH*KW*C) fp8 in im2col column order; ``w_scale`` per output channel, or (N, slices) with one
    ``a_scale`` per slice for a split op (``splits``: input-channel split points). Eager calls launch directly; traced
    ones call ``torch.ops.qdiff.conv2d_fp8_prequant``."""
    kh, kw = (int(k) for k in kernel)
    check_tensor(xq, XQ_NAME, (torch.float8_e4m3fn,), dim=4)
    B, H, W, _ = xq.shape
    n = w.shape[0]
    split = None if splits is None else [int(p) for p in splits]
    args = (xq, w, w_scale.reshape(-1) if split is None else w_scale.reshape(n, -1), fused_bias(bias, bias_corr, n),
            a_scale.float() if split is None else a_scale.float().reshape(-1), kh, kw, [int(e) for e in stride],
            [int(e) for e in padding], [int(e) for e in dilation], activation_code(act), out_dtype)
    if split is None:
        out = _conv2d_fp8_prequant(*args, wrap=direct) if eager_call(xq) else torch.ops.qdiff.conv2d_fp8_prequant(*args)
    else:
        out = _conv2d_fp8_prequant(*args, split, wrap=direct) if eager_call(xq) else torch.ops.qdiff.conv2d_fp8_prequant(*args, split)
    OH = conv_out_size(H, kh, stride[0], padding[0], dilation[0])
    OW = conv_out_size(W, kw, stride[1], padding[1], dilation[1])
    return out.view(B, OH, OW, n)

"""Low-bit weight GEMMs: packed INT4 (and INT8) weights dequantized inside the kernel.

Storage (see :mod:`qcompile.lowering.weights`): INT4 weights are ``uint8 (N, Kp/2)``, element
``2i`` in the low nibble and ``2i+1`` in the high nibble of byte ``i``; ``Kp`` is K padded with
zeros to whole groups (or to even for per-channel); scales are ``fp32 (N, Kp/group)`` (one column
for per-channel). A tile of ``BLOCK_K/2`` bytes per row is loaded, split into nibbles,
and interleaved back into K order: sign-extended to int8 for ``w4a8``, turned into fp32 by bit operations for the
float dequantization of ``w4a16`` (:func:`dequant_int4_tile`).

- ``w4a16`` (``weight_only_linear``): float activations; each weight tile becomes
  ``(q * scale[n, group]).to(x.dtype)`` (the reference's dequantized weight, bit for bit) and
  ``tl.dot`` runs in the activation's dtype with fp32 accumulation. Also serves INT8 weight-only.
  Few rows (M <= ``GEMV_MAX_M``) take ``weight_only_gemv_kernel`` instead: the CUDA cores, per-group sums of codes
  times activations scaled once; M >= ``DEQUANT_MM_MIN_M`` rows dequantize the weight once and call cuBLAS.
- ``w4a8``: the activation is quantized in the prologue (int8 with zero point, or fp8 e4m3) and the
  int4 tile is upcast to int8 / fp8 (exact); each K tile's dot (int32 or fp32) is scaled by its
  group's scale and accumulated in fp32. The zero point's term uses the tile's weight column sums.

Group-wise scales need ``group_size % BLOCK_K == 0`` (one scale per tile and column); autotune
config lists are filtered per group size.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ...switches import env_switch

from ._common import (
    FLOAT_DTYPES,
    INTERPRET,
    activation_code,
    apply_activation,
    autotuned,
    check_launchable,
    check_scalar,
    check_tensor,
    direct,
    eager_call,
    epilogue,
    INTERPRET_CONFIG,
    TORCH_ACTIVATIONS,
    config,
    fused_bias,
    quantize_fp8,
    quantize_int8,
    row_major,
    store_output,
    tile_ids,
)


@triton.jit
def packed_int4_tile(w_ptr, rn_l, kt, K_STORED, stride_wn, EVEN_K: tl.constexpr, BLOCK_K: tl.constexpr):
    """The (BLOCK_N, BLOCK_K / 2) packed bytes of int4 weight tile ``kt`` (uint8; bytes past the stored row load as 0)."""
    rb = kt * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
    ptrs = w_ptr + rn_l[:, None] * stride_wn + rb[None, :]
    if EVEN_K:
        return tl.load(ptrs)
    else:
        return tl.load(ptrs, mask=(rb < K_STORED // 2)[None, :], other=0)


@triton.jit
def load_weight_tile(w_ptr, rn_l, kt, K_STORED, stride_wn, W_INT4: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_K: tl.constexpr):
    """The (BLOCK_K, BLOCK_N) int8 weight tile ``kt`` (K_STORED: stored row length in elements)."""
    if W_INT4:
        p = packed_int4_tile(w_ptr, rn_l, kt, K_STORED, stride_wn, EVEN_K, BLOCK_K).to(tl.int8, bitcast=True)
        lo = (p << 4) >> 4  # arithmetic shifts sign-extend the nibbles
        hi = p >> 4
        return tl.trans(tl.interleave(lo, hi))
    else:
        rk = kt * BLOCK_K + tl.arange(0, BLOCK_K)
        ptrs = w_ptr + rn_l[None, :] * stride_wn + rk[:, None]
        if EVEN_K:
            return tl.load(ptrs)
        else:
            return tl.load(ptrs, mask=(rk < K_STORED)[:, None], other=0)


@triton.jit
def dequant_tile(q, ws_ptr, rn_l, stride_sn, k0, dtype, GROUP: tl.constexpr):
    """``q`` (K, BLOCK_N) int8 times its group's scale (groups of ``GROUP`` starting at ``k0``; 0: per-channel scales
    come in the epilogue), in ``dtype``: the reference's dequantized weight, bit for bit."""
    if GROUP > 0:
        s = tl.load(ws_ptr + rn_l * stride_sn + k0 // GROUP)
        return (q.to(tl.float32) * s[None, :]).to(dtype)
    return q.to(tl.float32).to(dtype)  # via fp32: the interpreter's int -> bf16 cast is wrong


@triton.jit
def _int4_as_float(nibble):
    """Nibbles (int32 in 0..15, two's-complement int4 codes) as fp32 values -8..7 without an int-to-float conversion:
    ``nibble ^ 8`` is the code plus 8 (offset binary); placed in the low mantissa bits of 2**23 it reads as
    ``2**23 + q + 8``, from which one exact subtraction leaves q."""
    return (nibble ^ 0x4B000008).to(tl.float32, bitcast=True) - 8388616.0


@triton.jit
def dequant_int4_tile(w_ptr, ws_ptr, rn_l, kt, K_STORED, stride_wn, stride_sn, dtype, GROUP: tl.constexpr,
                      EVEN_K: tl.constexpr, BLOCK_K: tl.constexpr):
    """The int4 weight tile ``kt`` dequantized to ``dtype``, N-major: (BLOCK_N, BLOCK_K), ``(q * scale[n, group]).to(dtype)``,
    the same values as :func:`dequant_tile` of :func:`load_weight_tile` (bit for bit), but the nibbles become fp32 by
    integer bit operations and one subtraction (:func:`_int4_as_float`) instead of an int8-to-fp32 conversion per
    element (a conversion-pipe instruction, a quarter of the FP32 rate on sm_90). The scale multiplies the
    (BLOCK_N, BLOCK_K / 2) nibble halves before they are interleaved into K order."""
    p = packed_int4_tile(w_ptr, rn_l, kt, K_STORED, stride_wn, EVEN_K, BLOCK_K).to(tl.int32)  # zero-extended bytes
    lo = _int4_as_float(p & 0xF)
    hi = _int4_as_float(p >> 4)
    if GROUP > 0:
        s = tl.load(ws_ptr + rn_l * stride_sn + (kt * BLOCK_K) // GROUP)[:, None]
        lo = lo * s
        hi = hi * s
    return tl.interleave(lo.to(dtype), hi.to(dtype))


@triton.jit
def weight_tile(w_ptr, ws_ptr, rn_l, kt, K_STORED, stride_wn, stride_sn, dtype, W_INT4: tl.constexpr, GROUP: tl.constexpr,
                EVEN_K: tl.constexpr, BLOCK_K: tl.constexpr, N_MAJOR: tl.constexpr):
    """The weight-only kernels' dequantized weight tile ``kt`` in ``dtype`` (int4 or int8 storage): (BLOCK_K, BLOCK_N),
    or (BLOCK_N, BLOCK_K) with ``N_MAJOR``."""
    if W_INT4:
        w = dequant_int4_tile(w_ptr, ws_ptr, rn_l, kt, K_STORED, stride_wn, stride_sn, dtype, GROUP, EVEN_K, BLOCK_K)
        if not N_MAJOR:
            w = tl.trans(w)
    else:
        q = load_weight_tile(w_ptr, rn_l, kt, K_STORED, stride_wn, False, EVEN_K, BLOCK_K)
        w = dequant_tile(q, ws_ptr, rn_l, stride_sn, kt * BLOCK_K, dtype, GROUP)
        if N_MAJOR:
            w = tl.trans(w)
    return w


@triton.jit
def float_dot(a, b, acc, FP32_DOT: tl.constexpr, INTERPRET: tl.constexpr):
    """``acc + a @ b`` for float operands (IEEE fp32 for fp32 inputs)."""
    if FP32_DOT:
        return tl.dot(a, b, acc, input_precision="ieee")
    elif INTERPRET:  # the interpreter's bf16 dot is wrong; bf16 operands are exact in fp32
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _x_tile(x_ptrs, rk, K, kt, EVEN_K: tl.constexpr, BLOCK_K: tl.constexpr):
    """The activation's (BLOCK_M, BLOCK_K) tile ``kt`` (columns past K load as 0)."""
    if EVEN_K:
        return tl.load(x_ptrs)
    else:
        return tl.load(x_ptrs, mask=(rk < K - kt * BLOCK_K)[None, :], other=0.0)


@triton.jit
def weight_only_kernel(
    x_ptr, w_ptr, ws_ptr, bias_ptr, out_ptr,
    M, N, K, K_STORED,
    stride_xm, stride_xk, stride_wn, stride_sn, stride_om, stride_on,
    W_INT4: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
    EVEN_K: tl.constexpr, FP32_DOT: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, SWAP_AB: tl.constexpr,
):
    # SWAP_AB (a config choice): accumulate out^T = W x^T, the dequantized weight tile as the dot's first operand, which
    # Hopper's wgmma reads from registers (the second operand, here the activation tile, comes from shared memory), so
    # the dequantized tile is not stored to shared memory and read back each K step; same products, same fp32 sums.
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm_l = tl.max_contiguous(tl.multiple_of(rm % M, BLOCK_M), BLOCK_M)
    rn_l = tl.max_contiguous(tl.multiple_of(rn % N, BLOCK_N), BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rm_l[:, None] * stride_xm + rk[None, :] * stride_xk
    if SWAP_AB:  # (constexpr branches: one loop, either orientation)
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kt in range(0, tl.cdiv(K, BLOCK_K)):
        a = _x_tile(x_ptrs, rk, K, kt, EVEN_K, BLOCK_K)
        w = weight_tile(w_ptr, ws_ptr, rn_l, kt, K_STORED, stride_wn, stride_sn, a.dtype, W_INT4, GROUP, EVEN_K, BLOCK_K, SWAP_AB)
        if SWAP_AB:
            acc = float_dot(w, tl.trans(a), acc, FP32_DOT, INTERPRET)
        else:
            acc = float_dot(a, w, acc, FP32_DOT, INTERPRET)
        x_ptrs += BLOCK_K * stride_xk
    if SWAP_AB:
        acc = tl.trans(acc)
    # no activation scale (1.0); per-channel weight scales are applied in the epilogue
    store_output(acc, rm, rn, M, N, out_ptr, stride_om, stride_on, ws_ptr, bias_ptr, 1.0, HAS_BIAS, GROUP == 0, ACT)


@triton.jit
def _gemv_codes(w_ptr, rn_l, kt, W_ROW, stride_wn, W_INT4: tl.constexpr, NG: tl.constexpr, BLOCK_K: tl.constexpr):
    """Weight tile ``kt``'s integer codes, even and odd K columns as fp32 (BLOCK_N, NG, BLOCK_K / NG / 2) tensors (NG
    slices of one group each). Int4 bytes hold an even and an odd column, so the halves need no interleaving; each
    program's row of bytes is contiguous. Columns past the stored row (``W_ROW`` storage elements: bytes, which a
    multiple of 16 lets the loads be 16 bytes wide) load as 0."""
    SW: tl.constexpr = BLOCK_K // NG  # columns per slice
    rg = tl.arange(0, NG)
    if W_INT4:
        rb = kt * (BLOCK_K // 2) + rg[:, None] * (SW // 2) + tl.arange(0, SW // 2)[None, :]  # (NG, SW / 2) byte offsets
        p = tl.load(w_ptr + rn_l[:, None, None] * stride_wn + rb[None, :, :], mask=(rb < W_ROW)[None, :, :], other=0)
        p = p.to(tl.int32)
        return _int4_as_float(p & 0xF), _int4_as_float(p >> 4)
    else:
        rk = kt * BLOCK_K + rg[:, None] * SW + 2 * tl.arange(0, SW // 2)[None, :]  # (NG, SW / 2) even columns
        ptrs = w_ptr + rn_l[:, None, None] * stride_wn + rk[None, :, :]
        lo = tl.load(ptrs, mask=(rk < W_ROW)[None, :, :], other=0).to(tl.float32)
        return lo, tl.load(ptrs + 1, mask=(rk + 1 < W_ROW)[None, :, :], other=0).to(tl.float32)


@triton.jit
def weight_only_gemv_kernel(
    x_ptr, w_ptr, ws_ptr, bias_ptr, out_ptr,
    N, K, K_STORED, W_ROW,
    stride_xm, stride_wn, stride_sn, stride_om,
    W_INT4: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Row ``m`` (grid axis 1) of a few-row weight-only GEMM as a GEMV on the CUDA cores: BLOCK_N output columns per
    program. Each K tile spans BLOCK_K / GROUP groups: per row and group the integer codes times the activation are
    summed in fp32, then scaled by the group's scale (``sum(q * x) * s``: the reference's products ``(q * s) * x`` up to
    fp32 rounding, without the reference's rounding of ``q * s`` to the activation's dtype); per-channel scales come in
    the epilogue.

    A GEMV of a few MB is bound by memory latency: a program's loads for one K tile issue together, and the tiles are
    long (BLOCK_K 512-1024: a row of K = 1152 in two round trips). Every load is masked (a memory-bound kernel has ALU to
    spare), so any K works."""
    NG: tl.constexpr = BLOCK_K // (GROUP + (GROUP == 0) * BLOCK_K)  # slices of one scale per tile (1: per channel)
    SW: tl.constexpr = BLOCK_K // NG
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rn_l = tl.max_contiguous(tl.multiple_of(rn % N, BLOCK_N), BLOCK_N)
    m = tl.program_id(1)
    r2 = tl.arange(0, NG)[:, None] * SW + 2 * tl.arange(0, SW // 2)[None, :]  # (NG, SW / 2) even columns of a tile
    acc = tl.zeros((BLOCK_N, NG), dtype=tl.float32)
    for kt in range(0, tl.cdiv(K, BLOCK_K)):
        ke = kt * BLOCK_K + r2
        xe = tl.load(x_ptr + m * stride_xm + ke, mask=ke < K, other=0.0).to(tl.float32)
        xo = tl.load(x_ptr + m * stride_xm + ke + 1, mask=ke + 1 < K, other=0.0).to(tl.float32)
        lo, hi = _gemv_codes(w_ptr, rn_l, kt, W_ROW, stride_wn, W_INT4, NG, BLOCK_K)
        part = tl.sum(lo * xe[None, :, :] + hi * xo[None, :, :], axis=2)  # (BLOCK_N, NG)
        if GROUP > 0:  # slices past the stored row: any finite scale (their codes are 0)
            g = tl.minimum(kt * NG + tl.arange(0, NG), K_STORED // GROUP - 1)
            part = part * tl.load(ws_ptr + rn_l[:, None] * stride_sn + g[None, :])
        acc += part
    y = epilogue(tl.sum(acc, axis=1)[None, :], rn, N, ws_ptr, bias_ptr, 1.0, HAS_BIAS, GROUP == 0, ACT)
    tl.store(out_ptr + m * stride_om + rn[None, :], y.to(out_ptr.dtype.element_ty), mask=(rn < N)[None, :])


@triton.jit
def w4a8_kernel(
    x_ptr, w_ptr, ws_ptr, bias_ptr, as_ptr, zp_ptr, smooth_ptr, out_ptr,
    M, N, K, K_STORED,
    stride_xm, stride_xk, stride_wn, stride_sn, stride_om, stride_on,
    A_FP8: tl.constexpr, QMIN: tl.constexpr, QMAX: tl.constexpr, ASYM: tl.constexpr, GROUP: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SMOOTH: tl.constexpr, ACT: tl.constexpr, EVEN_K: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm_l = tl.max_contiguous(tl.multiple_of(rm % M, BLOCK_M), BLOCK_M)
    rn_l = tl.max_contiguous(tl.multiple_of(rn % N, BLOCK_N), BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rm_l[:, None] * stride_xm + rk[None, :] * stride_xk
    a_scale = tl.load(as_ptr)
    inv_scale = tl.math.div_rn(1.0, a_scale)  # IEEE (plain "/" is approximate on GPU)
    if ASYM:
        zp = tl.load(zp_ptr)
        zp_f = zp.to(tl.float32)
    else:
        zp = 0
        zp_f = 0.0
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kt in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(x_ptrs)
        else:
            a = tl.load(x_ptrs, mask=(rk < K - kt * BLOCK_K)[None, :], other=0.0)
        a = a.to(tl.float32)
        if HAS_SMOOTH:
            kk = kt * BLOCK_K + rk
            a = a * tl.load(smooth_ptr + kk, mask=kk < K, other=0.0)[None, :]
        q = load_weight_tile(w_ptr, rn_l, kt, K_STORED, stride_wn, True, EVEN_K, BLOCK_K)
        if A_FP8:
            part = tl.dot(quantize_fp8(a * inv_scale, INTERPRET), q.to(tl.float16).to(tl.float8e4nv))
        else:
            part = tl.dot(quantize_int8(a * inv_scale, zp_f, QMIN, QMAX, INTERPRET), q, out_dtype=tl.int32)
            if ASYM:
                part = part - zp * tl.sum(q.to(tl.int32), axis=0)[None, :]
            part = part.to(tl.float32)
        if GROUP > 0:
            s = tl.load(ws_ptr + rn_l * stride_sn + (kt * BLOCK_K) // GROUP)
            acc += part * s[None, :]
        else:
            acc += part
        x_ptrs += BLOCK_K * stride_xk
    store_output(acc, rm, rn, M, N, out_ptr, stride_om, stride_on, ws_ptr, bias_ptr, a_scale, HAS_BIAS, GROUP == 0, ACT)


@triton.jit
def weight_only_splitk_kernel(
    x_ptr, w_ptr, ws_ptr, part_ptr,
    M, N, K, K_STORED,
    stride_xm, stride_wn, stride_sn,
    W_INT4: tl.constexpr, GROUP: tl.constexpr, EVEN_K: tl.constexpr, FP32_DOT: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Split-K partial products: program (n, s, m) sums K tiles s, s + S, s + 2S, ... (S = the grid's second
    dimension) of the (BLOCK_M rows, BLOCK_N columns) output tile (n, m) into ``part[s]`` (fp32, (S, M, N)). GEMV-like
    M fits one row tile; the medium tier (``QDIFF_W4_SPLITK_MEDIUM=1``) tiles M too."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    split = tl.num_programs(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rn_l = tl.max_contiguous(tl.multiple_of(rn % N, BLOCK_N), BLOCK_N)
    rm = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kt in range(pid_k, tl.cdiv(K, BLOCK_K), split):
        kk = kt * BLOCK_K + rk
        a = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :], mask=(rm[:, None] < M) & (kk < K)[None, :], other=0.0)
        w = weight_tile(w_ptr, ws_ptr, rn_l, kt, K_STORED, stride_wn, stride_sn, a.dtype, W_INT4, GROUP, EVEN_K, BLOCK_K, False)
        acc = float_dot(a, w, acc, FP32_DOT, INTERPRET)
    ptrs = part_ptr + pid_k * M * N + rm[:, None] * N + rn[None, :]
    tl.store(ptrs, acc, mask=(rm[:, None] < M) & (rn < N)[None, :])


@triton.jit
def splitk_reduce_kernel(
    part_ptr, ws_ptr, bias_ptr, out_ptr, M, N, SPLIT, stride_om,
    PER_CHANNEL_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, BLOCK: tl.constexpr,
):
    """``out[m, n] = act(sum_s part[s, m, n] * w_scale[n] (per channel) + bias[n])`` over M*N elements."""
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = idx < M * N
    n = idx % N
    y = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, SPLIT):
        y += tl.load(part_ptr + s * M * N + idx, mask=ok, other=0.0)
    if PER_CHANNEL_SCALE:
        y = y * tl.load(ws_ptr + n, mask=ok, other=0.0)
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + n, mask=ok, other=0.0)
    y = apply_activation(y, ACT)
    tl.store(out_ptr + (idx // N) * stride_om + n, y.to(out_ptr.dtype.element_ty), mask=ok)


def wo_config(bm: int, bn: int, bk: int, stages: int, warps: int, swap_ab: bool = False, group_m: int = 8) -> triton.Config:
    """A config of :func:`weight_only_kernel` (``swap_ab``: its SWAP_AB variant)."""
    c = config(bm, bn, bk, stages, warps, group_m)
    c.kwargs["SWAP_AB"] = swap_ab
    return c


@triton.jit
def dequantize_kernel(
    w_ptr, ws_ptr, bias_ptr, out_ptr, bias_out_ptr, N, K, K_STORED, stride_wn, stride_sn, stride_on,
    W_INT4: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``out[n, k] = (q[n, k] * scale[n, group]).to(out dtype)`` for k < K: the stored weight dequantized once, the same
    values as the GEMM kernels' tiles (:func:`weight_tile`), for the dequantize-then-cuBLAS route (:func:`dequant_mm_rows`).
    ``HAS_BIAS``: the first K tile's programs also write the fp32 bias in the output dtype (for cuBLAS's bias epilogue;
    a separate cast would be one more launch per GEMM)."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rn_l = rn % N
    kt = tl.program_id(1)
    dtype = out_ptr.dtype.element_ty
    if GROUP > 0:
        w = weight_tile(w_ptr, ws_ptr, rn_l, kt, K_STORED, stride_wn, stride_sn, dtype, W_INT4, GROUP, EVEN_K, BLOCK_K, True)
    else:  # per-channel scales (the GEMMs apply them in their epilogue); the integer codes are exact in fp32
        q = weight_tile(w_ptr, ws_ptr, rn_l, kt, K_STORED, stride_wn, stride_sn, tl.float32, W_INT4, GROUP, EVEN_K, BLOCK_K, True)
        w = (q * tl.load(ws_ptr + rn_l * stride_sn)[:, None]).to(dtype)
    rk = kt * BLOCK_K + tl.arange(0, BLOCK_K)
    tl.store(out_ptr + rn[:, None] * stride_on + rk[None, :], w, mask=(rn < N)[:, None] & (rk < K)[None, :])
    if HAS_BIAS:
        if kt == 0:
            tl.store(bias_out_ptr + rn, tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(dtype), mask=rn < N)


WEIGHT_ONLY_LARGE = [  # 8 warps for 128x128+ tiles: 4 would spill the fp32 accumulator (sm_90 AOT check)
    wo_config(128, 128, 64, 4, 8),
    wo_config(128, 256, 64, 3, 8),
    wo_config(128, 128, 128, 3, 8),
    wo_config(64, 128, 64, 4, 4),
    wo_config(128, 64, 32, 5, 4),
]
WEIGHT_ONLY_SMALL = [  # small M is bound by weight bytes: narrow N tiles, many CTAs. H200 sweep winners at M = 1 / 16, int4
    wo_config(16, 64, 64, 4, 4),  # groups of 64 (docs/gemm_tune_h200.json), most frequent first; the last (BLOCK_K 128,
    wo_config(16, 32, 64, 4, 4),  # not swept) serves per-channel weights and groups of 128+
    wo_config(32, 64, 64, 4, 4),
    wo_config(16, 32, 32, 4, 4),
    wo_config(16, 64, 128, 4, 4),
]
WEIGHT_ONLY_MEDIUM = [  # 64 < M <= 1024 (DiT-XL/2 at 512px, batch 1: M = 1024 tokens): tiles small enough that N = 1152
    wo_config(32, 64, 64, 4, 4),  # still fills 132 SMs; the large tables' 128 x 128 tiles leave 72 CTAs there (2026-12-03:
    wo_config(64, 64, 64, 4, 4),  # W4A16 8.46 ms vs bf16 3.76 ms at batch 1, CUDA graphs; 7.46 ms with the first four)
    wo_config(64, 128, 64, 4, 4),
    wo_config(32, 128, 64, 4, 4),
    wo_config(128, 64, 64, 4, 4),  # the H200 sweep's winner at M = 256, N >= 3456 with the bit-operation dequantization
    wo_config(64, 64, 32, 5, 4),  # groups of 32 (BLOCK_K must divide the group)
    wo_config(64, 128, 64, 4, 4, swap_ab=True),  # the dequantized weight as wgmma's register operand (SWAP_AB)
    wo_config(128, 128, 64, 3, 8, swap_ab=True),
    wo_config(128, 64, 64, 4, 4, swap_ab=True),
]
W4A8_LARGE = [  # a per-tile partial product next to the accumulator: no 128x256 tiles (they spill)
    config(128, 128, 64, 4, 8),
    config(128, 128, 128, 3, 8),
    config(64, 128, 64, 4, 4),
    config(128, 64, 32, 4, 4),
]
W4A8_SMALL = [
    config(16, 64, 64, 4, 4),
    config(16, 128, 64, 4, 4),
    config(32, 64, 128, 4, 4),
    config(16, 64, 32, 4, 4),
]


def gemv_config(bn: int, bk: int, warps: int) -> triton.Config:
    """A config of :func:`weight_only_gemv_kernel`: BLOCK_N columns, K tiles of BLOCK_K."""
    return triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=1)


WEIGHT_ONLY_GEMV = [  # (BLOCK_N, BLOCK_K, warps): BLOCK_K / 2 contiguous bytes per row and tile; the H200 sweep's
    gemv_config(2, 512, 1),  # winners at M = 1 and 4 (docs/experiments/w4a16-b1/tune_gemv_v3_2026-12-03.json) first
    gemv_config(8, 256, 1),
    gemv_config(4, 1024, 4),
    gemv_config(8, 1024, 4),
    gemv_config(16, 512, 4),
    gemv_config(4, 1024, 2),
]
SMALL_M = 64
MEDIUM_M = 1024
# the interpreter's one config per kernel (small tiles: tests cover several tiles and every edge mask)
INTERPRET_CONFIGS = {"weight_only": wo_config(16, 32, 32, 1, 4, group_m=2), "w4a8": INTERPRET_CONFIG,
                     "gemv": gemv_config(16, 64, 4)}
# the autotune tables per kernel and M tier (:func:`m_tier`); W4A8 has no medium table of its own yet (not measured);
# the GEMV kernel serves M <= GEMV_MAX_M (:func:`gemv_rows`) only
TABLES = {("weight_only", "small"): WEIGHT_ONLY_SMALL, ("weight_only", "medium"): WEIGHT_ONLY_MEDIUM,
          ("weight_only", "large"): WEIGHT_ONLY_LARGE, ("w4a8", "small"): W4A8_SMALL, ("w4a8", "medium"): W4A8_LARGE,
          ("w4a8", "large"): W4A8_LARGE, ("gemv", "small"): WEIGHT_ONLY_GEMV}
# Split-K GEMV path for M <= SPLITK_MAX_M (weight-bandwidth-bound): BLOCK_N columns x every SPLIT-th K tile per
# program, SPLIT chosen so that about CTAS_PER_SM programs per SM stream the weight; no autotuning (one compile).
# OFF (0): on the H200 (docs/gemm_tune_h200.json, M = 1 / 16, int4 groups of 64, 4 weight shapes) its best config
# took 24.8-78 us per call in do_bench vs 12.3-31.8 us for the plain W4A16 kernel: slower at all 8 shapes, because
# its two launches each pay the host-side launch cost that dominates these ~10-us GEMMs. Its GPU time alone is lower
# (6.2-10.8 us vs 7.9-21.1 us under a CUDA graph, 7 of 8 shapes), so it can pay off under CUDA graphs
# (mode="reduce-overhead"); ``QDIFF_W4_SPLITK=1`` turns it on up to SPLITK_ON_MAX_M for that end-to-end A/B
# (bench suffix ``-splitk``; measured 2026-12-03 at DiT-XL/2 batch 1: 7.42 vs 7.46 ms, no gain); the GEMV kernel
# still takes M <= GEMV_MAX_M first unless ``QDIFF_W4_GEMV=0``.
# The medium tier (M <= MEDIUM_M, row tiles of SPLITK_MEDIUM_BLOCK_M) splits K by default where few output tiles walk a
# long K (medium_splits_k, from the H200 sweep at M = 256); ``QDIFF_W4_SPLITK_MEDIUM=1`` splits every medium shape
# (bench suffix ``-splitk-medium``), ``=0`` none.
SPLITK_MAX_M = 0
SPLITK_ON_MAX_M = 16
SPLITK_ENV = "QDIFF_W4_SPLITK"
SPLITK_MEDIUM_ENV = "QDIFF_W4_SPLITK_MEDIUM"
SPLITK_GEMV_BLOCK_M = 16  # every M <= 16 row in one tile
SPLITK_MEDIUM_BLOCK_M = 64
SPLITK_MEDIUM_MIN_K_TILES = 32  # medium_splits_k: K of at least 32 tiles (2048 at BLOCK_K 64)
SPLITK_CONFIG = {"block_n": 64, "block_k": 128, "num_warps": 4, "num_stages": 3, "ctas_per_sm": 4}
# Dequantize-then-cuBLAS route (on by default; ``QDIFF_W4_DEQUANT_MM=0`` turns it off, bench suffixes ``-dequant-mm`` /
# ``-no-dequant-mm``): at M >= DEQUANT_MM_MIN_M the GEMM is compute-bound and the fused kernels ran at ~0.5x of cuBLAS
# bf16 (H200, 2026-12-03: 37.6 vs 19.7 us at 1024 x 1152 x 4608), so the weight is dequantized to the activation's dtype
# (one pass: writes N x K x 2 bytes, ~4 us for 1152 x 4608) and multiplied by cuBLAS through F.linear; the weight stays
# int4 in memory. Measured at DiT-XL/2 batch 1 (M = 1024), CUDA graphs: 4.84 ms against the fused kernels' 6.93 ms
# (bf16 Inductor 3.81 / 3.85 ms in the same runs).
DEQUANT_MM_ENV = "QDIFF_W4_DEQUANT_MM"
DEQUANT_MM_MIN_M = 512
DEQUANT_CONFIG = {"block_n": 32, "num_warps": 4}  # rows per program of dequantize_kernel (its K tile divides the group);
# the H200 sweep's best at 3 of 4 DiT shapes (M = 1024; docs/experiments/w4a16-b1/tune_gemv_v1_dequant_2026-12-03.json)

# GEMV path (on by default; ``QDIFF_W4_GEMV=0`` turns it off, bench suffix ``-no-gemv``): weight-only GEMMs of
# M <= GEMV_MAX_M rows (DiT's adaLN and timestep-embedding linears at batch 1) read the weight once per row on the CUDA
# cores (weight_only_gemv_kernel) instead of padding M to a 16-row tensor-core tile.
GEMV_ENV = "QDIFF_W4_GEMV"
GEMV_MAX_M = 4
_KEY_WO = ["M", "N", "K", "W_INT4", "GROUP", "ACT"]
_KEY_W4A8 = ["M", "N", "K", "A_FP8", "ASYM", "GROUP", "HAS_SMOOTH", "ACT"]
_KEY_GEMV = ["N", "K", "W_INT4", "GROUP", "ACT"]  # (M is the grid's second axis)


def _fits(c: triton.Config, group: int) -> bool:
    """Whether config ``c`` serves groups of ``group`` (0: per channel): the GEMM kernels' K tile divides the group, the
    GEMV kernel's (configs without BLOCK_M) holds whole groups."""
    bk = c.kwargs["BLOCK_K"]
    if "BLOCK_M" not in c.kwargs:
        return group == 0 or bk % group == 0
    return group == 0 or (bk <= group and group % bk == 0)


def m_tier(M: int) -> str:
    """The autotune table an M picks: ``small`` (weight-bandwidth-bound), ``medium`` (few output tiles) or ``large``."""
    return "small" if M <= SMALL_M else "medium" if M <= MEDIUM_M else "large"


def _configs(which: str, group: int, tier: str) -> list[triton.Config]:
    """The configs of ``which`` for M ``tier`` valid for ``group`` (0: per channel); the interpreter's one config there."""
    configs = [INTERPRET_CONFIGS[which]] if INTERPRET else TABLES[which, tier]
    return [c for c in configs if _fits(c, group)]


@functools.lru_cache(maxsize=None)
def _kernel(which: str, group: int, tier: str):
    """(autotuned kernel, K multiple that makes every config's K loop mask-free), or None."""
    configs = _configs(which, group, tier)
    if not configs:
        return None
    fn, key = {"weight_only": (weight_only_kernel, _KEY_WO), "w4a8": (w4a8_kernel, _KEY_W4A8),
               "gemv": (weight_only_gemv_kernel, _KEY_GEMV)}[which]
    return autotuned(fn, configs, key, interpret_config=configs[0]), max(c.kwargs["BLOCK_K"] for c in configs)


def supports_group(group_size: int | None) -> bool:
    """Whether the kernels have configs for int4 groups of ``group_size`` (in practice multiples of 32).

    Arithmetic on the config lists only (no autotuner is built), so it is cheap to trace."""
    g = group_size or 0
    return all(_configs(w, g, tier) for w, tier in TABLES)


def _check_stored(w, w_scale, group: int, int4: bool, K: int) -> tuple[int, int]:
    """``(N, stored K)`` of a packed int4 / int8 weight and its scales, checked against K input features and the group."""
    check_tensor(w, "weight", (torch.uint8,) if int4 else (torch.int8,), dim=2)
    if not int4 and group:
        raise ValueError("int8 weights are per-channel only")
    N = w.shape[0]
    k_stored = w.shape[1] * (2 if int4 else 1)
    if not (K <= k_stored < K + max(group, 2)):
        raise ValueError(f"a weight storing {k_stored} per row does not fit K={K} input features")
    n_groups = k_stored // group if group else 1
    check_tensor(w_scale, "weight scale", (torch.float32,), shape=(N, n_groups))
    if group and k_stored % group:
        raise ValueError(f"stored K {k_stored} is not a whole number of groups of {group}")
    if not (w.is_contiguous() and w_scale.is_contiguous()):
        raise ValueError("weight and weight scale must be contiguous")
    return N, k_stored


def _check_weight(x, w, w_scale, group: int, int4: bool, K: int):
    if x.shape[1] != K:
        raise ValueError(f"x has {x.shape[1]} input features; the weight was called with K={K}")
    N, k_stored = _check_stored(w, w_scale, group, int4, K)
    row_major(x, "x")
    return N, k_stored


def _grid(M, N):
    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    return grid


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def medium_splits_k(M: int, N: int, k_tiles: int, sms: int) -> bool:
    """The medium tier's default choice of the split-K path: the plain kernel's 64 x 64 output tiles do not fill the
    SMs and each would walk a long K (>= :data:`SPLITK_MEDIUM_MIN_K_TILES` tiles). Measured on the H200 at M = 256
    (2026-12-03, gemm_tune): 25.3 us split-K against 48.8 us plain at K = 4608, N = 1152 (72 tiles, 72 K tiles); the
    plain kernel won at N >= 3456, where its tiles fill the GPU."""
    return SMALL_M < M <= MEDIUM_M and triton.cdiv(M, 64) * triton.cdiv(N, 64) < sms and k_tiles >= SPLITK_MEDIUM_MIN_K_TILES


def splitk_plan(M: int, N: int, K: int, group: int, device: torch.device, cfg: dict | None = None,
                max_m: int | None = None) -> dict | None:
    """Launch parameters of the split-K path for this shape (None when it does not apply). Up to ``max_m`` rows when
    given; otherwise the switches decide: ``QDIFF_W4_SPLITK_MEDIUM=1`` every M up to :data:`MEDIUM_M`,
    ``QDIFF_W4_SPLITK=1`` M up to :data:`SPLITK_ON_MAX_M`, and by default (unset) the medium-tier shapes that
    :func:`medium_splits_k` picks (``QDIFF_W4_SPLITK_MEDIUM=0``: none; :data:`SPLITK_MAX_M`, 0, below the medium tier).
    Rows per tile: ``cfg["block_m"]``, else all of a GEMV-like M (<= 16) or :data:`SPLITK_MEDIUM_BLOCK_M`; the K split
    fills about ``ctas_per_sm`` programs per SM."""
    cfg = cfg or SPLITK_CONFIG
    if M == 0:
        return None
    bk = cfg["block_k"] if group == 0 else min(cfg["block_k"], group)
    if group and group % bk:
        return None
    k_tiles = triton.cdiv(K, bk)
    sms = _sm_count(device)
    if max_m is None:
        medium = env_switch(SPLITK_MEDIUM_ENV, None)
        if medium:
            max_m = MEDIUM_M
        elif env_switch(SPLITK_ENV, False):
            max_m = SPLITK_ON_MAX_M
        elif medium is None and medium_splits_k(M, N, k_tiles, sms):
            max_m = MEDIUM_M
        else:
            max_m = SPLITK_MAX_M
    if M > max_m:
        return None
    bm = cfg.get("block_m") or (SPLITK_GEMV_BLOCK_M if M <= SPLITK_GEMV_BLOCK_M else SPLITK_MEDIUM_BLOCK_M)
    tiles = triton.cdiv(N, cfg["block_n"]) * triton.cdiv(M, bm)
    split = max(1, min(k_tiles, triton.cdiv(cfg["ctas_per_sm"] * sms, tiles)))
    return {"block_m": bm, "block_n": cfg["block_n"], "block_k": bk, "split": split, "num_warps": cfg["num_warps"],
            "num_stages": cfg["num_stages"]}


def _splitk(x, w, w_scale, bias, K, k_stored, group, int4, act, plan, wrap=wrap_triton):
    """The split-K launches (``wrap``: identity to launch outside a triton_op, as the config sweep does)."""
    M, N = x.shape[0], w.shape[0]
    part = torch.empty((plan["split"], M, N), device=x.device, dtype=torch.float32)
    out = torch.empty((M, N), device=x.device, dtype=x.dtype)
    wrap(weight_only_splitk_kernel)[(triton.cdiv(N, plan["block_n"]), plan["split"], triton.cdiv(M, plan["block_m"]))](
        x, w, w_scale, part, M, N, K, k_stored, x.stride(0), w.stride(0), w_scale.stride(0),
        W_INT4=int4, GROUP=group, EVEN_K=K % plan["block_k"] == 0 and K == k_stored, FP32_DOT=x.dtype == torch.float32,
        INTERPRET=INTERPRET, BLOCK_M=plan["block_m"], BLOCK_N=plan["block_n"], BLOCK_K=plan["block_k"],
        num_warps=plan["num_warps"], num_stages=plan["num_stages"],
    )
    block = 256
    wrap(splitk_reduce_kernel)[(triton.cdiv(M * N, block),)](
        part, w_scale, bias if bias is not None else w_scale, out, M, N, plan["split"], out.stride(0),
        PER_CHANNEL_SCALE=group == 0, HAS_BIAS=bias is not None, ACT=act, BLOCK=block,
    )
    return out


def gemv_rows(M: int) -> bool:
    """Whether a weight-only GEMM of M rows takes the GEMV kernel: 0 < M <= :data:`GEMV_MAX_M` unless
    ``QDIFF_W4_GEMV=0``."""
    return 0 < M <= GEMV_MAX_M and bool(env_switch(GEMV_ENV, True))


def _gemv(x, w, w_scale, bias, K, k_stored, group, int4, act, wrap=wrap_triton):
    """The GEMV launch: one program per BLOCK_N columns and row."""
    found = _kernel("gemv", group, "small")
    if found is None:
        raise ValueError(f"no GEMV configuration for int4 groups of {group} (its K tiles must hold whole groups)")
    M, N = x.shape[0], w.shape[0]
    out = torch.empty((M, N), device=x.device, dtype=x.dtype)
    wrap(found[0])[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), M)](
        x, w, w_scale, bias if bias is not None else w_scale, out, N, K, k_stored, w.shape[1],
        x.stride(0), w.stride(0), w_scale.stride(0), out.stride(0),
        W_INT4=int4, GROUP=group, HAS_BIAS=bias is not None, ACT=act,
    )
    return out


def _weight_only_linear(x, w, w_scale, bias, K, group_size, int4, act, wrap=wrap_triton):
    check_tensor(x, "x", FLOAT_DTYPES, dim=2)
    N, k_stored = _check_weight(x, w, w_scale, group_size, int4, K)
    if bias is not None:
        check_tensor(bias, "bias", (torch.float32,), shape=(N,))
    check_launchable(x, w, w_scale)
    if x.stride(1) == 1:  # (the GEMV and split-K kernels read rows of x contiguously)
        if gemv_rows(x.shape[0]):
            return _gemv(x, w, w_scale, bias, K, k_stored, group_size, int4, act, wrap=wrap)
        plan = splitk_plan(x.shape[0], N, K, group_size, x.device)
        if plan is not None:
            return _splitk(x, w, w_scale, bias, K, k_stored, group_size, int4, act, plan, wrap=wrap)
    found = _kernel("weight_only", group_size, m_tier(x.shape[0]))
    if found is None:
        raise ValueError(f"no kernel configuration for int4 groups of {group_size} (need a multiple of 32)")
    kernel, k_multiple = found
    M = x.shape[0]
    out = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if M == 0:
        return out
    wrap(kernel)[_grid(M, N)](
        x, w, w_scale, bias if bias is not None else w_scale, out,
        M, N, K, k_stored,
        x.stride(0), x.stride(1), w.stride(0), w_scale.stride(0), out.stride(0), out.stride(1),
        W_INT4=int4, GROUP=group_size, HAS_BIAS=bias is not None, ACT=act,
        EVEN_K=K % k_multiple == 0 and K == k_stored, FP32_DOT=x.dtype == torch.float32, INTERPRET=INTERPRET,
    )
    return out


@triton_op("qdiff::weight_only_linear", mutates_args=())
def weight_only_linear_op(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                          K: int, group_size: int, int4: bool, act: int) -> torch.Tensor:
    """2-D float ``x`` times an int4-packed (``int4``) or int8 weight; ``group_size`` 0 = per channel."""
    return _weight_only_linear(x, w, w_scale, bias, K, group_size, int4, act)


@weight_only_linear_op.register_fake
def _(x, w, w_scale, bias, K, group_size, int4, act):
    return x.new_empty((x.shape[0], w.shape[0]))


def _w4a8_linear(x, w, w_scale, bias, a_scale, a_zp, act_smooth, K, group_size, a_fp8, act, wrap=wrap_triton):
    check_tensor(x, "x", FLOAT_DTYPES, dim=2)
    N, k_stored = _check_weight(x, w, w_scale, group_size, True, K)
    if bias is not None:
        check_tensor(bias, "bias", (torch.float32,), shape=(N,))
    check_scalar(a_scale, "activation scale", torch.float32)
    asym = a_zp is not None
    if asym:
        if a_fp8:
            raise ValueError("fp8 activations have no zero point")
        check_scalar(a_zp, "activation zero point", torch.int32)
    if act_smooth is not None:
        check_tensor(act_smooth, "act_smooth", (torch.float32,), shape=(K,))
    check_launchable(x, w, w_scale, a_scale)
    found = _kernel("w4a8", group_size, m_tier(x.shape[0]))
    if found is None:
        raise ValueError(f"no kernel configuration for int4 groups of {group_size} (need a multiple of 32)")
    kernel, k_multiple = found
    M = x.shape[0]
    out = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if M == 0:
        return out
    wrap(kernel)[_grid(M, N)](
        x, w, w_scale, bias if bias is not None else w_scale, a_scale, a_zp if asym else a_scale,
        act_smooth if act_smooth is not None else w_scale, out,
        M, N, K, k_stored,
        x.stride(0), x.stride(1), w.stride(0), w_scale.stride(0), out.stride(0), out.stride(1),
        A_FP8=a_fp8, QMIN=-128 if asym else -127, QMAX=127, ASYM=asym, GROUP=group_size,
        HAS_BIAS=bias is not None, HAS_SMOOTH=act_smooth is not None, ACT=act,
        EVEN_K=K % k_multiple == 0 and K == k_stored, INTERPRET=INTERPRET,
    )
    return out


@triton_op("qdiff::w4a8_linear", mutates_args=())
def w4a8_linear_op(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                   a_scale: torch.Tensor, a_zp: torch.Tensor | None, act_smooth: torch.Tensor | None,
                   K: int, group_size: int, a_fp8: bool, act: int) -> torch.Tensor:
    """2-D float ``x`` quantized in the prologue (int8, asymmetric when ``a_zp`` is given, or fp8) times an int4 weight."""
    return _w4a8_linear(x, w, w_scale, bias, a_scale, a_zp, act_smooth, K, group_size, a_fp8, act)


@w4a8_linear_op.register_fake
def _(x, w, w_scale, bias, a_scale, a_zp, act_smooth, K, group_size, a_fp8, act):
    return x.new_empty((x.shape[0], w.shape[0]))


def dequant_mm_rows(M: int) -> bool:
    """Whether a weight-only GEMM of M rows takes the dequantize-then-cuBLAS route: M >= :data:`DEQUANT_MM_MIN_M`
    unless ``QDIFF_W4_DEQUANT_MM=0``."""
    return M >= DEQUANT_MM_MIN_M and bool(env_switch(DEQUANT_MM_ENV, True))


def _dequantize(w, w_scale, bias, K, group_size, int4, dtype, wrap=wrap_triton, cfg: dict | None = None):
    """The dequantization launch: (weight, bias) in ``dtype``, the bias empty when None (``cfg``: :data:`DEQUANT_CONFIG`'s
    keys, for the config sweep)."""
    cfg = cfg or DEQUANT_CONFIG
    N, k_stored = _check_stored(w, w_scale, group_size, int4, K)
    if bias is not None:
        check_tensor(bias, "bias", (torch.float32,), shape=(N,))
    check_launchable(w, w_scale)
    bk = next((b for b in (64, 32) if group_size % b == 0), None)  # one scale per tile (group_size 0: any)
    if bk is None:
        raise ValueError(f"no dequantization tile for int4 groups of {group_size} (need a multiple of 32)")
    out = torch.empty((N, K), device=w.device, dtype=dtype)
    b_out = torch.empty((N if bias is not None else 0,), device=w.device, dtype=dtype)
    wrap(dequantize_kernel)[(triton.cdiv(N, cfg["block_n"]), triton.cdiv(K, bk))](
        w, w_scale, bias if bias is not None else w_scale, out, b_out, N, K, k_stored, w.stride(0), w_scale.stride(0),
        out.stride(0), W_INT4=int4, GROUP=group_size, HAS_BIAS=bias is not None, EVEN_K=k_stored % bk == 0,
        BLOCK_N=cfg["block_n"], BLOCK_K=bk, num_warps=cfg["num_warps"],
    )
    return out, b_out


@triton_op("qdiff::dequantize_weight_only", mutates_args=())
def dequantize_weight_only_op(w: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None, K: int, group_size: int,
                              int4: bool, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A stored int4 (``int4``) or int8 weight as a ``(N, K)`` ``dtype`` matrix (``group_size`` 0: per channel), and
    the fp32 ``bias`` in ``dtype`` (an empty tensor when None)."""
    return _dequantize(w, w_scale, bias, K, group_size, int4, dtype)


@dequantize_weight_only_op.register_fake
def _(w, w_scale, bias, K, group_size, int4, dtype):
    return w.new_empty((w.shape[0], K), dtype=dtype), w.new_empty((w.shape[0] if bias is not None else 0,), dtype=dtype)


def dequantize_weight_only(w: torch.Tensor, w_scale: torch.Tensor, K: int, *, wfmt: str, group_size: int | None,
                           dtype: torch.dtype, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The stored weight (int4 packed or int8, ``w_scale`` (N, groups)) dequantized to a ``(N, K)`` ``dtype`` matrix:
    the reference's :func:`qcompile.lowering.weights.dequantize_weight`, bit for bit; and the fp32 ``bias`` cast to
    ``dtype`` in the same launch (None when None)."""
    args = (w, w_scale.reshape(w.shape[0], -1), bias, K, group_size or 0, wfmt == "int4", dtype)
    w_f, b_f = _dequantize(*args, wrap=direct) if eager_call(w) else torch.ops.qdiff.dequantize_weight_only(*args)
    return w_f, (b_f if bias is not None else None)


def _as_2d(x):
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def weight_only_linear(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None, *,
                       wfmt: str, group_size: int | None, act: str = "none", bias_corr: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` (..., K) times a stored int4 (``wfmt="int4"``) or int8 weight, dequantized in the kernel."""
    if wfmt not in ("int4", "int8"):
        raise ValueError(f"weight-only kernel takes int4 or int8 weights, not {wfmt!r}")
    N, K = w.shape[0], x.shape[-1]
    x2 = _as_2d(x)
    if dequant_mm_rows(x2.shape[0]) and x.dtype in (torch.bfloat16, torch.float16):
        activation_code(act)  # (validates the name)
        w_f, b_f = dequantize_weight_only(w, w_scale, K, wfmt=wfmt, group_size=group_size, dtype=x.dtype,
                                          bias=fused_bias(bias, bias_corr, N))
        out = TORCH_ACTIVATIONS[act](torch.nn.functional.linear(x2, w_f, b_f))
        return out.reshape(*x.shape[:-1], N)
    args = (x2, w, w_scale.reshape(N, -1), fused_bias(bias, bias_corr, N), K, group_size or 0, wfmt == "int4", activation_code(act))
    out = _weight_only_linear(*args, wrap=direct) if eager_call(x) else torch.ops.qdiff.weight_only_linear(*args)
    return out.reshape(*x.shape[:-1], N)


def w4a8_linear(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None, a_scale: torch.Tensor,
                a_zp: torch.Tensor | None = None, *, group_size: int | None, afmt: str = "int8",
                act_smooth: torch.Tensor | None = None, act: str = "none", bias_corr: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` (..., K) quantized in the prologue to ``afmt`` (int8 / fp8_e4m3) times a packed int4 weight."""
    if afmt not in ("int8", "fp8_e4m3"):
        raise ValueError(f"w4a8 activations are int8 or fp8_e4m3, not {afmt!r}")
    N, K = w.shape[0], x.shape[-1]
    s = None if act_smooth is None else act_smooth.float().reshape(-1)
    zp = None if a_zp is None else a_zp.to(torch.int32)
    args = (_as_2d(x), w, w_scale.reshape(N, -1), fused_bias(bias, bias_corr, N), a_scale.float(), zp, s, K, group_size or 0,
            afmt == "fp8_e4m3", activation_code(act))
    out = _w4a8_linear(*args, wrap=direct) if eager_call(x) else torch.ops.qdiff.w4a8_linear(*args)
    return out.reshape(*x.shape[:-1], N)

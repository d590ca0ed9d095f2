"""W8A8 INT8 GEMM with a static per-tensor (optionally asymmetric) activation quantizer.

Prologue: ``q = clamp(round(x / a_scale) + zp, qmin, qmax)`` per loaded tile (int8, round half to
even as ``torch.round``). ``tl.dot`` on int8 tiles accumulates exactly in int32. Epilogue: the zero
point is removed in the integer domain, ``sum_k (q - zp) w = acc - zp * colsum[n]`` with
``colsum[n] = sum_k w_q[n, k]`` (computed by the wrapper from the stored weight), then
``* a_scale * w_scale[n] + bias``, optional activation, cast to the input's dtype.

Split ops (``splits``, constexpr ``NS`` > 1): per input-feature slice its own quantizer, an exact int32 partial
product minus ``zp[s] * colsum[n, s]``, added to an fp32 accumulator times ``a_scale[s] * w_scale[n, s]``.
"""

from __future__ import annotations

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
    configs_from,
    direct,
    eager_call,
    fused_bias,
    quantize_int8,
    row_major,
    slice_bound,
    slice_quantizer,
    split_args,
    store_output,
    tile_ids,
)


@triton.jit
def int8_linear_kernel(
    x_ptr, w_ptr, ws_ptr, colsum_ptr, bias_ptr, as_ptr, zp_ptr, smooth_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_om, stride_on, B1, B2, B3,
    QMIN: tl.constexpr, QMAX: tl.constexpr, ASYM: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SMOOTH: tl.constexpr, ACT: tl.constexpr,
    EVEN_K: tl.constexpr, NS: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm_l = tl.max_contiguous(tl.multiple_of(rm % M, BLOCK_M), BLOCK_M)
    rn_l = tl.max_contiguous(tl.multiple_of(rn % N, BLOCK_N), BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    if NS > 1:  # split op: slice s of K = [B_s, B_s+1) has its own quantizer, weight scales (N, NS), colsums (N, NS)
        x_base = x_ptr + rm_l[:, None] * stride_xm + rk[None, :] * stride_xk
        w_base = w_ptr + rn_l[None, :] * stride_wn + rk[:, None]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for s in tl.static_range(NS):
            lo = slice_bound(s, NS, K, B1, B2, B3)
            hi = slice_bound(s + 1, NS, K, B1, B2, B3)
            s_scale, s_inv, s_zp, s_zp_f = slice_quantizer(as_ptr, zp_ptr, s, ASYM)
            part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
            x_ptrs = x_base + (lo // BLOCK_K) * BLOCK_K * stride_xk
            w_ptrs = w_base + (lo // BLOCK_K) * BLOCK_K
            for kt in range(lo // BLOCK_K, tl.cdiv(hi, BLOCK_K)):  # tiles straddling a bound: masked to the slice
                kk = kt * BLOCK_K + rk
                k_ok = (kk >= lo) & (kk < hi)
                # columns outside the slice load weight 0: whatever their codes, they contribute nothing
                if EVEN_K:  # every bound on a tile edge (the wrapper's EVEN_K covers the split points): no masks
                    a = tl.load(x_ptrs)
                    b = tl.load(w_ptrs)
                else:
                    a = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
                    b = tl.load(w_ptrs, mask=k_ok[:, None], other=0)
                x_ptrs += BLOCK_K * stride_xk
                w_ptrs += BLOCK_K
                a = a.to(tl.float32)
                if HAS_SMOOTH:
                    a = a * tl.load(smooth_ptr + kk, mask=k_ok, other=0.0)[None, :]
                part = tl.dot(quantize_int8(a * s_inv, s_zp_f, QMIN, QMAX, INTERPRET), b, part, out_dtype=tl.int32)
            if ASYM:
                part = part - s_zp * tl.load(colsum_ptr + rn_l * NS + s)[None, :]
            acc += part.to(tl.float32) * (s_scale * tl.load(ws_ptr + rn_l * NS + s))[None, :]
        store_output(acc, rm, rn, M, N, out_ptr, stride_om, stride_on, ws_ptr, bias_ptr, 1.0, HAS_BIAS, False, ACT)
    else:
        x_ptrs = x_ptr + rm_l[:, None] * stride_xm + rk[None, :] * stride_xk
        w_ptrs = w_ptr + rn_l[None, :] * stride_wn + rk[:, None]
        a_scale, inv_scale, zp, zp_f = slice_quantizer(as_ptr, zp_ptr, 0, ASYM)  # an unsplit op: one slice
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for kt in range(0, tl.cdiv(K, BLOCK_K)):
            if EVEN_K:
                a = tl.load(x_ptrs)
                b = tl.load(w_ptrs)
            else:
                k_ok = rk < K - kt * BLOCK_K
                # masked-out K columns must contribute (q - zp) = 0: x = 0 quantizes to zp exactly
                a = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
                b = tl.load(w_ptrs, mask=k_ok[:, None], other=0)
            a = a.to(tl.float32)
            if HAS_SMOOTH:
                kk = kt * BLOCK_K + rk
                a = a * tl.load(smooth_ptr + kk, mask=kk < K, other=0.0)[None, :]
            a = quantize_int8(a * inv_scale, zp_f, QMIN, QMAX, INTERPRET)
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)
            x_ptrs += BLOCK_K * stride_xk
            w_ptrs += BLOCK_K
        if ASYM:
            colsum = tl.load(colsum_ptr + rn, mask=rn < N, other=0)
            acc = acc - zp * colsum[None, :]
        store_output(acc.to(tl.float32), rm, rn, M, N, out_ptr, stride_om, stride_on, ws_ptr, bias_ptr, a_scale, HAS_BIAS, True, ACT)


# Autotune tables (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps, GROUP_M): the H200 sweep's winners
# (docs/gemm_tune_h200.json; (16, 64, ...) won at M = 240 and M = 8). Regenerate with `gemm_tune --tables`.
CONFIG_TABLE = {
    "large": [(128, 256, 128, 3, 8, 8), (128, 256, 128, 3, 8, 16), (128, 256, 64, 4, 8, 8), (16, 64, 128, 4, 4, 8)],
    "small": [(16, 64, 128, 4, 4, 8), (32, 128, 128, 4, 4, 8)],
    # split ops (NS > 1) at M > 64: an fp32 accumulator beside each slice's exact int32 one. The large tables spill
    # then on sm_90 (aot_check: 128 x 128 x 128 / 8 warps 728 bytes of stack); these compile without spills.
    "split": [(64, 256, 128, 3, 8, 8), (64, 128, 64, 4, 4, 8), (64, 64, 128, 4, 4, 8)],
}
LARGE_M_CONFIGS = configs_from(CONFIG_TABLE["large"])
SMALL_M_CONFIGS = configs_from(CONFIG_TABLE["small"])
SPLIT_CONFIGS = configs_from(CONFIG_TABLE["split"])
SMALL_M = 64

_KEY = ["M", "N", "K", "ASYM", "HAS_SMOOTH", "ACT", "NS"]
_K_MULTIPLE = max(c.kwargs["BLOCK_K"] for c in LARGE_M_CONFIGS + SMALL_M_CONFIGS + SPLIT_CONFIGS)
_large = autotuned(int8_linear_kernel, LARGE_M_CONFIGS, _KEY)
_small = autotuned(int8_linear_kernel, SMALL_M_CONFIGS, _KEY)
_large_split = autotuned(int8_linear_kernel, SPLIT_CONFIGS, _KEY)


def weight_colsum(w: torch.Tensor, k_bounds: list[int] | tuple[int, ...] | None = None) -> torch.Tensor:
    """``sum_k w_q[n, k]`` in int32: the zero-point term of an asymmetric int8 activation. With ``k_bounds``
    (a split op's K segments ``[0, k1, ..., K]``, :func:`..weights.k_bounds`): one sum per segment, (N, segments)."""
    w2 = w.reshape(w.shape[0], -1)
    if k_bounds is None:
        return w2.sum(dim=1, dtype=torch.int32)
    return torch.stack([w2[:, a:b].sum(dim=1, dtype=torch.int32) for a, b in zip(k_bounds, k_bounds[1:])], dim=1).contiguous()


def _int8_linear(x, w, w_scale, colsum, bias, a_scale, a_zp, act_smooth, act, splits=None, wrap=wrap_triton):
    check_tensor(x, "x", FLOAT_DTYPES, dim=2)
    check_tensor(w, "weight", (torch.int8,), dim=2)
    N, K = w.shape
    if x.shape[1] != K:
        raise ValueError(f"x has {x.shape[1]} input features but the weight has K={K}")
    ns, b1, b2, b3 = split_args(splits, K)
    asym = a_zp is not None
    check_int8_quant_params(w_scale, a_scale, a_zp, N, ns if splits is not None else None)
    if bias is not None:
        check_tensor(bias, "bias", (torch.float32,), shape=(N,))
    if asym:
        if colsum is None:
            raise ValueError("an asymmetric activation quantizer needs the weight's column sums (weight_colsum)")
        check_tensor(colsum, "colsum", (torch.int32,), shape=(N,) if splits is None else (N, ns))
        if not colsum.is_contiguous():
            raise ValueError("colsum must be contiguous")
    if act_smooth is not None:
        check_tensor(act_smooth, "act_smooth", (torch.float32,), shape=(K,))
    row_major(x, "x")
    if not w.is_contiguous():
        raise ValueError("weight must be contiguous (N, K)")
    check_launchable(x, w, w_scale, a_scale)
    M = x.shape[0]
    out = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if M == 0:
        return out
    kernel = _small if M <= SMALL_M else (_large_split if ns > 1 else _large)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    wrap(kernel)[grid](
        x, w, w_scale, colsum if asym else w_scale, bias if bias is not None else w_scale, a_scale,
        a_zp if asym else a_scale, act_smooth if act_smooth is not None else w_scale, out,
        M, N, K,
        x.stride(0), x.stride(1), w.stride(0), out.stride(0), out.stride(1), b1, b2, b3,
        QMIN=-128 if asym else -127, QMAX=127, ASYM=asym,
        HAS_BIAS=bias is not None, HAS_SMOOTH=act_smooth is not None, ACT=act,
        EVEN_K=all(p % _K_MULTIPLE == 0 for p in (K, b1, b2, b3)), NS=ns, INTERPRET=INTERPRET,
    )
    return out


@triton_op("qdiff::int8_linear", mutates_args=())
def int8_linear_op(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, colsum: torch.Tensor | None,
                   bias: torch.Tensor | None, a_scale: torch.Tensor, a_zp: torch.Tensor | None,
                   act_smooth: torch.Tensor | None, act: int, splits: list[int] | None = None) -> torch.Tensor:
    """2-D ``x`` quantized to int8 in the prologue; ``a_zp`` None for a symmetric quantizer (range +-127).
    ``splits``: a split op's input-feature split points; ``a_scale`` / ``a_zp`` then have one entry per slice and
    ``w_scale`` / ``colsum`` are (N, slices)."""
    return _int8_linear(x, w, w_scale, colsum, bias, a_scale, a_zp, act_smooth, act, splits)


@int8_linear_op.register_fake
def _(x, w, w_scale, colsum, bias, a_scale, a_zp, act_smooth, act, splits=None):
    return x.new_empty((x.shape[0], w.shape[0]))


def int8_linear(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None, a_scale: torch.Tensor,
                a_zp: torch.Tensor | None = None, act_smooth: torch.Tensor | None = None, act: str = "none",
                bias_corr: torch.Tensor | None = None, colsum: torch.Tensor | None = None,
                splits: tuple[int, ...] | None = None) -> torch.Tensor:
    """``x`` (..., K) -> (..., N) with int8 ``w`` (N, K); ``a_zp`` None means symmetric (+-127).

    ``colsum`` (:func:`weight_colsum` of ``w``) may be passed precomputed; otherwise it is computed
    here when ``a_zp`` is given (one pass over the weight's bytes). ``splits`` (split op: input-feature split
    points): ``a_scale`` / ``a_zp`` hold one value per slice, ``w_scale`` and ``colsum`` are (N, slices).
    """
    N = w.shape[0]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    split = None if splits is None else [int(p) for p in splits]
    if a_zp is not None:
        a_zp = a_zp.to(torch.int32) if split is None else a_zp.to(torch.int32).reshape(-1)
        if colsum is None:
            colsum = weight_colsum(w, split)
    s = None if act_smooth is None else act_smooth.float().reshape(-1)
    if split is None:
        args = (x2, w, w_scale.reshape(-1), colsum, fused_bias(bias, bias_corr, N), a_scale.float(), a_zp, s, activation_code(act))
    else:
        args = (x2, w, w_scale.reshape(N, -1), colsum, fused_bias(bias, bias_corr, N), a_scale.float().reshape(-1), a_zp, s,
                activation_code(act), split)
    out = _int8_linear(*args, wrap=direct) if eager_call(x) else torch.ops.qdiff.int8_linear(*args)
    return out.reshape(*x.shape[:-1], N)

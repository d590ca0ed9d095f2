"""W8A8 FP8 e4m3 GEMM: ``y = act((q(x) @ W_q^T) * a_scale * w_scale[n] + bias)``.

The activation is quantized in the GEMM's prologue with a static per-tensor scale (``x / scale``
clamped to +-448, rounded to e4m3), tile by tile as it is loaded: no separate quantize pass over
memory, no amax. The weight is float8_e4m3fn in the plan's GEMM layout ``(N, K)`` (K-major, as
Hopper's fp8 wgmma wants both operands) with per-output-channel fp32 scales. ``tl.dot`` on the fp8
tiles accumulates in fp32; the epilogue dequantizes, adds the (pre-summed) bias, applies an
optional activation and casts to the input's dtype. ``fp8_linear_prequant`` takes an input that a
producer already quantized to fp8.

Split ops (``splits``, constexpr ``NS`` > 1, interior slice bounds ``B1..B3``): the K loop visits the input-feature
slices in order and quantizes each with its own scale; the one fp32 accumulator holds the sum in units of the current
slice's ``a_scale[s] * w_scale[n, s]`` (weight scales ``(N, slices)``), rescaled at each slice bound; see
``docs/kernels.md``.

Specialization is by ``tl.constexpr`` flags (input already fp8, bias, smoothing, activation, K
divisible by the tile) and shape-keyed autotuning; scales are tensor arguments, so plans that differ
only in scales (timestep groups) share the compiled kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ..heads import NO_HEADS, HeadsLayout
from . import fp8_tma
from ._common import (
    FLOAT_DTYPES,
    INTERPRET,
    activation_code,
    as_float,
    autotuned,
    check_launchable,
    check_scalar,
    check_split_params,
    check_tensor,
    configs_from,
    direct,
    eager_call,
    epilogue,
    flat,
    fused_bias,
    out_columns,
    quantize_fp8,
    quantize_output,
    row_major,
    rows,
    slice_bound,
    split_args,
    store_heads,
    store_tile,
    tile_ids,
)

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


@triton.jit
def fp8_linear_kernel(
    x_ptr, w_ptr, ws_ptr, bias_ptr, as_ptr, smooth_ptr, out_ptr, os_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_om, stride_on, B1, B2, B3,
    X_FP8: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SMOOTH: tl.constexpr, ACT: tl.constexpr,
    OUT_FP8: tl.constexpr, OUT_COLS: tl.constexpr, EVEN_K: tl.constexpr, NS: tl.constexpr, INTERPRET: tl.constexpr,
    HEADS: tl.constexpr, N_RM: tl.constexpr, SEQ: tl.constexpr, SEQ_PAD: tl.constexpr, HEAD_D: tl.constexpr, HEAD_W: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # rows / columns past the edge load valid (wrapped) data; only the store is masked
    rm_l = tl.max_contiguous(tl.multiple_of(rm % M, BLOCK_M), BLOCK_M)
    rn_l = tl.max_contiguous(tl.multiple_of(rn % N, BLOCK_N), BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    if NS > 1:  # split op: slice s of K = [B_s, B_s+1) has its own activation scale and weight scales (N, NS)
        # One fp32 accumulator (a second one would double the registers and spill): it holds the sum so far in units
        # of the current slice's scales c_s = a_scale[s] * w_scale[:, s], rescaled by c_s-1 / c_s at each slice bound.
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for s in tl.static_range(NS):
            lo = slice_bound(s, NS, K, B1, B2, B3)
            hi = slice_bound(s + 1, NS, K, B1, B2, B3)
            s_scale = tl.load(as_ptr + s)
            s_inv = tl.math.div_rn(1.0, s_scale)
            c = s_scale * tl.load(ws_ptr + rn_l * NS + s)
            if s > 0:
                acc = acc * tl.math.div_rn(c_prev, c)[None, :]  # noqa: F821 (set by the previous, unrolled, slice)
            for kt in range(lo // BLOCK_K, tl.cdiv(hi, BLOCK_K)):  # tiles straddling a bound: masked to the slice
                kk = kt * BLOCK_K + rk
                k_ok = (kk >= lo) & (kk < hi)
                if EVEN_K:  # every bound on a tile edge (the wrapper's EVEN_K covers the split points): no masks
                    a = tl.load(x_ptr + rm_l[:, None] * stride_xm + kk[None, :] * stride_xk)
                    b = tl.load(w_ptr + rn_l[None, :] * stride_wn + kk[:, None])
                else:
                    a = tl.load(x_ptr + rm_l[:, None] * stride_xm + kk[None, :] * stride_xk, mask=k_ok[None, :], other=0.0)
                    b = tl.load(w_ptr + rn_l[None, :] * stride_wn + kk[:, None], mask=k_ok[:, None], other=0.0)
                if not X_FP8:  # (fp8 input: each slice quantized by its producer with the slice's scale)
                    a = a.to(tl.float32)
                    if HAS_SMOOTH:
                        a = a * tl.load(smooth_ptr + kk, mask=k_ok, other=0.0)[None, :]
                    a = quantize_fp8(a * s_inv, INTERPRET)
                acc = tl.dot(a, b, acc)
            c_prev = c
        y = epilogue(acc * c_prev[None, :], rn, N, ws_ptr, bias_ptr, 1.0, HAS_BIAS, False, ACT)
    else:
        x_ptrs = x_ptr + rm_l[:, None] * stride_xm + rk[None, :] * stride_xk
        w_ptrs = w_ptr + rn_l[None, :] * stride_wn + rk[:, None]
        a_scale = tl.load(as_ptr)
        inv_scale = tl.math.div_rn(1.0, a_scale)  # IEEE (plain "/" is approximate on GPU)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kt in range(0, tl.cdiv(K, BLOCK_K)):
            if EVEN_K:
                a = tl.load(x_ptrs)
                b = tl.load(w_ptrs)
            else:
                k_ok = rk < K - kt * BLOCK_K
                a = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
                b = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
            if not X_FP8:
                a = a.to(tl.float32)
                if HAS_SMOOTH:
                    kk = kt * BLOCK_K + rk
                    a = a * tl.load(smooth_ptr + kk, mask=kk < K, other=0.0)[None, :]
                a = quantize_fp8(a * inv_scale, INTERPRET)
            acc = tl.dot(a, b, acc)
            x_ptrs += BLOCK_K * stride_xk
            w_ptrs += BLOCK_K
        y = epilogue(acc, rn, N, ws_ptr, bias_ptr, a_scale, HAS_BIAS, True, ACT)
    if HEADS:  # fp8 attention heads, quantized per column with os_ptr[n] (lowering/heads.py)
        store_heads(y, rm, rn, M, N, out_ptr, os_ptr, N_RM, SEQ, SEQ_PAD, HEAD_D, HEAD_W, INTERPRET)
    else:
        if OUT_FP8:  # quantize for the next fp8 GEMM (its static scale): it reads 1-byte inputs, no quantize pass
            y = quantize_output(y, rn, N, os_ptr, OUT_COLS, INTERPRET)
        store_tile(y, rm, rn, M, N, out_ptr, stride_om, stride_on)


# Autotune tables: (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps, GROUP_M) per M regime: the winners of the
# H200 sweep (docs/gemm_tune_h200.json, triton 3.6; `python -m qcompile.gemm_tune --tables --out docs/gemm_tune_h200.json`),
# one or two per swept shape, most frequent first. Every BLOCK_K divides 128, so EVEN_K (no K masks) is K % 128 == 0.
CONFIG_TABLE = {
    "large": [  # bf16/fp16 input quantized in the prologue (2-byte A tiles); (64, 64, ...) won at M = 240
        (128, 256, 128, 3, 8, 16), (128, 256, 64, 4, 8, 8), (128, 256, 128, 3, 8, 8), (64, 64, 128, 4, 4, 8),
    ],
    "large_prequant": [  # fp8 input (quantized by its producer), when the TMA kernel does not apply (fp8_tma.py)
        (256, 128, 64, 4, 8, 8), (128, 128, 128, 4, 8, 8), (128, 128, 128, 4, 4, 8), (128, 64, 128, 4, 4, 8),
    ],
    # M <= 64: the sweep's M = 8 winners (bf16 / fp8 input); 64 x 64 covers M up to 64 in one row of tiles (not swept)
    "small": [(16, 64, 128, 4, 4, 8), (16, 32, 128, 4, 4, 8), (64, 64, 128, 4, 4, 8)],
    # split ops (NS > 1) at M > 64: the "large" rows that compile without spills with the per-slice rescale (aot_check)
    "split": [(128, 256, 64, 4, 8, 8), (64, 256, 128, 3, 8, 8), (64, 64, 128, 4, 4, 8)],
    # split ops whose bounds are multiples of 64 but not of 128 (im2col columns of 320 / 960 channels x 9 taps): BLOCK_K
    # 64 keeps them unmasked; the masked path spills with every split row (aot_check: STACK 8-64), these do not
    "split_k64": [(128, 256, 64, 4, 8, 8), (64, 256, 64, 3, 8, 8), (64, 128, 64, 4, 4, 8)],
}
SMALL_M = 64  # M at or below this uses the "small" table

LARGE_M_CONFIGS = configs_from(CONFIG_TABLE["large"])
PREQUANT_CONFIGS = configs_from(CONFIG_TABLE["large_prequant"])
SMALL_M_CONFIGS = configs_from(CONFIG_TABLE["small"])
SPLIT_CONFIGS = configs_from(CONFIG_TABLE["split"])
SPLIT_K64_CONFIGS = configs_from(CONFIG_TABLE["split_k64"])

_KEY = ["M", "N", "K", "X_FP8", "HAS_SMOOTH", "ACT", "OUT_FP8", "NS", "HEADS"]
# EVEN_K (no K masks) when K is a multiple of every config's BLOCK_K
_K_MULTIPLE = max(c.kwargs["BLOCK_K"] for c in LARGE_M_CONFIGS + PREQUANT_CONFIGS + SMALL_M_CONFIGS + SPLIT_CONFIGS)
_K64_MULTIPLE = max(c.kwargs["BLOCK_K"] for c in SPLIT_K64_CONFIGS)
_large = autotuned(fp8_linear_kernel, LARGE_M_CONFIGS, _KEY)
_large_prequant = autotuned(fp8_linear_kernel, PREQUANT_CONFIGS, _KEY)
_small = autotuned(fp8_linear_kernel, SMALL_M_CONFIGS, _KEY)
_large_split = autotuned(fp8_linear_kernel, SPLIT_CONFIGS, _KEY)
_large_split_k64 = autotuned(fp8_linear_kernel, SPLIT_K64_CONFIGS, _KEY)
_KERNELS = {"small": _small, "split": _large_split, "split_k64": _large_split_k64, "large_prequant": _large_prequant, "large": _large}


def tile_table(M: int, K: int, bounds: tuple[int, ...], split: bool, x_fp8: bool) -> tuple[str, bool]:
    """The config table (``CONFIG_TABLE`` name) of a non-TMA launch and whether its K loop needs no masks (``EVEN_K``):
    every bound (K, split points) a multiple of every BLOCK_K in the table."""
    if M <= SMALL_M:
        name = "small"
    elif split:
        if any(p % _K_MULTIPLE for p in (K, *bounds)) and not any(p % _K64_MULTIPLE for p in (K, *bounds)):
            return "split_k64", True
        name = "split"
    else:
        name = "large_prequant" if x_fp8 else "large"
    return name, all(p % _K_MULTIPLE == 0 for p in (K, *bounds))


def _launch(x, w, w_scale, bias, a_scale, act_smooth, act: int, out_dtype: torch.dtype, x_fp8: bool,
            out_scale: torch.Tensor | None, wrap, splits=None, heads: HeadsLayout | None = None) -> torch.Tensor:
    """Allocate the output and launch: fp8 inputs of large GEMMs on the persistent TMA kernel (:func:`.fp8_tma.use_tma`),
    everything else on :func:`fp8_linear_kernel`. ``wrap``: ``wrap_triton`` (inside the triton_ops) or :func:`direct`.
    ``splits``: input-feature split points of a split op (per-slice scales, quantized in the prologue). ``heads``: the
    output is the flat fp8 attention-heads buffer of that layout, ``out_scale`` one scale per column."""
    M, K = x.shape
    N = w.shape[0]
    if heads is not None:
        out = torch.empty((heads.numel,), device=x.device, dtype=FP8)
    else:
        out = torch.empty((M, N), device=x.device, dtype=FP8 if out_scale is not None else out_dtype)
    if M == 0:
        return out
    if x_fp8 and splits is None and fp8_tma.use_tma(x, w):
        return fp8_tma.launch_autotuned(x, w, w_scale, bias, a_scale, out, act, out_scale, wrap, _layout(heads))
    return launch_tiled(x, w, w_scale, bias, a_scale, act_smooth, act, x_fp8, out_scale, out, wrap, splits, heads)


def _layout(heads: HeadsLayout | None) -> dict:
    """The kernels' heads constexprs of an output (:data:`NO_HEADS` for a plain (M, N) one)."""
    return NO_HEADS if heads is None else {"HEADS": True, **heads.kernel_args()}


def launch_tiled(x, w, w_scale, bias, a_scale, act_smooth, act: int, x_fp8: bool, out_scale: torch.Tensor | None,
                 out: torch.Tensor, wrap, splits=None, heads: HeadsLayout | None = None) -> torch.Tensor:
    """Launch :func:`fp8_linear_kernel` (autotuned over its table for the shape) writing ``out`` (allocated by the
    caller: (M, N), or the flat heads buffer of ``heads``); arguments as :func:`_launch`."""
    M, K = x.shape
    N = w.shape[0]
    ns, b1, b2, b3 = split_args(splits, K)
    table, even_k = tile_table(M, K, (b1, b2, b3), ns > 1, x_fp8)
    kernel = _KERNELS[table]

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    wrap(kernel)[grid](
        x, w, w_scale, bias if bias is not None else w_scale, a_scale,
        act_smooth if act_smooth is not None else w_scale, out, out_scale if out_scale is not None else a_scale,
        M, N, K,
        x.stride(0), x.stride(1), w.stride(0), N if heads is not None else out.stride(0), 1 if heads is not None else out.stride(1),
        b1, b2, b3,
        X_FP8=x_fp8, HAS_BIAS=bias is not None, HAS_SMOOTH=act_smooth is not None, ACT=act,
        OUT_FP8=out_scale is not None, OUT_COLS=out_columns(out_scale, heads), EVEN_K=even_k, NS=ns, INTERPRET=INTERPRET, **_layout(heads),
    )
    return out


def _check(x, w, w_scale, bias, a_scale, act_smooth, x_dtypes, splits=None):
    check_tensor(x, "x", x_dtypes, dim=2)
    check_tensor(w, "weight", (FP8,), dim=2)
    N, K = w.shape
    if x.shape[1] != K:
        raise ValueError(f"x has {x.shape[1]} input features but the weight has K={K}")
    if splits is not None:
        check_split_params(w_scale, a_scale, None, N, split_args(splits, K)[0])
    else:
        check_tensor(w_scale, "weight scale", (torch.float32,))
        if w_scale.numel() != N or not w_scale.is_contiguous():
            raise ValueError(f"weight scale must be a contiguous per-output-channel tensor of {N} entries, got {tuple(w_scale.shape)}")
        check_scalar(a_scale, "activation scale", torch.float32)
    if bias is not None:
        check_tensor(bias, "bias", (torch.float32,), shape=(N,))
    if act_smooth is not None:
        check_tensor(act_smooth, "act_smooth", (torch.float32,), shape=(K,))
    row_major(x, "x")
    if not w.is_contiguous():
        raise ValueError("weight must be contiguous (N, K)")
    check_launchable(x, w, w_scale, a_scale)


def _check_out(out_scale, out_dtype, n: int):
    """An fp8 output's scale: one (the next GEMM's input scale) or one per output column (``n``); else a float dtype."""
    if out_scale is not None and out_scale.numel() > 1:
        check_tensor(out_scale, "output scale", (torch.float32,), shape=(n,))
    elif out_scale is not None:
        check_scalar(out_scale, "output scale", torch.float32)
    elif out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be fp16/bf16/fp32, got {out_dtype}")


def _fp8_linear(x, w, w_scale, bias, a_scale, act_smooth, act, out_scale, splits=None, wrap=wrap_triton):
    _check(x, w, w_scale, bias, a_scale, act_smooth, FLOAT_DTYPES, splits)
    _check_out(out_scale, x.dtype, w.shape[0])
    return _launch(x, w, w_scale, bias, a_scale, act_smooth, act, x.dtype, False, out_scale, wrap, splits)


def _fp8_linear_prequant(xq, w, w_scale, bias, a_scale, act, out_dtype, out_scale, splits=None, wrap=wrap_triton):
    _check(xq, w, w_scale, bias, a_scale, None, (FP8,), splits)
    _check_out(out_scale, out_dtype, w.shape[0])
    return _launch(xq, w, w_scale, bias, a_scale, None, act, out_dtype, True, out_scale, wrap, splits)


@triton_op("qdiff::fp8_linear", mutates_args=())
def fp8_linear_op(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                  a_scale: torch.Tensor, act_smooth: torch.Tensor | None, act: int, out_scale: torch.Tensor | None,
                  splits: list[int] | None = None) -> torch.Tensor:
    """2-D ``x`` (fp16/bf16/fp32) quantized in the prologue; output in x's dtype, or float8_e4m3fn
    quantized with ``out_scale`` (the next fp8 GEMM's activation scale) when it is given. ``splits``: a split op's
    input-feature split points; ``a_scale`` then has one entry per slice and ``w_scale`` is (N, slices)."""
    return _fp8_linear(x, w, w_scale, bias, a_scale, act_smooth, act, out_scale, splits)


@fp8_linear_op.register_fake
def _(x, w, w_scale, bias, a_scale, act_smooth, act, out_scale, splits=None):
    return x.new_empty((x.shape[0], w.shape[0]), dtype=FP8 if out_scale is not None else x.dtype)


@triton_op("qdiff::fp8_linear_prequant", mutates_args=())
def fp8_linear_prequant_op(xq: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                           a_scale: torch.Tensor, act: int, out_dtype: torch.dtype, out_scale: torch.Tensor | None,
                           splits: list[int] | None = None) -> torch.Tensor:
    """2-D ``xq`` already float8_e4m3fn (quantized by its producer with ``a_scale``); output ``out_dtype``,
    or float8_e4m3fn quantized with ``out_scale`` when it is given. Large unsplit GEMMs run the persistent TMA kernel.
    ``splits``: a split op's input-feature split points, each slice of ``xq`` quantized with its own ``a_scale``
    entry; ``w_scale`` is then (N, slices)."""
    return _fp8_linear_prequant(xq, w, w_scale, bias, a_scale, act, out_dtype, out_scale, splits)


@fp8_linear_prequant_op.register_fake
def _(xq, w, w_scale, bias, a_scale, act, out_dtype, out_scale, splits=None):
    return xq.new_empty((xq.shape[0], w.shape[0]), dtype=FP8 if out_scale is not None else out_dtype)


def fp8_linear(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None, a_scale: torch.Tensor,
               act_smooth: torch.Tensor | None = None, act: str = "none", bias_corr: torch.Tensor | None = None,
               out_scale: torch.Tensor | None = None, splits: tuple[int, ...] | None = None) -> torch.Tensor:
    """``x`` of shape (..., K) -> (..., N); ``w`` float8 (N, K), ``w_scale`` fp32 per output channel.

    ``out_scale``: return float8_e4m3fn quantized with it (after bias and activation) instead of x's dtype; one scale,
    or one per output column (N).
    ``splits`` (split op: input-feature split points): ``a_scale`` holds one scale per slice and ``w_scale`` (N, slices);
    each slice's partial product is scaled by its own scales inside the K loop.
    Eager calls launch directly (:func:`._common.eager_call`); traced ones call ``torch.ops.qdiff.fp8_linear``."""
    N = w.shape[0]
    split = None if splits is None else [int(p) for p in splits]
    args = (rows(x), w, flat(w_scale) if split is None else w_scale.reshape(N, -1), fused_bias(bias, bias_corr, N),
            as_float(a_scale) if split is None else flat(as_float(a_scale)),
            None if act_smooth is None else flat(as_float(act_smooth)), activation_code(act),
            None if out_scale is None else flat(as_float(out_scale)))
    if split is None:  # (the unsplit call keeps its exact argument list: no dispatch cost for the extra argument)
        out = _fp8_linear(*args, wrap=direct) if eager_call(x) else torch.ops.qdiff.fp8_linear(*args)
    else:
        out = _fp8_linear(*args, split, wrap=direct) if eager_call(x) else torch.ops.qdiff.fp8_linear(*args, split)
    return out if x.dim() == 2 else out.reshape(*x.shape[:-1], N)


def fp8_linear_prequant(xq: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None, a_scale: torch.Tensor,
                        out_dtype: torch.dtype, act: str = "none", bias_corr: torch.Tensor | None = None,
                        out_scale: torch.Tensor | None = None, splits: tuple[int, ...] | None = None) -> torch.Tensor:
    """As :func:`fp8_linear` for an input already quantized to float8_e4m3fn with ``a_scale`` (split ops: each slice
    with its own scale, see :func:`quantize_slices_fp8`)."""
    N = w.shape[0]
    split = None if splits is None else [int(p) for p in splits]
    args = (rows(xq), w, flat(w_scale) if split is None else w_scale.reshape(N, -1), fused_bias(bias, bias_corr, N),
            as_float(a_scale) if split is None else flat(as_float(a_scale)), activation_code(act), out_dtype,
            None if out_scale is None else flat(as_float(out_scale)))
    if split is None:  # (the unsplit call keeps its exact argument list)
        out = _fp8_linear_prequant(*args, wrap=direct) if eager_call(xq) else torch.ops.qdiff.fp8_linear_prequant(*args)
    else:
        out = _fp8_linear_prequant(*args, split, wrap=direct) if eager_call(xq) else torch.ops.qdiff.fp8_linear_prequant(*args, split)
    return out if xq.dim() == 2 else out.reshape(*xq.shape[:-1], N)


def _fp8_linear_heads(x, w, w_scale, bias, a_scale, out_scale, heads: list[int], wrap=wrap_triton):
    x_fp8 = x.dtype == FP8
    _check(x, w, w_scale, bias, a_scale, None, (FP8,) if x_fp8 else FLOAT_DTYPES)
    layout = HeadsLayout(*heads)
    if (layout.rows, layout.columns) != (x.shape[0], w.shape[0]):
        raise ValueError(f"heads layout {layout} does not match the GEMM's ({x.shape[0]}, {w.shape[0]}) output")
    check_tensor(out_scale, "per-column output scale", (torch.float32,), shape=(w.shape[0],))
    if not out_scale.is_contiguous():
        raise ValueError("the per-column output scale must be contiguous")
    return _launch(x, w, w_scale, bias, a_scale, None, 0, torch.float32, x_fp8, out_scale, wrap, heads=layout)


@triton_op("qdiff::fp8_linear_heads", mutates_args=())
def fp8_linear_heads_op(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                        a_scale: torch.Tensor, out_scale: torch.Tensor, heads: list[int]) -> torch.Tensor:
    """2-D ``x`` (float, quantized in the prologue, or float8_e4m3fn quantized by its producer with ``a_scale``) times
    the fp8 weight, each output column quantized with ``out_scale[n]`` and stored as fp8 attention heads: the flat
    buffer of ``HeadsLayout(*heads)`` (``lowering/heads.py``)."""
    return _fp8_linear_heads(x, w, w_scale, bias, a_scale, out_scale, heads)


@fp8_linear_heads_op.register_fake
def _(x, w, w_scale, bias, a_scale, out_scale, heads):
    return x.new_empty((HeadsLayout(*heads).numel,), dtype=FP8)


def fp8_linear_heads(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None, a_scale: torch.Tensor,
                     out_scale: torch.Tensor, layout: HeadsLayout, bias_corr: torch.Tensor | None = None) -> torch.Tensor:
    """The q / k / v projection ``x`` (..., K) -> the flat fp8 heads buffer of ``layout`` (:mod:`..heads`), each output
    column quantized with ``out_scale[n]``. Eager calls launch directly; traced ones call
    ``torch.ops.qdiff.fp8_linear_heads``."""
    N = w.shape[0]
    args = (rows(x), w, flat(w_scale), fused_bias(bias, bias_corr, N), as_float(a_scale), flat(as_float(out_scale)), list(layout.fields()))
    return _fp8_linear_heads(*args, wrap=direct) if eager_call(x) else torch.ops.qdiff.fp8_linear_heads(*args)


def quantize_slices_fp8(x: torch.Tensor, a_scale: torch.Tensor, splits: tuple[int, ...]) -> torch.Tensor:
    """Static fp8 quantization of ``x`` (..., K) with one scale per slice ``[splits[i], splits[i+1])`` of its last dim, as
    aten ops (a per-feature scale vector; Inductor fuses it into the producer), the reference's arithmetic per slice."""
    scales = a_scale.float().reshape(-1)
    per_k = torch.cat([scales[i].expand(b - a) for i, (a, b) in enumerate(zip(splits, splits[1:]))])
    return (x.float() / per_k).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def quantize_input_fp8(x: torch.Tensor, a_scale: torch.Tensor, act_smooth: torch.Tensor | None = None) -> torch.Tensor:
    """Static fp8 quantization of ``x`` as plain aten pointwise ops (the reference's arithmetic), so that
    Inductor fuses it into the kernel that produces ``x`` (LayerNorm, modulate, GELU, a layout copy)."""
    if act_smooth is not None:
        x = x * act_smooth.to(x.dtype)
    return (x.float() / a_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)

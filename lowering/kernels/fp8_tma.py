"""W8A8 FP8 GEMM, persistent schedule with TMA tensor descriptors (Hopper; Triton >= 3.4).

Same math as :mod:`.fp8_linear` (``y = act((q(x) @ W_q^T) * a_scale * w_scale[n] + bias)``), but
``NUM_SMS`` programs walk the output tiles (grouped, ``GROUP_M`` row tiles at a time) and load A
and B tiles through device-side tensor descriptors (``tl.make_tensor_descriptor``: TMA on sm_90,
zero padding out of bounds, so no masks and no wrapped indices). ``X_FP8``: the input is already
float8_e4m3fn (quantized by its producer); otherwise bf16/fp16/fp32 tiles are quantized in
registers after the TMA load. ``FLATTEN`` lets Triton's pipeliner flatten the tile and K loops
(the next tile's loads overlap this tile's epilogue); ``WARP_SPEC`` asks for warp specialization.

``OUT_FP8``: the epilogue quantizes the output with the next fp8 GEMM's static scale (``os_ptr``), as
:mod:`.fp8_linear` does (``passes.act_quant`` decides where).

Descriptors need 16-byte aligned bases and rows (``K * itemsize % 16 == 0``) and a global scratch allocator
(``triton.set_allocator``), set by :func:`ensure_allocator`. Production use (:func:`use_tma`, called by
:mod:`.fp8_linear` for fp8 inputs): Triton with descriptors, a CUDA device of compute capability >= 9.0,
M >= 1024 and N, K >= 512, where the H200 sweep (``docs/gemm_tune_h200.json``) measured 0.82-0.93x
``torch._scaled_mm`` against 0.69-0.80x for the non-persistent kernel. The sweep launches it directly
(:func:`launch`) with explicit configs.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from ..heads import NO_HEADS
from ._common import INTERPRET, autotuned, config, epilogue, grouped_tile, out_columns, quantize_fp8, quantize_output, store_heads, store_tile

HAS_TMA: bool = hasattr(tl, "make_tensor_descriptor") and hasattr(triton, "set_allocator")


@triton.jit
def fp8_linear_tma_kernel(
    x_ptr, w_ptr, ws_ptr, bias_ptr, as_ptr, out_ptr, os_ptr,
    M, N, K,
    stride_xm, stride_om,
    X_FP8: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, OUT_FP8: tl.constexpr, OUT_COLS: tl.constexpr, INTERPRET: tl.constexpr,
    NUM_SMS: tl.constexpr, FLATTEN: tl.constexpr, WARP_SPEC: tl.constexpr,
    HEADS: tl.constexpr, N_RM: tl.constexpr, SEQ: tl.constexpr, SEQ_PAD: tl.constexpr, HEAD_D: tl.constexpr, HEAD_W: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    x_desc = tl.make_tensor_descriptor(x_ptr, shape=[M, K], strides=[stride_xm, 1], block_shape=[BLOCK_M, BLOCK_K])
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[N, K], strides=[K, 1], block_shape=[BLOCK_N, BLOCK_K])
    a_scale = tl.load(as_ptr)
    inv_scale = tl.math.div_rn(1.0, a_scale)  # IEEE (plain "/" is approximate on GPU)
    inv_out = tl.math.div_rn(1.0, tl.load(os_ptr))  # (os_ptr is as_ptr when not OUT_FP8; HEADS / OUT_COLS: per column)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    for tile in tl.range(tl.program_id(0), num_m * num_n, NUM_SMS, flatten=FLATTEN, warp_specialize=WARP_SPEC):
        pid_m, pid_n = grouped_tile(tile, num_m, num_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kt in range(0, k_tiles):
            a = x_desc.load([off_m, kt * BLOCK_K])
            b = w_desc.load([off_n, kt * BLOCK_K])
            if not X_FP8:
                a = quantize_fp8(a.to(tl.float32) * inv_scale, INTERPRET)  # zero padding quantizes to 0
            acc = tl.dot(a, b.T, acc)
        rm = off_m + tl.arange(0, BLOCK_M)
        rn = off_n + tl.arange(0, BLOCK_N)
        y = epilogue(acc, rn, N, ws_ptr, bias_ptr, a_scale, HAS_BIAS, True, ACT)
        if HEADS:  # fp8 attention heads, quantized per column with os_ptr[n] (lowering/heads.py)
            store_heads(y, rm, rn, M, N, out_ptr, os_ptr, N_RM, SEQ, SEQ_PAD, HEAD_D, HEAD_W, INTERPRET)
        else:
            if OUT_COLS:  # quantized per column (a q / k / v projection feeding attention)
                y = quantize_output(y, rn, N, os_ptr, OUT_COLS, INTERPRET)
            elif OUT_FP8:  # quantized for the next fp8 GEMM (its static scale, hoisted out of the tile loop)
                y = quantize_fp8(y * inv_out, INTERPRET)
            store_tile(y, rm, rn, M, N, out_ptr, stride_om, 1)


def tma_compatible(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether descriptors can address ``x`` (M, K) and ``w`` (N, K): 16-byte aligned bases and rows."""
    return (
        HAS_TMA
        and x.stride(-1) == 1 and w.is_contiguous()
        and x.data_ptr() % 16 == 0 and w.data_ptr() % 16 == 0
        and (x.stride(0) * x.element_size()) % 16 == 0 and (w.shape[1] * w.element_size()) % 16 == 0
    )


# Production use: the persistent kernel wins from these sizes up (H200 sweep: M = 2048-8192, N, K = 640-4608);
# at M = 240 / 8 and at 8192 x 320 x 320 the non-persistent kernel was as fast or faster.
TMA_MIN_M = 1024
TMA_MIN_NK = 512
# QDIFF_FP8_TMA=0 keeps every fp8 GEMM on the tiled kernel (A/B measurements; read once, at import).
TMA_ENABLED: bool = os.environ.get("QDIFF_FP8_TMA", "1") != "0"


def tma_eligible(M: int, N: int, K: int, row_stride: int, offset: int, *, has_tma: bool, capability: tuple[int, int] | None) -> bool:
    """The production dispatch rule for an fp8-input GEMM ``(M, K) x (N, K)^T`` (1-byte elements; ``row_stride`` /
    ``offset``: the input's row stride and storage offset in elements; ``capability``: the CUDA device's, None off CUDA)."""
    return (
        has_tma and capability is not None and capability >= (9, 0)
        and M >= TMA_MIN_M and N >= TMA_MIN_NK and K >= TMA_MIN_NK
        and K % 16 == 0 and row_stride % 16 == 0 and offset % 16 == 0  # 16-byte aligned descriptor rows and base
    )


@functools.lru_cache(maxsize=None)
def _capability(device: torch.device) -> tuple[int, int] | None:
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else None


def use_tma(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether the fp8 input ``x`` (M, K) with contiguous weight ``w`` (N, K) runs on the persistent TMA kernel.

    Shapes, strides and storage offsets only (no data pointers), so it traces under FakeTensors; the weight's
    storage offset must be aligned too. Never in the interpreter (no descriptors there in production)."""
    if not TMA_ENABLED or INTERPRET or x.dtype != torch.float8_e4m3fn or w.storage_offset() % 16:
        return False
    return tma_eligible(x.shape[0], w.shape[0], x.shape[1], x.stride(0), x.storage_offset(), has_tma=HAS_TMA,
                        capability=_capability(x.device))


def ensure_allocator() -> None:
    """Give Triton a scratch allocator for device-side descriptors (a no-op if one is set)."""
    from triton.runtime import _allocation

    current = getattr(_allocation, "_allocator", None)
    current = current.get() if hasattr(current, "get") else current
    if current is None or isinstance(current, getattr(_allocation, "NullAllocator", ())):
        triton.set_allocator(_torch_alloc)


def _torch_alloc(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


@functools.lru_cache(maxsize=None)
def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: a few programs, so each walks several tiles


# Autotune table of the production (fp8-input) kernel: (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps, GROUP_M),
# all with FLATTEN: the H200 sweep's winners at M >= 1024 (docs/gemm_tune_h200.json). Never a bf16-input config:
# 128x256x128 s3 w8 without FLATTEN returned non-finite output there (triton 3.6), and bf16 input is not routed here.
CONFIG_TABLE = [(128, 128, 128, 4, 4, 8), (128, 256, 128, 4, 8, 8), (128, 128, 128, 4, 8, 8), (128, 256, 64, 4, 8, 8)]


def _with_flatten(c: triton.Config) -> triton.Config:
    return triton.Config({**c.kwargs, "FLATTEN": True}, num_warps=c.num_warps, num_stages=c.num_stages)


def _autotuned_prod(configs: list[triton.Config]):
    return autotuned(fp8_linear_tma_kernel, configs, ["M", "N", "K", "ACT", "OUT_FP8", "HEADS"],
                     interpret_config=_with_flatten(config(16, 32, 32, 1, 4, 2)))


PROD_CONFIGS = [_with_flatten(config(*row)) for row in CONFIG_TABLE]
_prod = _autotuned_prod(PROD_CONFIGS)
# The heads epilogue (store_heads) on the configs whose output was exact on an H200 (triton 3.6): 128 x 128 x 128 tiles
# with 8 warps, FLATTEN on or off. Every other production config, 128 x 128 with 4 warps and the 128 x 256 tiles,
# lost V entries there (examples/heads_store_check.py, docs/kernels.md "fp8 heads from the projection"), though the
# interpreter is exact for all: a compiled layout conversion of the transposed byte tile, not the index arithmetic.
HEADS_CONFIGS = [_with_flatten(config(128, 128, 128, 4, 8, 8))]
_prod_heads = _autotuned_prod(HEADS_CONFIGS)


def launch_autotuned(x, w, w_scale, bias, a_scale, out, act: int, out_scale, wrap, layout: dict | None = None) -> torch.Tensor:
    """The production launch (autotuned over :data:`CONFIG_TABLE`; heads: :data:`HEADS_CONFIGS`) for fp8 ``x``; ``wrap``: ``wrap_triton`` inside a
    ``triton_op`` (Inductor inlines the kernel), the identity in eager. ``layout``: the heads constexprs
    (:data:`NO_HEADS`: ``out`` is (M, N); else ``out`` is the flat heads buffer of ``lowering/heads.py``)."""
    layout = NO_HEADS if layout is None else layout
    if x.device.type == "cuda":
        ensure_allocator()
    M, K = x.shape
    N = w.shape[0]
    sms = num_sms(x.device)

    def grid(meta):
        return (min(sms, triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"])),)

    wrap(_prod_heads if layout["HEADS"] else _prod)[grid](
        x, w, w_scale, bias if bias is not None else w_scale, a_scale, out, out_scale if out_scale is not None else a_scale,
        M, N, K, x.stride(0), N if layout["HEADS"] else out.stride(0),
        X_FP8=True, HAS_BIAS=bias is not None, ACT=act, OUT_FP8=out_scale is not None,
        OUT_COLS=out_columns(out_scale, layout["HEADS"]), INTERPRET=INTERPRET,
        NUM_SMS=sms, WARP_SPEC=False, **layout,
    )
    return out


def launch(x, w, w_scale, bias, a_scale, out, act: int, *, block_m: int, block_n: int, block_k: int, group_m: int,
           num_warps: int, num_stages: int, flatten: bool = False, warp_spec: bool = False, out_scale=None) -> torch.Tensor:
    """One launch with an explicit config (the autotuner is not involved); ``out`` (M, N) is written."""
    if not HAS_TMA:
        raise RuntimeError(f"this Triton ({triton.__version__}) has no tl.make_tensor_descriptor / triton.set_allocator")
    if not tma_compatible(x, w):
        raise ValueError("TMA descriptors need 16-byte aligned bases and row strides")
    if x.device.type == "cuda":
        ensure_allocator()
    M, K = x.shape
    N = w.shape[0]
    sms = num_sms(x.device)
    tiles = triton.cdiv(M, block_m) * triton.cdiv(N, block_n)
    fp8_linear_tma_kernel[(min(sms, tiles),)](
        x, w, w_scale, bias if bias is not None else w_scale, a_scale, out, out_scale if out_scale is not None else a_scale,
        M, N, K, x.stride(0), out.stride(0),
        X_FP8=x.dtype == torch.float8_e4m3fn, HAS_BIAS=bias is not None, ACT=act, OUT_FP8=out_scale is not None,
        OUT_COLS=out_columns(out_scale, False), INTERPRET=INTERPRET,
        NUM_SMS=sms, FLATTEN=flatten, WARP_SPEC=warp_spec, **NO_HEADS,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m, num_warps=num_warps, num_stages=num_stages,
    )
    return out

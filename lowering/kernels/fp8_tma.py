"""W8A8 FP8 GEMM, persistent schedule with TMA tensor descriptors (Hopper; Triton >= 3.4).

Same math as :mod:`.fp8_linear` (``y = act((q(x) @ W_q^T) * a_scale * w_scale[n] + bias)``), but
``NUM_SMS`` programs walk the output tiles (grouped, ``GROUP_M`` row tiles at a time) and load A
and B tiles through device-side tensor descriptors (``tl.make_tensor_descriptor``: TMA on sm_90,
zero padding out of bounds, so no masks and no wrapped indices). ``X_FP8``: the input is already
float8_e4m3fn (quantized by its producer); otherwise bf16/fp16/fp32 tiles are quantized in
registers after the TMA load. ``FLATTEN`` lets Triton's pipeliner flatten the tile and K loops
(the next tile's loads overlap this tile's epilogue); ``WARP_SPEC`` asks for warp specialization.

Descriptors need 16-byte aligned rows (``K * itemsize % 16 == 0``) and a global scratch allocator
(``triton.set_allocator``), set by :func:`ensure_allocator`. Which of this kernel and
:mod:`.fp8_linear` is faster per shape is decided by ``python -m qcompile.gemm_tune`` on the GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, grouped_tile, quantize_fp8, store_output

HAS_TMA: bool = hasattr(tl, "make_tensor_descriptor") and hasattr(triton, "set_allocator")


@triton.jit
def fp8_linear_tma_kernel(
    x_ptr, w_ptr, ws_ptr, bias_ptr, as_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_om,
    X_FP8: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, INTERPRET: tl.constexpr,
    NUM_SMS: tl.constexpr, FLATTEN: tl.constexpr, WARP_SPEC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    x_desc = tl.make_tensor_descriptor(x_ptr, shape=[M, K], strides=[stride_xm, 1], block_shape=[BLOCK_M, BLOCK_K])
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[N, K], strides=[K, 1], block_shape=[BLOCK_N, BLOCK_K])
    a_scale = tl.load(as_ptr)
    inv_scale = tl.math.div_rn(1.0, a_scale)  # IEEE (plain "/" is approximate on GPU)
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
        store_output(acc, rm, rn, M, N, out_ptr, stride_om, 1, ws_ptr, bias_ptr, a_scale, HAS_BIAS, True, ACT)


def ensure_allocator() -> None:
    """Give Triton a scratch allocator for device-side descriptors (a no-op if one is set)."""
    from triton.runtime import _allocation

    current = getattr(_allocation, "_allocator", None)
    current = current.get() if hasattr(current, "get") else current
    if current is None or isinstance(current, getattr(_allocation, "NullAllocator", ())):
        triton.set_allocator(_torch_alloc)


def _torch_alloc(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def tma_compatible(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether descriptors can address ``x`` (M, K) and ``w`` (N, K): 16-byte aligned bases and rows."""
    return (
        HAS_TMA
        and x.stride(-1) == 1 and w.is_contiguous()
        and x.data_ptr() % 16 == 0 and w.data_ptr() % 16 == 0
        and (x.stride(0) * x.element_size()) % 16 == 0 and (w.shape[1] * w.element_size()) % 16 == 0
    )


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: a few programs, so each walks several tiles


def launch(x, w, w_scale, bias, a_scale, out, act: int, *, block_m: int, block_n: int, block_k: int, group_m: int,
           num_warps: int, num_stages: int, flatten: bool = False, warp_spec: bool = False) -> torch.Tensor:
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
        x, w, w_scale, bias if bias is not None else w_scale, a_scale, out,
        M, N, K, x.stride(0), out.stride(0),
        X_FP8=x.dtype == torch.float8_e4m3fn, HAS_BIAS=bias is not None, ACT=act, INTERPRET=INTERPRET,
        NUM_SMS=sms, FLATTEN=flatten, WARP_SPEC=warp_spec,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m, num_warps=num_warps, num_stages=num_stages,
    )
    return out

"""Config sweep of the qdiff GEMM kernels at the shapes of the benchmark models (GPU; ``--smoke`` on CPU).

GPU command (H100, < 7 min; the repository installed with ``pip install --no-deps --target /tmp/site .``)::

    PYTHONPATH=/tmp/site python -m qcompile.gemm_tune --out $OUT/tune.json

Each kernel family is launched *directly* (the ``@triton.jit`` function with one explicit config;
no autotuner) over a broad, explicit config list per M regime, at DiT-XL/2 b8 512px, PixArt-alpha
1024px b2 and SD 1.5 512px b2 shapes, and timed with ``triton.testing.do_bench`` (median). Families:
``fp8`` (bf16 input, quantized in the prologue), ``fp8_prequant`` (fp8 input), ``fp8_tma`` /
``fp8_tma_prequant`` (persistent TMA kernel, Triton >= 3.4), ``int8`` (asymmetric, bf16 input),
``w4a16``, ``w4a16_splitk``, ``w4a16_dequant_mm`` (the dequantization kernel then ``torch.mm``) and
``w4a16_gemv`` (M <= 16 only), at M = 1, 16, 256 and 1024. Baselines: bf16 ``torch.mm`` (also under a CUDA graph),
``torch._scaled_mm`` tensorwise (default and fast accumulation), ``torch._int_mm``. Every config's output is checked
against the reference lowering (SQNR); configs that do not fit shared memory (estimate) or fail
to compile / launch are logged with the reason and skipped. Compilation runs first, in parallel
worker processes sharing Triton's disk cache (``Kernel.warmup``). For each family's best config the
sweep also times it under a CUDA graph (``do_bench_cudagraph``: pure GPU time, no launch overhead)
and times the production wrapper (autotuned op, as the lowering calls it) with the config its
autotuner chose: the gaps separate slow kernels from slow launches and bad autotuner choices.

Output: one JSON (every (kernel, shape, config, us, TFLOP/s, SQNR), the best config per (kernel,
shape), baselines, diagnostics, a markdown summary), rewritten after each step so a run cut short
still leaves data; the summary is printed. ``--budget-s`` bounds the timed part.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .lowering.heads import NO_HEADS

# (tag, M, K, N): DiT-XL/2 b8 512 px (PixArt-alpha 1024 px b2 has the same token count and widths)
W8A8_SHAPES = [
    ("dit qkv", 8192, 1152, 3456),
    ("dit attn-out / pixart q", 8192, 1152, 1152),
    ("dit fc1", 8192, 1152, 4608),
    ("dit fc2", 8192, 4608, 1152),
    ("dit adaLN", 8, 1152, 6912),
    ("pixart cross-attn kv", 240, 1152, 1152),
    ("sd15 geglu", 2048, 640, 5120),
    ("sd15 attn 320", 8192, 320, 320),
    ("sd15 ff 320", 8192, 320, 1280),
]
W4_MS = (1, 16, 256, 1024)  # GEMV-like, medium M, and DiT-XL/2 at 512px, batch 1: 1024 tokens (the medium tier's top)
SPLITK_ROWS = 16  # the split-K kernel takes all M <= 16 rows in one tile (larger M: row tiles of the config's BLOCK_M)
W4_KN = [(1152, 4608), (4608, 1152), (1152, 6912), (1152, 3456)]
W4_GROUP = 64
SMOKE_W8A8 = [("smoke", 32, 64, 48), ("smoke small", 8, 80, 32)]
SMOKE_W4_KN = [(128, 64)]
SMEM_LIMIT = 232448  # bytes of shared memory per block on H100 (227 KB)
SMALL_M = 256  # M at or below this uses the small-M config lists of the sweep
KERNEL_SMALL_M = 64  # the kernels' own boundary between their "small" and "large" autotune tables
SQNR_FLOOR_DB = 35.0


def cfg(bm: int, bn: int, bk: int, stages: int, warps: int, group_m: int = 8, **extra) -> dict:
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m, "num_stages": stages, "num_warps": warps, **extra}


def cfg_name(c: dict) -> str:
    s = f"{c.get('BLOCK_M', '-')}x{c['BLOCK_N']}x{c['BLOCK_K']} s{c['num_stages']} w{c['num_warps']} g{c.get('GROUP_M', '-')}"
    extras = [k.lower() if v is True else f"{k.lower()}={v}" for k, v in c.items()
              if k not in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_stages", "num_warps") and v is not False]
    return s + "".join(f" +{e}" for e in extras)


# --- explicit config lists (Hopper) ---------------------------------------------------------
W8A8_LARGE = [
    cfg(128, 256, 128, 3, 8), cfg(128, 256, 128, 4, 8), cfg(256, 128, 128, 3, 8), cfg(256, 128, 128, 4, 8),
    cfg(128, 128, 128, 3, 8), cfg(128, 128, 128, 4, 8), cfg(128, 128, 128, 4, 4), cfg(128, 128, 256, 3, 8),
    cfg(128, 256, 64, 4, 8), cfg(256, 128, 64, 4, 8), cfg(64, 256, 128, 4, 4), cfg(128, 64, 128, 4, 4),
    cfg(128, 256, 128, 3, 8, group_m=16), cfg(128, 128, 128, 4, 8, group_m=4),
]
W8A8_SMALL = [
    cfg(16, 64, 128, 4, 4), cfg(16, 128, 128, 4, 4), cfg(16, 32, 128, 4, 4), cfg(16, 64, 256, 3, 4), cfg(16, 128, 64, 5, 4),
    cfg(32, 64, 128, 4, 4), cfg(32, 128, 128, 4, 4), cfg(64, 64, 128, 4, 4), cfg(64, 128, 128, 4, 4), cfg(128, 64, 128, 4, 4),
    cfg(128, 128, 128, 3, 8),
]
TMA_LARGE = [
    cfg(128, 256, 128, 3, 8, FLATTEN=True), cfg(128, 256, 128, 4, 8, FLATTEN=True), cfg(256, 128, 128, 3, 8, FLATTEN=True),
    cfg(128, 128, 128, 4, 8, FLATTEN=True), cfg(128, 128, 128, 4, 4, FLATTEN=True), cfg(128, 256, 64, 4, 8, FLATTEN=True),
    cfg(128, 256, 128, 3, 8), cfg(128, 128, 128, 4, 8), cfg(128, 256, 128, 3, 8, WARP_SPEC=True),
    cfg(128, 128, 128, 4, 8, WARP_SPEC=True),
]
TMA_SMALL = [
    cfg(64, 64, 128, 4, 4, FLATTEN=True), cfg(64, 128, 128, 4, 4, FLATTEN=True), cfg(128, 64, 128, 4, 4, FLATTEN=True),
    cfg(128, 128, 128, 4, 8, FLATTEN=True), cfg(64, 128, 128, 4, 4),
]
W4_SMALL_M = [  # group 64: BLOCK_K must divide it
    cfg(16, 32, 64, 4, 4), cfg(16, 64, 64, 4, 4), cfg(16, 128, 64, 4, 4), cfg(16, 32, 32, 4, 4), cfg(16, 64, 32, 5, 4),
    cfg(16, 256, 64, 3, 8), cfg(32, 64, 64, 4, 4), cfg(16, 64, 64, 4, 4, SWAP_AB=True), cfg(16, 128, 64, 4, 4, SWAP_AB=True),
]
W4_MEDIUM_M = [  # 16 < M <= 1024, group 64: the production medium table and smaller / larger neighbours
    cfg(32, 64, 64, 4, 4), cfg(64, 64, 64, 4, 4), cfg(64, 128, 64, 4, 4), cfg(32, 128, 64, 4, 4), cfg(16, 64, 64, 4, 4),
    cfg(32, 32, 64, 4, 4), cfg(64, 64, 32, 5, 4), cfg(64, 64, 64, 3, 4), cfg(128, 64, 64, 4, 4), cfg(128, 128, 64, 4, 8),
    cfg(128, 64, 64, 3, 8), cfg(128, 128, 64, 3, 8),
    # SWAP_AB: out^T = W x^T, the dequantized weight as wgmma's register operand
    cfg(64, 128, 64, 4, 4, SWAP_AB=True), cfg(128, 128, 64, 3, 8, SWAP_AB=True), cfg(128, 64, 64, 4, 4, SWAP_AB=True),
    cfg(64, 64, 64, 4, 4, SWAP_AB=True), cfg(128, 128, 64, 4, 8, SWAP_AB=True), cfg(64, 128, 64, 3, 8, SWAP_AB=True),
]
W4_SPLITK = [  # (BLOCK_M is 16: all M <= 16 rows at once); CTAS_PER_SM sets the K split
    cfg(16, 64, 64, 3, 4, 1, CTAS_PER_SM=4), cfg(16, 64, 64, 3, 4, 1, CTAS_PER_SM=8), cfg(16, 32, 64, 3, 4, 1, CTAS_PER_SM=4),
    cfg(16, 128, 64, 3, 4, 1, CTAS_PER_SM=4), cfg(16, 64, 32, 4, 4, 1, CTAS_PER_SM=4), cfg(16, 128, 64, 3, 8, 1, CTAS_PER_SM=2),
    cfg(16, 64, 64, 3, 2, 1, CTAS_PER_SM=4),
]
W4_SPLITK_MEDIUM = [  # M = 256: row tiles of BLOCK_M (QDIFF_W4_SPLITK_MEDIUM's path)
    cfg(64, 64, 64, 3, 4, 1, CTAS_PER_SM=4), cfg(64, 128, 64, 3, 4, 1, CTAS_PER_SM=2), cfg(32, 64, 64, 3, 4, 1, CTAS_PER_SM=4),
    cfg(64, 64, 64, 3, 4, 1, CTAS_PER_SM=8), cfg(128, 64, 64, 3, 8, 1, CTAS_PER_SM=4),
]
SMOKE_SPLITK = [cfg(16, 32, 32, 1, 4, 1, CTAS_PER_SM=4)]
SMOKE_CONFIGS = [cfg(16, 32, 32, 1, 4, 2), cfg(32, 16, 64, 1, 4, 2), cfg(256, 256, 256, 4, 8)]  # the last: over the smem estimate
SMOKE_TMA = [cfg(16, 32, 32, 1, 4, 2, FLATTEN=True), cfg(32, 16, 64, 1, 4, 2)]


# --- kernel families --------------------------------------------------------------------------
@dataclass
class Family:
    """One kernel launched directly: its tensors come from a per-shape dict ``D`` (real tensors, or
    torch dtypes for ``warmup`` compilation); ``args`` / ``flags`` / ``grid`` build the launch."""

    name: str
    kernel: Callable[[], object]  # returns the @triton.jit function (imported lazily)
    args: Callable  # (D, M, K, N) -> positional args
    flags: Callable  # (M, K, N, config) -> constexpr kwargs (besides the config's)
    grid: Callable  # (M, N, config, sms) -> grid tuple
    a_bytes: int  # bytes per A element in shared memory
    b_bytes: float  # bytes per B element
    configs: Callable  # (M, smoke) -> config list
    out: str = "out"  # key of the output tensor in D
    reference: str = "ref_fp8"  # key of the reference output in D
    baseline: str = "bf16"  # baseline the summary compares with
    available: Callable[[], str | None] = lambda: None  # reason the family cannot run, or None
    needs_tma: bool = False
    launcher: Callable | None = None  # (D, M, K, N, config, sms) -> output, for multi-kernel families (not precompiled)


def _interp() -> bool:
    from .lowering.kernels._common import INTERPRET

    return INTERPRET


def _tile_grid(M, N, c, sms):
    import triton

    return (triton.cdiv(M, c["BLOCK_M"]) * triton.cdiv(N, c["BLOCK_N"]),)


def _persistent_grid(M, N, c, sms):
    import triton

    return (min(sms, triton.cdiv(M, c["BLOCK_M"]) * triton.cdiv(N, c["BLOCK_N"])),)


def _w8a8_configs(tma: bool):
    def pick(M, smoke):
        if smoke:
            return SMOKE_TMA if tma else SMOKE_CONFIGS
        lst = (TMA_SMALL if M <= SMALL_M else TMA_LARGE) if tma else (W8A8_SMALL if M <= SMALL_M else W8A8_LARGE)
        return [c for c in lst if M > 16 or c["BLOCK_M"] == 16 or tma]
    return pick


def _fp8_kernel():
    from .lowering.kernels.fp8_linear import fp8_linear_kernel

    return fp8_linear_kernel


def _fp8_family(name: str, x_key: str) -> Family:
    return Family(
        name=name, kernel=_fp8_kernel,
        args=lambda D, M, K, N: (D[x_key], D["w8"], D["ws8"], D["bias"], D["s8"], D["bias"], D["out"], D["s8"], M, N, K, K, 1, K, N, 1, 0, 0, 0),
        flags=lambda M, K, N, c: dict(X_FP8=x_key == "xq", HAS_BIAS=True, HAS_SMOOTH=False, ACT=0, OUT_FP8=False, OUT_COLS=False, EVEN_K=K % c["BLOCK_K"] == 0,
                                      NS=1, INTERPRET=_interp(), **NO_HEADS),
        grid=_tile_grid, a_bytes=1 if x_key == "xq" else 2, b_bytes=1, configs=_w8a8_configs(False), baseline="scaled_mm",
    )


def _tma_available() -> str | None:
    from .lowering.kernels.fp8_tma import HAS_TMA

    import triton

    return None if HAS_TMA else f"triton {triton.__version__} has no tl.make_tensor_descriptor"


def _tma_kernel():
    from .lowering.kernels.fp8_tma import fp8_linear_tma_kernel

    return fp8_linear_tma_kernel


def _tma_family(name: str, x_key: str) -> Family:
    return Family(
        name=name, kernel=_tma_kernel,
        args=lambda D, M, K, N: (D[x_key], D["w8"], D["ws8"], D["bias"], D["s8"], D["out"], D["s8"], M, N, K, K, N),
        flags=lambda M, K, N, c: dict(X_FP8=x_key == "xq", HAS_BIAS=True, ACT=0, OUT_FP8=False, OUT_COLS=False, INTERPRET=_interp(),
                                                FLATTEN=c.get("FLATTEN", False), WARP_SPEC=c.get("WARP_SPEC", False), **NO_HEADS),
        grid=_persistent_grid, a_bytes=1 if x_key == "xq" else 2, b_bytes=1, configs=_w8a8_configs(True), baseline="scaled_mm",
        available=_tma_available, needs_tma=True,
    )


def _int8_kernel():
    from .lowering.kernels.int8_linear import int8_linear_kernel

    return int8_linear_kernel


def _w4_kernel():
    from .lowering.kernels.w4_linear import weight_only_kernel

    return weight_only_kernel


def _w4_configs(M, smoke):
    if smoke:
        base = [c for c in SMOKE_CONFIGS if W4_GROUP % c["BLOCK_K"] == 0]
        base += [dict(base[0], SWAP_AB=True)]
    else:
        base = W4_SMALL_M if M <= SPLITK_ROWS else W4_MEDIUM_M
    return [{"SWAP_AB": False, **c} for c in base]

FAMILIES: dict[str, Family] = {
    "fp8_prequant": _fp8_family("fp8_prequant", "xq"),
    "fp8_tma_prequant": _tma_family("fp8_tma_prequant", "xq"),
    "fp8": _fp8_family("fp8", "x"),
    "fp8_tma": _tma_family("fp8_tma", "x"),
    "int8": Family(
        name="int8", kernel=_int8_kernel,
        args=lambda D, M, K, N: (D["x"], D["wi"], D["wsi"], D["colsum"], D["bias"], D["si"], D["zi"], D["bias"], D["out"],
                                 M, N, K, K, 1, K, N, 1, 0, 0, 0),
        flags=lambda M, K, N, c: dict(QMIN=-128, QMAX=127, ASYM=True, HAS_BIAS=True, HAS_SMOOTH=False, ACT=0,
                                      EVEN_K=K % c["BLOCK_K"] == 0, NS=1, INTERPRET=_interp()),
        grid=_tile_grid, a_bytes=2, b_bytes=1, configs=_w8a8_configs(False), reference="ref_int8", baseline="int_mm",
    ),
    "w4a16": Family(
        name="w4a16", kernel=_w4_kernel,
        args=lambda D, M, K, N: (D["x"], D["w4"], D["ws4"], D["bias"], D["out"], M, N, K, K, K, 1, K // 2, K // W4_GROUP, N, 1),
        flags=lambda M, K, N, c: dict(W_INT4=True, GROUP=64, HAS_BIAS=True, ACT=0, EVEN_K=K % c["BLOCK_K"] == 0, FP32_DOT=False,
                                      INTERPRET=_interp()),
        grid=_tile_grid, a_bytes=2, b_bytes=0.5, configs=_w4_configs, reference="ref_w4", baseline="bf16",
    ),
}
def _splitk_launch(D, M, K, N, c, sms):
    from .lowering.kernels.w4_linear import MEDIUM_M, _splitk, splitk_plan

    plan = splitk_plan(M, N, K, W4_GROUP, D["x"].device, {"block_m": c["BLOCK_M"], "block_n": c["BLOCK_N"], "block_k": c["BLOCK_K"],
                                                          "num_warps": c["num_warps"], "num_stages": c["num_stages"],
                                                          "ctas_per_sm": c["CTAS_PER_SM"]},
                      max_m=MEDIUM_M)  # (the sweep times split-K at every shape, whatever production picks)
    return _splitk(D["x"], D["w4"], D["ws4"], D["bias"], K, K, W4_GROUP, True, 0, plan, wrap=lambda k: k)


FAMILIES["w4a16_splitk"] = Family(
    name="w4a16_splitk", kernel=_w4_kernel, args=None, flags=None, grid=None, a_bytes=2, b_bytes=0.5,
    configs=lambda M, smoke: SMOKE_SPLITK if smoke else W4_SPLITK if M <= SPLITK_ROWS else W4_SPLITK_MEDIUM, reference="ref_w4",
    baseline="bf16", launcher=_splitk_launch,
)
def _dequant_mm_launch(D, M, K, N, c, sms):
    from .lowering.kernels.w4_linear import _dequantize

    x = D["x"]
    w, b = _dequantize(D["w4"], D["ws4"], D["bias"], K, W4_GROUP, True, x.dtype, wrap=lambda k: k,
                       cfg={"block_n": c["BLOCK_N"], "num_warps": c["num_warps"]})
    return torch.nn.functional.linear(x, w, b)


W4_DEQUANT = [cfg(1, bn, W4_GROUP, 1, w) for bn, w in ((64, 4), (128, 4), (128, 8), (256, 8), (32, 4))]  # (BLOCK_M unused)
# the dequantize-then-cuBLAS route (M >= w4_linear.DEQUANT_MM_MIN_M in production): dequantization tile x torch.mm
FAMILIES["w4a16_dequant_mm"] = Family(
    name="w4a16_dequant_mm", kernel=_w4_kernel, args=None, flags=None, grid=None, a_bytes=0, b_bytes=0,
    configs=lambda M, smoke: W4_DEQUANT[:2] if smoke else W4_DEQUANT, reference="ref_w4", baseline="bf16",
    launcher=_dequant_mm_launch,
)


def _gemv_kernel():
    from .lowering.kernels.w4_linear import weight_only_gemv_kernel

    return weight_only_gemv_kernel


def gemv_cfg(bn: int, bk: int, warps: int) -> dict:
    return {"BLOCK_N": bn, "BLOCK_K": bk, "num_stages": 1, "num_warps": warps}


W4_GEMV = [  # (BLOCK_N, BLOCK_K, warps): BLOCK_K / 2 contiguous bytes per row and tile
    gemv_cfg(*c) for c in ((4, 1024, 2), (2, 1024, 1), (4, 512, 1), (8, 512, 2), (8, 1024, 4), (16, 256, 2), (2, 2048, 2),
                           (4, 2048, 4), (1, 1024, 1), (2, 512, 1), (8, 256, 1), (16, 512, 4), (4, 1024, 4), (32, 128, 2))
]
# the GEMV kernel (M <= w4_linear.GEMV_MAX_M in production; swept up to SPLITK_ROWS): a program per BLOCK_N columns and row
FAMILIES["w4a16_gemv"] = Family(
    name="w4a16_gemv", kernel=_gemv_kernel,
    args=lambda D, M, K, N: (D["x"], D["w4"], D["ws4"], D["bias"], D["out"], N, K, K, K // 2, K, K // 2, K // W4_GROUP, N),
    flags=lambda M, K, N, c: dict(W_INT4=True, GROUP=W4_GROUP, HAS_BIAS=True, ACT=0),
    grid=lambda M, N, c, sms: (-(-N // c["BLOCK_N"]), M), a_bytes=0, b_bytes=0,
    configs=lambda M, smoke: [] if M > SPLITK_ROWS else [gemv_cfg(8, 64, 2)] if smoke else W4_GEMV,
    reference="ref_w4", baseline="bf16",
)
W8A8_FAMILIES = ["fp8_prequant", "fp8_tma_prequant", "fp8", "fp8_tma", "int8"]
W4_FAMILIES = ["w4a16", "w4a16_splitk", "w4a16_dequant_mm", "w4a16_gemv"]


def smem_estimate(fam: Family, c: dict) -> int:
    """Bytes of shared memory the pipelined A and B tiles need (the compiler's own figure may differ)."""
    per_stage = c.get("BLOCK_M", 0) * c["BLOCK_K"] * fam.a_bytes + c["BLOCK_N"] * c["BLOCK_K"] * fam.b_bytes
    return int(per_stage * max(c["num_stages"], 1))


def _split(c: dict):
    meta = {k: v for k, v in c.items() if k not in ("num_stages", "num_warps", "FLATTEN", "WARP_SPEC")}
    return meta, {"num_stages": c["num_stages"], "num_warps": c["num_warps"]}


def launch(fam: Family, D: dict, M: int, K: int, N: int, c: dict, sms: int) -> torch.Tensor:
    """One launch of ``fam`` with config ``c``; returns the output tensor."""
    if fam.launcher is not None:
        return fam.launcher(D, M, K, N, c, sms)
    meta, opts = _split(c)
    kernel = fam.kernel()
    kernel[fam.grid(M, N, c, sms)](*fam.args(D, M, K, N), **fam.flags(M, K, N, c), **(_sms_flag(fam, sms)), **meta, **opts)
    return D[fam.out]




def _sms_flag(fam: Family, sms: int) -> dict:
    return {"NUM_SMS": sms} if fam.needs_tma else {}


# --- data -------------------------------------------------------------------------------------
def _sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.double(), out.double()
    if not torch.isfinite(out).all():
        return -math.inf
    noise = (ref - out).pow(2).sum().item()
    return math.inf if noise == 0 else 10 * math.log10(ref.pow(2).sum().item() / noise)


def _quant(w: torch.Tensor, fmt: str, group):
    from .lowering.weights import quantize_weight

    qw = quantize_weight(w.float().cpu(), fmt, "linear", group, clip_search=False)
    qw.data, qw.scale = qw.data.to(w.device), qw.scale.to(w.device)
    return qw


def w8a8_data(M: int, K: int, N: int, device: str) -> dict:
    """Inputs, quantized weights and reference outputs (fp8 and int8) of one shape."""
    from .lowering import reference

    g = torch.Generator(device="cpu").manual_seed(M * 31 + K * 7 + N)
    x = torch.randn(M, K, generator=g).to(device=device, dtype=torch.bfloat16)
    w = (torch.randn(N, K, generator=g) * K**-0.5).to(device=device, dtype=torch.bfloat16)
    bias = (torch.randn(N, generator=g) * 0.1).to(device)
    D = {"x": x, "w": w, "bias": bias, "out": torch.empty(M, N, device=device, dtype=torch.bfloat16)}
    qw = _quant(w, "fp8_e4m3", None)
    s8 = (x.float().abs().amax() / 448).reshape(())
    zero = torch.zeros((), dtype=torch.int32, device=device)
    D.update(w8=qw.data, ws8=qw.scale.reshape(-1).contiguous(), s8=s8, xq=reference.quantize_activation(x.float(), s8, zero, "fp8_e4m3", True))
    D["ref_fp8"] = reference.qlinear(x.float(), qw.data, qw.scale, bias, s8, zero, wfmt="fp8_e4m3", group_size=None,
                                     weight_shape=qw.shape, afmt="fp8_e4m3")
    qi = _quant(w, "int8", None)
    lo, hi = x.float().min().item(), x.float().max().item()
    si = torch.tensor((hi - lo) / 255, device=device)
    zi = torch.tensor(round(-128 - lo / si.item()), dtype=torch.int32, device=device)
    D.update(wi=qi.data, wsi=qi.scale.reshape(-1).contiguous(), si=si, zi=zi, colsum=qi.data.sum(dim=1, dtype=torch.int32))
    D["ref_int8"] = reference.qlinear(x.float(), qi.data, qi.scale, bias, si, zi, wfmt="int8", group_size=None, weight_shape=qi.shape,
                                      afmt="int8", asym=True)
    return D


def w4_data(M: int, K: int, N: int, device: str) -> dict:
    from .lowering import reference

    g = torch.Generator(device="cpu").manual_seed(K * 13 + N + M)
    x = torch.randn(M, K, generator=g).to(device=device, dtype=torch.bfloat16)
    w = (torch.randn(N, K, generator=g) * K**-0.5).to(device=device, dtype=torch.bfloat16)
    bias = (torch.randn(N, generator=g) * 0.1).to(device)
    qw = _quant(w, "int4", W4_GROUP)
    D = {"x": x, "w": w, "bias": bias, "w4": qw.data, "ws4": qw.scale.contiguous(), "out": torch.empty(M, N, device=device, dtype=torch.bfloat16)}
    D["ref_w4"] = reference.qlinear(x.float(), qw.data, qw.scale, bias, None, None, wfmt="int4", group_size=W4_GROUP, weight_shape=qw.shape)
    return D


def dtype_dict(D: dict) -> dict:
    """``D`` with tensors replaced by their dtypes (what ``Kernel.warmup`` takes)."""
    return {k: (v.dtype if isinstance(v, torch.Tensor) else v) for k, v in D.items()}


# --- timing -----------------------------------------------------------------------------------
class Timer:
    """``do_bench`` (median ms) on CUDA; one wall-clock call in the interpreter (smoke runs)."""

    def __init__(self, cuda: bool, warmup: int, rep: int):
        self.cuda, self.warmup, self.rep = cuda, warmup, rep

    def __call__(self, fn) -> float:
        if not self.cuda:
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e3
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=self.warmup, rep=self.rep, return_mode="median"))

    def graph(self, fn) -> float | None:
        """Median ms of ``fn`` replayed in a CUDA graph (no launch overhead); None off CUDA."""
        if not self.cuda:
            return None
        from triton.testing import do_bench_cudagraph

        return float(do_bench_cudagraph(fn, rep=self.rep, return_mode="median"))


def tflops(M: int, K: int, N: int, ms: float | None) -> float | None:
    return None if not ms else 2 * M * K * N / (ms * 1e-3) / 1e12


# --- parallel compilation ---------------------------------------------------------------------
def _compile_task(task) -> tuple[str, str | None]:
    """Worker: compile one (family, shape, config) into Triton's disk cache with ``warmup``."""
    fam_name, M, K, N, c, dtypes, sms = task
    fam = FAMILIES[fam_name]
    meta, opts = _split(c)
    try:
        fam.kernel().warmup(*fam.args(dtypes, M, K, N), grid=fam.grid(M, N, c, sms), **fam.flags(M, K, N, c), **_sms_flag(fam, sms),
                            **meta, **opts)
        return fam_name, None
    except Exception as e:  # noqa: BLE001 - reported back per task; the timed pass retries and logs it
        return fam_name, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def _spec_key(fam: Family, M, K, N, c, dtypes, sms):
    ints = tuple((a == 1, a % 16 == 0) if isinstance(a, int) else str(a) for a in fam.args(dtypes, M, K, N))
    return (fam.name, tuple(sorted(c.items())), tuple(sorted(fam.flags(M, K, N, c).items())), ints, sms if fam.needs_tma else 0)


def precompile(tasks: list, workers: int, timeout_s: float, log) -> dict:
    """Compile ``tasks`` in ``workers`` spawned processes (deduplicated by specialization); returns stats."""
    import concurrent.futures as cf
    import multiprocessing as mp

    unique = {}
    for t in tasks:
        unique.setdefault(_spec_key(FAMILIES[t[0]], *t[1:]), t)
    todo = list(unique.values())
    stats = {"tasks": len(tasks), "unique": len(todo), "compiled": 0, "failed": 0, "timed_out": 0, "seconds": 0.0}
    if not todo or workers < 1:
        return stats
    t0 = time.time()
    log(f"precompiling {len(todo)} kernel variants in {workers} processes (timeout {timeout_s:.0f} s)")
    pool = cf.ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"))
    futures = [pool.submit(_compile_task, t) for t in todo]
    done, pending = cf.wait(futures, timeout=timeout_s)
    for f in done:
        err = f.exception() or f.result()[1]
        stats["failed" if err else "compiled"] += 1
    stats["timed_out"] = len(pending)
    pool.shutdown(wait=False, cancel_futures=True)
    stats["seconds"] = round(time.time() - t0, 1)
    log(f"precompile: {stats}")
    return stats


# --- the sweep --------------------------------------------------------------------------------
@dataclass
class Sweep:
    timer: Timer
    device: str
    sms: int
    deadline: float
    log: Callable[[str], None]
    rows: list = field(default_factory=list)
    baselines: list = field(default_factory=list)
    diagnostics: list = field(default_factory=list)

    def out_of_time(self) -> bool:
        return time.time() > self.deadline

    def baseline(self, tag: str, name: str, M, K, N, fn) -> float | None:
        try:
            ms = self.timer(fn)
            graph_ms = self.timer.graph(fn)  # (small GEMMs: do_bench's time is mostly the launch)
            err = None
        except RuntimeError as e:  # cuBLASLt shape constraints (_int_mm needs M > 16, ...)
            ms, graph_ms, err = None, None, str(e).splitlines()[0]
        self.baselines.append({"shape": tag, "M": M, "K": K, "N": N, "name": name, "us": None if ms is None else ms * 1e3,
                               "cudagraph_us": None if graph_ms is None else graph_ms * 1e3, "tflops": tflops(M, K, N, ms),
                               "error": err})
        return ms

    def family(self, fam: Family, tag: str, D: dict, M: int, K: int, N: int, smoke: bool) -> None:
        reason = fam.available()
        for c in fam.configs(M, smoke):
            row = {"kernel": fam.name, "shape": tag, "M": M, "K": K, "N": N, "config": c, "config_name": cfg_name(c),
                   "us": None, "tflops": None, "sqnr_db": None, "status": "ok", "reason": None}
            self.rows.append(row)
            smem = smem_estimate(fam, c)
            if reason:
                row.update(status="skipped", reason=reason)
            elif smem > SMEM_LIMIT:
                row.update(status="skipped", reason=f"shared memory estimate {smem // 1024} KB > {SMEM_LIMIT // 1024} KB")
            elif self.out_of_time():
                row.update(status="skipped", reason="time budget exhausted")
            else:
                self._run_config(fam, row, D, M, K, N, c)
            if row["status"] != "ok":
                self.log(f"    {fam.name} {cfg_name(c)}: {row['status']}: {row['reason']}")

    def _run_config(self, fam, row, D, M, K, N, c):
        D["out"].fill_(float("nan"))
        try:
            out = launch(fam, D, M, K, N, c, self.sms)
            if self.timer.cuda:
                torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001 - compile errors, out of resources: logged per config
            row.update(status="failed", reason=f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[-1][:300]}")
            return
        row["sqnr_db"] = _sqnr(D[fam.reference], out.float())
        if row["sqnr_db"] < SQNR_FLOOR_DB:
            row.update(status="wrong", reason=f"SQNR {row['sqnr_db']:.1f} dB < {SQNR_FLOOR_DB} dB against the reference")
            return
        ms = self.timer(lambda: launch(fam, D, M, K, N, c, self.sms))
        row.update(us=ms * 1e3, tflops=tflops(M, K, N, ms))

    def best(self) -> dict:
        best: dict = {}
        for r in self.rows:
            if r["status"] != "ok":
                continue
            cur = best.setdefault(r["kernel"], {}).get(r["shape"] + f" {r['M']}x{r['K']}x{r['N']}")
            if cur is None or r["us"] < cur["us"]:
                best[r["kernel"]][r["shape"] + f" {r['M']}x{r['K']}x{r['N']}"] = {
                    k: r[k] for k in ("M", "K", "N", "config", "config_name", "us", "tflops", "sqnr_db")}
        return best


def _wrapper_call(name: str, D: dict):
    """The production wrapper (autotuned triton_op, as the lowering calls it) of family ``name``, or None."""
    from .lowering.kernels import fp8_linear, fp8_linear_prequant, int8_linear, weight_only_linear

    if name == "fp8":
        return lambda: fp8_linear(D["x"], D["w8"], D["ws8"], D["bias"], D["s8"])
    if name == "fp8_prequant":
        return lambda: fp8_linear_prequant(D["xq"], D["w8"], D["ws8"], D["bias"], D["s8"], torch.bfloat16)
    if name == "int8":
        return lambda: int8_linear(D["x"], D["wi"], D["wsi"], D["bias"], D["si"], D["zi"], colsum=D["colsum"])
    if name in W4_FAMILIES:  # (the wrapper's own choice: the dequantize-then-cuBLAS route from M = 512, split-K for the
        # medium shapes medium_splits_k picks, the fused kernels otherwise)
        return lambda: weight_only_linear(D["x"], D["w4"], D["ws4"], D["bias"], wfmt="int4", group_size=W4_GROUP)
    return None


def _autotuner_choice(name: str, D: dict, M: int) -> str | None:
    """The config the production autotuner picked last for family ``name`` (None if not an autotuner)."""
    import importlib

    module = {"fp8": "fp8_linear", "fp8_prequant": "fp8_linear", "int8": "int8_linear"}.get(name)
    if module is None:
        return None
    mod = importlib.import_module(f"{__package__}.lowering.kernels.{module}")  # (the package re-exports same-named functions)
    tma = importlib.import_module(f"{__package__}.lowering.kernels.fp8_tma")
    if name == "fp8_prequant" and tma.use_tma(D["xq"], D["w8"]):
        at = tma._prod
    elif M <= mod.SMALL_M:
        at = mod._small
    else:
        at = mod._large_prequant if name == "fp8_prequant" else mod._large
    c = getattr(at, "best_config", None)
    if c is None:
        return None
    return cfg_name({**c.kwargs, "num_stages": c.num_stages, "num_warps": c.num_warps})


def diagnose(sw: Sweep, fam: Family, tag: str, D: dict, M, K, N, best: dict | None) -> None:
    """CUDA-graph time of the best config and the production wrapper's time (with its autotuner's choice)."""
    if best is None or sw.out_of_time():
        return
    d = {"kernel": fam.name, "shape": tag, "M": M, "K": K, "N": N, "best_config": best["config_name"], "best_us": best["us"]}
    try:
        g = sw.timer.graph(lambda: launch(fam, D, M, K, N, best["config"], sw.sms))
        d["best_cudagraph_us"] = None if g is None else g * 1e3
    except Exception as e:  # noqa: BLE001 - diagnostics only; recorded
        d["cudagraph_error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    call = _wrapper_call(fam.name, D)
    if call is not None:
        try:
            call()  # autotune (compiled configs come from the disk cache)
            d["wrapper_us"] = sw.timer(call) * 1e3
            d["wrapper_config"] = _autotuner_choice(fam.name, D, M)
            g = sw.timer.graph(call)
            d["wrapper_cudagraph_us"] = None if g is None else g * 1e3
        except Exception as e:  # noqa: BLE001 - diagnostics only; recorded
            d["wrapper_error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    sw.diagnostics.append(d)


def _f(v, d=0):
    return "n/a" if v is None else f"{v:.{d}f}"


def markdown(result: dict) -> str:
    """Summary tables: per shape the baselines and each family's best (TFLOP/s, ratio, config)."""
    base = {(b["shape"], b["M"], b["K"], b["N"], b["name"]): b for b in result["baselines"]}
    diag = {(d["kernel"], d["M"], d["K"], d["N"]): d for d in result["diagnostics"]}
    lines = [f"GEMM config sweep on {result['device']} (triton {result['triton']}, torch {result['torch']}); TFLOP/s, do_bench median.",
             "", "| shape | M x K x N | bf16 | _scaled_mm | fast-accum | _int_mm | kernel | best | vs | best config | cudagraph us | wrapper us (autotuner's config) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for tag, M, K, N in result["shapes"]:
        b = {n: base.get((tag, M, K, N, n)) for n in ("bf16", "scaled_mm", "scaled_mm_fast", "int_mm")}
        bt = {n: (v or {}).get("tflops") for n, v in b.items()}
        first = True
        for name in W8A8_FAMILIES + W4_FAMILIES:
            br = result["best"].get(name, {}).get(f"{tag} {M}x{K}x{N}")
            if br is None:
                continue
            fam = FAMILIES[name]
            ref = bt.get(fam.baseline) or bt.get("bf16")
            d = diag.get((name, M, K, N), {})
            wr = "n/a" if d.get("wrapper_us") is None else f"{d['wrapper_us']:.1f} ({d.get('wrapper_config')})"
            cols = [tag, f"{M} x {K} x {N}", _f(bt["bf16"]), _f(bt["scaled_mm"]), _f(bt["scaled_mm_fast"]), _f(bt["int_mm"])] if first else [""] * 6
            lines.append("| " + " | ".join(cols + [name, _f(br["tflops"]), "n/a" if not ref else f"{br['tflops'] / ref:.2f}x {fam.baseline if bt.get(fam.baseline) else 'bf16'}",
                                                 br["config_name"], _f(d.get("best_cudagraph_us"), 1), wr]) + " |")
            first = False
    w4 = [r for r in result["baselines"] if r["name"] == "bf16" and r["M"] in result["w4_ms"] and r["shape"].startswith("w4")]
    if w4:
        lines += ["", "W4A16 (int4, groups of 64) at small M, microseconds", "",
                  "| M x K x N | bf16 | " + " | ".join(W4_FAMILIES) + " | best config |", "| --- | --- | " + " --- |" * (len(W4_FAMILIES) + 1)]
        for b in w4:
            key = f"{b['shape']} {b['M']}x{b['K']}x{b['N']}"
            bests = [result["best"].get(n, {}).get(key) for n in W4_FAMILIES]
            top = min((x for x in bests if x), key=lambda x: x["us"], default=None)
            lines.append(f"| {b['M']} x {b['K']} x {b['N']} | {_f(b['us'], 1)} | " + " | ".join(_f(x and x["us"], 1) for x in bests)
                         + f" | {top['config_name'] if top else 'n/a'} |")
    failed = [r for r in result["rows"] if r["status"] in ("failed", "wrong")]
    if failed:
        lines += ["", f"{len(failed)} configs failed or were wrong (reasons in the JSON rows); first few:"]
        lines += [f"- {r['kernel']} {r['M']}x{r['K']}x{r['N']} {r['config_name']}: {r['reason']}" for r in failed[:8]]
    return "\n".join(lines)


def tables(result: dict, limit: int = 6) -> str:
    """Python autotune tables (``CONFIG_TABLE`` rows) from a sweep's best configs: per family and M regime, the
    distinct winners, most frequent first, at most ``limit`` (paste into the kernel files). A config that gave a
    wrong result (status ``wrong``) at any shape of its family is left out everywhere; extra constexprs
    (``FLATTEN``, ``WARP_SPEC``, ...) follow the six numbers as a dict."""
    wrong = {(r["kernel"], cfg_name(r["config"])) for r in result.get("rows", []) if r.get("status") == "wrong"}
    lines = []
    from .lowering.kernels.w4_linear import m_tier

    for fam, per_shape in result["best"].items():
        regimes = ([(t, lambda m, t=t: m_tier(m) == t) for t in ("small", "medium", "large")] if fam in W4_FAMILIES
                   else [("small", lambda m: m <= KERNEL_SMALL_M), ("large", lambda m: m > KERNEL_SMALL_M)])
        for regime, pick in regimes:
            count: dict = {}
            for b in per_shape.values():
                c = b["config"]
                if pick(b["M"]) and (fam, cfg_name(c)) not in wrong:
                    row = (c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"], c["num_stages"], c["num_warps"], c["GROUP_M"])
                    extra = {k: v for k, v in c.items() if k not in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_stages", "num_warps")
                             and v is not False}
                    if extra:
                        row = row + (extra,)
                    key = repr(row)
                    count[key] = (count[key][0] + 1, row) if key in count else (1, row)
            if count:
                rows = [row for _, row in sorted(count.values(), key=lambda e: -e[0])][:limit]
                lines.append(f"# {fam} ({regime} M): {', '.join(f'{r} x{count[repr(r)][0]}' for r in rows)}")
                lines.append(f"{fam}_{regime} = {rows}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m qcompile.gemm_tune", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output directory (writes DIR/gemm_tune.json), or a path ending in .json")
    p.add_argument("--smoke", action="store_true", help="tiny shapes and configs in Triton's interpreter on CPU (tests)")
    p.add_argument("--budget-s", type=float, default=400.0, help="stop timing new configs after this many seconds")
    p.add_argument("--warmup", type=int, default=5, help="do_bench warmup (ms)")
    p.add_argument("--rep", type=int, default=20, help="do_bench repetitions (ms)")
    p.add_argument("--families", default=None, help="comma-separated subset of " + ",".join(FAMILIES))
    p.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1), help="parallel compile processes (0: none)")
    p.add_argument("--precompile-timeout", type=float, default=150.0)
    p.add_argument("--no-diagnostics", action="store_true", help="skip the CUDA-graph and production-wrapper timings")
    p.add_argument("--w4-ms", default=None, help="comma-separated M values of the weight-only shapes (default: "
                   + ",".join(map(str, W4_MS)) + ")")
    p.add_argument("--tables", action="store_true", help="print autotune tables from the JSON at --out (no sweep)")
    args = p.parse_args(argv)
    if args.tables:
        path = args.out if args.out.endswith(".json") else os.path.join(args.out, "gemm_tune.json")
        with open(path) as f:
            print(tables(json.load(f)))
        return 0

    t0 = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t0:6.1f}s] {msg}", flush=True)

    if args.smoke and not torch.cuda.is_available() and not _interp():
        env = dict(os.environ, TRITON_INTERPRET="1")  # the interpreter must be on before triton is imported
        return subprocess.call([sys.executable, "-m", "qcompile.gemm_tune", *(argv if argv is not None else sys.argv[1:])], env=env)
    cuda = torch.cuda.is_available() and not _interp()
    if not cuda and not args.smoke:
        print("gemm_tune needs a CUDA GPU (or --smoke on CPU)", file=sys.stderr)
        return 2
    import triton

    device = "cuda" if cuda else "cpu"
    names = list(FAMILIES) if args.families is None else args.families.split(",")
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        p.error(f"unknown families {unknown}; choose from {', '.join(FAMILIES)}")
    out_path = args.out if args.out.endswith(".json") else os.path.join(args.out, "gemm_tune.json")
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    w8a8_shapes = SMOKE_W8A8 if args.smoke else W8A8_SHAPES
    w4_ms = W4_MS if args.w4_ms is None else tuple(int(m) for m in args.w4_ms.split(","))
    w4_shapes = [(f"w4 M={m}", m, k, n) for k, n in (SMOKE_W4_KN if args.smoke else W4_KN) for m in w4_ms]
    sms = torch.cuda.get_device_properties(0).multi_processor_count if cuda else 4
    if cuda:
        from .lowering.kernels.fp8_tma import HAS_TMA, ensure_allocator

        if HAS_TMA:
            ensure_allocator()
    sw = Sweep(Timer(cuda, args.warmup, args.rep), device, sms, t0 + args.budget_s, log)
    result = {"device": torch.cuda.get_device_name() if cuda else "cpu (Triton interpreter)", "torch": torch.__version__,
              "triton": triton.__version__, "shapes": [list(s) for s in w8a8_shapes + w4_shapes], "w4_ms": list(w4_ms),
              "config": vars(args), "precompile": None, "rows": sw.rows, "baselines": sw.baselines, "diagnostics": sw.diagnostics}

    def save():
        result["best"] = sw.best()
        result["seconds"] = round(time.time() - t0, 1)
        result["markdown"] = markdown(result)
        with open(out_path, "w") as f:
            json.dump(result, f, indent=1, default=str)

    log(f"device {result['device']}, triton {triton.__version__}, {sms} SMs; families {names}; budget {args.budget_s:.0f} s")
    w8 = [n for n in names if n in W8A8_FAMILIES]
    w4 = [n for n in names if n in W4_FAMILIES]
    if cuda and args.workers > 0:  # compile everything first, in parallel, into Triton's disk cache
        tasks = []
        for fams, shapes, make in ((w8, w8a8_shapes, w8a8_dtypes), (w4, w4_shapes, w4_dtypes)):
            for tag, M, K, N in shapes:
                dt = make(M, K, N)
                for n in fams:
                    fam = FAMILIES[n]
                    if fam.available() is None and fam.launcher is None:
                        tasks += [(n, M, K, N, c, dt, sms) for c in fam.configs(M, False) if smem_estimate(fam, c) <= SMEM_LIMIT]
        result["precompile"] = precompile(tasks, args.workers, args.precompile_timeout, log)
        save()

    for fams, shapes, make in ((w8, w8a8_shapes, w8a8_data), (w4, w4_shapes, w4_data)):
        if not fams:  # (no family of this group asked for: its baselines neither)
            continue
        for tag, M, K, N in shapes:
            D = make(M, K, N, device)
            log(f"{tag} {M}x{K}x{N}")
            sw.baseline(tag, "bf16", M, K, N, lambda: torch.mm(D["x"], D["w"].t()))
            if "w8" in D:
                one = torch.ones((), device=device)
                wt = D["w8"].t()
                if cuda:
                    sw.baseline(tag, "scaled_mm", M, K, N, lambda: torch._scaled_mm(D["xq"], wt, D["s8"], one, out_dtype=torch.bfloat16))
                    sw.baseline(tag, "scaled_mm_fast", M, K, N,
                                lambda: torch._scaled_mm(D["xq"], wt, D["s8"], one, out_dtype=torch.bfloat16, use_fast_accum=True))
                    xi = torch.randint(-128, 127, (M, K), dtype=torch.int8, device=device)
                    sw.baseline(tag, "int_mm", M, K, N, lambda: torch._int_mm(xi, D["wi"].t()))
            for n in fams:
                sw.family(FAMILIES[n], tag, D, M, K, N, args.smoke)
                b = sw.best().get(n, {}).get(f"{tag} {M}x{K}x{N}")
                summary = "none" if b is None else f"{b['tflops']:.0f} TFLOP/s {b['us']:.1f} us {b['config_name']}"
                log(f"  {n}: best {summary}")
                if not args.no_diagnostics:
                    diagnose(sw, FAMILIES[n], tag, D, M, K, N, b)
            save()
            del D
    save()
    print(result["markdown"], flush=True)
    log(f"wrote {out_path}")
    return 0


def w8a8_dtypes(M, K, N) -> dict:
    return {"x": torch.bfloat16, "xq": torch.float8_e4m3fn, "w8": torch.float8_e4m3fn, "ws8": torch.float32, "s8": torch.float32,
            "bias": torch.float32, "out": torch.bfloat16, "wi": torch.int8, "wsi": torch.float32, "colsum": torch.int32,
            "si": torch.float32, "zi": torch.int32}


def w4_dtypes(M, K, N) -> dict:
    return {"x": torch.bfloat16, "w4": torch.uint8, "ws4": torch.float32, "bias": torch.float32, "out": torch.bfloat16}


if __name__ == "__main__":
    sys.exit(main())

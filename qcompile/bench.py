"""``qdiff bench``: step latency, compile time, calibration time and memory, side by side.

One run measures every (model, variant) row on one device with the same inputs: bf16 eager,
bf16 Inductor, torchao int8 / fp8 dynamic quantization (+ Inductor) and each qdiff preset. Each
row runs in its own subprocess with a fresh Inductor cache and a time limit, so one slow compile
cannot eat the whole run and compile times are cold. Rows go to ``benchmarks.json`` and a
markdown table; the ratio column is ``bf16 Inductor ms / row ms`` (above 1: faster).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import queue
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from .metrics import output_tensor, sqnr_db

Inputs = dict[str, Any]


@dataclass(frozen=True)
class BenchModel:
    """A denoiser to benchmark: how to build it (random init or bundled weights) and its inputs."""

    name: str
    description: str
    build: Callable[[], torch.nn.Module]  # float32 model on the current default device
    inputs: Callable[[torch.device, torch.dtype, int], Inputs]  # (device, dtype, timestep) -> kwargs
    variants: tuple[str, ...] | None = None  # only these variants (None: every one asked for)


def _timesteps(batch: int, t: int, device: torch.device) -> torch.Tensor:
    return torch.full((batch,), t, dtype=torch.long, device=device)


def _dit_xl_2() -> torch.nn.Module:
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(sample_size=64, out_channels=8)  # DiT-XL/2 at 512px: 64x64 latents


def _dit_inputs(batch: int, size: int, channels: int, classes: int) -> Callable[[torch.device, torch.dtype, int], Inputs]:
    def make(device: torch.device, dtype: torch.dtype, t: int) -> Inputs:
        g = torch.Generator(device="cpu").manual_seed(t)
        return {
            "hidden_states": torch.randn(batch, channels, size, size, generator=g).to(device, dtype),
            "timestep": _timesteps(batch, t, device),
            "class_labels": torch.randint(0, classes, (batch,), generator=g).to(device),
        }

    return make


def _sd15_unet() -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=64,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768,
        attention_head_dim=8,
        layers_per_block=2,
    )


def _sd15_inputs(device: torch.device, dtype: torch.dtype, t: int) -> Inputs:
    g = torch.Generator(device="cpu").manual_seed(t)
    return {
        "sample": torch.randn(2, 4, 64, 64, generator=g).to(device, dtype),
        "timestep": _timesteps(2, t, device),
        "encoder_hidden_states": torch.randn(2, 77, 768, generator=g).to(device, dtype),
    }


def _pixart_1024() -> torch.nn.Module:
    from diffusers import PixArtTransformer2DModel

    return PixArtTransformer2DModel(sample_size=128, caption_channels=4096, use_additional_conditions=True)


def _pixart_inputs(device: torch.device, dtype: torch.dtype, t: int) -> Inputs:
    g = torch.Generator(device="cpu").manual_seed(t)
    batch = 2  # classifier-free guidance
    return {
        "hidden_states": torch.randn(batch, 4, 128, 128, generator=g).to(device, dtype),
        "encoder_hidden_states": torch.randn(batch, 120, 4096, generator=g).to(device, dtype),
        "timestep": _timesteps(batch, t, device),
        "added_cond_kwargs": {
            "resolution": torch.tensor([[1024.0, 1024.0]] * batch, device=device, dtype=dtype),
            "aspect_ratio": torch.tensor([[1.0]] * batch, device=device, dtype=dtype),
        },
    }


def _bundled_unet() -> torch.nn.Module:
    from .zoo.bundled import bundled_dir, load_unet

    return load_unet(bundled_dir("cifar10_ddpm"))


def _bundled_unet_inputs(device: torch.device, dtype: torch.dtype, t: int) -> Inputs:
    g = torch.Generator(device="cpu").manual_seed(t)
    return {"sample": torch.randn(64, 3, 32, 32, generator=g).to(device, dtype), "timestep": _timesteps(64, t, device)}


def _bundled_dit() -> torch.nn.Module:
    from .zoo.bundled import load_cifar10_dit

    return load_cifar10_dit()


MODELS: dict[str, BenchModel] = {
    m.name: m
    for m in [
        BenchModel("dit-xl-2-512", "DiT-XL/2, 512px (64x64 latent), batch 8, random init", _dit_xl_2, _dit_inputs(8, 64, 4, 1000)),
        BenchModel(
            "dit-xl-2-512-b1", "DiT-XL/2, 512px, batch 1 (the weight-only small-batch case), random init", _dit_xl_2, _dit_inputs(1, 64, 4, 1000),
            variants=("bf16-eager", "bf16-inductor", "qdiff-w4a16", "qdiff-w8a8-fp8", "bf16-inductor-cudagraphs",
                      "qdiff-w4a16-cudagraphs", "qdiff-w4a16-splitk-cudagraphs", "qdiff-w4a16-splitk-medium-cudagraphs"),
        ),
        BenchModel("sd15-unet-512", "SD 1.5 UNet, 512px, batch 2, 77-token context, random init", _sd15_unet, _sd15_inputs),
        BenchModel("pixart-alpha-1024", "PixArt-alpha XL/2 transformer, 1024px, batch 2 (CFG), 120 tokens, random init", _pixart_1024, _pixart_inputs),
        BenchModel("bundled-cifar10-ddpm", "bundled CIFAR-10 UNet2DModel, batch 64", _bundled_unet, _bundled_unet_inputs),
        BenchModel("bundled-cifar10-dit", "bundled CIFAR-10 DiT, batch 64", _bundled_dit, _dit_inputs(64, 32, 3, 10)),
    ]
}

BASE_VARIANTS = ("bf16-eager", "bf16-inductor", "torchao-int8-dynamic", "torchao-fp8-dynamic")
QDIFF_PRESETS = ("w8a8-int8", "w8a8-fp8", "w4a8", "w4a16")
CUDAGRAPHS = "-cudagraphs"  # suffix: the same variant compiled with mode="reduce-overhead" (CUDA graphs, no per-launch host work)
# suffix (before -cudagraphs): ops whose fp8 kernel is slower than bf16 at their shape kept in bf16 (qcompile.latency)
LATENCY_GUARD = "-guard"
# suffix (before -cudagraphs): the row's process runs fp8 convs on the direct engine (QDIFF_CONV_ENGINE=direct)
CONV_DIRECT = "-direct"
# suffix (before -cudagraphs): the row's process quantizes the inputs of fp8 GEMMs after extern kernels in the GEMM's
# prologue at every width (QDIFF_FP8_PASS_MIN_N=off: the placement before 2026-12-02), the A/B of passes/act_quant's rule
EXTERN_PROLOGUE = "-extern-prologue"
# suffixes (before -cudagraphs): Inductor's multi-kernel reductions on / off in the row (QDIFF_MULTI_KERNEL, read by the
# qdiff backend and by bf16 Inductor rows; default off, Inductor's own default), the A/B of that patch
MULTI_KERNEL = "-multikernel"
SINGLE_KERNEL = "-single-kernel"
# suffixes (before -cudagraphs): fp8 attention's q / k / v written as fp8 heads by their projection's GEMM
# (QDIFF_ATTN_HEADS=1: passes/attention_heads.py, off by default) or quantized by a separate pass (=0), its A/B
HEADS = "-heads"
SEPARATE_HEADS = "-separate-heads"
# suffixes (before -cudagraphs): quantized attention writes fp8 for the output projection (QDIFF_ATTN_FP8_OUT=1, the
# default since 2026-12-03) or its float output is quantized by a separate pass (=0), its A/B
ATTN_FP8_OUT = "-fp8-out"
ATTN_FLOAT_OUT = "-float-out"
# suffixes (before -cudagraphs): block boundaries (residual add + LayerNorm + modulate + quantize) as one kernel
# (QDIFF_NORM_QUANT=1: passes/norm_quant.py, the default since 2026-12-03) or as Inductor's kernels (=0), its A/B
NORM_QUANT = "-normq"
NO_NORM_QUANT = "-no-normq"
# suffixes (before -cudagraphs): fp8 attention's q / k / v projections write plain fp8 output, one scale per column
# (QDIFF_ATTN_FP8_QKV=1: passes/attention_heads.write_fp8_projections, the default since 2026-12-03) or float output
# that the attention call quantizes (=0), its A/B
FP8_QKV = "-fp8-qkv"
FLOAT_QKV = "-float-qkv"
# suffix (before -cudagraphs): Inductor's coordinate-descent tuning of its generated kernels (QDIFF_COORDINATE_DESCENT=1)
COORDINATE_DESCENT = "-cdtune"
# suffixes (before -cudagraphs): weight-only GEMMs at M <= 16 take the split-K path (QDIFF_W4_SPLITK=1, off by default), or
# every M up to the medium tier's 1024 does (QDIFF_W4_SPLITK_MEDIUM=1; by default only the shapes w4_linear.medium_splits_k picks)
W4_SPLITK = "-splitk"
W4_SPLITK_MEDIUM = "-splitk-medium"
# suffixes (before -cudagraphs): weight-only GEMMs of M >= 512 rows dequantize the weight and call cuBLAS
# (QDIFF_W4_DEQUANT_MM=1, the default), or take the fused kernels (=0)
W4_DEQUANT_MM = "-dequant-mm"
W4_NO_DEQUANT_MM = "-no-dequant-mm"
# suffix (before -cudagraphs): weight-only GEMMs of M <= 4 rows take the tensor-core kernel instead of the GEMV kernel
# (QDIFF_W4_GEMV=0; the GEMV kernel is the default)
W4_NO_GEMV = "-no-gemv"
# suffixes (before -cudagraphs): fp8 attention's softmax mode (QDIFF_ATTN_SOFTMAX, lowering/kernels/fp8_attention.softmax_mode:
# P by ex2, the row sum from V's ones column, P's codes built on the FMA pipe, or half and half), its A/B
SOFTMAX_SUFFIXES = {f"-softmax-{mode}": ("QDIFF_ATTN_SOFTMAX", mode) for mode in ("ex2", "ex2-lv", "bits", "half")}
# suffix (before -cudagraphs): the attention lowering's V copy carries the kernel's ones row (QDIFF_ATTN_V_ONES=1, off by
# default until timed: lowering/triton_lowering.v_ones_enabled)
V_ONES = "-v-ones"
# the environment each row-process suffix sets (row_environment); measure() strips them
ROW_ENV_SUFFIXES = {CONV_DIRECT: ("QDIFF_CONV_ENGINE", "direct"), EXTERN_PROLOGUE: ("QDIFF_FP8_PASS_MIN_N", "off"),
                    MULTI_KERNEL: ("QDIFF_MULTI_KERNEL", "1"), SINGLE_KERNEL: ("QDIFF_MULTI_KERNEL", "0"),
                    HEADS: ("QDIFF_ATTN_HEADS", "1"), SEPARATE_HEADS: ("QDIFF_ATTN_HEADS", "0"), ATTN_FP8_OUT: ("QDIFF_ATTN_FP8_OUT", "1"),
                    ATTN_FLOAT_OUT: ("QDIFF_ATTN_FP8_OUT", "0"), COORDINATE_DESCENT: ("QDIFF_COORDINATE_DESCENT", "1"),
                    NORM_QUANT: ("QDIFF_NORM_QUANT", "1"), NO_NORM_QUANT: ("QDIFF_NORM_QUANT", "0"), FP8_QKV: ("QDIFF_ATTN_FP8_QKV", "1"),
                    FLOAT_QKV: ("QDIFF_ATTN_FP8_QKV", "0"), W4_SPLITK: ("QDIFF_W4_SPLITK", "1"),
                    W4_SPLITK_MEDIUM: ("QDIFF_W4_SPLITK_MEDIUM", "1"), W4_DEQUANT_MM: ("QDIFF_W4_DEQUANT_MM", "1"),
                    W4_NO_DEQUANT_MM: ("QDIFF_W4_DEQUANT_MM", "0"), W4_NO_GEMV: ("QDIFF_W4_GEMV", "0"), V_ONES: ("QDIFF_ATTN_V_ONES", "1"),
                    **SOFTMAX_SUFFIXES}
VARIANTS = (BASE_VARIANTS + tuple(f"qdiff-{p}" for p in QDIFF_PRESETS)
            + tuple(v + CUDAGRAPHS for v in ("bf16-inductor", "torchao-fp8-dynamic", "qdiff-w8a8-fp8", "qdiff-w4a16"))
            + tuple("qdiff-w4a16" + s + c for s in (W4_SPLITK, W4_SPLITK_MEDIUM, W4_DEQUANT_MM, W4_NO_DEQUANT_MM, W4_NO_GEMV)
                    for c in ("", CUDAGRAPHS))
            + ("qdiff-w8a8-fp8" + LATENCY_GUARD, "qdiff-w8a8-fp8" + LATENCY_GUARD + CUDAGRAPHS)
            + ("qdiff-w8a8-fp8-attn", "qdiff-w8a8-fp8-attn" + CUDAGRAPHS)  # fp8 attention (qdiff::fp8_attention) on top of w8a8-fp8
            + ("qdiff-w8a8-fp8" + CONV_DIRECT, "qdiff-w8a8-fp8" + CONV_DIRECT + CUDAGRAPHS)
            + ("qdiff-w8a8-fp8" + EXTERN_PROLOGUE, "qdiff-w8a8-fp8" + EXTERN_PROLOGUE + CUDAGRAPHS)
            + ("bf16-inductor" + MULTI_KERNEL, "bf16-inductor" + MULTI_KERNEL + CUDAGRAPHS)
            + tuple(v + COORDINATE_DESCENT + c for v in ("bf16-inductor", "qdiff-w8a8-fp8-attn-heads-fp8-out") for c in ("", CUDAGRAPHS))
            + tuple(f"qdiff-w8a8-fp8-attn{s}{NORM_QUANT}{c}" for s in ("", ATTN_FP8_OUT, HEADS + ATTN_FP8_OUT) for c in ("", CUDAGRAPHS))
            + ("qdiff-w8a8-fp8-attn" + SINGLE_KERNEL, "qdiff-w8a8-fp8-attn" + SINGLE_KERNEL + CUDAGRAPHS)
            + tuple(f"qdiff-w8a8-fp8-attn{s}{c}" for s in (ATTN_FLOAT_OUT + NO_NORM_QUANT, NO_NORM_QUANT, FP8_QKV, FLOAT_QKV)
                    for c in ("", CUDAGRAPHS))
            + tuple(f"qdiff-w8a8-fp8-attn{s}{c}" for s in (HEADS, SEPARATE_HEADS, ATTN_FP8_OUT, HEADS + ATTN_FP8_OUT)
                    for c in ("", CUDAGRAPHS))
            + tuple(f"qdiff-w8a8-fp8-attn{s}{c}" for s in (*SOFTMAX_SUFFIXES, V_ONES) for c in ("", CUDAGRAPHS)))
CALIBRATION_TIMESTEPS = (999, 750, 500, 250, 1)  # a synthetic trajectory for random-init models
TORCHAO_INDUCTOR_CONFIG = "Inductor defaults (set_inductor_config=False: no coordinate-descent tuning, as in every other row)"
TORCHAO_MIN_M = 16  # torchao's int8 kernel (torch._int_mm) rejects M <= 16
TORCHAO_DIM_MULTIPLE = 16  # and K, N must be multiples of 8 (int8) / 16 (fp8 _scaled_mm): the bundled DiT's 12-wide output


@dataclass
class Row:
    """One measured (model, variant)."""

    model: str
    variant: str
    status: str = "ok"  # ok | error | timeout
    ms: float | None = None
    ratio_vs_bf16_inductor: float | None = None
    compile_s: float | None = None
    calibration_s: float | None = None
    peak_mem_gb: float | None = None
    weight_gb: float | None = None
    repeats: int | None = None
    quantized_ops: str | None = None
    error: str | None = None
    device: str = ""
    date: str = ""
    torch: str = torch.__version__
    triton: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# -- measuring one row (runs in a subprocess) ---------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _call(model: Any, inputs: Inputs) -> Any:
    return model(**inputs)


def torchao_linears(model: torch.nn.Module, m_of: dict[str, int]) -> set[str]:
    """The linears torchao's dynamic int8 / fp8 kernels accept: more than 16 rows, K and N multiples of 16."""
    mods = dict(model.named_modules())
    return {
        name
        for name, m in m_of.items()
        if m > TORCHAO_MIN_M and mods[name].in_features % TORCHAO_DIM_MULTIPLE == 0 and mods[name].out_features % TORCHAO_DIM_MULTIPLE == 0
    }


def _linear_m(model: torch.nn.Module, inputs: Inputs) -> dict[str, int]:
    """Rows (M) each nn.Linear sees in one call, found with forward hooks."""
    m: dict[str, int] = {}
    hooks = [
        mod.register_forward_hook(lambda mod, args, out, name=name: m.__setitem__(name, args[0].numel() // args[0].shape[-1]))
        for name, mod in model.named_modules()
        if isinstance(mod, torch.nn.Linear)
    ]
    with torch.no_grad():
        _call(model, inputs)
    for h in hooks:
        h.remove()
    return m


def _tensor_bytes(t: torch.Tensor) -> int:
    """Storage bytes of a tensor, following tensor subclasses (torchao) to their inner tensors."""
    if type(t) not in (torch.Tensor, torch.nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def _module_weight_bytes(model: torch.nn.Module) -> int:
    return sum(_tensor_bytes(p) for p in model.parameters()) + sum(_tensor_bytes(b) for b in model.buffers())


def _qdiff_weight_bytes(model: torch.nn.Module, plan: Any) -> int:
    """Quantized storage of the plan's ops and int8 tables plus every other parameter in the run dtype."""
    quantized = {n.weight_name for n in plan.quantized_nodes()} | set(plan.tables)
    params = dict(model.named_parameters())
    rest = sum(_tensor_bytes(p) for name, p in params.items() if name not in quantized)
    return rest + sum(n.weight.nbytes for n in plan.quantized_nodes()) + sum(w.nbytes for w in plan.tables.values())


def _time_ms(fn: Callable[[], Any], device: torch.device, budget_s: float) -> tuple[float, int]:
    """Median latency (ms) of ``fn`` and the number of repeats: CUDA via triton.testing.do_bench."""
    if device.type == "cuda":
        import triton.testing

        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        one = max(time.perf_counter() - t0, 1e-4)
        rep_ms = min(max(50 * one * 1e3, 500.0), budget_s * 1e3)
        ms = triton.testing.do_bench(fn, warmup=min(100.0, rep_ms / 4), rep=rep_ms, return_mode="median")
        return float(ms), max(1, int(rep_ms / max(ms, 1e-3)))
    times = []
    deadline = time.perf_counter() + budget_s
    while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), len(times)


FIRST_CALL_ALONE_S = 120.0  # how long a compiled graph's first call may hold the host alone (see _exclusive_first_run)


def _exclusive_first_run(compiled: Callable[..., Any], rows_dir: str | None, first_calls_s: list[float] | None = None,
                         alone_s: float = FIRST_CALL_ALONE_S) -> Callable[..., Any]:
    """``compiled`` whose first run holds the host alone (:func:`_alone_on_host`) for at most ``alone_s`` seconds:
    the run in which Inductor and our kernels autotune and cuDNN's benchmark mode picks its algorithms, so that other
    rows' compiles and calibration kernels do not skew those picks. Later runs go straight through. Each first run's
    duration goes to ``first_calls_s``.

    The bound: on torch 2.11 a torchao row's first run compiled its Triton kernels one by one in the row's process
    (minutes, 2026-12-02), and holding the host that long stopped every other row past its time limit. Past the
    bound the run goes on beside the others (and pauses while another row times)."""
    pending = [True]

    def run(*args: Any) -> Any:
        if not pending:
            return compiled(*args)
        t0 = time.perf_counter()
        with _alone_on_host(rows_dir, max_s=alone_s):
            out = compiled(*args)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
        pending.clear()
        if first_calls_s is not None:
            first_calls_s.append(round(time.perf_counter() - t0, 1))
        return out

    return run


def _compile(model: torch.nn.Module, backend: str, mode: str | None, rows_dir: str | None, options: dict | None = None,
             first_calls_s: list[float] | None = None) -> Any:
    """``torch.compile(model, backend=..., mode=..., options=...)`` (``backend``: ``"inductor"`` or ``"qdiff"``); in a
    multi-row run (``rows_dir``) the backend's compiled graphs run their first call alone on the host
    (:func:`_exclusive_first_run`, durations to ``first_calls_s``) while compiling still overlaps with other rows."""
    if backend == "inductor":
        from torch._inductor import list_mode_options
        from torch._inductor.compile_fx import compile_fx

        from .backend import inductor_patches_from_env

        switched = inductor_patches_from_env()
        patches = {**(list_mode_options(mode) if mode else {}), **switched}
        if rows_dir is None:  # (torch.compile takes a mode or options, not both)
            return torch.compile(model, backend="inductor", options=patches) if switched else torch.compile(model, backend="inductor", mode=mode)
        inner = lambda gm, example_inputs: compile_fx(gm, example_inputs, config_patches=patches)  # noqa: E731
    elif rows_dir is None:
        return torch.compile(model, backend=backend, options=options)
    elif backend == "qdiff":
        from .backend import qdiff_backend

        inner = lambda gm, example_inputs: qdiff_backend(gm, example_inputs, options=options)  # noqa: E731
    else:
        raise ValueError(f"unknown backend {backend!r}")
    return torch.compile(model, backend=lambda gm, example_inputs: _exclusive_first_run(inner(gm, example_inputs), rows_dir, first_calls_s))


PLANS_ENV = "QDIFF_BENCH_PLANS"  # ``--plans DIR``: calibrated plans kept across runs (and device calls)


def _plan_folder(rows_dir: str | None) -> Path | None:
    """Where rows keep calibrated plans: ``--plans DIR`` (reused by later runs) or the run's own folder, or None."""
    if folder := os.environ.get(PLANS_ENV):
        return Path(folder)
    return Path(rows_dir) / "plans" if rows_dir else None


def _shared_plan(rows_dir: str | None, key: str, calibrate_here: Callable[[], Any]) -> tuple[Any, str]:
    """The row's plan and where it came from. Rows of one model and preset share one calibration: in a multi-row run
    (``rows_dir``) or with ``--plans DIR`` the first row to get there calibrates and saves the plan (under a file lock),
    the others wait for it and load it (validated: :meth:`QuantPlan.load`). Every row builds its model with the same
    seed, so the shared plan is the one it would calibrate; kernel switches (row suffixes) act after calibration. A plan
    kept in ``--plans`` is reused as long as its file is there: delete it after changing calibration itself."""
    folder = _plan_folder(rows_dir)
    if folder is None:
        return calibrate_here(), "calibrated in this row"
    import fcntl

    from .plan import QuantPlan

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{key}.qplan"
    with open(folder / f"{key}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists():
            return QuantPlan.load(path), f"loaded from {path.name} in {folder}, calibrated by an earlier row"
        plan = calibrate_here()
        plan.save(path)
        return plan, f"calibrated in this row, saved as {path.name} in {folder} for later rows"


def _prepare_variant(variant: str, model: torch.nn.Module, spec: BenchModel, device: torch.device, dtype: torch.dtype, row: Row,
                     rows_dir: str | None = None) -> Any:
    """The callable model of one variant (quantized and/or compiled, not yet run). ``rows_dir``: the run's row
    folder (rows side by side): GPU timings taken while preparing, and each compiled graph's first run, then hold the
    host alone."""
    mode = "reduce-overhead" if variant.endswith(CUDAGRAPHS) else None
    variant, _ = _split_row_suffixes(variant.removesuffix(CUDAGRAPHS))  # (the row's environment carries them: row_environment)
    if variant == "bf16-eager":
        return model
    if variant == "bf16-inductor":
        return _compile(model, "inductor", mode, rows_dir, first_calls_s=row.extra.setdefault("first_calls_s", []))
    if variant.startswith("torchao-"):
        from torchao.quantization import (  # torchao is optional: only these rows need it
            Float8DynamicActivationFloat8WeightConfig,
            Int8DynamicActivationInt8WeightConfig,
            PerRow,
            quantize_,
        )

        m_of = _linear_m(model, spec.inputs(device, dtype, 500))
        keep = torchao_linears(model, m_of)
        row.quantized_ops = f"{len(keep)}/{len(m_of)} linears (M > {TORCHAO_MIN_M}, K and N multiples of {TORCHAO_DIM_MULTIPLE})"
        # set_inductor_config=False: every row compiles with Inductor's defaults. torchao's default turns on Inductor's
        # coordinate-descent tuning process-wide, which tunes each generated kernel at its first run, compiling
        # variants one by one in the row's process (2026-12-02: minutes on the bundled UNet, past every time limit).
        cfg = (Int8DynamicActivationInt8WeightConfig(set_inductor_config=False) if "int8" in variant
               else Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False))
        row.extra["torchao_inductor_config"] = TORCHAO_INDUCTOR_CONFIG
        t0 = time.perf_counter()
        quantize_(model, cfg, filter_fn=lambda mod, fqn: isinstance(mod, torch.nn.Linear) and fqn in keep)
        row.calibration_s = time.perf_counter() - t0  # quantize_ time (no calibration)
        return _compile(model, "inductor", mode, rows_dir, first_calls_s=row.extra.setdefault("first_calls_s", []))
    if variant.startswith("qdiff-"):
        from .calibrate import calibrate
        from .config import QuantConfig

        guard = variant.endswith(LATENCY_GUARD)
        cfg = QuantConfig.preset(variant.removeprefix("qdiff-").removesuffix(LATENCY_GUARD))

        def run(stand_in: Any) -> None:
            for t in CALIBRATION_TIMESTEPS:
                stand_in(**spec.inputs(device, dtype, t))

        t0 = time.perf_counter()
        plan, row.extra["plan"] = _shared_plan(rows_dir, f"{spec.name}-{cfg.name}", lambda: calibrate(
            model, run, cfg, progress=False, expected_calls=len(CALIBRATION_TIMESTEPS)))
        _sync(device)
        row.calibration_s = time.perf_counter() - t0
        if guard:  # time each fp8 op against bf16 at its shape; keep the slower ones in bf16
            from .latency import keep_slower_in_float, time_fp8_ops

            t0 = time.perf_counter()
            with _alone_on_host(rows_dir):  # per-op GPU timings: not beside other rows' work
                timings = time_fp8_ops(plan, device)
            kept = keep_slower_in_float(plan, timings)
            row.extra["latency_guard"] = {"timed": len(timings), "kept_in_bf16": kept, "seconds": round(time.perf_counter() - t0, 1)}
        row.quantized_ops = f"{len(plan.quantized_nodes())}/{len(plan.nodes)} ops"
        row.extra["qdiff_weight_bytes"] = _qdiff_weight_bytes(model, plan)
        row.extra["qdiff_plan"] = plan  # (replaced by its kernel counts once compiled: measure)
        torch._dynamo.reset()
        # the float weights of the quantized ops are freed once compiled: peak memory holds the quantized storage only
        options = {"plan": plan, "release_float_weights": True, **({"mode": mode} if mode else {})}
        return _compile(model, "qdiff", mode, rows_dir, options, first_calls_s=row.extra.setdefault("first_calls_s", []))
    check_variant(variant)  # (an unknown name: its ValueError)
    raise RuntimeError(f"variant {variant!r} passes check_variant but has no preparation here")


def check_variant(variant: str) -> None:
    """Raise ``ValueError`` unless ``variant`` names a row :func:`_prepare_variant` can build: a base variant or
    ``qdiff-`` plus a preset (``-guard`` optional), then any row-process suffixes and ``-cudagraphs``."""
    from .config import QuantConfig

    base, _ = _split_row_suffixes(variant.removesuffix(CUDAGRAPHS))
    if base in BASE_VARIANTS:
        return
    if base.startswith("qdiff-") and base.removeprefix("qdiff-").removesuffix(LATENCY_GUARD) in QuantConfig.PRESETS:
        return
    raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")


def measure(model_name: str, variant: str, device: str = "cuda", budget_s: float = 20.0) -> Row:
    """Build, prepare, compile and time one row (in this process, whose environment must hold the variant's
    kernel switches: :func:`row_environment`, set by the row's subprocess)."""
    if model_name not in MODELS:  # checked before the model is built (minutes for DiT-XL/2 on a CPU)
        raise ValueError(f"unknown model {model_name!r}; choose from {', '.join(MODELS)}")
    check_variant(variant)
    switches = row_environment(variant)
    unset = {k: v for k, v in switches.items() if os.environ.get(k) != v}
    if unset:
        raise RuntimeError(f"variant {variant!r} needs {', '.join(f'{k}={v}' for k, v in unset.items())} in its process environment "
                           "(qdiff bench sets it for the row's subprocess)")
    spec = MODELS[model_name]
    dev = torch.device(device)
    dtype = torch.bfloat16
    row = Row(model_name, variant, device=_device_name(dev), date=datetime.date.today().isoformat(), triton=_triton_version())
    if dev.type == "cuda":  # every row's cuDNN convolutions at their best (algorithms benchmarked, not picked by heuristics)
        torch.backends.cudnn.benchmark = True
        row.extra["cudnn_benchmark"] = True
    if switches:
        row.extra["kernel_switches"] = switches
    torch.manual_seed(0)
    with torch.device(dev):
        model = spec.build()
    model = model.to(dev, dtype).eval()
    rows_dir = os.environ.get(ROWS_ENV)
    # build, calibrate, compile: alongside other rows (paused while one of them times or runs a first call)
    with torch.no_grad():
        inputs = spec.inputs(dev, dtype, 500)
        eager = None if variant == "bf16-eager" else output_tensor(_call(model, inputs))  # before quantizing / releasing
        runnable = _prepare_variant(variant, model, spec, dev, dtype, row, rows_dir)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        timers = _compile_timers()
        seen = {k: len(v) for k, v in timers.items()}  # (calibration's own Dynamo work is not the compile's)
        _sync(dev)
        t0 = time.perf_counter()
        out = _call(runnable, inputs)
        _sync(dev)
        first = time.perf_counter() - t0
        if eager is not None:  # (read now: a CUDA-graph replay overwrites the output)
            row.compile_s = first
            row.extra["sqnr_vs_bf16_eager_db"] = round(sqnr_db(eager, output_tensor(out)), 2)
            first_call = {k: sum(v[seen.get(k, 0):]) for k, v in timers.items()}
            row.extra["torch_compile_phases_s"] = {k: round(s, 1) for k, s in first_call.items() if s >= MIN_PHASE_S}
        plan = row.extra.pop("qdiff_plan", None)
        if plan is not None:
            row.extra["qdiff_kernels"] = qdiff_kernel_counts(plan)
            row.extra["act_quant"] = dict(sum((Counter(r.act_quant) for r in plan.compiled), Counter()))
            row.extra["attention_heads"] = sum(r.attention_heads for r in plan.compiled)  # projections writing fp8 heads
            row.extra["norm_quant"] = sum(r.norm_quant for r in plan.compiled)  # block boundaries in one kernel
            row.extra["released_float_gb"] = sum(sum(r.released.values()) for r in plan.compiled) / 2**30
            row.extra["compile_phases_s"] = compile_phases(plan.compiled, first, row.extra.get("first_calls_s") or None)
        row.extra["resident_weight_gb"] = _resident_weight_bytes(model, plan) / 2**30
        if dev.type == "cuda":  # the peak of the first call (compile included); the row's peak is the timed steps'
            row.extra["first_call_peak_mem_gb"] = torch.cuda.max_memory_allocated(dev) / 2**30
            torch.cuda.reset_peak_memory_stats(dev)
    with torch.no_grad(), _alone_on_host(rows_dir) as paused:  # timed repeats: nothing else runs on the host
        row.ms, row.repeats = _time_ms(lambda: _call(runnable, inputs), dev, budget_s)
    row.extra["rows_paused_while_timing"] = paused
    if dev.type == "cuda":
        row.peak_mem_gb = torch.cuda.max_memory_allocated(dev) / 2**30
    row.weight_gb = row.extra.pop("qdiff_weight_bytes", None) or _module_weight_bytes(model)
    row.weight_gb /= 2**30
    return row


MIN_PHASE_S = 0.1  # torch's compile timers below this are left out of a row


def _compile_timers() -> dict[str, list[float]]:
    """torch's per-function compile timers (``torch._dynamo.utils.compilation_time_metrics``: Dynamo, AOTAutograd and
    Inductor phases such as ``GraphLowering.run``, ``Scheduler.codegen``, ``async_compile.wait`` (waiting for kernel
    compiles); nested, and work in compile threads sums over the threads, so read them as a profile, not a sum). A
    private torch table: a new dict where it is missing."""
    from torch._dynamo import utils as dynamo_utils

    return getattr(dynamo_utils, "compilation_time_metrics", {})


def compile_phases(compiled: Sequence[Any], total_s: float, first_calls_s: Sequence[float] | None = None) -> dict[str, float]:
    """Where a qdiff row's compile went, summed over its compiled graphs (:attr:`.backend.QuantizedGraph.compile_s`):
    qdiff's passes, Inductor's ``compile_fx``, the graphs' first runs (kernel autotuning; known in multi-row runs,
    ``first_calls_s``) and the rest of ``total_s`` (Dynamo's tracing, guards, waiting for other rows), in seconds."""
    phases = dict(sum((Counter(r.compile_s) for r in compiled), Counter()))
    if first_calls_s is not None:
        phases["first_runs"] = float(sum(first_calls_s))
    phases["dynamo_and_rest"] = total_s - sum(phases.values())
    return {k: round(v, 1) for k, v in phases.items()}


def _resident_weight_bytes(model: torch.nn.Module, plan: Any = None) -> int:
    """Bytes the weights actually hold now: the module's parameter and buffer storages (released ones hold 0) plus
    the buffers of the plan's compiled graphs (quantized weights, scales), each storage counted once."""
    tensors = [*model.parameters(), *model.buffers()]
    for record in getattr(plan, "compiled", []):
        tensors += list(record.converted.buffers())
    seen: dict[int, int] = {}
    for t in tensors:
        if type(t) in (torch.Tensor, torch.nn.Parameter):
            storage = t.untyped_storage()
            seen[storage.data_ptr() or id(t)] = storage.nbytes()
        else:
            seen[id(t)] = _tensor_bytes(t)
    return sum(seen.values())


def qdiff_kernel_counts(plan: Any) -> dict[str, int]:
    """What Inductor's post-grad graphs of ``plan`` launch, summed over its compiled graphs: our Triton kernels by
    name (``module.kernel``: inlined as user-defined Triton kernels) or ``qdiff::op`` (an op call left in the
    graph, i.e. a Python launch per call)."""
    total: dict[str, int] = {}
    for record in getattr(plan, "compiled", []):
        for name, n in (getattr(record.kernel_pass, "kernels", None) or {}).items():
            total[name] = total.get(name, 0) + n
    return total


ROWS_ENV = "QDIFF_BENCH_ROWS"  # folder where the rows of one run register (rows compile side by side, time alone)


@contextlib.contextmanager
def _registered(rows_dir: str | None) -> Iterator[None]:
    """Register this row process (the leader of its own process group) in ``rows_dir`` while it runs."""
    if not rows_dir:
        yield
        return
    me = Path(rows_dir) / str(os.getpid())
    me.write_text("")
    try:
        yield
    finally:
        me.unlink(missing_ok=True)


def _row_groups(rows_dir: str) -> list[int]:
    return [int(p.name) for p in Path(rows_dir).iterdir() if p.name.isdigit()]


def _signal_groups(groups: list[int], sig: int) -> None:
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError):  # that row has just finished
            os.killpg(pgid, sig)


_HOST_HELD: list[str] = []  # non-empty while this process holds the host (flock is not re-entrant across opens)


@contextlib.contextmanager
def _alone_on_host(rows_dir: str | None, max_s: float | None = None) -> Iterator[int]:
    """Run the timed repeats alone on the host: take the run's timing lock (one row times at a time), stop every
    other registered row's process group (its compile, Inductor's compile workers, calibration kernels) with
    SIGSTOP, and continue them afterwards, or after ``max_s`` seconds if that comes first (the block then goes on
    beside the others). Yields how many rows were paused.

    (Timing one row at a time was not enough: other rows' compiles saturate the CPU and a launch-bound model then
    measures several times slower; and a reader/writer lock that waits for the compiles to end can wait for minutes
    when some row is always compiling.)"""
    if not rows_dir or _HOST_HELD:  # (re-entered: a graph compiled while timing runs its first call; the lock is ours)
        yield 0
        return
    import fcntl
    import signal

    with open(Path(rows_dir) / ".timing", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        others = [g for g in _row_groups(rows_dir) if g != os.getpid()]
        _signal_groups(others, signal.SIGSTOP)
        _HOST_HELD.append(rows_dir)
        released = threading.Lock()

        def release() -> None:  # once: at the end of the block or when max_s runs out, whichever comes first
            if not released.acquire(blocking=False):
                return
            _HOST_HELD.remove(rows_dir)
            _signal_groups(others, signal.SIGCONT)
            fcntl.flock(f, fcntl.LOCK_UN)

        timer = None
        if max_s is not None:
            timer = threading.Timer(max_s, release)
            timer.daemon = True
            timer.start()
        try:
            time.sleep(0.2)  # let kernels the others queued drain from the GPU
            yield len(others)
        finally:
            if timer is not None:
                timer.cancel()
                timer.join()  # (a release under way finishes before the lock file closes)
            release()


def _resume_if_nobody_times(rows_dir: str) -> None:
    """Continue every row if no row holds the timing lock (a row killed while timing leaves the others stopped)."""
    import fcntl
    import signal

    with open(Path(rows_dir) / ".timing", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return  # a live row is timing: it continues everyone when done
        try:
            _signal_groups(_row_groups(rows_dir), signal.SIGCONT)
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} threads)"


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


# -- orchestrating rows in subprocesses --------------------------------------------------------


def row_environment(variant: str) -> dict[str, str]:
    """Kernel switches a variant sets in its row's process (:data:`ROW_ENV_SUFFIXES`, stacked: ``-direct``:
    ``QDIFF_CONV_ENGINE=direct``; ``-extern-prologue``: ``QDIFF_FP8_PASS_MIN_N=off``; ``-heads-fp8-out``: both attention
    epilogues); the Inductor pass's uuid
    includes the conv engine, and the act-quant placement changes the graph itself, so cached kernels of another
    setting are not reused."""
    return _split_row_suffixes(variant.removesuffix(CUDAGRAPHS))[1]


_SUFFIXES_LONGEST_FIRST = sorted(ROW_ENV_SUFFIXES, key=len, reverse=True)


def _split_row_suffixes(variant: str) -> tuple[str, dict[str, str]]:
    """``variant`` without its trailing row-process suffixes (they stack: ``-heads-fp8-out``) and their environment. The
    longest suffix that fits is taken first (``-separate-heads`` is not ``-heads``, ``-no-normq`` not ``-normq``)."""
    env: dict[str, str] = {}
    while suffix := next((s for s in _SUFFIXES_LONGEST_FIRST if variant.endswith(s)), None):
        name, value = ROW_ENV_SUFFIXES[suffix]
        env.setdefault(name, value)  # (the last suffix wins, as it did when only one was allowed)
        variant = variant.removesuffix(suffix)
    return variant, env


COMPILE_THREADS_ENV = "TORCHINDUCTOR_COMPILE_THREADS"  # Inductor's compile worker processes per row


def compile_threads_per_row(rows_at_once: int, cpus: int | None = None) -> int:
    """Inductor compile workers for each of ``rows_at_once`` rows compiling side by side: the host's CPUs shared out
    (at least 2). Inductor's own default is one worker per CPU in every process, so six rows on 16 cores started 96
    workers (~1 GB each): the host ran out of memory and killed rows mid-compile (2026-12-02)."""
    cpus = cpus or os.cpu_count() or 1
    return max(2, cpus // max(1, rows_at_once))


def _row_failure(returncode: int, stderr: str, stdout: str) -> str:
    """Why a row's process failed, for the table: a signal's name (SIGKILL without a time limit: most likely the
    host's out-of-memory killer), else the last exception of its output (not the warnings printed after it)."""
    import signal

    if returncode < 0:
        name = signal.Signals(-returncode).name
        hint = " (not our time limit: most likely the host's out-of-memory killer)" if name == "SIGKILL" else ""
        return f"killed by {name}{hint}"
    lines = (stderr or stdout).strip().splitlines()
    start = max((i for i, line in enumerate(lines) if line.startswith("Traceback")), default=len(lines) - 6)
    tail = [line for line in lines[start:] if line.strip()]
    return " | ".join(tail[:1] + tail[-3:] if len(tail) > 4 else tail)[-600:]


def _run_row_subprocess(model: str, variant: str, device: str, gpu: int | None, timeout_s: float, budget_s: float, rows_dir: str | None = None,
                        compile_threads: int | None = None) -> Row:
    """One row in its own process group (so a time limit kills its compile workers too, and a timing row can pause
    it: :func:`_alone_on_host`), with a fresh Inductor and Triton cache and ``compile_threads`` Inductor compile
    workers (unless the caller's environment sets them)."""
    import signal

    with tempfile.TemporaryDirectory(prefix="qdiff-bench-") as tmp:
        out = Path(tmp) / "row.json"
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(Path(tmp) / "inductor"), TRITON_CACHE_DIR=str(Path(tmp) / "triton"))
        if compile_threads is not None:
            env.setdefault(COMPILE_THREADS_ENV, str(compile_threads))
        env.update(row_environment(variant))
        if rows_dir:
            env[ROWS_ENV] = rows_dir
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(gpu)
        cmd = [sys.executable, "-m", "qcompile.bench", "--row", model, variant, "--device", device, "--budget-s", str(budget_s), "--row-out", str(out)]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            stdout, stderr = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _signal_groups([proc.pid], signal.SIGKILL)
            proc.communicate()
            return Row(model, variant, status="timeout", error=f"row time limit of {timeout_s:g} s exceeded")
        finally:
            if rows_dir:
                (Path(rows_dir) / str(proc.pid)).unlink(missing_ok=True)
                _resume_if_nobody_times(rows_dir)
        if out.exists():  # (a row that raised wrote its error here: _row_main)
            return Row(**json.loads(out.read_text()))
        return Row(model, variant, status="error", error=_row_failure(proc.returncode, stderr, stdout))


def run_bench(
    models: list[str],
    variants: list[str],
    device: str,
    gpus: int,
    timeout_s: float,
    budget_s: float,
    total_s: float | None = None,
    on_row: Callable[[list[Row]], None] | None = None,
    progress: bool = True,
    jobs_per_gpu: int = 1,
    pairs: list[tuple[str, str]] | None = None,
) -> list[Row]:
    """Measure every (model, variant), each row in its own subprocess; rows are spread over ``gpus`` GPUs of one host.
    ``pairs``, when given, are the rows to run instead of ``models`` x ``variants``, in their order.

    A row's time limit is cut to what is left of ``total_s``; a row with less than a minute left is
    reported as ``skipped``. Models with a ``variants`` list get only those rows. ``on_row`` gets the rows so far after each one (to save partial results).
    ``jobs_per_gpu`` rows share a GPU at once: their builds, calibrations and compiles overlap, and each
    row's timed repeats run alone on the host, the other rows paused (:func:`_alone_on_host`); compile times are
    then measured under load.
    """
    deadline = None if total_s is None else time.monotonic() + total_s
    slots = [g for g in range(max(1, gpus)) for _ in range(max(1, jobs_per_gpu))]

    rows_dir = None if len(slots) == 1 else tempfile.mkdtemp(prefix="qdiff-bench-rows-")
    work: queue.Queue[tuple[str, str]] = queue.Queue()
    if pairs is None:
        matrix = [(m, v) for m in models for v in variants if MODELS[m].variants is None or v in MODELS[m].variants]
        pairs = sorted(matrix, key=lambda p: variants.index(p[1]))  # variant-major: every model gets its baselines first
    for pair in pairs:
        work.put(pair)
    rows: list[Row] = []
    lock = threading.Lock()

    def worker(gpu: int | None) -> None:
        while True:
            try:
                m, v = work.get_nowait()
            except queue.Empty:
                return
            t0 = time.perf_counter()
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left < min(timeout_s, 60.0):
                row = Row(m, v, status="skipped", error=f"not started: less than {min(timeout_s, 60.0):g} s of the run's --total-s left")
            else:
                row = _run_row_subprocess(m, v, device, gpu, timeout_s if left is None else min(timeout_s, left), budget_s, rows_dir,
                                          compile_threads_per_row(len(slots)))
            row.date = row.date or datetime.date.today().isoformat()  # (rows that did not finish: the day they were tried)
            row.extra["wall_s"] = round(time.perf_counter() - t0, 1)
            with lock:
                rows.append(row)
                if on_row is not None:
                    on_row(list(rows))
                if progress:
                    ms = f"{row.ms:.2f} ms" if row.ms is not None else row.status
                    print(f"[gpu {gpu}] {m:22s} {v:22s} {ms:>12s}  ({row.extra['wall_s']:.0f} s)", flush=True)

    workers = [threading.Thread(target=worker, args=(g if device == "cuda" else None,)) for g in slots]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    if rows_dir:
        shutil.rmtree(rows_dir, ignore_errors=True)
    add_ratios(rows)
    order = {pair: i for i, pair in enumerate(pairs)}
    return sorted(rows, key=lambda r: order[(r.model, r.variant)])


def baseline_variant(variant: str) -> str:
    """The bf16 Inductor row a variant's ratio is taken against: in the same mode (``-cudagraphs`` rows against
    ``bf16-inductor-cudagraphs``: a CUDA-graph row against a launch-bound default-mode row would credit the graphs'
    saved launches to quantization)."""
    return "bf16-inductor" + (CUDAGRAPHS if variant.endswith(CUDAGRAPHS) else "")


SAME_RUN_BASELINE = "bf16_inductor_ms_same_run"  # a row's extra: its baseline's ms in the run that measured it
# a row's extra, for rows without a same-run baseline: the table's baseline ms its ratio was taken against, kept when a
# later run replaced that baseline row (a merge must not change the ratios of rows it did not measure)
TABLE_BASELINE = "bf16_inductor_ms_of_the_table"


def _bf16_inductor_ms(rows: list[Row]) -> dict[tuple[str, str], float]:
    return {(r.model, r.variant): r.ms for r in rows if r.variant.startswith("bf16-inductor") and r.ms}


def record_same_run_baselines(rows: list[Row]) -> None:
    """Store in each row of one run its :func:`baseline_variant`'s ms from that run (``extra[SAME_RUN_BASELINE]``),
    so that a merged table keeps the row's ratio against its own run after a later run replaces the bf16 row."""
    base = _bf16_inductor_ms(rows)
    for r in rows:
        b = base.get((r.model, baseline_variant(r.variant)))
        if b is not None and r.ms:
            r.extra[SAME_RUN_BASELINE] = b


def add_ratios(rows: list[Row]) -> None:
    """``ratio_vs_bf16_inductor`` = bf16 Inductor ms / row ms, per model, against :func:`baseline_variant`: the one of
    the row's own run where it was measured then (:func:`record_same_run_baselines`), else the table's when a merge
    replaced it (:data:`TABLE_BASELINE`), else the table's (None where either is unmeasured)."""
    base = _bf16_inductor_ms(rows)
    for r in rows:
        b = r.extra.get(SAME_RUN_BASELINE) or r.extra.get(TABLE_BASELINE) or base.get((r.model, baseline_variant(r.variant)))
        r.ratio_vs_bf16_inductor = None if r.ms is None or b is None else b / r.ms


def _fmt(v: Any, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def _old_peak(r: Row) -> str:
    """``*`` for a peak measured before peaks were taken over the timed steps only (rows without ``resident_weight_gb``)."""
    return "*" if r.peak_mem_gb is not None and "resident_weight_gb" not in r.extra else ""


# below this SQNR against the bf16 eager model (or NaN) a row's output is marked suspect in the table: quantized rows
# of the random-init models measured 18.9-26.4 dB, bf16 Inductor 35-37 dB (2026-12-03); wrong kernels give far less
SUSPECT_SQNR_DB = 10.0


def _suspect(r: Row) -> str:
    """`` (output suspect: ...)`` for a row whose prediction is far from the bf16 eager model's (:data:`SUSPECT_SQNR_DB`)."""
    db = r.extra.get("sqnr_vs_bf16_eager_db")
    if db is None or db >= SUSPECT_SQNR_DB:  # (NaN fails the comparison: suspect)
        return ""
    return f" (output suspect: {db} dB vs bf16 eager)"


def markdown_table(rows: list[Row]) -> str:
    """The rows as a markdown table."""
    lines = [
        "| model | variant | date | ms / step | × vs bf16 Inductor (same mode) | SQNR vs bf16 eager dB | compile s | calib / quantize s | peak mem GB | weights GB | quantized | status |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:  # (merged tables mix runs: the date says which run a row, and its ratio's numerator, come from)
        status = (r.status + _suspect(r)) if r.status == "ok" else f"{r.status}: {(r.error or '')[:160]}"
        later = r.extra.get("later_attempt")
        if later:
            why = f": {later['error'][:80]}" if later.get("status") == "error" and later.get("error") else ""
            status += f" (a later attempt on {later.get('date') or '?'}: {later.get('status')}{why})"
        lines.append(
            f"| {r.model} | {r.variant} | {r.date or '—'} | {_fmt(r.ms, '.2f')} | {_fmt(r.ratio_vs_bf16_inductor, '.2f')} | "
            f"{_fmt(r.extra.get('sqnr_vs_bf16_eager_db'), '.1f')} | {_fmt(r.compile_s, '.0f')} | "
            f"{_fmt(r.calibration_s, '.1f')} | {_fmt(r.peak_mem_gb, '.2f')}{_old_peak(r)} | {_fmt(r.weight_gb, '.3f')} | {r.quantized_ops or '—'} | {status} |"
        )
    return "\n".join(lines)


BEGIN, END = "<!-- qdiff bench: begin -->", "<!-- qdiff bench: end -->"


def write_results(rows: list[Row], out: Path, command: str, merge: bool) -> None:
    """Write ``benchmarks.json`` (merged by (model, variant) if ``merge``) and the table into ``benchmarks.md``."""
    out.mkdir(parents=True, exist_ok=True)
    jpath = out / "benchmarks.json"
    record_same_run_baselines(rows)
    keep: list[dict] = []
    if merge and jpath.exists():
        old = {(d["model"], d["variant"]): d for d in json.loads(jpath.read_text())}
        finished = []
        for r in rows:  # a row that did not finish (not started, over a time limit, failed) keeps the measured row it would replace
            before = old.get((r.model, r.variant))
            if r.status != "ok" and before is not None and before["status"] == "ok":
                before["extra"]["later_attempt"] = {"date": r.date, "status": r.status, "error": r.error}
            else:
                finished.append(r)
        rows = finished
        new = {(r.model, r.variant) for r in rows}
        keep = [d for key, d in old.items() if key not in new]
        for d in keep:  # the table's baseline is replaced: keep the one this row's ratio was taken against
            replaced = (d["model"], baseline_variant(d["variant"])) in new
            if replaced and d["ms"] and d["ratio_vs_bf16_inductor"] and SAME_RUN_BASELINE not in d["extra"]:
                d["extra"].setdefault(TABLE_BASELINE, d["ratio_vs_bf16_inductor"] * d["ms"])
    for r in rows:
        r.extra.setdefault("command", command)  # rows merged from another run keep theirs
    data = keep + [asdict(r) for r in rows]
    all_rows = [Row(**d) for d in data]
    add_ratios(all_rows)
    jpath.write_text(json.dumps([asdict(r) for r in all_rows], indent=1) + "\n")
    devices = sorted({r.device for r in all_rows if r.device})
    versions = sorted({f"torch {r.torch}, triton {r.triton}" for r in all_rows if r.status == "ok"})
    commands = sorted({r.extra.get("command", "") for r in all_rows})
    section = "\n".join(
        [
            BEGIN,
            "## `qdiff bench`",
            "",
            f"Date(s): {', '.join(sorted({r.date for r in all_rows if r.date}))}. Device(s): {', '.join(devices)}. Versions: {'; '.join(versions)}.",
            "Command(s): " + "; ".join(f"`{c}`" for c in commands if c),
            "",
            "Median step latency (`triton.testing.do_bench`, median); date = the run a row comes from (a merged table mixes runs; "
            "`×` divides by the bf16 Inductor row of the same model and mode measured in the row's own run, "
            "`extra.bf16_inductor_ms_same_run`, else by the table's at the time the row was measured, "
            "`extra.bf16_inductor_ms_of_the_table` once a later run replaced it); `×` = bf16 Inductor ms / row ms (above 1 is faster; "
            "`-cudagraphs` rows against `bf16-inductor-cudagraphs`); "
            "compile s = first call (Dynamo + Inductor, cold cache); `-cudagraphs` rows: the same variant with `mode=\"reduce-overhead\"` (CUDA graphs); peak memory during the timed steps "
            "(after the first call; qdiff rows compile with `release_float_weights`, so the float weights of quantized ops are freed; a peak "
            "marked `*` comes from an older `qdiff bench` and includes the first call and, for qdiff rows, the float weights); weights = stored "
            "parameter bytes (quantized storage + the rest in bf16). Rows: " + ", ".join(f"{m.name} = {m.description}" for m in MODELS.values() if m.name in {r.model for r in all_rows}) + ".",
            "",
            markdown_table(all_rows),
            END,
        ]
    )
    mpath = out / "benchmarks.md"
    text = mpath.read_text() if mpath.exists() else "# Benchmarks\n"
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + section + text[text.index(END) + len(END) :]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    mpath.write_text(text)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``qdiff bench`` flags."""
    p.add_argument("--models", nargs="+", default=list(MODELS), help=f"models (default: all): {', '.join(MODELS)}")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), help=f"variants (default: all): {', '.join(VARIANTS)}")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--gpus", type=int, default=1, help="run rows on this many GPUs of the host at once (identical GPUs; default: 1)")
    p.add_argument("--jobs-per-gpu", type=int, default=1, help="rows built and compiled on one GPU at once; each row is timed alone on the host (default: 1)")
    p.add_argument("--row-timeout", type=float, default=420.0, help="seconds allowed per row, build to last repeat (default: 420)")
    p.add_argument("--budget-s", type=float, default=5.0, help="seconds of timed repeats per row (default: 5)")
    p.add_argument("--out", default="docs", help="folder for benchmarks.md / benchmarks.json (default: docs)")
    p.add_argument("--total-s", type=float, help="stop starting rows when a row could not finish before this many seconds (rows left are 'skipped')")
    p.add_argument("--merge", action="store_true", help="keep rows of other (model, variant) pairs already in benchmarks.json")
    p.add_argument("--rows", nargs="+", metavar="MODEL:VARIANT", help="run just these rows, in this order (instead of --models x --variants)")
    p.add_argument("--plans", metavar="DIR", help="keep calibrated plans here and reuse them (rows of one model and preset, this run "
                   "and later ones; default: shared within the run only)")


def cmd_bench(args: argparse.Namespace) -> int:
    """Run the benchmark matrix and write the results."""
    pairs = None if args.rows is None else [tuple(r.split(":", 1)) for r in args.rows]
    if pairs is not None and any(len(p) != 2 for p in pairs):
        raise SystemExit(f"qdiff bench: --rows takes MODEL:VARIANT items, got {args.rows}")
    models = args.models if pairs is None else [m for m, _ in pairs]
    variants = args.variants if pairs is None else [v for _, v in pairs]
    unknown = [m for m in models if m not in MODELS] + [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"qdiff bench: unknown model/variant {unknown}; models: {', '.join(MODELS)}; variants: {', '.join(VARIANTS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("qdiff bench: no CUDA device; speed is measured on a GPU (use --device cpu only for a smoke run)")
    command = "qdiff bench " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else "qdiff bench"
    if args.plans:  # (the rows' processes inherit it)
        os.environ[PLANS_ENV] = str(Path(args.plans).resolve())

    def save(rows: list[Row]) -> None:
        add_ratios(rows)
        write_results(rows, Path(args.out), command, args.merge)

    rows = run_bench(models, variants, args.device, args.gpus, args.row_timeout, args.budget_s, args.total_s, on_row=save,
                     jobs_per_gpu=args.jobs_per_gpu, pairs=pairs)
    save(rows)
    print(markdown_table(rows))
    return 0 if all(r.status == "ok" for r in rows) else 1


def _die_with_parent() -> None:
    """Rows run in their own process group (see :func:`_run_row_subprocess`), so a signal to the orchestrator's
    group does not reach them: on Linux, ask the kernel to kill this row when the orchestrator dies."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def _row_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m qcompile.bench")
    p.add_argument("--row", nargs=2, metavar=("MODEL", "VARIANT"), required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--budget-s", type=float, default=10.0)
    p.add_argument("--row-out", required=True)
    a = p.parse_args(argv)
    _die_with_parent()
    stacks = _sample_stacks(a.row[0], a.row[1])
    with _registered(os.environ.get(ROWS_ENV)):
        try:
            row = measure(a.row[0], a.row[1], a.device, a.budget_s)
        except Exception as e:  # the row's error goes into the table (with where it was raised); the traceback to stderr
            import traceback

            traceback.print_exc()
            row = Row(a.row[0], a.row[1], status="error", error=exception_summary(e), date=datetime.date.today().isoformat())
    Path(a.row_out).write_text(json.dumps(asdict(row)))
    if stacks is not None:
        stacks.close()
    return 0 if row.status == "ok" else 1


STACKS_ENV = "QDIFF_BENCH_STACKS"  # "DIR" or "DIR:SECONDS": each row writes its Python stacks there periodically


def _other_threads_stacks() -> str:
    """Every other thread's Python stack as text. The frames are released on return: a frame kept between samples
    keeps its locals alive, and on 2026-12-02 the tensors of a returned CUDA-graph warm-up frame, held that way by the
    sampler, failed cudagraph trees' live-allocation check ("tensors in the cudagraph pool not tracked as outputs")."""
    import traceback

    names = {t.ident: t.name for t in threading.enumerate()}
    lines = []
    for ident, frame in sys._current_frames().items():
        if ident != threading.get_ident():
            lines.append(f"Thread {names.get(ident, '?')} ({ident}), most recent call last:\n")
            lines.extend(traceback.format_stack(frame))
    return "".join(lines)


class StackSampler:
    """Writes every thread's Python stack to ``path`` every ``every_s`` seconds from a daemon thread, through
    ``sys._current_frames()`` under the GIL. (``faulthandler.dump_traceback_later`` walks other threads' frames without
    the GIL: on 2026-12-02 it killed busy rows with SIGSEGV, in CI and here, at a 0.2 s period.)"""

    def __init__(self, path: Path, every_s: float):
        self._file = open(path, "w")  # noqa: SIM115 (closed by close())
        self._every_s = every_s
        self._stop = threading.Event()
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="qdiff-bench-stacks", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        n = 0
        while not self._stop.wait(self._every_s):
            n += 1
            self._file.write(f"--- stacks {n}, {time.monotonic() - self._t0:.1f} s into the row ---\n" + _other_threads_stacks())
            self._file.flush()

    def close(self) -> None:
        """Stop sampling (waits for a sample being written) and close the file."""
        self._stop.set()
        self._thread.join()
        self._file.close()


def _sample_stacks(model: str, variant: str) -> StackSampler | None:
    """With ``QDIFF_BENCH_STACKS=DIR[:SECONDS]`` set, this row writes every thread's Python stack to
    ``DIR/stacks-MODEL-VARIANT.txt`` every SECONDS (default 30; a paused row writes none while paused): where a slow
    row spends its time. This found torchao's coordinate-descent tuning (2026-12-02). A thread holding the GIL in a
    long C call delays the next sample until it returns."""
    spec = os.environ.get(STACKS_ENV)
    if not spec:
        return None
    folder, _, every = spec.partition(":")
    Path(folder).mkdir(parents=True, exist_ok=True)
    return StackSampler(Path(folder) / f"stacks-{model}-{variant}.txt", float(every or 30))


def exception_summary(e: BaseException) -> str:
    """``Type: message (file:line in function)`` of the frame that raised ``e``, first line of the message only,
    at most 600 characters (a long message is cut, the place is kept)."""
    import traceback

    frames = traceback.extract_tb(e.__traceback__)
    where = f" ({Path(frames[-1].filename).name}:{frames[-1].lineno} in {frames[-1].name})" if frames else ""
    first = (str(e).strip().splitlines() or [""])[0]
    head = f"{type(e).__name__}: {first}"
    limit = 600 - len(where)
    return (head if len(head) <= limit else head[: limit - 3] + "...") + where


if __name__ == "__main__":
    sys.exit(_row_main(sys.argv[1:]))

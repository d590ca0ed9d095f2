"""``qdiff demo``: the main job, end to end on one model, written to a report folder.

Calibrates with a preset (progress bars), compiles with ``backend="qdiff"``, samples the same
noise with the full-precision and the quantized model, and writes ``grid.png`` (FP32 | quantized
| difference), ``layers.md`` (the inspection table), ``plan.qplan`` and ``report.md``.
"""

from __future__ import annotations

import math
import platform
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .calibrate import calibrate
from .config import QuantConfig
from .evaluate import EvalCase
from .inspect import inspect
from .metrics import psnr_db, ssim


def _grid(images: torch.Tensor, cols: int) -> np.ndarray:
    """(N, 1 or 3, H, W) in [0, 1] -> an (rows*H, cols*W) uint8 mosaic with 2-px gaps."""
    n, c, h, w = images.shape
    rows = math.ceil(n / cols)
    out = np.ones((rows * (h + 2), cols * (w + 2), c), dtype=np.float32)
    for i, img in enumerate(images):
        r, k = divmod(i, cols)
        out[r * (h + 2) : r * (h + 2) + h, k * (w + 2) : k * (w + 2) + w] = img.permute(1, 2, 0).numpy()
    return (out.clip(0, 1) * 255).round().astype(np.uint8)


def _save_side_by_side(fp: torch.Tensor, q: torch.Tensor, path: Path, scale: int = 3) -> None:
    cols = int(math.ceil(math.sqrt(fp.shape[0])))
    diff = ((q - fp).abs() * 4).clamp(0, 1)  # error magnified 4x
    panels = [_grid(x, cols) for x in (fp, q, diff)]
    gap = np.full((panels[0].shape[0], 8, panels[0].shape[2]), 255, dtype=np.uint8)
    img = np.concatenate([panels[0], gap, panels[1], gap, panels[2]], axis=1)
    if img.shape[2] == 1:
        img = img[:, :, 0]
    pil = Image.fromarray(img)
    pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST).save(path)


def _weight_bytes(plan) -> tuple[int, int]:
    """(bytes of the quantized ops' weights in fp32, bytes of their quantized storage)."""
    fp = sum(math.prod(n.weight_shape) * 4 for n in plan.quantized_nodes())
    q = sum(n.weight.nbytes for n in plan.quantized_nodes())
    return fp, q


def write_report(out: Path, title: str, plan, report, fp01: torch.Tensor, q01: torch.Tensor, timings: list[str], device: str, preset: str) -> None:
    """Write ``grid.png``, ``layers.md`` and ``report.md`` to ``out`` and print the summary.

    ``fp01`` / ``q01``: (N, C, H, W) samples in [0, 1] from the same noise; ``timings``: table rows
    ``"what | value"``; ``report``: the :class:`~qcompile.inspect.InspectReport` of the compiled model.
    """
    _save_side_by_side(fp01, q01, out / "grid.png")
    (out / "layers.md").write_text("```\n" + str(report) + "\n```\n")
    fp_bytes, q_bytes = _weight_bytes(plan)
    psnr, s = psnr_db(fp01, q01), ssim(fp01, q01)
    lines = [
        f"# qdiff demo: {title}",
        "",
        f"Device: {device}; torch {torch.__version__}; lowering: {_lowering_text(device)}.",
        "",
        "![FP32 | quantized | |difference| x4](grid.png)",
        "",
        "| metric | value |",
        "| --- | --- |",
        f"| ops quantized | {len(plan.quantized_nodes())} of {len(plan.nodes)} |",
        f"| weights of quantized ops | {fp_bytes / 1e6:.3f} MB fp32 -> {q_bytes / 1e6:.3f} MB ({q_bytes / max(fp_bytes, 1):.2f}x) |",
        f"| final samples vs FP32 | PSNR {psnr:.2f} dB, SSIM {s:.4f} |",
        f"| denoiser output SQNR on the probe | {report.output_sqnr_db:.2f} dB |",
        *(f"| {row} |" for row in timings),
        "",
        "On CPU the reference lowering dequantizes in PyTorch, so it is slower than FP32; speed comes",
        "from the Triton kernels on a GPU (`--device cuda`; see docs/benchmarks.md). Per-layer table: [layers.md](layers.md).",
    ]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print(str(report))
    print(
        f"\nqdiff demo: {len(plan.quantized_nodes())}/{len(plan.nodes)} ops quantized ({preset}); weights "
        f"{fp_bytes / 1e6:.3f} -> {q_bytes / 1e6:.3f} MB; samples vs FP32: PSNR {psnr:.2f} dB, SSIM {s:.4f}; "
        f"report in {out}/report.md"
    )


def _lowering_text(device: str) -> str:
    if device == "cuda":
        return "generated Triton kernels through Inductor (the backend's default for CUDA inputs)"
    return "reference (pure PyTorch dequantize + op, eager)"


def run_demo(case: EvalCase, preset: str, out: Path, samples: int, calib_samples: int, device: str = "cpu") -> int:
    """Run the main job on ``case`` (on ``device``: ``cpu`` or ``cuda``) and write the report folder ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    cfg = QuantConfig.preset(preset)
    model = case.build().eval().to(device)
    lo, hi = case.data_range
    calib_noise = torch.randn(calib_samples, *case.shape, generator=torch.Generator().manual_seed(1234)).to(device)
    noise = torch.randn(samples, *case.shape, generator=torch.Generator().manual_seed(0)).to(device)
    print(f"qdiff demo: {case.name}, preset {preset}: calibrating on {calib_samples} trajectories")
    t0 = time.perf_counter()
    plan = calibrate(model, lambda m: case.sample(m, calib_noise), cfg)
    calib_s = time.perf_counter() - t0
    plan.save(out / "plan.qplan")
    qmodel = torch.compile(model, backend="qdiff", options={"plan": plan})
    with torch.no_grad():
        t0 = time.perf_counter()
        fp = case.sample(model, noise).clamp(lo, hi)
        fp_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        q = case.sample(qmodel, noise).clamp(lo, hi)
        q_s = time.perf_counter() - t0  # includes the one-time compile
        t0 = time.perf_counter()
        case.sample(qmodel, noise)
        q2_s = time.perf_counter() - t0
    fp01, q01 = ((fp - lo) / (hi - lo)).cpu(), ((q - lo) / (hi - lo)).cpu()
    timings = [
        f"calibration | {calib_s:.1f} s ({len(plan.calls)} denoiser calls)",
        f"sampling {samples} images, FP32 | {fp_s:.2f} s",
        f"sampling, quantized (first run, with compile) | {q_s:.2f} s",
        f"sampling, quantized (second run) | {q2_s:.2f} s",
    ]
    device = "cuda" if next(model.parameters()).is_cuda else f"{platform.machine()} CPU"
    write_report(out, f"{case.name}, {preset}", plan, inspect(qmodel), fp01, q01, timings, device, preset)
    return 0

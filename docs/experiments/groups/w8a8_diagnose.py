"""Is 8-bit activation quantization alone enough to cap the shared UNet's last DDIM step?

Along the FP32 DDIM trajectory (50 steps, the seeds of ``qdiff eval``), at every step the FP32 model sees
its own input ``x_t`` and, separately, ``x_t`` rounded by one static per-tensor quantizer; the per-step
SQNR of the second output against the first is printed. Nothing else is quantized. Every quantizer is
fitted to *this step's* batch (the best a timestep group of one step can do), asymmetric:

* ``mm8`` / ``mm10`` / ``mm12`` / ``mm16``: range = exact min/max of ``x_t``, 8 / 10 / 12 / 16 bits;
* ``mse8``: qdiff's int8 MSE range (``observers.choose_qparams``, clipping searched on sample + exact tails);
* ``out8``: ``mse8`` plus qdiff's outlier split (``observers.with_outlier_split``, taken whenever it helps),
  applied by the reference lowering (``lowering.reference``: inliers and sparse residual both int8).

Run: OMP_NUM_THREADS=1 python docs/experiments/groups/w8a8_diagnose.py [--seeds 64]
"""

from __future__ import annotations

import argparse

import torch

from qcompile.config import ActSpec, Format
from qcompile.lowering.reference import _maybe_quantize_input
from qcompile.metrics import sqnr_db
from qcompile.observers import ActivationStats, choose_qparams
from qcompile.zoo import ddim_sample, load_mnist_unet


COLUMNS = ("mm8", "mm10", "mm12", "mm16", "mse8", "out8")


def minmax_quant(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Asymmetric ``bits``-bit fake quantization on the exact min/max of ``x``."""
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = (hi - lo) / (2**bits - 1)
    zp = round(-lo / scale)
    return (torch.clamp(torch.round(x / scale) + zp, 0, 2**bits - 1) - zp) * scale


def library_quant(x: torch.Tensor, outliers: bool) -> tuple[torch.Tensor, str]:
    """x through qdiff's int8 quantizer fitted to x (MSE range; optionally the outlier split)."""
    stats = ActivationStats(16384, torch.Generator().manual_seed(0), channel_dim=1)
    stats.update(x, 0)
    q = choose_qparams(stats, ActSpec(Format.INT8), 0.0 if outliers else None)
    scale, zp = torch.tensor(q.scale), torch.tensor(q.zero_point, dtype=torch.int32)
    o = None if q.outlier is None else torch.tensor(q.outlier.scale)
    note = "" if q.outlier is None else f"inliers [{q.lo:.3g}, {q.hi:.3g}], {q.outlier.share:.2%} outliers, est. +{q.outlier.gain_db:.1f} dB"
    return _maybe_quantize_input(x, scale, zp, "int8", True, outlier_scale=o), note


class InputQuant:
    """The FP32 model, recording per step the SQNR of its output with a quantized input against FP32."""

    def __init__(self, model):
        self.model, self.rows, self.notes = model, [], []

    def __call__(self, x, t):
        ref = self.model(x, t)
        inputs = [minmax_quant(x, b) for b in (8, 10, 12, 16)]
        inputs.append(library_quant(x, False)[0])
        xo, note = library_quant(x, True)
        inputs.append(xo)
        self.rows.append([int(t[0, 0])] + [sqnr_db(ref, self.model(xq, t)) for xq in inputs])
        self.notes.append(note)
        return ref


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=64)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = load_mnist_unet().eval()
    noise = torch.randn(args.seeds, 1, 28, 28, generator=torch.Generator().manual_seed(0))  # qdiff eval's test noise
    probe = InputQuant(model)
    with torch.no_grad():
        ddim_sample(probe, noise, num_steps=50)
    print(f"per-step output SQNR (dB) of the FP32 mnist_unet with only its input x_t quantized ({args.seeds} seeds)")
    print("step    t  " + "  ".join(f"{c:>6}" for c in COLUMNS) + "  out8 split")
    for i, (row, note) in enumerate(zip(probe.rows, probe.notes)):
        print(f"{i:>4}  {row[0]:>3}  " + "  ".join(f"{v:6.2f}" for v in row[1:]) + f"  {note}")
    for j, c in enumerate(COLUMNS):
        col = [r[j + 1] for r in probe.rows]
        worst = min(range(len(col)), key=col.__getitem__)
        print(f"{c:>5}: mean {sum(col) / len(col):.2f} dB, worst {col[worst]:.2f} dB at step {worst} (t={probe.rows[worst][0]})")


if __name__ == "__main__":
    main()

"""Per-step quality of the Triton lowering's graph passes against the reference lowering, on the bundled trained DiT.

    TRITON_INTERPRET=1 python examples/lowering_quality.py [--steps 0 12 25 37 49] [--out lowering_quality.json]

``qdiff eval --lowering triton`` samples whole trajectories, too slow for Triton's interpreter on a CPU (a 2-seed run of
the bundled DiT did not finish in 25 min). This checks the same thing at a few denoising steps instead: the bundled
CIFAR-10 DiT (``cifar10_dit``, a diffusers ``DiTTransformer2DModel``) is calibrated with ``w8a8-fp8-attn`` over the
sampler's trajectories, one FP32 trajectory (one seed, its CFG batch of 2) is recorded, and at each chosen step the
denoiser's FP32 output is compared (SQNR, dB) with the quantized one for each variant: the reference lowering
(pure PyTorch, the ground truth of the quantized arithmetic) and the Triton lowering with the kernel-path switches as
set below (the defaults; the block-boundary kernel and attention's fp8 output off; q / k / v projections writing float,
quantized by the attention call: each pass the defaults turn on, off).
All variants see the same FP32 input at each step, as ``qdiff eval``'s per-step SQNR does. Runs on a GPU as well
(without TRITON_INTERPRET, ``--device cuda``).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import time

import torch

from qcompile import QuantConfig, calibrate
from qcompile.dispatch import compile as compile_plan
from qcompile.metrics import output_tensor, sqnr_db
from qcompile.passes.act_quant import ATTN_FP8_OUT_ENV
from qcompile.passes.attention_heads import FP8_QKV_ENV
from qcompile.passes.norm_quant import ENV as NORM_QUANT_ENV
from qcompile.zoo.bundled import dit_sampler, load_cifar10_dit

# variant -> (lowering, kernel-path switches set for its compile)
VARIANTS = {
    "reference": ("reference", {}),
    "triton (defaults)": ("triton", {}),
    "triton, no block-boundary kernel, float attention output": ("triton", {NORM_QUANT_ENV: "0", ATTN_FP8_OUT_ENV: "0"}),
    "triton, float q / k / v projections": ("triton", {FP8_QKV_ENV: "0"}),
}
SWITCHES = (NORM_QUANT_ENV, ATTN_FP8_OUT_ENV, FP8_QKV_ENV)


@contextlib.contextmanager
def switches(env: dict[str, str]):
    """The kernel-path switches exactly as ``env`` sets them (the others at their defaults), restored afterwards."""
    saved = {k: os.environ.pop(k, None) for k in SWITCHES}
    os.environ.update(env)
    try:
        yield
    finally:
        for k in SWITCHES:
            os.environ.pop(k, None)
        os.environ.update({k: v for k, v in saved.items() if v is not None})


class Recorder(torch.nn.Module):
    """The denoiser, recording each call's inputs (so the quantized variants can replay them)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, x, timestep, class_labels):
        self.calls.append((x.clone(), timestep.clone(), class_labels.clone()))
        return self.model(x, timestep=timestep, class_labels=class_labels)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, nargs="+", default=[0, 12, 25, 37, 49], help="denoising steps to compare (of 50)")
    p.add_argument("--calib-samples", type=int, default=4)
    p.add_argument("--device", default="cpu")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="NAME",
                   help="which of: " + "; ".join(VARIANTS) + " (default: all)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    dev = torch.device(args.device)
    model = load_cifar10_dit().eval().to(dev)
    sample = dit_sampler()
    with torch.no_grad():
        rec = Recorder(model)
        sample(rec, torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(dev))
    calib_noise = torch.randn(args.calib_samples, 3, 32, 32, generator=torch.Generator().manual_seed(10_000)).to(dev)
    plan = calibrate(model, lambda m: sample(m, calib_noise), QuantConfig.preset("w8a8-fp8-attn"), progress=False)
    inputs = [rec.calls[s] for s in args.steps]
    with torch.no_grad():
        want = [model(x, timestep=t, class_labels=y).sample for x, t, y in inputs]
    results = {}
    for name in args.variants:
        lowering, env = VARIANTS[name]
        with switches(env):
            torch._dynamo.reset()
            t0 = time.perf_counter()
            test = compile_plan(model, plan, inductor=False, lowering=lowering)
            with torch.no_grad():
                got = [test(x, timestep=t, class_labels=y) for x, t, y in inputs]
        sqnr = [round(sqnr_db(w, output_tensor(g)), 2) for w, g in zip(want, got)]
        results[name] = {"lowering": lowering, "switches": env, "sqnr_db": sqnr, "seconds": round(time.perf_counter() - t0, 1)}
        print(f"{name:58s} " + " ".join(f"{s:6.2f}" for s in sqnr) + f"   ({results[name]['seconds']} s)", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": "cifar10_dit", "preset": "w8a8-fp8-attn", "steps": args.steps, "device": str(dev),
                       "torch": torch.__version__, "interpret": os.environ.get("TRITON_INTERPRET") == "1", "variants": results}, f, indent=1)


if __name__ == "__main__":
    main()

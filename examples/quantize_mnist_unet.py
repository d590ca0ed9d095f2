"""Quantize the trained MNIST DDPM UNet of ../shared with qdiff, step by step.

    python examples/quantize_mnist_unet.py [--preset w4a8]
"""

import argparse

import torch

import qcompile
from qcompile.metrics import psnr_db
from qcompile.zoo import ddim_sample, load_mnist_unet, shared_dir


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="w8a8-int8", choices=qcompile.QuantConfig.PRESETS)
    args = parser.parse_args()
    if shared_dir() is None:
        raise SystemExit("../shared is absent: set QDIFF_SHARED to the folder holding models/mnist_unet_ddpm")

    unet = load_mnist_unet()
    cfg = qcompile.QuantConfig.preset(args.preset)

    # 1. calibrate on the model's own DDIM trajectory (every one of the 50 steps is observed)
    calib_noise = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    plan = qcompile.calibrate(unet, lambda m: ddim_sample(m, calib_noise, num_steps=50), cfg)

    # 2. the plan is a safetensors file: quantized weights, scales, decisions, fingerprint
    plan.save("mnist_unet.qplan")
    plan = qcompile.QuantPlan.load("mnist_unet.qplan")

    # 3. compile with the qdiff backend and sample
    qunet = torch.compile(unet, backend="qdiff", options={"plan": plan})
    noise = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fp = ddim_sample(unet, noise).clamp(0, 1)
        q = ddim_sample(qunet, noise).clamp(0, 1)
    print(f"final samples vs FP32: PSNR {psnr_db(fp, q):.2f} dB")

    # 4. per-op table: formats, scales, local and cumulative SQNR on the stored probe
    report = qcompile.inspect(qunet)
    print(report)
    report.to_svg("mnist_unet_graph.svg")


if __name__ == "__main__":
    main()

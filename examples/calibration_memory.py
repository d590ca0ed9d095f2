"""Peak resident memory of calibrating the bundled CIFAR-10 UNet (w8a8-int8, 50 DDIM steps).

    python examples/calibration_memory.py 8      # trajectories (batch); prints max RSS and wall time
    MALLOC_MMAP_THRESHOLD_=131072 python ...    # glibc's mmap threshold fixed from outside (the former qcompile/_malloc.py)
"""
import resource
import sys
import time

import torch

from qcompile import QuantConfig, calibrate
from qcompile.cli import _unet_folder_case
from qcompile.zoo.bundled import bundled_dir

case = _unet_folder_case("cifar10_ddpm", bundled_dir("cifar10_ddpm"), 50)
model = case.build().eval()
noise = torch.randn(int(sys.argv[1]) if len(sys.argv) > 1 else 8, *case.shape, generator=torch.Generator().manual_seed(1))
t0 = time.time()
plan = calibrate(model, lambda m: case.sample(m, noise), QuantConfig.preset("w8a8-int8"), progress=False)
print(f"max RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB, {time.time() - t0:.0f} s, {len(plan.calls)} calls")

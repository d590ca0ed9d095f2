"""Ablation: SmoothQuant-style smoothing on a random-weight diffusers UNet2DModel (the test model).

    python examples/smoothing_on_random_unet.py      (from the repository root)

Prints the one-step output SQNR (mean of 3 timesteps) of w8a8-int8 with and without smoothing.
"""

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import qcompile  # noqa: E402
from qcompile.metrics import sqnr_db  # noqa: E402
from tests.models.test_diffusers_models import trajectory, with_timestep  # noqa: E402
from tests.tiny_models import tiny_unet2d  # noqa: E402

for alpha in (None, 0.5):
    torch._dynamo.reset()
    case = tiny_unet2d()
    cfg = qcompile.QuantConfig.preset("w8a8-int8").replace(smooth_alpha=alpha)
    plan = qcompile.calibrate(case.model, lambda m: trajectory(case, m), cfg, progress=False)
    q = torch.compile(case.model, backend="qdiff", options={"plan": plan})
    sq = []
    with torch.no_grad():
        for t in (800, 400, 50):
            args, kwargs = with_timestep(case.with_batch(2, seed=7), t)
            sq.append(sqnr_db(case.output(case.model(*args, **kwargs)), case.output(q(*args, **kwargs))))
    smoothed = sum(n.smooth is not None for n in plan.nodes.values())
    print(f"smooth_alpha={alpha}: SQNR {statistics.mean(sq):.2f} dB ({smoothed} ops smoothed)")

"""What the W8A8 target variant decides on the shared UNet: outlier splits per group and the activation floor.

Calibrates ``mnist_unet`` exactly as ``qdiff eval`` does (32 calibration trajectories, noise seed 10000) with a
variant of ``qcompile.evaluate.experiments()`` and prints the activation floor's record, the outlier-split
decisions per timestep group and ``qcompile.inspect``'s groups table (plan only, no probe).

Run: OMP_NUM_THREADS=1 PYTHONPATH=. python docs/experiments/groups/w8a8_target_plan.py [variant]
"""

from __future__ import annotations

import sys

import torch

import qcompile
from qcompile.act_floor import describe
from qcompile.cli import _shared_cases
from qcompile.evaluate import experiments
from qcompile.groups_report import group_rows


def main() -> None:
    name = sys.argv[1] if len(sys.argv) > 1 else "w8a8-int8-k10-seg-outlier-floor25"
    case = _shared_cases()["mnist_unet"]
    model = case.build().eval()
    noise = torch.randn(32, *case.shape, generator=torch.Generator().manual_seed(10_000))
    plan = qcompile.calibrate(model, lambda m: case.sample(m, noise), experiments()[name], progress=False)
    print(f"{name}: {len(plan.quantized_nodes())}/{len(plan.nodes)} ops quantized, {plan.groups.count} timestep groups")
    print(describe(plan) or "no activation floor")
    print("\ngroup  timesteps    steps  inputs quantized  with outlier split  (quantizers split / applied, incl. slices)")
    for row in group_rows(plan):
        g = row["group"]
        acts = [n.acts[g] for n in plan.quantized_nodes() if n.acts[g] is not None]
        parts = [p for a in acts for p in a.parts()]
        split = sum(1 for a in acts if any(p.outlier is not None for p in a.parts()))
        print(f"{g:>5}  {row['t_min']:>4} .. {row['t_max']:<4} {row['steps']:>5}  {len(acts):>16}  {split:>18}  "
              f"({sum(p.outlier is not None for p in parts)}/{len(parts)})")
    shares = [p.outlier.share for n in plan.quantized_nodes() for a in n.acts if a is not None for p in a.parts() if p.outlier is not None]
    if shares:
        print(f"\nestimated outlier share of a split input: median {sorted(shares)[len(shares) // 2]:.3%}, max {max(shares):.3%}")


if __name__ == "__main__":
    main()

"""Bit allocation checks on one model: cost, additivity, Lagrangian vs exact DP, first-order (fisher) accuracy.

Calibrates a mixed plan (A8, candidates without bf16, optionally K timestep groups with per-group
allocation) keeping the allocator alive, then from the same kept calls:

* cost of the measured tables (forward passes, wall time) and of the first-order estimate (backward passes,
  wall time); Spearman / Pearson (linear and log-log) of the estimate against the measured ``D_n(b)``
  over every (node, candidate, group); the measured output NMSE of the plan allocated from the estimate;
* additivity: predicted ``sum D_n(b_n)`` vs the measured output NMSE of the plans allocated at a sweep of
  budgets and of random mixes (Pearson r, linear and log-log);
* the Lagrangian's predicted distortion against the exact DP optimum at the same budgets.

    python examples/rd_estimators.py --model mnist_vit --out docs/experiments/rd/estimators
    python examples/rd_estimators.py --model mnist_vit --groups 10 --per-group --out docs/experiments/rd/estimators
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch

from qcompile import AllocationSpec, QuantConfig
from qcompile.cli import _eval_cases
from qcompile.passes.allocate import exact_allocate, lagrangian_allocate
from qcompile.rdreport import pearson, plot_bits_per_layer, spearman
from qcompile.sensitivity import calibrate_with_allocator

NOBF16 = ("int4", "int4g32", "int5", "int6", "int8", "fp8_e4m3")
BUDGETS = (4.25, 4.5, 4.75, 5.0, 5.5, 6.0, 7.0)


def _log_pearson(pairs: list[tuple[float, float]]) -> float:
    return pearson(*([math.log10(max(v, 1e-30)) for v in col] for col in zip(*pairs)))


def study(name: str, groups: int, per_group: bool, calls: int, calib_samples: int, n_random: int, out: Path) -> dict:
    case = _eval_cases()[name]
    model = case.build().eval()
    noise = torch.randn(calib_samples, *case.shape, generator=torch.Generator().manual_seed(10_000))  # as evaluate_case
    spec = AllocationSpec(candidates=NOBF16, calls_per_group=calls, per_group=per_group)
    cfg = QuantConfig.preset("w4a8").replace(weight_bit_budget=4.5, timestep_groups=groups, allocation=spec)
    torch._dynamo.reset()
    t0 = time.perf_counter()
    plan, al = calibrate_with_allocator(model, lambda m: case.sample(m, noise), cfg, progress=False)
    rec = plan.allocation
    tag = f"{name}-k{groups}{'-pg' if per_group else ''}"
    result: dict = {
        "model": name, "groups": groups, "per_group": per_group, "calls_per_group": calls, "kept_calls": sum(rec.calls),
        "nodes": len(rec.nodes), "calibration_s": time.perf_counter() - t0,
        "measured_tables": {"forward_passes": rec.forward_passes, "allocation_wall_s": rec.wall_s},
        "plan": {"average_bits": rec.average_bits, "predicted": rec.predicted, "measured": rec.measured, "solver": rec.solver},
    }
    rd = al.rd_tables(al.tables)
    total = al.total_params

    # -- additivity and the DP gap over a sweep of budgets, plus random mixes ----------------------
    sweep = []
    for b in BUDGETS:
        lag = lagrangian_allocate(rd, b * total)
        dp = exact_allocate(rd, b * total, b * total / 100_000)
        choices = al.group_choices(lag.options(rd))
        sweep.append({"budget": b, "avg_bits": lag.rate / total, "predicted": lag.distortion, "measured": al.measure_choice(choices),
                      "dp": dp.distortion, "gap": lag.distortion / dp.distortion - 1 if dp.distortion > 0 else 0.0})
    rng = random.Random(0)
    mixes = []
    for _ in range(n_random):
        p4 = rng.random()
        opts = {t.key: ("int4" if rng.random() < p4 else rng.choice(t.options)) if "int4" in t.options else rng.choice(t.options) for t in rd}
        predicted = sum(t.distortions[t.options.index(opts[t.key])] for t in rd)
        mixes.append({"predicted": predicted, "measured": al.measure_choice(al.group_choices(opts)),
                      "avg_bits": sum(t.rates[t.options.index(opts[t.key])] for t in rd) / total})
    pts = [(p["predicted"], p["measured"]) for p in sweep + mixes]
    result["additivity"] = {"pearson_r": pearson(*zip(*pts)), "pearson_r_log": _log_pearson(pts),
                            "ratio_range": [min(m / p for p, m in pts), max(m / p for p, m in pts)], "sweep": sweep, "random": mixes}
    result["dp_gap_max"] = max(s["gap"] for s in sweep)

    # -- first-order (fisher) estimate in the same graphs ----------------------------------------
    f0, b0, fw0 = time.perf_counter(), al.model.backwards, al.model.forwards
    fisher = al.fisher()
    fisher_s = time.perf_counter() - f0
    pairs = [(al.tables[k][c][g], fisher[k][c][g]) for k in fisher for c in fisher[k] for g in range(len(al.group_weights))]
    rd_f = al.rd_tables(fisher)
    alloc_f = lagrangian_allocate(rd_f, 4.5 * total)
    choices_f = al.group_choices(alloc_f.options(rd_f))
    result["fisher"] = {
        "wall_s": fisher_s, "backward_passes": al.model.backwards - b0, "forward_passes": al.model.forwards - fw0, "probes": spec.probes,
        "spearman": spearman(*zip(*pairs)), "pearson": pearson(*zip(*pairs)), "pearson_log": _log_pearson(pairs),
        "allocation_measured": al.measure_choice(choices_f), "measured_allocation_measured": rec.measured,
        "same_choice_fraction": sum(choices_f[k] == rec.group_choices(k) for k in choices_f) / len(choices_f),
    }
    al.close()
    out.mkdir(parents=True, exist_ok=True)
    plot_bits_per_layer(plan, out / f"bits_{tag}.png")
    (out / f"{tag}.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("additivity",)}, indent=1))
    print("additivity", {k: v for k, v in result["additivity"].items() if k in ("pearson_r", "pearson_r_log", "ratio_range")})
    print("sweep", [(s["budget"], round(s["avg_bits"], 3), f"{s['predicted']:.3g}", f"{s['measured']:.3g}", f"{s['gap']:.2e}") for s in sweep])
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--groups", type=int, default=1)
    ap.add_argument("--per-group", action="store_true")
    ap.add_argument("--calls", type=int, default=4, help="kept calls per timestep group")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--random", type=int, default=12, help="random mixes for the additivity check")
    ap.add_argument("--out", type=Path, default=Path("docs/experiments/rd/estimators"))
    a = ap.parse_args()
    study(a.model, a.groups, a.per_group, a.calls, a.calib_samples, a.random, a.out)


if __name__ == "__main__":
    main()

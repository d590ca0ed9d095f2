"""Rate-distortion bit allocation: additivity check, estimator accuracy and quality against uniform bits.

Per model (run one at a time; each writes ``<out>/parts/<model>.json``):

1. calibrate with ``weight_bit_budget=4.5`` (A8, measured D_n(b)) keeping the allocator alive;
2. additivity: allocate over a sweep of budgets (and random mixes) from the same tables, and
   compare predicted ``sum_n D_n(b_n)`` with the measured output NMSE of the mixed plan (same kept calls);
3. the exact DP optimum on the real tables against the Lagrangian at 4.5 bits;
4. the fisher estimate (output sensitivity x analytic error) against the measured tables, and the
   plan it allocates;
5. per-step SQNR along the FP32 trajectory (qcompile.evaluate) of uniform W4A8 / W6A8 and the
   mixed plans at 4.5 average weight bits.

``--report`` then writes quality.md / quality.json / rd.json and the pictures from all parts::

    python examples/rd_ablation.py --model mnist_unet --seeds 32
    python examples/rd_ablation.py --model mnist_vit --seeds 32
    python examples/rd_ablation.py --model cifar10_ddpm --seeds 8 --calib-samples 4 --calls 2
    python examples/rd_ablation.py --report
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import shlex
import sys
import time
from pathlib import Path

import torch

from qcompile import AllocationSpec, Format, QuantConfig, QuantPlan, WeightSpec
from qcompile.cli import _eval_cases
from qcompile.config import CANDIDATE_BITS
from qcompile.evaluate import EvalResult, evaluate_case, write_report
from qcompile.passes.allocate import exact_allocate, lagrangian_allocate
from qcompile.rdreport import pearson, plot_bits_per_layer, plot_predicted_vs_measured, spearman
from qcompile.sensitivity import calibrate_with_allocator

BUDGETS = (4.0, 4.25, 4.5, 5.0, 5.5, 6.0, 7.0, 8.0)


def _mixed_plan(plan: QuantPlan, allocator, choice: dict[str, str], estimator: str, predicted: float, measured: float) -> QuantPlan:
    """``plan`` with every allocated node replaced by its candidate in ``choice``."""
    nodes = {k: allocator.plans[k][choice[k]] if k in choice else n for k, n in plan.nodes.items()}
    out = QuantPlan(plan.config, nodes, plan.groups, plan.subgraphs, plan.model_class, plan.calls, plan.probe)
    rec = dataclasses.replace(plan.allocation, estimator=estimator, predicted=predicted, measured=measured)
    rec.nodes = {k: {**v, "choice": choice[k], "bits": CANDIDATE_BITS[choice[k]]} for k, v in rec.nodes.items()}
    out.allocation = rec
    return out


def _uniform_bits(allocator, bits: int) -> float:
    """Average weight bits of a uniform preset (first/last ops at >= 8 bits, as first_last='8bit')."""
    restricted = allocator._first_last_keys()
    total = allocator.total_params
    return sum(p * (max(bits, 8) if k in restricted else bits) for k, p in allocator.params.items()) / total


def study(name: str, seeds: int, calib_samples: int, calls: int, n_random: int, out: Path) -> dict:
    case = _eval_cases()[name]
    model = case.build().eval()
    calib_noise = torch.randn(calib_samples, *case.shape, generator=torch.Generator().manual_seed(10_000))  # as evaluate_case
    cfg = QuantConfig.preset("w4a8").replace(weight_bit_budget=4.5, allocation=AllocationSpec(calls_per_group=calls), name="mixed-4.5a8")
    torch._dynamo.reset()
    t0 = time.perf_counter()
    plan, al = calibrate_with_allocator(model, lambda m: case.sample(m, calib_noise), cfg)
    calib_s = time.perf_counter() - t0
    rec = plan.allocation
    print(f"{name}: allocation {rec.forward_passes} forwards, {rec.wall_s:.1f} s; avg bits {rec.average_bits:.3f}; "
          f"predicted {rec.predicted:.3g} measured {rec.measured:.3g}", flush=True)
    rd = al.rd_tables(al.tables)
    total = al.total_params
    lowest = sum(min(t.rates) for t in rd) / total

    # -- additivity: budget sweep and random mixes ------------------------------------------------
    sweep = []
    for b in BUDGETS:
        alloc = lagrangian_allocate(rd, max(b, lowest) * total)
        measured = al.measure_choice(alloc.options(rd))
        sweep.append({"budget": max(b, lowest), "avg_bits": alloc.rate / total, "predicted": alloc.distortion, "measured": measured})
        print(f"  budget {b:5.2f}: predicted {alloc.distortion:.4g} measured {measured:.4g}", flush=True)
    rng = random.Random(0)
    mixes = []
    for _ in range(n_random):
        p4 = rng.random()
        choice = {}
        for t in rd:
            quantized = [o for o in t.options if o != "bf16"]
            choice[t.key] = "int4" if "int4" in quantized and rng.random() < p4 else rng.choice(quantized)
        predicted = sum(t.distortions[t.options.index(choice[t.key])] for t in rd)
        bits = sum(CANDIDATE_BITS[choice[t.key]] * al.params[t.key] for t in rd) / total
        mixes.append({"avg_bits": bits, "predicted": predicted, "measured": al.measure_choice(choice)})
    pts = [(p["predicted"], p["measured"]) for p in sweep + mixes]
    additivity = {
        "pearson_r": pearson(*zip(*pts)),
        "pearson_r_log": pearson(*([math.log10(v) for v in col] for col in zip(*pts))),
        "max_ratio": max(m / p for p, m in pts),
        "min_ratio": min(m / p for p, m in pts),
    }

    # -- exact DP vs Lagrangian at 4.5 bits ----------------------------------------------------
    lag = lagrangian_allocate(rd, 4.5 * total)
    unit = 16 * total / 40_000
    dp = exact_allocate(rd, 4.5 * total, unit)
    exact = {"lagrangian": lag.distortion, "dp": dp.distortion, "dp_unit_bits": unit, "dp_avg_bits": dp.rate / total,
             "dp_measured": al.measure_choice(dp.options(rd))}

    # -- fisher estimate ------------------------------------------------------------------------
    f0, b0 = time.perf_counter(), al.model.backwards
    fisher = al.fisher()
    fisher_s, backwards = time.perf_counter() - f0, al.model.backwards - b0
    rd_f = al.rd_tables(fisher)
    pairs = [(tm.distortions[i], tf.distortions[i]) for tm, tf in zip(rd, rd_f) for i, o in enumerate(tm.options) if o != "bf16"]
    alloc_f = lagrangian_allocate(rd_f, 4.5 * total)
    choice_f = alloc_f.options(rd_f)
    measured_f = al.measure_choice(choice_f)
    fisher_acc = {
        "spearman": spearman(*zip(*pairs)), "pearson_log": pearson(*([math.log10(max(v, 1e-30)) for v in c] for c in zip(*pairs))),
        "wall_s": fisher_s, "backward_passes": backwards, "pearson": pearson(*zip(*pairs)),
        "allocation_predicted": alloc_f.distortion, "allocation_measured": measured_f,
        "same_choice_fraction": sum(choice_f[k] == rec.nodes[k]["choice"] for k in choice_f) / len(choice_f),
    }
    print(f"  fisher: spearman {fisher_acc['spearman']:.3f}, {backwards} backwards, {fisher_s:.1f} s; "
          f"allocation measured {measured_f:.4g} vs {rec.measured:.4g}", flush=True)
    plan_f = _mixed_plan(plan, al, choice_f, "fisher", alloc_f.distortion, measured_f)
    (out / "img").mkdir(parents=True, exist_ok=True)
    plot_bits_per_layer(plan, out / "img" / f"bits_{name}.png")
    avg_bits = {"w4a8": _uniform_bits(al, 4), "w6a8": _uniform_bits(al, 6), "mixed-4.5a8": rec.average_bits,
                "mixed-4.5a8-fisher": alloc_f.rate / total}
    al.close()

    # -- quality along the FP32 trajectory ------------------------------------------------------
    w4 = QuantConfig.preset("w4a8")
    configs = {"w4a8": w4, "w6a8": w4.replace(weight=WeightSpec(Format.INT6), name="w6a8"), "mixed-4.5a8": plan, "mixed-4.5a8-fisher": plan_f}
    results = evaluate_case(case, configs, seeds, calib_samples)
    for r in results:
        if r.config.startswith("mixed"):
            r.calibration_s = calib_s  # the mixed plans came from the study's calibration (measurement included)
        print(f"  {r.config:20s} SQNR mean {r.sqnr_mean_db:6.2f} dB worst {r.sqnr_worst_db:6.2f} dB", flush=True)
    part = {
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "model": name, "seeds": seeds, "calib_samples": calib_samples, "calls_per_group": calls, "nodes": len(rd),
        "params": total, "allocation": {k: v for k, v in rec.to_dict().items() if k != "nodes"},
        "choices": {k: v["choice"] for k, v in rec.nodes.items()}, "avg_bits": avg_bits,
        "sweep": sweep, "random": mixes, "additivity": additivity, "exact": exact, "fisher": fisher_acc,
        "results": [dataclasses.asdict(r) for r in results],
    }
    (out / "parts").mkdir(parents=True, exist_ok=True)
    (out / "parts" / f"{name}.json").write_text(json.dumps(part, indent=1) + "\n")
    return part


def report(out: Path, command: str) -> None:
    parts = [json.loads(p.read_text()) for p in sorted((out / "parts").glob("*.json"))]
    if not parts:
        sys.exit(f"no parts in {out / 'parts'}; run with --model first")
    points = {
        p["model"]: [(s["predicted"], s["measured"], f"{s['avg_bits']:.2f}b") for s in p["sweep"]]
        + [(m["predicted"], m["measured"], "random") for m in p["random"]]
        for p in parts
    }
    plot_predicted_vs_measured(points, out / "img" / "rd_scatter.png")
    (out / "rd.json").write_text(json.dumps(parts, indent=1) + "\n")
    results = [EvalResult(**r) for p in parts for r in p["results"]]
    lines = ["## Rate-distortion bit allocation (issue 4, part 3)", ""]
    lines += [
        "Mixed plans: `w4a8` preset + `weight_bit_budget=4.5` (A8 int8 activations everywhere; candidates int4/g64, int6, int8,",
        "fp8 e4m3 per channel, or the op kept in full precision = 16 bits; first/last op >= 8 bits as in `w4a8`). Average bits are",
        "nominal weight bits x parameters over the quantizable ops (the fp32 scales of int4/g64, +0.5 bit, are not counted).",
        "`mixed-4.5a8` uses measured D_n(b) (output NMSE when only node n is quantized), `mixed-4.5a8-fisher` the fisher estimate.",
        "",
        "| model | seeds | avg bits w4a8 / mixed / w6a8 | SQNR mean w4a8 | mixed-4.5a8 | mixed (fisher) | w6a8 | mixed - w4a8 | w6a8 - mixed |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for p in parts:
        r = {x["config"]: x["sqnr_mean_db"] for x in p["results"]}
        b = p["avg_bits"]
        lines.append(
            f"| {p['model']} | {p['seeds']} | {b['w4a8']:.2f} / {b['mixed-4.5a8']:.2f} / {b['w6a8']:.2f} | {r['w4a8']:.2f} | "
            f"{r['mixed-4.5a8']:.2f} | {r['mixed-4.5a8-fisher']:.2f} | {r['w6a8']:.2f} | {r['mixed-4.5a8'] - r['w4a8']:+.2f} | "
            f"{r['w6a8'] - r['mixed-4.5a8']:+.2f} |"
        )
    lines += [
        "", "### Additivity: predicted sum_n D_n(b_n) vs measured output NMSE of the mixed plan", "",
        "Same kept calibration calls for both; budget sweep " + ", ".join(f"{b:g}" for b in BUDGETS) + " bits plus random mixes.",
        "", "![predicted vs measured](img/rd_scatter.png)", "",
        "| model | points | Pearson r | Pearson r (log-log) | measured / predicted (min..max) |", "| --- | --- | --- | --- | --- |",
    ]
    for p in parts:
        a = p["additivity"]
        lines.append(f"| {p['model']} | {len(p['sweep']) + len(p['random'])} | {a['pearson_r']:.3f} | {a['pearson_r_log']:.3f} | "
                     f"{a['min_ratio']:.2f}..{a['max_ratio']:.2f} |")
    lines += ["", "Budget sweep (allocated plans):", "", "| model | budget | avg bits | predicted | measured | measured / predicted |",
              "| --- | --- | --- | --- | --- | --- |"]
    for p in parts:
        for s in p["sweep"]:
            lines.append(f"| {p['model']} | {s['budget']:.2f} | {s['avg_bits']:.3f} | {s['predicted']:.3g} | {s['measured']:.3g} | "
                         f"{s['measured'] / s['predicted']:.2f} |")
    lines += ["", "### Cost of allocation and the cheaper estimate", "",
              "| model | ops | kept calls | measured: forwards | measured: wall (s) | fisher: backwards | fisher: wall (s) | "
              "fisher vs measured D_n(b): Spearman / Pearson(log) | fisher plan: measured NMSE vs measured-table plan | same choice |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for p in parts:
        a, f = p["allocation"], p["fisher"]
        lines.append(
            f"| {p['model']} | {p['nodes']} | {sum(a['calls'])} | {a['forward_passes']} | {a['wall_s']:.0f} | {f['backward_passes']} | "
            f"{f['wall_s']:.0f} | {f['spearman']:.3f} / {f['pearson_log']:.3f} | {f['allocation_measured']:.3g} vs {a['measured']:.3g} | "
            f"{f['same_choice_fraction']:.0%} |"
        )
    lines += ["", "Exact DP (rates discretized to 1/40000 of the bf16 total) vs Lagrangian at 4.5 bits, on the measured tables:", "",
              "| model | Lagrangian predicted | DP predicted | DP measured |", "| --- | --- | --- | --- |"]
    for p in parts:
        e = p["exact"]
        lines.append(f"| {p['model']} | {e['lagrangian']:.4g} | {e['dp']:.4g} | {e['dp_measured']:.4g} |")
    lines += ["", "Commands:", "", "```", *[p["command"] for p in parts], command, "```"]
    lines += ["", "Bits per layer (4.5-bit plans, measured tables; weights are shared by all timestep groups):", ""]
    lines += [f"![bits {p['model']}](img/bits_{p['model']}.png)" for p in parts]
    notes = out / "notes.md"
    if notes.is_file():
        lines += ["", notes.read_text().strip()]
    write_report(results, out, command, "\n".join(lines))
    (out / "command.txt").write_text(command + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="mnist_unet, mnist_vit or cifar10_ddpm")
    ap.add_argument("--seeds", type=int, default=32)
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--calls", type=int, default=4, help="kept calls per timestep group for measuring D_n(b)")
    ap.add_argument("--random", type=int, default=16, help="random mixes for the additivity scatter")
    ap.add_argument("--out", default="docs/experiments/rd")
    ap.add_argument("--report", action="store_true", help="write the report from the parts")
    args = ap.parse_args()
    out = Path(args.out)
    if args.report:
        report(out, "python " + " ".join(shlex.quote(a) for a in sys.argv))
    elif args.model:
        study(args.model, args.seeds, args.calib_samples, args.calls, args.random, out)
    else:
        ap.error("pass --model NAME or --report")


if __name__ == "__main__":
    main()

"""Allocation summary and bits heatmaps of saved mixed plans (``qdiff eval --plans DIR``).

    PYTHONPATH=. python examples/rd_plans_report.py /tmp/rd/plans/*mixed*.qplan --img docs/experiments/rd/img

Prints one markdown row per plan: average bits, predicted vs measured output NMSE on the kept calls, the
Lagrangian's predicted distortion against the exact DP optimum at the same budget, the allocation's cost
(forward / backward passes, wall time) and how many (node, group) choices differ from the node's group-0 choice;
writes ``bits_<plan>.png`` per plan.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from qcompile import QuantPlan
from qcompile.rdreport import plot_bits_per_layer, record_tables
from qcompile.sensitivity import exact_check


def row(path: Path, img: Path | None) -> str:
    plan = QuantPlan.load(path)
    rec = plan.allocation
    if rec is None:
        return f"| {path.stem} | (no allocation) |"
    check = exact_check(record_tables(rec), rec.budget_bits * rec.total_params)  # recomputed: older records used a coarser DP
    dp = check.get("exact_dp_distortion")
    gap = "-" if not dp else f"{100 * (rec.predicted / dp - 1):+.2f}%" + ("" if check["exact_dp_exact"] else " (DP approx.)")
    temporal = sum(len(set(rec.group_choices(k))) > 1 for k in rec.nodes)
    counts: dict[str, int] = {}
    for k in rec.nodes:
        for c in rec.group_choices(k):
            counts[c] = counts.get(c, 0) + 1
    if img is not None:
        img.mkdir(parents=True, exist_ok=True)
        plot_bits_per_layer(plan, img / f"bits_{path.stem}.png")
    mix = ", ".join(f"{c} {n}" for c, n in sorted(counts.items()))
    return (
        f"| {path.stem} | {rec.average_bits:.3f} | {rec.predicted:.3g} | {rec.measured:.3g} | {gap} | {rec.forward_passes} | "
        f"{rec.backward_passes} | {rec.wall_s:.0f} | {temporal}/{len(rec.nodes)} | {mix} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("plans", nargs="+", type=Path)
    ap.add_argument("--img", type=Path, help="folder for the bits heatmaps")
    a = ap.parse_args()
    print("| plan | avg bits | predicted NMSE | measured NMSE | Lagrangian vs DP | forwards | backwards | wall (s) | ops whose bits vary over groups | (node, group) choices |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for p in a.plans:
        print(row(p, a.img))


if __name__ == "__main__":
    main()

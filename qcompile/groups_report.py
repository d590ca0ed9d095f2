"""The timestep groups of a plan as text: edges, steps per group and per-group activation scales."""

from __future__ import annotations

import inspect as pyinspect
from typing import Any

import torch

from .plan import QuantPlan
from .timesteps import find_timestep


def probe_group(plan: QuantPlan, model: torch.nn.Module, args: tuple, kwargs: dict) -> int:
    """The timestep group of a probe call (0 for single-group plans or calls without a timestep)."""
    if plan.groups.count == 1:
        return 0
    found = find_timestep(pyinspect.signature(model.forward), args, kwargs, plan.config.calibration.timestep_args)
    return plan.groups.group_of(None if found is None else found[1])


def group_rows(plan: QuantPlan) -> list[dict[str, Any]]:
    """Per group: timestep interval (edges), observed timesteps, calibration calls and distinct steps."""
    edges = plan.groups.edges
    out = []
    for g in range(plan.groups.count):
        ts = [c["timestep"] for c in plan.calls if c.get("timestep") is not None and plan.groups.group_of(c["timestep"]) == g]
        out.append(
            {
                "group": g,
                "from": edges[g - 1] if g > 0 else None,
                "to": edges[g] if g < len(edges) else None,
                "t_min": min(ts) if ts else None,
                "t_max": max(ts) if ts else None,
                "calls": len(ts),
                "steps": len(set(ts)),
            }
        )
    return out


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.4g}"


def groups_table(plan: QuantPlan) -> str:
    """Text: one line per group, then each quantized input's activation scale per group."""
    how = "segmented where activation ranges change most" if plan.config.group_boundaries == "segment" else "uniform in step index"
    lines = [f"timestep groups: {plan.groups.count} ({how}, config timestep_groups={plan.config.timestep_groups!r})"]
    loss = plan.meta.get("segmentation_loss_db")
    if loss:
        lines.append("  range loss per site and step (dB) for K = 1, 2, ...: " + " ".join(f"{v:.2f}" for v in loss))
    lines.append(f"  {'group':>5}  {'interval':<24} {'timesteps':<20} {'calls':>6} {'steps':>6}")
    for r in group_rows(plan):
        interval = f"[{_num(r['from'])}, {_num(r['to'])})"
        lines.append(f"  {r['group']:>5}  {interval:<24} {_num(r['t_min']) + ' .. ' + _num(r['t_max']):<20} {r['calls']:>6} {r['steps']:>6}")
    nodes = [n for n in plan.quantized_nodes() if any(a is not None for a in n.acts)]
    if nodes:
        width = max(4, *(len(n.key) for n in nodes))
        lines += ["", "activation scale per group:", "  " + "node".ljust(width) + "".join(f"  {'g' + str(g):>9}" for g in range(plan.groups.count))]
        for n in nodes:
            lines.append("  " + n.key.ljust(width) + "".join(f"  {'-' if a is None else format(a.scale, '.3e'):>9}" for a in n.acts))
    return "\n".join(lines)

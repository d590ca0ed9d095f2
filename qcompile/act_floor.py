"""Temporal mixed precision of activations: a floor on each timestep group's output SQNR.

With ``QuantConfig.group_act_floor_db`` set, calibration keeps one denoiser call per timestep bin (the
calls of the calibration trajectory, :class:`~qcompile.sensitivity.CallSample`). After the plan is built,
the model is captured once with every quantized op switchable (:class:`~qcompile.sensitivity.SwitchableModel`)
and each group's quantized output is compared with FP32 on that group's kept calls. A group whose worst
kept step is below the floor keeps its activations unquantized: every quantized op's activation quantizer
of that group is removed (``NodePlan.acts[g] = None``), weights stay as they are (W8A16 for that group in
deployment; the reference lowering computes in the model's dtype). The decision and both measurements are
recorded in the plan (:class:`ActFloorRecord`); nothing about steps or layers is fixed in advance.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .metrics import sqnr_db

if TYPE_CHECKING:  # plan.py reads ActFloorRecord; the measurement's imports stay out of its import chain
    from .plan import QuantPlan
    from .sensitivity import Call, SwitchableModel


@dataclass
class ActFloorRecord:
    """What the activation floor measured and decided."""

    floor_db: float
    measured_db: list[float | None]  # per group: worst kept calibration step's output SQNR with the group's W8A8 ops
    a16_groups: list[int]  # groups below the floor: activations unquantized
    after_db: list[float | None] = field(default_factory=list)  # per group: the same measurement after the decision
    kept_calls: list[int] = field(default_factory=list)  # kept calls (steps) measured per group
    step_share: float = 0.0  # share of the calibration trajectory's denoiser calls in the A16 groups
    forwards: int = 0
    wall_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ActFloorRecord":
        rec = cls(**d)
        groups = len(rec.measured_db)
        if not all(isinstance(g, int) and 0 <= g < groups for g in rec.a16_groups) or len(set(rec.a16_groups)) != len(rec.a16_groups):
            raise ValueError(f"A16 groups {rec.a16_groups} are not distinct groups of {groups}")
        if len(rec.after_db) != groups or len(rec.kept_calls) != groups or not 0.0 <= rec.step_share <= 1.0:
            raise ValueError(f"per-group lists do not have {groups} entries, or the step share {rec.step_share} is not in [0, 1]")
        return rec


def _worst(model: "SwitchableModel", group: int) -> float | None:
    calls = model.calls[group]
    if not calls:
        return None
    with torch.no_grad():
        return min(sqnr_db(ref, model.run(group, call)) for call, ref in zip(calls, model.references[group]))


def _switch_all(model: "SwitchableModel", plan: "QuantPlan") -> None:
    from .backend import node_op

    for n in plan.quantized_nodes():
        model.use(n.key, [node_op(n, g) for g in range(plan.groups.count)])


def apply_act_floor(model: torch.nn.Module, plan: "QuantPlan", calls: "list[list[Call]]", floor_db: float) -> ActFloorRecord:
    """Measure each group's output SQNR on its kept ``calls``; drop the activation quantizers of groups below ``floor_db``.

    Changes ``plan.nodes[*].acts`` in place and returns the record (also stored as ``plan.act_floor``).
    """
    from .sensitivity import SwitchableModel

    t0 = time.perf_counter()
    switchable = SwitchableModel(model, calls)
    try:
        _switch_all(switchable, plan)
        measured = [_worst(switchable, g) for g in range(plan.groups.count)]
        below = [g for g, v in enumerate(measured) if v is not None and v < floor_db]
        for n in plan.quantized_nodes():
            for g in below:
                n.acts[g] = None
        after: list[float | None] = list(measured)
        if below:
            _switch_all(switchable, plan)
            for g in below:
                after[g] = _worst(switchable, g)
        forwards = switchable.forwards
    finally:
        switchable.close()
    group_of = [c.get("group") for c in plan.calls]
    share = sum(1 for g in group_of if g in below) / max(len(group_of), 1)
    rec = ActFloorRecord(floor_db, measured, below, after, [len(c) for c in calls], share, forwards, time.perf_counter() - t0)
    plan.act_floor = rec
    return rec


def describe(plan: "QuantPlan") -> str:
    """One paragraph for ``inspect``: the floor, each group's measurement and what runs at which precision."""
    rec = plan.act_floor
    if rec is None:
        return ""
    db = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    per_group = ", ".join(
        f"g{g}: {db(m)}" + (f" -> {db(rec.after_db[g])} A16" if g in rec.a16_groups else "") for g, m in enumerate(rec.measured_db)
    )
    steps = f"{rec.step_share:.0%} of the calibration steps"
    if rec.a16_groups:
        what = f"group(s) {rec.a16_groups} keep activations unquantized (W8A16 in deployment), {steps}; the rest W8A8"
    else:
        what = "every group stays W8A8"
    return (
        f"activation floor {rec.floor_db:g} dB (worst kept calibration step per group, output SQNR vs FP32, dB): {per_group}\n"
        f"  {what}; {rec.forwards} forwards, {rec.wall_s:.1f} s"
    )

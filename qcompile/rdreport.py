"""Reporting for rate-distortion bit allocation: correlations and pictures (bits per layer, predicted vs measured)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch

from .config import CANDIDATE_BITS
from .passes.allocate import AllocationRecord, RDTable
from .plan import QuantPlan


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation coefficient of two equally long sequences."""
    a, b = torch.tensor(list(x), dtype=torch.float64), torch.tensor(list(y), dtype=torch.float64)
    if a.numel() != b.numel() or a.numel() < 2:
        raise ValueError(f"pearson needs two sequences of equal length >= 2, got {a.numel()} and {b.numel()}")
    a, b = a - a.mean(), b - b.mean()
    den = math.sqrt(float(a.pow(2).sum() * b.pow(2).sum()))
    return float((a * b).sum()) / den if den > 0 else math.nan


def _ranks(v: Sequence[float]) -> list[float]:
    """Ranks (1-based) with ties given their average rank."""
    order = sorted(range(len(v)), key=lambda i: v[i])
    ranks = [0.0] * len(v)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (Pearson of the ranks)."""
    return pearson(_ranks(list(x)), _ranks(list(y)))


def record_tables(rec: AllocationRecord) -> list[RDTable]:
    """The allocation's tables rebuilt from a plan's record (per (node, group) pair with ``per_group``)."""
    w = rec.group_weights
    if rec.per_group:
        return [
            RDTable(f"{k}@{g}", tuple(n["distortion"]), [wg * CANDIDATE_BITS[c] * n["params"] for c in n["distortion"]],
                    [wg * n["distortion"][c][g] for c in n["distortion"]])
            for k, n in rec.nodes.items() for g, wg in enumerate(w)
        ]
    return [
        RDTable(k, tuple(n["distortion"]), [CANDIDATE_BITS[c] * n["params"] for c in n["distortion"]],
                [sum(a * b for a, b in zip(w, n["distortion"][c])) for c in n["distortion"]])
        for k, n in rec.nodes.items()
    ]


def bits_matrix(plan: QuantPlan) -> tuple[list[str], list[list[str]]]:
    """(allocated node keys in graph order, candidate per node per timestep group) of a mixed plan."""
    rec = plan.allocation
    if rec is None:
        raise ValueError("the plan has no bit allocation (it was not made with weight_bit_budget)")
    keys = [k for k in plan.nodes if k in rec.nodes]
    return keys, [rec.group_choices(k) for k in keys]


def plot_bits_per_layer(plan: QuantPlan, path: str | Path, title: str | None = None) -> Path:
    """Heatmap of the weight bits of every allocated op (columns, graph order) per timestep group (rows).

    Cells are coloured by bits and labelled with the candidate (4 = int4 g64, 4g = int4 g32, 5, 6, 8,
    f = fp8, 16 = kept in bf16). A shared allocation has equal rows.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rec = plan.allocation
    keys, choices = bits_matrix(plan)
    groups = len(rec.group_weights)
    bits = [[CANDIDATE_BITS[c[g]] for c in choices] for g in range(groups)]
    short = {"int4": "4", "int4g32": "4g", "int5": "5", "int6": "6", "int8": "8", "fp8_e4m3": "f", "bf16": "16"}
    fig, ax = plt.subplots(figsize=(max(6, 0.18 * len(keys) + 2.5), 1.2 + 0.32 * groups))
    im = ax.imshow(bits, aspect="auto", cmap="viridis", vmin=4, vmax=max(8, max(max(r) for r in bits)))
    if len(keys) * groups <= 2500:
        for g in range(groups):
            for i, c in enumerate(choices):
                ax.text(i, g, short.get(c[g], "?"), ha="center", va="center", fontsize=5, color="w" if bits[g][i] < 6 else "k")
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels(keys, rotation=90, fontsize=5)
    ax.set_yticks(range(groups))
    ax.set_yticklabels([f"g{g}" for g in range(groups)], fontsize=6)
    ax.set_ylabel("timestep group")
    kind = "per group" if rec.per_group else "shared by all groups"
    ax.set_title(
        title or f"{plan.model_class.rsplit('.', 1)[-1]}: weight bits per layer ({kind}); budget {rec.budget_bits:g}, avg {rec.average_bits:.3f}",
        fontsize=8,
    )
    fig.colorbar(im, ax=ax, fraction=0.02, pad=0.01, label="bits")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def plot_predicted_vs_measured(points: dict[str, list[tuple[float, float, str]]], path: str | Path) -> Path:
    """Log-log scatter of predicted vs measured output distortion, one series per model.

    ``points[model]`` holds (predicted, measured, label) triples; the diagonal is perfect additivity.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(points), figsize=(4.2 * len(points), 4), squeeze=False)
    for ax, (model, pts) in zip(axes[0], points.items()):
        pred, meas = [p for p, _, _ in pts], [m for _, m, _ in pts]
        sweep = [i for i, (_, _, label) in enumerate(pts) if not label.startswith("random")]
        rand = [i for i in range(len(pts)) if i not in sweep]
        ax.scatter([pred[i] for i in rand], [meas[i] for i in rand], s=10, c="#999", label="random mixes")
        ax.scatter([pred[i] for i in sweep], [meas[i] for i in sweep], s=18, c="#de2d26", label="allocated (budget sweep)")
        for i in sweep:
            ax.annotate(pts[i][2], (pred[i], meas[i]), fontsize=6, xytext=(3, -3), textcoords="offset points")
        lo, hi = min(pred + meas), max(pred + meas)
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.7)
        ax.set_xscale("log")
        ax.set_yscale("log")
        r = pearson(pred, meas)
        r_log = pearson([math.log10(p) for p in pred], [math.log10(m) for m in meas])
        ax.set_title(f"{model}: Pearson r = {r:.3f} (log-log {r_log:.3f})", fontsize=9)
        ax.set_xlabel("predicted sum_n D_n(b_n) (output NMSE)")
        ax.set_ylabel("measured output NMSE")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

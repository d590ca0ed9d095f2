"""``qcompile.inspect``: what was quantized, how, and how well.

``inspect(qmodel)`` runs a probe input (stored in the plan by calibration, or given) through the
compiled model while tapping each compiled graph: for every quantizable op it records the
float input and output, the output of the quantized op on the *same* float input (local SQNR)
and the op's output in the fully quantized graph (cumulative SQNR). The report prints as a
table and writes the annotated graph as DOT or SVG.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from .backend import QuantizedGraph
from .config import CANDIDATE_BITS, Format
from .errors import QdiffError
from .metrics import sqnr_db
from .passes.annotate import ANNOTATION_KEY
from .passes.fuse_siblings import siblings_of
from .passes.sites import META_KEY
from .act_floor import describe as describe_floor
from .groups_report import groups_table, probe_group as _probe_group
from .plan import QuantPlan
from .probe import decode
from .release import check_not_released


def plan_of(compiled: Any) -> QuantPlan:
    """The plan a ``torch.compile(..., backend="qdiff", options={"plan": ...})`` module was built with."""
    if isinstance(getattr(compiled, "qdiff_plan", None), QuantPlan):  # qcompile.compile of a multi-group plan
        return compiled.qdiff_plan
    obj = getattr(getattr(compiled, "dynamo_ctx", None), "callback", None)
    for _ in range(16):
        if obj is None:
            break
        kwargs = getattr(obj, "kwargs", None)
        if isinstance(kwargs, dict) and isinstance(kwargs.get("options"), dict) and "plan" in kwargs["options"]:
            plan = kwargs["options"]["plan"]
            return QuantPlan.load(plan) if not isinstance(plan, QuantPlan) else plan
        obj = getattr(obj, "_torchdynamo_orig_backend", None) or getattr(obj, "_torchdynamo_orig_callable", None)
    raise QdiffError(
        f"inspect needs a module compiled with torch.compile(model, backend='qdiff', options={{'plan': plan}}) "
        f"or a QuantPlan; got {type(compiled).__name__}"
    )


class _Tap(fx.Interpreter):
    """Runs a graph and records the (resolved) inputs and output of every quantizable op."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.records: dict[str, tuple[Any, tuple, dict, torch.Tensor, slice | None]] = {}  # the columns of a fused call

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        site = n.meta.get(META_KEY)
        if site is not None and n.op == "call_function":
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            members = siblings_of(n)
            if members is None:
                self.records[site.key] = (n.target, args, kwargs, out, None)
            else:  # one fused call of several linears (passes.fuse_siblings): each member's output columns
                for m in members:
                    self.records[m.key] = (n.target, args, kwargs, out[..., m.start : m.stop], slice(m.start, m.stop))
        return out


@dataclass
class OpReport:
    """One row of the inspection table."""

    key: str
    op: str
    weight_shape: tuple[int, ...]
    input_shape: tuple[int, ...] | None
    weight_format: str
    act_format: str
    weight_scale_range: tuple[float, float] | None
    act_range: tuple[float, float] | None
    sqnr_local_db: float | None = None
    sqnr_cumulative_db: float | None = None
    note: str = ""
    split: str = ""  # the split-shortcut decision: "split 40+40 (cat(...) > ...)", "not split: why", or "" (no concat behind)
    act_slice_ranges: list[tuple[float, float]] | None = None  # per channel slice of a split op
    weight_bits: float | None = None  # rate in bits per weight of this group's format (16: kept in full precision by bit allocation)
    outliers: str = ""  # the outlier-split decision of this group's input quantizer(s): "+6.1 dB 0.03%", "no (+0.4 dB)", or ""


@dataclass
class InspectReport:
    """The inspection result: a row per quantizable op, the output SQNR and the annotated graphs."""

    plan: QuantPlan
    rows: list[OpReport]
    output_sqnr_db: float | None = None
    graphs: list[fx.GraphModule] = field(default_factory=list, repr=False)
    group: int = 0  # the timestep group the rows (and the probe) belong to

    def __str__(self) -> str:
        headers = ["node", "op", "weight", "input", "w fmt", "w bits", "a fmt", "w scale", "a range", "SQNR local", "SQNR cum", "note", "split", "outliers"]
        rows = [
            [
                r.key, r.op, "x".join(map(str, r.weight_shape)), "x".join(map(str, r.input_shape or ())), r.weight_format,
                "-" if r.weight_bits is None else f"{r.weight_bits:g}", r.act_format, _range(r.weight_scale_range, ".1e"),
                " | ".join(_range(a, ".3g") for a in r.act_slice_ranges) if r.act_slice_ranges else _range(r.act_range, ".3g"),
                _db(r.sqnr_local_db), _db(r.sqnr_cumulative_db), r.note, r.split, r.outliers,
            ]
            for r in self.rows
        ]
        widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(headers)]
        line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
        q = sum(1 for r in self.rows if r.weight_format != "float")
        head = (
            f"qdiff plan for {self.plan.model_class} ({self.plan.config.name}, fingerprint {self.plan.fingerprint}): "
            f"{q}/{len(self.rows)} ops quantized, {self.plan.groups.count} timestep group(s)"
        )
        split = sum(1 for r in self.rows if r.split.startswith("split"))
        refused = sum(1 for r in self.rows if r.split.startswith("not split"))
        if split or refused:
            head += f"\nsplit shortcuts: {split} op(s) read a channel concat with a quantizer per slice, {refused} not split (column 'split')"
        cfg = self.plan.config
        if self.plan.tables:
            tables = self.plan.tables.values()
            head += (f"\nembedding tables: {len(self.plan.tables)} stored int8 with a scale per row "
                     f"({sum(w.nbytes for w in tables) / 1e6:.1f} MB; {sum(w.data.numel() for w in tables) * 2 / 1e6:.1f} MB in 16-bit)")
        if cfg.outlier_split_db is not None:
            taken = sum(1 for r in self.rows if "dB" in r.outliers and not r.outliers.startswith("no"))
            head += (
                f"\noutlier split (outlier_split_db={cfg.outlier_split_db:g}): {taken} op input(s) in group {self.group} have a second, "
                "sparse int8 quantizer for the values beyond the inlier range (column 'outliers': estimated SQNR gain and share)"
            )
        tail = f"model output SQNR on the probe: {_db(self.output_sqnr_db)}" if self.output_sqnr_db is not None else ""
        tail = "\n".join(filter(None, [tail, describe_floor(self.plan)]))
        if self.plan.groups.count > 1:
            head += f"; table for group {self.group}"
            tail = "\n\n".join(filter(None, [tail, groups_table(self.plan)]))
        alloc = self.plan.allocation
        if alloc is not None:
            head += (
                f"\nbit allocation ({alloc.estimator}): {alloc.average_bits:.3f} average weight bits for a budget of "
                f"{alloc.budget_bits:g} over {len(alloc.nodes)} ops; output NMSE predicted {alloc.predicted:.3g}, measured "
                f"{_g(alloc.measured)}; {alloc.forward_passes} forwards, {alloc.wall_s:.1f} s; "
                + (f"bits per op per timestep group below" if alloc.per_group else f"one weight format per op for all {self.plan.groups.count} timestep group(s)")
            )
            if alloc.per_group:
                tail = "\n\n".join(filter(None, [tail, bits_table(self.plan)]))
        return "\n".join([head, line(headers), line(["-" * w for w in widths]), *map(line, rows), tail]).rstrip()

    def to_dicts(self) -> list[dict[str, Any]]:
        return [r.__dict__.copy() for r in self.rows]

    def to_networkx(self, index: int = 0):
        """The annotated graph ``index`` as a networkx DiGraph (op nodes only, with labels)."""
        import networkx as nx

        gm = self.graphs[index]
        g = nx.DiGraph()
        by_key = {r.key: r for r in self.rows}
        for n in gm.graph.nodes:
            if n.op in ("placeholder", "get_attr", "output"):
                continue
            site = n.meta.get(META_KEY)
            label, color = _short_target(n), "white"
            if site is not None:
                r = by_key.get(site.key)
                label = f"{site.key}\n{site.kind.value}"
                if r is not None and r.weight_format != "float":
                    label += f"\nW {r.weight_format} / A {r.act_format}"
                    if r.split.startswith("split"):
                        label += f"\n{r.split.split(' (')[0]}"
                    if r.sqnr_local_db is not None:
                        label += f"\n{_db(r.sqnr_local_db)}"
                    color = "#9ecae1" if r.weight_format.startswith("int4") else "#a1d99b"
                else:
                    color = "#fdae6b"
            g.add_node(n.name, label=label, color=color)
            for a in n.all_input_nodes:
                if a.name in g:
                    g.add_edge(a.name, n.name)
        return g

    def to_dot(self, path: str | Path, index: int = 0) -> Path:
        """Write the annotated graph as Graphviz DOT (quantized ops green/blue, float ops orange)."""
        g = self.to_networkx(index)
        esc = lambda s: s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")  # noqa: E731
        lines = ["digraph qdiff {", "  node [shape=box, style=filled, fontname=monospace];"]
        lines += [f'  "{n}" [label="{esc(d["label"])}", fillcolor="{d["color"]}"];' for n, d in g.nodes(data=True)]
        lines += [f'  "{a}" -> "{b}";' for a, b in g.edges]
        path = Path(path)
        path.write_text("\n".join(lines + ["}"]) + "\n")
        return path

    def to_svg(self, path: str | Path, index: int = 0) -> Path:
        """Draw the annotated graph (layered by topological generation) to SVG with matplotlib."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import networkx as nx

        g = self.to_networkx(index)
        for layer, nodes in enumerate(nx.topological_generations(g)):
            for n in nodes:
                g.nodes[n]["layer"] = layer
        pos = nx.multipartite_layout(g, subset_key="layer", align="horizontal", scale=-1)
        layers = 1 + max((d["layer"] for _, d in g.nodes(data=True)), default=0)
        fig, ax = plt.subplots(figsize=(12, max(4, 0.6 * layers)))
        nx.draw_networkx_edges(g, pos, ax=ax, arrowsize=6, width=0.5, edge_color="#888")
        for n, d in g.nodes(data=True):
            ax.text(*pos[n], d["label"], fontsize=5, ha="center", va="center", bbox={"boxstyle": "round", "fc": d["color"], "ec": "#666"})
        ax.set_axis_off()
        path = Path(path)
        fig.savefig(path, format="svg", bbox_inches="tight")
        plt.close(fig)
        return path


def _short_target(n: fx.Node) -> str:
    t = n.target
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


def _db(v: float | None) -> str:
    if v is None:
        return "-"
    return "inf dB" if math.isinf(v) else f"{v:.1f} dB"


def _range(r: tuple[float, float] | None, fmt: str) -> str:
    return "-" if r is None else f"{r[0]:{fmt}}..{r[1]:{fmt}}"


def _g(v: float | None) -> str:
    return "-" if v is None else f"{v:.3g}"


def _outlier_note(a) -> str:
    """The outlier-split decision of one activation quantizer (per slice for split inputs)."""
    if a is None or all(p.outlier_gain_db is None for p in a.parts()):
        return ""
    def one(p) -> str:
        if p.outlier is not None:
            return f"+{p.outlier.gain_db:.1f} dB {p.outlier.share:.2%}"
        return "no" if p.outlier_gain_db is None else f"no ({p.outlier_gain_db:+.1f} dB)"
    return " | ".join(one(p) for p in a.parts())


def bits_table(plan: QuantPlan) -> str:
    """Weight bits of every allocated op in every timestep group (per-group bit allocation)."""
    rec = plan.allocation
    groups = len(rec.group_weights)
    keys = [k for k in plan.nodes if k in rec.nodes]
    width = max(len("node"), *(len(k) for k in keys))
    lines = [f"weight bits per op per timestep group (4g = int4 g32, f = fp8):", "  ".join(["node".ljust(width), *(f"g{g:<3d}" for g in range(groups)), "avg"])]
    short = {"int4g32": "4g", "fp8_e4m3": "f", "bf16": "16"}
    for k in keys:
        cells = [short.get(c, c.removeprefix("int")).ljust(4) for c in rec.group_choices(k)]
        lines.append("  ".join([k.ljust(width), *cells, f"{rec.nodes[k]['bits']:.2f}"]))
    return "\n".join(lines)


def _rows(plan: QuantPlan, group: int) -> list[OpReport]:
    rows = []
    rec = plan.allocation
    shared = plan.meta.get("shared_statistics", {})  # site -> the site whose input statistics (and quantizer) it shares
    for n in plan.nodes.values():
        w = n.weight_for(group)
        a = n.acts[group] if w is not None else None
        wfmt = "float" if w is None else w.fmt + (f"/g{w.group_size}" if w.group_size else "")
        afmt = "float" if a is None else a.fmt + ("" if a.symmetric else "/asym")
        if a is None and w is not None and plan.act_floor is not None and group in plan.act_floor.a16_groups:
            afmt = "16-bit (floor)"
        rows.append(
            OpReport(
                n.key, n.kind.value, n.weight_shape, n.input_shape, wfmt, afmt,
                None if w is None else (float(w.scale.min()), float(w.scale.max())),
                None if a is None else (a.lo, a.hi),
                note="; ".join(x for x in (n.reason, f"input quantizer shared with {shared[n.key]}" if n.key in shared else "") if x),
                split=n.split_note or "",
                act_slice_ranges=None if a is None or a.slices is None else [(p.lo, p.hi) for p in a.slices],
                weight_bits=CANDIDATE_BITS[rec.group_choices(n.key)[group]] if rec is not None and n.key in rec.nodes else (None if w is None else Format(w.fmt).bits),
                outliers=_outlier_note(a),
            )
        )
    return rows


def _first_output(out: Any) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out:
        return _first_output(out[0])
    if hasattr(out, "to_tuple"):
        return _first_output(out.to_tuple())
    return None


def inspect(obj: Any, *args: Any, **kwargs: Any) -> InspectReport:
    """Report on a qdiff-compiled module (or a plan): formats, scales, and SQNR on a probe.

    Pass the probe inputs as ``*args, **kwargs`` (called like the model); otherwise the probe
    that calibration stored in the plan is used. With a :class:`QuantPlan` alone no SQNR is computed.
    """
    if isinstance(obj, QuantPlan):
        return InspectReport(obj, _rows(obj, 0))
    plan = plan_of(obj)
    model = getattr(obj, "_orig_mod", None)
    if model is None:
        raise QdiffError("inspect needs the object returned by torch.compile(model, backend='qdiff', ...)")
    check_not_released(model, "inspect (its SQNR reference)")
    if not args and not kwargs:
        if plan.probe is None:
            raise QdiffError("the plan holds no probe input; call qcompile.inspect(qmodel, *inputs) with one denoiser call's inputs")
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        args, kwargs = decode(*plan.probe, device=device)
    group = _probe_group(plan, model, args, kwargs)
    with torch.no_grad():
        reference = _first_output(model(*args, **kwargs))
        obj(*args, **kwargs)  # compile whatever graphs the probe needs (strides may differ from earlier calls)
        taps: list[tuple[_Tap, _Tap]] = []
        saved = [r.runner for r in plan.compiled]
        for record in plan.compiled:
            record.runner = _tapping_runner(record, taps)
        try:
            quantized = _first_output(obj(*args, **kwargs))
        finally:
            for record, runner in zip(plan.compiled, saved):
                record.runner = runner
        if not taps:
            raise QdiffError("inspect: the probe call ran none of the plan's compiled graphs (was the model recompiled elsewhere?)")
    rows = _rows(plan, group)
    by_key = {r.key: r for r in rows}
    for float_tap, quant_tap in taps:
        for key, (_, fargs, _, fout, _) in float_tap.records.items():
            row = by_key.get(key)
            if row is None or key not in quant_tap.records:
                continue
            target, qargs, qkwargs, qout, cols = quant_tap.records[key]
            if row.weight_format != "float":
                local = target(fargs[0], *qargs[1:], **qkwargs)
                row.sqnr_local_db = sqnr_db(fout, local if cols is None else local[..., cols])
            row.sqnr_cumulative_db = sqnr_db(fout, qout)
    out_sqnr = None if reference is None or quantized is None else sqnr_db(reference, quantized)
    return InspectReport(plan, rows, out_sqnr, [r.prepared for r in plan.compiled], group)


def _tapping_runner(record: QuantizedGraph, taps: list):
    def run(*args: Any) -> Any:
        float_tap, quant_tap = _Tap(record.prepared), _Tap(record.converted)
        float_tap.run(*args)
        out = quant_tap.run(*args)
        taps.append((float_tap, quant_tap))
        return out

    return run

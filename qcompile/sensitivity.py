"""Output sensitivity of each quantizable node, and rate-distortion bit allocation at calibration time.

For each node ``n`` and candidate weight format ``b``, ``D_n(b)`` is the distortion of the model
output when only ``n`` is quantized with ``b``: the normalized MSE ``|y_q - y|^2 / |y|^2`` per kept
denoiser call, averaged over each timestep group's kept calls (the calls calibration kept, see
:class:`CallSample`), then over groups weighted by their share of calls. ``R_n(b)`` is
``bits(b) x parameters``. :mod:`qcompile.passes.allocate` turns the tables into bit-widths.

Two estimators of ``D_n(b)``:

* ``measured``: the model is captured once by Dynamo with every quantizable op replaced by a
  switch (:class:`SwitchableModel`) that runs the float op or a given quantized op (converted by
  :func:`qcompile.passes.convert.convert`); one forward per node x candidate x kept call.
* ``fisher`` (first order): ``D_n(b) ~ sum_j s_j (z_b - z)_j^2`` over the elements ``j`` of the node's
  output ``z``: ``s`` is the diagonal of ``J^T J / |y|^2`` (Gauss-Newton / Fisher of the output),
  estimated with random output projections (``probes`` backward passes per kept call, whatever the
  node count), and ``z_b - z`` is the output error of the candidate's converted op on the node's
  captured input. Both run in the same captured graphs and converted ops as the measurement.
"""

from __future__ import annotations

import copy
import math
from fractions import Fraction
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
from torch.utils._pytree import tree_map
from tqdm.auto import tqdm

from .backend import node_op
from .config import CANDIDATE_BITS, Estimator, FirstLastPolicy
from .errors import CalibrationError
from .graph import prepare
from .passes.allocate import AllocationRecord, RDTable, exact_allocate, lagrangian_allocate
from .passes.annotate import Annotation
from .passes.convert import QuantizedOp, convert
from .passes.sites import META_KEY, Site
from .plan import NodePlan
from .timesteps import TimestepGroups

if TYPE_CHECKING:
    from .calibrate import CalibrationSession

Call = tuple[tuple, dict]


def _copy_call(args: tuple, kwargs: dict) -> Call:
    """The call's arguments with every tensor detached and cloned (other values are kept as they are)."""
    clone = lambda v: v.detach().clone() if isinstance(v, torch.Tensor) else v  # noqa: E731
    return tree_map(clone, tuple(args)), tree_map(clone, dict(kwargs))


class CallSample:
    """A bounded sample of denoiser call inputs: a reservoir of ``per_bin`` calls per timestep bin."""

    def __init__(self, per_bin: int, generator: torch.Generator):
        self.per_bin = per_bin
        self.generator = generator
        self.bins: dict[int, tuple[int, list[tuple[float | None, Call]]]] = {}  # bin -> (calls seen, kept)

    def _draw(self, n: int) -> int:
        return int(torch.randint(n, (1,), generator=self.generator))

    def offer(self, bin_id: int, timestep: float | None, args: tuple, kwargs: dict) -> None:
        seen, kept = self.bins.get(bin_id, (0, []))
        seen += 1
        if len(kept) < self.per_bin:
            kept.append((timestep, _copy_call(args, kwargs)))
        else:
            j = self._draw(seen)
            if j < self.per_bin:
                kept[j] = (timestep, _copy_call(args, kwargs))
        self.bins[bin_id] = (seen, kept)

    def merge(self, absorbed: int, into: int) -> None:
        """Fold bin ``absorbed`` into ``into`` (as :class:`~qcompile.timesteps.StepBins` merged them)."""
        if absorbed not in self.bins:
            return
        seen_a, kept_a = self.bins.pop(absorbed)
        seen_b, kept_b = self.bins.get(into, (0, []))
        pool = kept_a + kept_b
        while len(pool) > self.per_bin:
            pool.pop(self._draw(len(pool)))
        self.bins[into] = (seen_a + seen_b, pool)

    def select(self, groups: TimestepGroups, per_group: int) -> list[list[Call]]:
        """Up to ``per_group`` kept calls of each timestep group, spread evenly over its timesteps."""
        by_group: list[list[tuple[float | None, Call]]] = [[] for _ in range(groups.count)]
        for _, kept in self.bins.values():
            for t, call in kept:
                by_group[groups.group_of(t)].append((t, call))
        out = []
        for items in by_group:
            items.sort(key=lambda tc: -math.inf if tc[0] is None else tc[0])
            if len(items) > per_group:
                items = [items[int((i + 0.5) * len(items) / per_group)] for i in range(per_group)]
            out.append([call for _, call in items])
        return out


# -- the switchable model ---------------------------------------------------------------------
def output_tensor(out: Any) -> torch.Tensor:
    """The first tensor of a denoiser output (tensor, tuple or diffusers output)."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    if isinstance(out, (tuple, list)) and out:
        return output_tensor(out[0])
    raise CalibrationError(f"bit allocation: cannot find the output tensor of the denoiser (it returned {type(out).__name__})")


def nmse(reference: torch.Tensor, test: torch.Tensor) -> float:
    """``|test - reference|^2 / |reference|^2`` in float64."""
    ref = reference.detach().double()
    return float((test.detach().double() - ref).pow(2).sum() / ref.pow(2).sum().clamp_min(1e-300))


def _single_op_module(node: fx.Node) -> fx.GraphModule:
    """A GraphModule computing just ``node`` (its input nodes become placeholders, meta is kept)."""
    g = fx.Graph()
    env = {inp: g.placeholder(f"in_{i}") for i, inp in enumerate(node.all_input_nodes)}
    g.output(g.node_copy(node, lambda n: env[n]))
    return fx.GraphModule(torch.nn.Module(), g)


class SwitchOp(torch.nn.Module):
    """Stands for one quantizable op: runs it in float, or a quantized version (one per timestep group)."""

    def __init__(self, owner: "SwitchableModel", site: Site, float_op: fx.GraphModule):
        super().__init__()
        self.owner = [owner]  # in a list: not a submodule
        self.site = site
        self.float_op = float_op
        self.quantized: list[fx.GraphModule | None] | None = None
        self.candidates: dict[tuple[str, int], fx.GraphModule] = {}  # (candidate, group) -> converted op (first-order estimate)

    def use(self, ops: list[QuantizedOp | None] | None, device: torch.device) -> None:
        """Run ``ops[g]`` in timestep group ``g`` (None, or a None entry: the float op)."""
        if ops is None:
            self.quantized = None
            return
        self.quantized = [None if q is None else convert(copy.deepcopy(self.float_op), {self.site.key: q}, device) for q in ops]

    def forward(self, *inputs: Any) -> torch.Tensor:
        owner = self.owner[0]
        op = self.float_op if self.quantized is None or self.quantized[owner.group] is None else self.quantized[owner.group]
        out = op(*inputs)
        if owner.capture is not None:  # first-order estimate: a leaf to differentiate at, and the op's inputs
            if not out.requires_grad:  # only where no earlier captured op feeds it: paths through later ops stay connected
                out = out.detach().requires_grad_()
            owner.capture.append((self, tuple(i.detach() if isinstance(i, torch.Tensor) else i for i in inputs), out))
        return out

    def converted(self, candidate: str, group: int, op: QuantizedOp, device: torch.device) -> fx.GraphModule:
        """The op converted to ``op`` (cached per candidate and group), as :meth:`use` would run it."""
        key = (candidate, group)
        if key not in self.candidates:
            self.candidates[key] = convert(copy.deepcopy(self.float_op), {self.site.key: op}, device)
        return self.candidates[key]


class SwitchableModel:
    """The denoiser captured once by Dynamo with every quantizable op behind a :class:`SwitchOp`.

    ``calls[g]`` are the kept calls of timestep group ``g``; their float outputs are computed once
    (the references). :meth:`use` switches one node to quantized ops (one per group) or back.
    """

    def __init__(self, model: torch.nn.Module, calls: list[list[Call]]):
        self.calls = calls
        self.device = next((p.device for p in model.parameters()), torch.device("cpu"))
        self.switches: dict[str, list[SwitchOp]] = {}
        self.assignment: dict[str, list[QuantizedOp]] = {}
        self.group = 0
        self.capture: list[tuple[SwitchOp, tuple, torch.Tensor]] | None = None
        self.forwards = 0
        self.backwards = 0
        self._compiled = torch.compile(model, backend=self._backend)
        with torch.no_grad():
            self.references = [[self.run(g, call) for call in group] for g, group in enumerate(calls)]

    def _backend(self, gm: fx.GraphModule, example_inputs: Any) -> Any:
        gm, _ = prepare(gm, example_inputs)
        for node in list(gm.graph.nodes):
            site: Site | None = node.meta.get(META_KEY)
            if site is None or site.unsupported or node.op != "call_function":
                continue
            switch = SwitchOp(self, site, _single_op_module(node))
            if site.key in self.assignment:
                switch.use(self.assignment[site.key], self.device)
            name = f"qdiff_switch_{sum(map(len, self.switches.values()))}"
            gm.add_submodule(name, switch)
            with gm.graph.inserting_before(node):
                new = gm.graph.call_module(name, tuple(node.all_input_nodes))
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            self.switches.setdefault(site.key, []).append(switch)
        gm.graph.lint()
        gm.recompile()

        def forward(*args: Any) -> Any:
            # The first-order estimate differentiates through this very graph: grad is enabled inside
            # it, not around the Dynamo call, which would guard-fail and capture a different graph.
            if self.capture is None:
                return gm.forward(*args)
            with torch.enable_grad():
                return gm.forward(*args)

        return forward

    def run(self, group: int, call: Call) -> torch.Tensor:
        """One forward of a kept call, with group ``group``'s quantized ops where switched."""
        self.group = group
        self.forwards += 1
        args, kwargs = call
        return output_tensor(self._compiled(*args, **kwargs))

    def use(self, key: str, ops: list[QuantizedOp] | None) -> None:
        """Switch node ``key`` to ``ops`` (one quantized op per timestep group) or back to float (None)."""
        if ops is None:
            self.assignment.pop(key, None)
        else:
            self.assignment[key] = ops
        for switch in self.switches.get(key, []):
            switch.use(ops, self.device)

    def reset(self) -> None:
        for key in list(self.assignment):
            self.use(key, None)

    def distortions(self) -> list[float]:
        """Mean normalized output MSE against the float references, per timestep group."""
        out = []
        with torch.no_grad():
            for g, group in enumerate(self.calls):
                errs = [nmse(ref, self.run(g, call)) for call, ref in zip(group, self.references[g])]
                out.append(sum(errs) / len(errs) if errs else 0.0)
        return out

    def first_order(self, ops: dict[str, dict[str, list[QuantizedOp] | None]], probes: int, generator: torch.Generator) -> dict[str, dict[str, list[float]]]:
        """First-order (Fisher / Gauss-Newton diagonal) estimate of ``D_n(b)`` per group, in the measured graphs.

        Per kept call the float model runs once in the same captured graphs as the measurement, with
        grad enabled inside them; ``probes`` backward passes of ``v . y`` (``v`` Gaussian, scaled by
        ``1/|y|``) give ``s = E_v (d(v.y)/dz)^2`` per element of every node output ``z``: the diagonal of
        ``J^T J / |y|^2``. Each candidate's converted op (the one the measurement switches in) then runs
        on the node's captured input, and ``D_n(b) ~ sum s * (z_b - z)^2``, averaged over the group's
        calls. Cost: one forward and ``probes`` backwards per call, plus single-op forwards.
        """
        out = {key: {c: [0.0] * len(self.calls) for c in per} for key, per in ops.items()}
        with torch.no_grad():
            for g, group in enumerate(self.calls):
                for call in group:
                    self.capture = []
                    y = self.run(g, call)
                    captured, self.capture = self.capture, None
                    captured = [item for item in captured if item[0].site.key in ops]
                    if not y.requires_grad or not captured:
                        continue
                    norm = y.detach().double().norm().clamp_min(1e-30).float()
                    sens = [torch.zeros_like(z) for _, _, z in captured]
                    for p in range(probes):
                        v = torch.randn(y.shape, generator=generator).to(y.device, y.dtype) / norm
                        with torch.enable_grad():
                            grads = torch.autograd.grad((y * v).sum(), [z for _, _, z in captured], retain_graph=p + 1 < probes, allow_unused=True)
                        self.backwards += 1
                        for s_acc, grad in zip(sens, grads):
                            if grad is not None:
                                s_acc.add_(grad.pow(2))
                    for (switch, inputs, z), s_acc in zip(captured, sens):
                        key = switch.site.key
                        for c, per_group in ops[key].items():
                            if per_group is None:
                                continue
                            zq = switch.converted(c, g, per_group[g], self.device)(*inputs)
                            err = (zq.double() - z.detach().double()).pow(2)
                            out[key][c][g] += float((s_acc.double() * err).sum()) / (probes * len(group))
        for switches in self.switches.values():
            for sw in switches:
                sw.candidates.clear()
        return out

    def close(self) -> None:
        """Drop quantized ops and references (Dynamo's cache may keep the captured graph itself)."""
        self.reset()
        for switches in self.switches.values():
            for s in switches:
                s.quantized = None
        self.references = []
        self.calls = []


# -- the exact optimum, for the Lagrangian's gap ---------------------------------------------
def exact_check(rd: list[RDTable], budget: float, cells: float = 5e7) -> dict[str, Any]:
    """The exact DP optimum at the same budget, for the gap report.

    Exact when every rate is a multiple of a common unit (their rational GCD) and the DP table
    (tables x budget/unit) has at most ``cells`` entries; else at the resolution that fits (rates rounded up).
    """
    t0 = time.perf_counter()
    fracs = [Fraction(r).limit_denominator(10_000) for t in rd for r in t.rates]
    den = math.lcm(*(f.denominator for f in fracs))
    unit = math.gcd(*(int(f * den) for f in fracs)) / den
    exact = all(abs(float(f) - r) <= 1e-9 * max(r, 1.0) for f, r in zip(fracs, (r for t in rd for r in t.rates)))
    if not exact or unit <= 0 or budget / unit * len(rd) > cells:
        exact, unit = False, budget * len(rd) / cells
    try:
        dp = exact_allocate(rd, budget, unit=unit)
    except ValueError as e:  # rates rounded up to whole units may not fit a tight budget
        return {"exact_dp_error": str(e)}
    return {"exact_dp_distortion": dp.distortion, "exact_dp_rate": dp.rate, "exact_dp_unit": unit, "exact_dp_exact": exact,
            "exact_dp_s": time.perf_counter() - t0}


# -- allocation at calibration time -----------------------------------------------------------
class BitAllocator:
    """Candidates, distortion tables and the allocation for one calibration session.

    Built inside :meth:`CalibrationSession.finish` while the session still holds its statistics.
    """

    def __init__(self, session: "CalibrationSession", members: list[list[int]], groups: TimestepGroups, progress: bool = True):
        t0 = time.perf_counter()
        self.session, self.progress = session, progress
        cfg = session.config
        self.spec = cfg.allocation
        self.budget_bits = float(cfg.weight_bit_budget)
        group_calls = [sum(1 for c in session.calls if c["group"] == g) for g in range(groups.count)]
        self.group_weights = [n / max(sum(group_calls), 1) for n in group_calls]
        calls = session.kept.select(groups, self.spec.calls_per_group) if session.kept is not None else [[] for _ in group_calls]
        restricted = self._first_last_keys()
        self.candidates: dict[str, list[str]] = {}
        self.plans: dict[str, dict[str, NodePlan]] = {}
        self.params: dict[str, int] = {}
        annotations = [session.decisions[k] for k in session.sites]
        for ann in tqdm(annotations, desc="qdiff: allocation candidates", unit="op", disable=not progress, leave=False):
            if ann.quantized:
                self._add_node(ann, members, restricted)
        self.ops = {
            key: {c: None if not p.quantized else [node_op(p, g) for g in range(groups.count)] for c, p in per.items()}
            for key, per in self.plans.items()
        }
        self.model = SwitchableModel(session.model, calls)
        missing = [k for k in self.plans if k not in self.model.switches]
        if missing:
            raise CalibrationError(
                f"bit allocation: the re-captured graph has no op for node(s) {missing[:5]} (Dynamo fell back to eager? "
                "raise torch._dynamo.config.recompile_limit or call torch._dynamo.reset() between calibrations)"
            )
        self.setup_s = time.perf_counter() - t0
        self.tables: dict[str, dict[str, list[float]]] = {}

    def _first_last_keys(self) -> set[str]:
        """Keys the first/last policy keeps at >= 8 bits (EIGHT_BIT); SKIP'd ones are not quantized at all."""
        s = self.session
        if s.config.first_last is not FirstLastPolicy.EIGHT_BIT:
            return set()
        quantized = [k for k in s.sites if s.decisions[k].quantized]
        return {quantized[0], quantized[-1]} if quantized else set()

    def _add_node(self, ann: Annotation, members: list[list[int]], restricted: set[str]) -> None:
        s, cfg = self.session, self.session.config
        site = s.sites[ann.key]
        cands = [c for c in self.spec.candidates if ann.key not in restricted or CANDIDATE_BITS[c] >= 8]
        per: dict[str, NodePlan] = {}
        for c in cands:
            wspec = self.spec.weight_spec(c, cfg.weight)
            a = replace(ann, weight=wspec) if wspec is not None else Annotation(
                ann.key, None, reason=f"kept in full precision by bit allocation (budget {self.budget_bits:g} weight bits)"
            )
            per[c] = s._node_plan(site, a, members)
            if wspec is not None and not per[c].quantized:
                return  # never executed (in some group): stays float with the session's reason
        if len(cands) < 2:
            return
        self.candidates[ann.key] = cands
        self.plans[ann.key] = per
        self.params[ann.key] = math.prod(site.weight_shape)

    # -- tables ----------------------------------------------------------------------------
    def measure(self, keys: list[str] | None = None) -> dict[str, dict[str, list[float]]]:
        """``D_n(b)`` per group by one forward per node x candidate x kept call (bf16 is exact: 0)."""
        keys = list(self.ops) if keys is None else keys
        pairs = [(k, c) for k in keys for c in self.ops[k]]
        out: dict[str, dict[str, list[float]]] = {k: {} for k in keys}
        groups = len(self.group_weights)
        for key, c in tqdm(pairs, desc="qdiff: measure D_n(b)", unit="cfg", disable=not self.progress, leave=False):
            ops = self.ops[key][c]
            if ops is None:
                out[key][c] = [0.0] * groups
                continue
            self.model.use(key, ops)
            out[key][c] = self.model.distortions()
            self.model.use(key, None)
        return out

    def fisher(self) -> dict[str, dict[str, list[float]]]:
        """``D_n(b)`` per group by the first-order estimate (:meth:`SwitchableModel.first_order`)."""
        return self.model.first_order(self.ops, self.spec.probes, torch.Generator().manual_seed(self.session.config.calibration.seed))

    def tables_for(self, estimator: Estimator) -> dict[str, dict[str, list[float]]]:
        return self.measure() if estimator is Estimator.MEASURED else self.fisher()

    def rd_tables(self, tables: dict[str, dict[str, list[float]]]) -> list[RDTable]:
        """The allocation's tables: per node, group-weighted ``D_n(b)`` and ``R_n(b) = bits x params``.

        With ``per_group`` one table per (node, group) pair, keyed ``node@g``: ``w_g D_{n,g}(b)`` and
        ``w_g bits(b) params``, so one budget (the call-weighted average bits over groups) spans all groups.
        """
        if self.spec.per_group:
            return [
                RDTable(
                    f"{key}@{g}", tuple(cands), [w * CANDIDATE_BITS[c] * self.params[key] for c in cands],
                    [w * tables[key][c][g] for c in cands],
                )
                for key, cands in self.candidates.items() for g, w in enumerate(self.group_weights)
            ]
        return [
            RDTable(
                key, tuple(cands), [CANDIDATE_BITS[c] * self.params[key] for c in cands],
                [sum(w * d for w, d in zip(self.group_weights, tables[key][c])) for c in cands],
            )
            for key, cands in self.candidates.items()
        ]

    def group_choices(self, options: dict[str, str]) -> dict[str, list[str]]:
        """Per node, the candidate of every group, from the options chosen for :meth:`rd_tables`' keys."""
        groups = len(self.group_weights)
        if self.spec.per_group:
            return {key: [options[f"{key}@{g}"] for g in range(groups)] for key in self.candidates}
        return {key: [options[key]] * groups for key in self.candidates}

    @property
    def total_params(self) -> int:
        return sum(self.params.values())

    def measure_choice(self, choices: dict[str, str | list[str]]) -> float:
        """Measured group-weighted output distortion with every node quantized as ``choices`` says
        (a candidate for all groups, or a list of one per group)."""
        for key, per_group in choices.items():
            if isinstance(per_group, str):
                per_group = [per_group] * len(self.group_weights)
            self.model.use(key, [None if self.ops[key][c] is None else self.ops[key][c][g] for g, c in enumerate(per_group)])
        per_group_d = self.model.distortions()
        self.model.reset()
        return sum(w * d for w, d in zip(self.group_weights, per_group_d))

    def node_plan(self, key: str, choices: list[str]) -> NodePlan:
        """The node's plan for one candidate per group: the candidate's own plan where all groups agree,
        else the groups' weights and bias corrections (groups sharing a candidate share its weight)."""
        per = self.plans[key]
        if len(set(choices)) == 1:
            return per[choices[0]]
        base = next(per[c] for c in choices if per[c].quantized)
        corr = None
        if base.bias_correction is not None:
            rows = [per[c].bias_correction[g] if per[c].bias_correction is not None else torch.zeros_like(base.bias_correction[g]) for g, c in enumerate(choices)]
            corr = torch.stack(rows)
        weights = [per[c].weight for c in choices]
        return replace(base, weight=next(w for w in weights if w is not None), group_weights=weights, bias_correction=corr)

    # -- the whole step ---------------------------------------------------------------------
    def run(self) -> tuple[dict[str, NodePlan], AllocationRecord]:
        """Measure (or estimate) the tables, allocate to the budget, measure the result; (node plans, record)."""
        t0 = time.perf_counter()
        estimator = self.spec.estimator
        self.tables = self.tables_for(estimator)
        rd = self.rd_tables(self.tables)
        if not rd:
            raise CalibrationError("bit allocation: no quantizable op has more than one candidate; nothing to allocate")
        budget = self.budget_bits * self.total_params
        try:
            alloc = lagrangian_allocate(rd, budget)
        except ValueError as e:
            lowest = sum(min(t.rates) for t in rd) / self.total_params
            raise CalibrationError(
                f"weight_bit_budget {self.budget_bits:g} is below the smallest achievable average of {lowest:.4f} bits for "
                f"{type(self.session.model).__name__} (first/last ops kept at >= 8 bits by first_last='8bit' count too); "
                "raise the budget or set first_last='quantize'"
            ) from e
        choices = self.group_choices(alloc.options(rd))
        alloc_s = time.perf_counter() - t0
        measured = self.measure_choice(choices)
        solver = {"lagrangian_rate": alloc.rate, **exact_check(rd, budget)}
        per_group = self.spec.per_group
        record = AllocationRecord(
            self.budget_bits, estimator.value, list(self.spec.candidates), self.group_weights,
            {
                key: {
                    "choice": choices[key] if per_group else choices[key][0],
                    "bits": sum(w * CANDIDATE_BITS[c] for w, c in zip(self.group_weights, choices[key])) if per_group else CANDIDATE_BITS[choices[key][0]],
                    "params": self.params[key], "distortion": self.tables[key],
                }
                for key in self.candidates
            },
            alloc.lam, alloc.distortion, measured, self.model.forwards, self.model.backwards,
            self.setup_s + alloc_s, [len(g) for g in self.model.calls], per_group, solver,
        )
        return {key: self.node_plan(key, c) for key, c in choices.items()}, record

    def close(self) -> None:
        self.model.close()


def calibrate_with_allocator(model: torch.nn.Module, run: Any, config: Any, progress: bool = True) -> tuple[Any, BitAllocator]:
    """:func:`qcompile.calibrate` that also returns the live :class:`BitAllocator` (tables, kept calls,
    switchable model) for studies such as predicted-vs-measured distortion sweeps. Close it when done."""
    from .calibrate import CalibrationSession, ObservedDenoiser

    if config.weight_bit_budget is None:
        raise CalibrationError("calibrate_with_allocator needs a config with weight_bit_budget set")
    session = CalibrationSession(config, model)
    session.keep_allocator = True
    with tqdm(desc="qdiff: calibrate", unit="call", disable=not progress) as bar, torch.no_grad():
        run(ObservedDenoiser(model, session, bar))
    plan = session.finish(progress)
    return plan, session.allocator

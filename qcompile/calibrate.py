"""Timestep-aware calibration over the model's own sampling trajectory (as in Q-Diffusion).

:func:`calibrate` hands the user's sampling function a stand-in for the denoiser. Each call of
the stand-in finds its timestep, then runs the model through Dynamo with a calibration backend
that prepares and annotates the graph and observes every quantizable op's input. Statistics
are kept per timestep bin and merged into timestep groups at the end; the plan is built from them.
"""

from __future__ import annotations

import dataclasses
import inspect as pyinspect
import math
import warnings
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
from tqdm.auto import tqdm

from .act_floor import apply_act_floor
from .attention import AttentionCalibration
from .config import OpKind, QuantConfig, Rounding
from .errors import CalibrationError
from .graph import prepare
from .lowering.weights import bias_correction, quantize_weight, smooth_weight, smoothing_factors
from .observers import ActivationStats, ActQParams, choose_qparams
from .passes.annotate import Annotation, annotate, apply_first_last, decide
from .passes.observe import INPUT_EDGE, input_of, insert_observers
from .passes.provenance import SplitDecision, apply_split, find_splits, split_note
from .passes.sites import META_KEY, Site, bound_args, parameter_tensors
from .passes.tables import find_tables, quantize_table
from .plan import NodePlan, QuantPlan
from .probe import UnsupportedProbe, encode
from .reconstruct import joint_rounding
from .release import check_not_released
from .segment import Segmentation, segment_groups
from .sensitivity import BitAllocator, CallSample
from .timesteps import StepBins, TimestepGroups, equal_groups, find_timestep

BIN_CAP = 64  # timestep bins kept during calibration (bins merge past this)
GRAM_MAX_FEATURES = 4096  # gptq / learned rounding: linears with more input features are rounded to nearest
JOINT_CALLS_PER_BIN = 2  # joint rounding: denoiser calls kept per timestep bin (4 of 5 batch rows fitted, the 5th checked)


class ActivationObserver(torch.nn.Module):
    """Passes its input through and reports it to the calibration session."""

    def __init__(self, session: "CalibrationSession", site: Site):
        super().__init__()
        self.session = session
        self.key = site.key
        self.node = site.node
        self.channel_dim = -1 if site.kind is OpKind.LINEAR else 1
        ann = session.decisions.get(site.key)
        self.split = None if ann is None else ann.splits.get(INPUT_EDGE)  # one statistics per channel slice
        # sites reading the same tensor share one statistics (and so get the same activation quantizer)
        self.stats_key = session.stats_key(site.key)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.session.observe(self, x)
        return x


class CalibrationSession:
    """State of one calibration run: sites seen, statistics, the call log and the probe."""

    def __init__(self, config: QuantConfig, model: torch.nn.Module):
        check_not_released(model, "calibration")
        self.config = config
        self.model = model
        self.model_class = f"{type(model).__module__}.{type(model).__qualname__}"
        self.generator = torch.Generator().manual_seed(config.calibration.seed)
        self.bin_size = max(1024, 4 * config.calibration.reservoir_size // BIN_CAP)
        self.bins = StepBins(cap=BIN_CAP)
        self.sites: dict[str, Site] = {}
        self.decisions: dict[str, Annotation] = {}
        self.splits: dict[str, SplitDecision] = {}  # channel-provenance decisions (first graph that has the op)
        self.weights: dict[str, torch.Tensor] = {}
        self.input_shapes: dict[str, tuple[int, ...]] = {}
        self.subgraphs: list[list[str]] = []
        self.stats: dict[tuple[str, int], ActivationStats] = {}
        self.calls: list[dict[str, Any]] = []
        self.timestep: float | None = None
        self.bin = 0
        self.probe: tuple[Any, dict[str, torch.Tensor]] | None = None
        self.segmentation: Segmentation | None = None  # set when groups are segmented
        self.closed = False
        self.kept: CallSample | None = None  # call inputs kept for bit allocation, the activation floor, joint rounding
        self.joint = config.weight.rounding is Rounding.JOINT
        if config.weight_bit_budget is not None or config.group_act_floor_db is not None or self.joint:  # one call per bin is enough for the floor
            per_bin = config.allocation.calls_per_group if config.weight_bit_budget is not None else 1
            self.kept = CallSample(max(per_bin, JOINT_CALLS_PER_BIN) if self.joint else per_bin, self.generator)
        self.keep_allocator = False  # keep the BitAllocator (tables, switchable model) after finish, for studies
        self.allocator: Any = None
        self.act_cache: dict[tuple, list] = {}
        self.stats_alias: dict[str, str] = {}  # site key -> the site whose statistics it shares (same input tensor)
        self.grams: dict[str, tuple[torch.Tensor, int]] = {}  # linear input sum of x x^T and row count (gptq / learned rounding)
        self.collect_gram = config.weight.rounding is not Rounding.NEAREST
        self.group_cache: dict[tuple, ActivationStats | None] = {}  # (key, act spec, smoothed) -> activation quantizers per group
        self.attention = None if config.attention is None else AttentionCalibration()  # q / k / v scales (qcompile/attention.py)
        self.tables: dict[str, torch.Tensor] = {}  # embedding tables to store int8 (config.embedding_tables), by weight name
        self.float_tables: dict[str, str] = {}  # embedding tables that stay in float: name -> why

    # -- Dynamo backend ------------------------------------------------------------------------
    def backend(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        """Prepare, annotate and observe one captured graph; it then runs eagerly."""
        gm, sites = prepare(gm, example_inputs)
        params = parameter_tensors(gm, example_inputs)
        for d in find_splits(gm):
            self.splits.setdefault(d.key, d)
        for site in sites:
            self.sites.setdefault(site.key, site)
            self.decisions.setdefault(site.key, apply_split(decide(site, self.config), self.splits.get(site.key), self.config.split_shortcuts))
        for node in gm.graph.nodes:
            site = node.meta.get(META_KEY)
            if site is not None and not site.unsupported:
                self.weights.setdefault(site.key, params[bound_args(node)["weight"].name][1])
        if self.config.embedding_tables is not None:
            for table, value in find_tables(gm, params):
                if table.unsupported:
                    self.float_tables.setdefault(table.weight_name, table.unsupported)
                else:
                    self.tables.setdefault(table.weight_name, value)
        signature = [s.key for s in sites]
        if signature not in self.subgraphs:
            self.subgraphs.append(signature)
        annotate(gm, self.decisions)
        self._share_statistics(gm)
        gm = insert_observers(gm, lambda site, edge: ActivationObserver(self, site))
        return (gm if self.attention is None else self.attention.observe(self, gm)).forward

    def _share_statistics(self, gm: fx.GraphModule) -> None:
        """Sites that read the same graph node with the same channel dim and split observe it once: the first one
        (in graph order) keeps the statistics, the others alias it (PT2E's shared quantization spec). Their
        activation quantizers are then identical, so a producer quantizes once for all of them (q / k / v) and
        the Triton lowering can fuse them into one GEMM (``passes/fuse_siblings.py``)."""
        first: dict[tuple, str] = {}
        for node in gm.graph.nodes:
            site = node.meta.get(META_KEY)
            if site is None or site.unsupported:
                continue
            ann = self.decisions.get(site.key)
            split = None if ann is None else ann.splits.get(INPUT_EDGE)
            group = (input_of(node), site.kind is OpKind.LINEAR, None if split is None else tuple(split))
            primary = first.setdefault(group, self.stats_alias.get(site.key, site.key))
            self.stats_alias.setdefault(site.key, primary)  # (a site seen in an earlier graph keeps its alias)

    def stats_key(self, key: str) -> str:
        """The site whose activation statistics ``key`` uses (itself unless it shares another's)."""
        return self.stats_alias.get(key, key)

    # -- per call --------------------------------------------------------------------------------
    def begin_call(self, signature: pyinspect.Signature, args: tuple, kwargs: dict) -> None:
        found = find_timestep(signature, args, kwargs, self.config.calibration.timestep_args)
        if found is None and self.config.timestep_groups != 1:
            raise CalibrationError(
                f"timestep_groups={self.config.timestep_groups!r} needs the timestep, but the call has no "
                f"argument named {' / '.join(self.config.calibration.timestep_args)}; set "
                "QuantConfig.calibration.timestep_args to the denoiser's timestep argument name"
            )
        self.timestep = None if found is None else found[1]
        self.bin = 0 if self.timestep is None else self.bins.bin_of(self.timestep)
        self._apply_bin_merges()
        if self.kept is not None:
            self.kept.offer(self.bin, self.timestep, args, kwargs)
        self.calls.append({"timestep": self.timestep})
        self._maybe_keep_probe(args, kwargs)

    def _apply_bin_merges(self) -> None:
        """Fold the statistics of bins that :class:`StepBins` merged into the surviving bin."""
        while self.bins.merged:
            absorbed, into = self.bins.merged.pop(0)
            if self.kept is not None:
                self.kept.merge(absorbed, into)
            for key in {k for (k, b) in self.stats if b == absorbed}:
                gone = self.stats.pop((key, absorbed))
                target = self.stats.setdefault((key, into), ActivationStats(self.bin_size, self.generator))
                target.merge(gone)

    def _maybe_keep_probe(self, args: tuple, kwargs: dict) -> None:
        """Keep one call's inputs, chosen uniformly at random over the run (reservoir of one)."""
        n = len(self.calls)
        if float(torch.rand(1, generator=self.generator)) * n >= 1.0:
            return
        try:
            self.probe = encode(args, kwargs)
        except UnsupportedProbe as e:
            self.probe = None
            warnings.warn(f"qdiff: no probe input stored in the plan ({e}); pass probe inputs to qcompile.inspect", stacklevel=4)

    def observe(self, observer: ActivationObserver, x: torch.Tensor) -> None:
        if self.closed:
            return
        key = observer.key
        if observer.stats_key != key:  # the site it shares statistics with records this tensor
            return
        self.record(key, x, observer.node, "the input of node", observer.channel_dim, observer.split)
        if self.collect_gram and observer.channel_dim == -1 and x.shape[-1] <= GRAM_MAX_FEATURES:
            rows = x.detach().reshape(-1, x.shape[-1]).double()
            gram, n = self.grams.get(key, (0.0, 0))
            self.grams[key] = ((rows.T @ rows).cpu() + gram, n + rows.shape[0])
        self.input_shapes[key] = tuple(x.shape)

    def record(self, key: str, x: torch.Tensor, node: str, what: str, channel_dim: int = -1,
               split: tuple[int, ...] | None = None) -> None:
        """Add ``x`` to statistics ``key`` of the current timestep bin; non-finite values are an error naming
        ``what`` ``key`` and its graph node (weight-op inputs here, attention's q / k / v in :mod:`.attention`)."""
        call = len(self.calls) - 1
        stats = self.stats.get((key, self.bin))
        if stats is None:
            stats = self.stats[(key, self.bin)] = ActivationStats(self.bin_size, self.generator, channel_dim, split)
        stats.update(x, call)
        if not stats.is_finite():
            raise CalibrationError(
                f"non-finite values (nan/inf) at {what} '{key}' (graph node '{node}') in "
                f"calibration call {call} (timestep {self.timestep}); the full-precision model itself produces them"
            )

    # -- building the plan -------------------------------------------------------------------
    def _group_stats(self, key: str, members: list[int]) -> ActivationStats | None:
        """Merge the per-bin statistics of one site over the bins of one group (memoized: read-only)."""
        key = self.stats_key(key)
        memo = (key, tuple(members))
        if memo in self.group_cache:
            return self.group_cache[memo]
        parts = [s for (k, b), s in self.stats.items() if k == key and b in members]
        out = None
        if parts:
            out = ActivationStats(self.config.calibration.reservoir_size, self.generator)
            for part in parts:
                out.merge(part)
        if self.config.weight_bit_budget is not None:  # bit allocation asks once per candidate
            self.group_cache[memo] = out
        return out

    def finish(self, progress: bool = True) -> QuantPlan:
        """Choose ranges, quantize weights and return the plan."""
        if not self.calls:
            raise CalibrationError("the sampling function never called the denoiser: nothing was calibrated")
        timesteps = [c["timestep"] for c in self.calls if c["timestep"] is not None]
        groups = self._groups(timesteps)
        for c in self.calls:
            c["group"] = groups.group_of(c["timestep"])
        members = self.bins.members(groups) if timesteps else [[0]]
        ordered = apply_first_last([self.decisions[k] for k in self.sites], self.config.first_last)
        nodes: dict[str, NodePlan] = {}
        allocated, allocation = {}, None
        if self.config.weight_bit_budget is not None:  # rate-distortion bit allocation (qcompile.sensitivity)
            self.allocator = BitAllocator(self, members, groups, progress)
            allocated, allocation = self.allocator.run()
            if not self.keep_allocator:
                self.allocator.close()
                self.allocator = None
        for ann in tqdm(ordered, desc="qdiff: quantize", unit="op", disable=not progress, leave=False):
            nodes[ann.key] = allocated.get(ann.key) or self._node_plan(self.sites[ann.key], ann, members)
        if not any(n.quantized for n in nodes.values()):
            warnings.warn(f"qdiff: nothing quantizable in {self.model_class}; it will run in full precision", stacklevel=3)
        joint = None
        if self.joint and any(n.quantized for n in nodes.values()):  # refine the chosen integer linears on the output
            nodes, joint = self._joint_rounding(nodes, members, groups, progress)
        attention = None if self.attention is None else self.attention.finish(self, members)
        self.closed = True
        self.stats.clear()
        self.group_cache.clear()
        plan = QuantPlan(self.config, nodes, groups, self.subgraphs, self.model_class, self.calls, self.probe)
        plan.allocation = allocation
        plan.attention = attention
        plan.tables = {name: quantize_table(t) for name, t in self.tables.items() if name not in self.float_tables}
        if self.float_tables:
            warnings.warn("qdiff: embedding tables kept in float:\n" + "\n".join(f"  {k}: {r}" for k, r in self.float_tables.items()),
                          stacklevel=3)
        if self.config.group_act_floor_db is not None and any(n.quantized for n in nodes.values()):
            apply_act_floor(self.model, plan, self.kept.select(groups, BIN_CAP), self.config.group_act_floor_db)
        self.kept = None
        shared = {k: v for k, v in self.stats_alias.items() if k != v and k in nodes}
        if shared:  # sites reading one tensor: one statistics, one input quantizer (for inspect)
            plan.meta["shared_statistics"] = shared
        if joint is not None:
            plan.meta["joint_rounding"] = joint
        if self.segmentation is not None:  # the loss curve behind the chosen boundaries, for inspect
            plan.meta["segmentation_loss_db"] = [round(v, 4) for v in self.segmentation.loss_db]
        return plan

    def _joint_rounding(self, nodes: dict[str, NodePlan], members: list[list[int]], groups: TimestepGroups, progress: bool):
        """``Rounding.JOINT``: :func:`qcompile.reconstruct.joint_rounding` on every kept call (bias correction from
        each group's input mean, as :meth:`_quantize` computes it)."""
        means = {}
        if self.config.bias_correction:
            for key, n in nodes.items():
                per_group = [self._group_stats(key, m) for m in members]
                if n.quantized and n.bias_correction is not None and all(s is not None and s.channel_mean() is not None for s in per_group):
                    means[key] = [s.channel_mean() for s in per_group]
        hessians = {}
        for key, n in nodes.items():
            h = self._hessian(self.sites[key], self.decisions[key], None, [self._group_stats(key, m) for m in members]) if n.quantized and n.smooth is None else None
            if h is not None:
                hessians[key] = h
        calls = self.kept.select(groups, BIN_CAP * self.kept.per_bin)
        return joint_rounding(self.model, nodes, self.weights, means, calls, self.config.weight.joint_iters, self.config.calibration.seed, progress, hessians)

    def _groups(self, timesteps: list[float]) -> TimestepGroups:
        """Timestep groups: equal numbers of steps, or segmented where activation ranges change most."""
        k = self.config.timestep_groups
        if not timesteps:
            return TimestepGroups()
        if self.config.group_boundaries == "uniform":
            return equal_groups(timesteps, k)
        quantized = {key: a.act[0].symmetric for key, a in self.decisions.items() if a.quantized and a.act.get(0) is not None}
        sites = quantized or {key: False for key in self.sites}  # weight-only: segment on all inputs (bias correction)
        by_key: dict[str, list] = {}
        for (key, b), st in self.stats.items():
            by_key.setdefault(key, []).append((b, st))
        stats = {(key, b): st for key in sites for b, st in by_key.get(self.stats_key(key), [])}  # shared ones per site
        groups, self.segmentation = segment_groups(self.bins.bins, stats, sites, k)
        return groups

    def _importance(self, site: Site, group_stats: list[ActivationStats | None]) -> torch.Tensor | None:
        """Input-feature variance over all groups (weights the weight error), where it applies."""
        present = [(s.count, s.channel_variance()) for s in group_stats if s is not None]
        if not present or site.conv_args.get("groups", 1) != 1 or present[0][1] is None:
            return None
        return sum(n * v for n, v in present) / sum(n for n, _ in present)

    def _node_plan(self, site: Site, ann: Annotation, members: list[list[int]]) -> NodePlan:
        group_stats = [self._group_stats(site.key, m) for m in members]
        reason = ann.reason
        if reason is None and all(s is None for s in group_stats):
            reason = "never executed during calibration"
        weight, acts, corr, smooth = None, [None] * len(members), None, None
        if reason is None:
            spec = ann.weight
            w = self.weights[site.key]
            factors = self._smoothing(site, ann, w, group_stats)
            variants = [self._quantize(site, ann, w, group_stats, None)]
            if factors is not None:
                variants.append(self._quantize(site, ann, w, group_stats, factors))
            weight, corr, acts, _, smooth = min(variants, key=lambda v: v[3])
            if ann.act.get(0) is not None and any(a is None for a in acts):
                missing = [g for g, a in enumerate(acts) if a is None]
                reason, weight, acts, corr, smooth = f"not executed in timestep group(s) {missing}", None, [None] * len(members), None, None
        stats = [
            {"amin": s.amin, "amax": s.amax, "count": s.count} if s is not None else {"amin": None, "amax": None, "count": 0}
            for s in group_stats
        ]
        log = sorted(c for s in group_stats if s is not None for c in s.call_log)
        call_log = torch.tensor([[c, _nan_if_none(self.calls[c]["timestep"]), lo, hi] for c, lo, hi in log], dtype=torch.float32) if log else None
        return NodePlan(
            site.key, site.kind, site.weight_name, site.weight_shape, site.conv_args, weight, acts, reason,
            self.input_shapes.get(self.stats_key(site.key)), stats, call_log, corr, smooth,
            split=None if weight is None else weight.splits, split_note=split_note(self.splits.get(site.key), ann if weight is not None else Annotation(site.key, None), self.config.split_shortcuts),
        )

    def _quantize(self, site: Site, ann: Annotation, w: torch.Tensor, group_stats: list, factors: torch.Tensor | None):
        """(weight, bias correction, activation quantizers, estimated output error, factors) of one variant.

        The estimate adds, per group, the activation rounding noise ``scale^2 / 12`` through the
        weight and the weight error through each input feature's variance (its mean is removed by
        bias correction): ``scale^2/12 * |W|^2 + sum_k var_k |dW_k|^2``, summed over taps.
        """
        spec, kind = ann.weight, site.kind.value
        w = w.detach().float()  # quantized on the weight's device (fast on a GPU); the plan keeps CPU tensors
        if factors is not None:
            w = smooth_weight(w, kind, factors)
            group_stats = [None if s is None else s.smoothed(factors) for s in group_stats]
        importance = self._importance(site, group_stats)
        weight = quantize_weight(
            w, spec.fmt.value, kind, spec.group_size, spec.clip_search, importance, spec.min_clip, ann.splits.get(INPUT_EDGE),
            self._hessian(site, ann, factors, group_stats) if spec.rounding is not Rounding.NEAREST else None,
            spec.rounding.per_layer.value, spec.rounding_iters,
        )
        corr = None
        means = [None if s is None else s.channel_mean() for s in group_stats]
        if self.config.bias_correction and all(m is not None for m in means):
            args = site.conv_args
            corr = torch.stack([bias_correction(w, weight, m, args.get("stride", 1), args.get("groups", 1)) for m in means]).cpu()
        act_spec = ann.act.get(0)
        acts = [None] * len(group_stats)
        if act_spec is not None:  # the same for every weight format bit allocation tries: computed once
            cache = (site.key, act_spec, factors is not None)
            if cache not in self.act_cache:
                self.act_cache[cache] = [None if s is None else choose_qparams(s, act_spec, self.config.outlier_split_db) for s in group_stats]
            acts = list(self.act_cache[cache])
        axis = 0 if kind == "conv_transpose" else 1
        others = [d for d in range(w.dim()) if d != axis]
        w_sq = w.detach().float().pow(2).sum(dim=others)
        dw_sq = (weight.dequantize() - w.detach().float()).pow(2).sum(dim=others)
        error = 0.0
        for s, a in zip(group_stats, acts):
            if s is None:
                continue
            var = s.channel_variance()
            error += s.count * float(((0.0 if var is None else (var.to(dw_sq.device) * dw_sq).sum()) + (0.0 if a is None else _act_noise(a, w_sq, ann.splits.get(INPUT_EDGE)))))
        weight = dataclasses.replace(weight, data=weight.data.cpu(), scale=weight.scale.cpu())
        return weight, corr, acts, error, None if factors is None else factors.cpu()

    def _hessian(self, site: Site, ann: Annotation, factors: torch.Tensor | None, group_stats: list) -> torch.Tensor | None:
        """``E[x x^T]`` of an unsplit linear's input over all calls (of ``x / factors`` when smoothed); None otherwise.

        For learned rounding with bias correction, the error that remains after each timestep group's mean output
        shift is cancelled: ``E[x x^T] - sum_g p_g m_g m_g^T`` (``m_g``: group ``g``'s input mean, ``p_g`` its share),
        so the rounding is not spent on a mean error the bias correction removes anyway."""
        gram_key = self.stats_key(site.key)
        if gram_key not in self.grams or site.kind is not OpKind.LINEAR or ann.splits.get(INPUT_EDGE) is not None:
            return None
        gram, n = self.grams[gram_key]
        h = gram / max(n, 1)
        h = h if factors is None else h / (factors.double()[:, None] * factors.double()[None, :])
        present = [(s.count, s.channel_mean()) for s in group_stats if s is not None]  # (already smoothed with factors)
        if ann.weight.rounding.per_layer is Rounding.LEARNED and self.config.bias_correction and present and all(m is not None for _, m in present):
            total = sum(c for c, _ in present)
            h = h - sum(c / total * torch.outer(m.double().cpu(), m.double().cpu()) for c, m in present)
        return h

    def _smoothing(self, site: Site, ann: Annotation, w: torch.Tensor, group_stats: list) -> torch.Tensor | None:
        """SmoothQuant factors for a site whose input is quantized (config.smooth_alpha), else None."""
        alpha = self.config.smooth_alpha
        if alpha is None or not ann.act or site.conv_args.get("groups", 1) != 1:
            return None
        present = [s for s in group_stats if s is not None]
        if not present or present[0].channel_absmax() is None:
            return None
        absmax = torch.stack([s.channel_absmax() for s in present]).amax(dim=0)
        return smoothing_factors(absmax, w, site.kind.value, alpha).cpu()


def _act_noise(a: ActQParams, w_sq: torch.Tensor, split: tuple[int, ...] | None) -> torch.Tensor:
    """Rounding noise of an activation quantizer through the weight: ``scale^2 / 12 * |W|^2`` (per slice)."""
    if a.slices is None or split is None:
        return a.scale**2 / 12 * w_sq.sum()
    return sum(p.scale**2 / 12 * w_sq[lo:hi].sum() for p, lo, hi in zip(a.slices, split, split[1:]))


def _nan_if_none(v: float | None) -> float:
    return math.nan if v is None else v


class ObservedDenoiser:
    """Stands in for the denoiser during calibration; every other attribute is the model's."""

    def __init__(self, model: torch.nn.Module, session: CalibrationSession, progress: tqdm):
        self._model = model
        self._session = session
        self._progress = progress
        self._signature = pyinspect.signature(model.forward)
        self._compiled = torch.compile(model, backend=session.backend)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self._session.begin_call(self._signature, args, kwargs)
        out = self._compiled(*args, **kwargs)
        self._progress.update(1)
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


def calibrate(
    model: torch.nn.Module,
    run: Callable[[Any], Any],
    config: QuantConfig,
    *,
    progress: bool = True,
    expected_calls: int | None = None,
) -> QuantPlan:
    """Calibrate ``model`` by running ``run(stand_in)``, the user's own sampling loop.

    ``run`` receives a stand-in for the model (call it exactly like the model; attributes such as
    ``config`` or ``dtype`` are the model's) and runs the full-precision sampler. Every denoiser
    call along the trajectory is observed. Returns a :class:`QuantPlan` with quantized weights and
    per-timestep-group activation quantizers.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"calibrate needs the denoiser nn.Module, got {type(model).__name__}")
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a QuantConfig (e.g. QuantConfig.preset('w8a8-int8')), got {type(config).__name__}")
    if model.training:
        warnings.warn("qdiff: calibrating a model in training mode (dropout active); call model.eval() first", stacklevel=2)
    session = CalibrationSession(config, model)
    with tqdm(total=expected_calls, desc="qdiff: calibrate", unit="call", disable=not progress) as bar:
        stand_in = ObservedDenoiser(model, session, bar)
        with torch.no_grad():
            run(stand_in)
    return session.finish(progress)

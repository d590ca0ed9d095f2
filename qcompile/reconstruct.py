"""Joint learned rounding of a plan's integer linear weights against the denoiser's output (``Rounding.JOINT``).

Layer-wise rounding (:func:`qcompile.lowering.weights.best_rounding`) minimizes each linear's own output error;
how that error reaches the denoiser's output (tokens that are dropped, attention, normalization) it cannot see.
Here, once the plan's formats and scales are chosen (after bit allocation), the rounding of every unsplit,
unsmoothed integer linear weight is refined *jointly* on the denoiser output, as in BRECQ / Q-Diffusion's
reconstruction but over the whole network (no block boundaries need to be found): the model is captured once
by Dynamo with each such linear replaced by :class:`SoftLinear`, whose weight is ``s (base + h(v))`` (AdaRound's
rectified sigmoid; each value chooses between its current integer and the neighbour towards ``w / s``), with
each timestep group's bias correction computed from that weight. Adam minimizes the normalized output MSE
against the float model on the calls calibration kept (one call per step), plus each layer's own output error
``tr(dW C dW^T)`` relative to its start (exact over all calibration inputs: an anchor against overfitting the few
trajectories), plus a term pushing ``h`` to 0 or 1.
Every fifth batch row of each kept call (every fifth call where batches are smaller than 5) is held out: the
rounding is checked on them 20 times along the run, and the best state (early stopping: one set of trajectories
is easy to overfit with this many free choices) is kept, if it lowers their output error at all.
Scales, formats and storage are unchanged; the plan holds ordinary integer weights.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from tqdm.auto import tqdm

from .config import OpKind
from .graph import prepare
from .lowering.formats import int_range, pack_int4, unpack_int4
from .lowering.weights import ZETA, GAMMA, QuantizedWeight, _rectified_sigmoid, bias_correction, padded_k
from .passes.sites import META_KEY, bound_args
from .plan import NodePlan
from .sensitivity import Call, nmse, output_tensor

REG = 300.0  # weight of the push to 0 / 1, relative to the output error at the start (normalized to 1)
LR = 0.03
WARMUP = 0.2  # share of the steps without the push
LAYER_ANCHOR = 1.0  # weight of each layer's own output error (relative to its start, exact on all calibration inputs) in the loss


class _Target:
    """One distinct integer weight under optimization: ``s * clamp(base + h(v))`` in GEMM layout (out, K)."""

    def __init__(self, qw: QuantizedWeight, w: torch.Tensor, hessian: torch.Tensor | None = None):
        k = w.shape[1]
        q = (unpack_int4(qw.data) if qw.fmt == "int4" else qw.data)[:, :k].float()
        self.qw, self.k, self.w = qw, k, w.float()
        self.qmin, self.qmax = int_range(qw.fmt, True)
        self.per_col = qw.scale.float().repeat_interleave(qw.group_size or k, dim=1)[:, :k].to(w.device)
        x = self.w / self.per_col
        q = q.to(w.device)
        self.base = torch.where(x >= q, q, q - 1.0)  # choose between q and its neighbour towards w / s
        start = ((q - self.base - GAMMA) / (ZETA - GAMMA)).clamp(1e-4, 1 - 1e-4)
        self.v = torch.log(start / (1 - start)).requires_grad_()
        self.h = None if hessian is None else hessian.float().to(w.device)
        if self.h is not None:
            dw = q * self.per_col - self.w
            self.err0 = float((dw @ self.h * dw).sum().clamp_min(1e-30))

    def layer_error(self) -> torch.Tensor:
        """The layer's own output error ``tr(dW H dW^T)`` of the soft weight, relative to the start's."""
        dw = self.weight(False) - self.w
        return (dw @ self.h * dw).sum() / self.err0

    def weight(self, hard: bool) -> torch.Tensor:
        h = (_rectified_sigmoid(self.v) >= 0.5).float() if hard else _rectified_sigmoid(self.v)
        return (self.base + h).clamp(self.qmin, self.qmax) * self.per_col

    def push(self, beta: float) -> torch.Tensor:
        return (1.0 - (2.0 * _rectified_sigmoid(self.v) - 1.0).abs().pow(beta)).mean()

    def quantized(self) -> QuantizedWeight:
        """The rounded weight in the plan's storage (same scales, format and padding)."""
        q = (self.base + (_rectified_sigmoid(self.v.detach()) >= 0.5).float()).clamp(self.qmin, self.qmax).to(torch.int8).cpu()
        kp = padded_k(self.k, self.qw.fmt, self.qw.group_size)
        q = F.pad(q, (0, kp - self.k)) if kp != self.k else q
        return dataclasses.replace(self.qw, data=pack_int4(q) if self.qw.fmt == "int4" else q)


class SoftLinear(torch.nn.Module):
    """Stands for one quantized linear in the captured graph: its group's soft (or hard) weight, bias-corrected."""

    def __init__(self, owner: "JointRounding", key: str):
        super().__init__()
        self.owner = [owner]  # not a submodule
        self.key = key

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        owner = self.owner[0]
        target = None if owner.reference else owner.targets[self.key][owner.group]
        if target is None:  # the float model (references), or full precision in this group
            return F.linear(x, weight, bias)
        wq = target.weight(owner.hard)
        out = F.linear(x, wq.to(weight.dtype), bias)
        mean = owner.means.get(self.key)
        if mean is not None:  # bias correction: -(W_hat - W) E[x] of this group
            out = out - ((wq - target.w) @ mean[owner.group]).to(out.dtype)
        return out


class JointRounding:
    """The denoiser captured with every refinable linear behind a :class:`SoftLinear`; fits and applies the rounding."""

    def __init__(self, model: torch.nn.Module, nodes: dict[str, NodePlan], weights: dict[str, torch.Tensor],
                 means: dict[str, list[torch.Tensor]], calls: list[list[Call]], hessians: dict[str, torch.Tensor] | None = None):
        self.group, self.hard, self.training, self.reference = 0, True, False, True
        self.targets: dict[str, list[_Target | None]] = {}
        distinct: dict[int, _Target] = {}
        for key, n in nodes.items():
            if not refinable(n):
                continue
            w = weights[key].detach()
            per_group = [n.weight_for(g) for g in range(len(n.acts))]
            self.targets[key] = [None if qw is None else distinct.setdefault(id(qw), _Target(qw, w.reshape(w.shape[0], -1), (hessians or {}).get(key))) for qw in per_group]
        self.distinct = list(distinct.values())
        self.means = {k: torch.stack([m.float().to(weights[k].device) for m in ms]) for k, ms in means.items() if k in self.targets}
        self.calls, self.held = [], []  # (group, call) to fit on / to check on
        for g, group in enumerate(calls):
            for i, call in enumerate(group):
                parts = split_rows(call)
                if parts is not None:
                    self.calls.append((g, parts[0]))
                    self.held.append((g, parts[1]))
                else:
                    (self.held if i % 5 == 4 else self.calls).append((g, call))
        if not self.calls:
            self.calls = list(self.held)
        self.captured: set[str] = set()
        self._compiled = torch.compile(model, backend=self._backend)
        with torch.no_grad():
            self.references = [self._run(g, call).detach() for g, call in self.calls]
            self.held_references = [self._run(g, call).detach() for g, call in self.held]
        self.reference = False

    def _backend(self, gm: fx.GraphModule, example_inputs: Any) -> Any:
        gm, _ = prepare(gm, example_inputs)
        for node in list(gm.graph.nodes):
            site = node.meta.get(META_KEY)
            if site is None or site.unsupported or node.op != "call_function" or site.key not in self.targets:
                continue
            args = bound_args(node)
            name = f"qdiff_soft_{len(self.captured)}_{node.name}"
            gm.add_submodule(name, SoftLinear(self, site.key))
            with gm.graph.inserting_before(node):
                new = gm.graph.call_module(name, (args["input"], args["weight"], args["bias"]))
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            self.captured.add(site.key)
        gm.graph.lint()
        gm.recompile()

        def forward(*args: Any) -> Any:
            if not self.training:  # grad is enabled inside the graph only (the call runs under no_grad: one capture)
                return gm.forward(*args)
            with torch.enable_grad():
                return gm.forward(*args)

        return forward

    def _run(self, group: int, call: Call) -> torch.Tensor:
        self.group = group
        args, kwargs = call
        return output_tensor(self._compiled(*args, **kwargs))

    def error(self, held: bool) -> float:
        """Mean normalized output MSE of the hard rounding on the fitted or the held-out calls."""
        self.hard, self.training = True, False
        calls, refs = (self.held, self.held_references) if held else (self.calls, self.references)
        with torch.no_grad():
            return sum(nmse(ref, self._run(*call)) for call, ref in zip(calls, refs)) / max(len(calls), 1)

    def fit(self, iters: int, seed: int, progress: bool = True) -> dict[str, Any]:
        """Adam on the rounding variables; returns the record (errors before / after, kept or not)."""
        t0 = time.perf_counter()
        start = {"fit": self.error(False), "held_out": self.error(True)}
        best, best_step, saved = start["held_out"], 0, [t.v.detach().clone() for t in self.distinct]
        check = max(iters // 20, 1)
        norm = max(start["fit"], 1e-30)
        opt = torch.optim.Adam([t.v for t in self.distinct], lr=LR)
        gen = torch.Generator().manual_seed(seed)
        warm = int(WARMUP * iters)
        self.hard, self.training = False, True
        with torch.no_grad():
            for i in tqdm(range(iters), desc="qdiff: joint rounding", unit="step", disable=not progress, leave=False):
                idx = int(torch.randint(len(self.calls), (1,), generator=gen))
                y = self._run(*self.calls[idx])
                with torch.enable_grad():
                    ref = self.references[idx].double()
                    loss = (y.double() - ref).pow(2).sum() / ref.pow(2).sum().clamp_min(1e-300) / norm
                    anchored = [t for t in self.distinct if t.h is not None]
                    if LAYER_ANCHOR > 0 and anchored:
                        loss = loss + LAYER_ANCHOR * sum(t.layer_error() for t in anchored) / len(anchored)
                    if i >= warm:
                        beta = 2.0 + 18.0 * (1.0 - (i - warm) / max(iters - warm, 1))
                        loss = loss + REG * sum(t.push(beta) for t in self.distinct) / len(self.distinct)
                    params = [t.v for t in self.distinct]  # only these: the model's own parameters get no .grad
                    for v, g in zip(params, torch.autograd.grad(loss, params, allow_unused=True)):  # unused: not in this group
                        v.grad = g
                opt.step()
                if (i + 1) % check == 0 or i + 1 == iters:  # early stopping on the held-out rows
                    err = self.error(True)
                    if err < best:
                        best, best_step, saved = err, i + 1, [t.v.detach().clone() for t in self.distinct]
                    self.hard, self.training = False, True
        for t, v in zip(self.distinct, saved):
            t.v.data.copy_(v)
        kept = best_step > 0
        end = {"fit": self.error(False), "held_out": self.error(True)}
        db = lambda d: round(-10 * math.log10(max(d, 1e-30)), 3)  # noqa: E731  as an SQNR
        return {
            "iters": iters, "weights": len(self.distinct), "nodes": sorted(self.targets), "calls_fit": len(self.calls), "calls_held_out": len(self.held), "best_step": best_step,
            "sqnr_db_before": {k: db(v) for k, v in start.items()}, "sqnr_db_after": {k: db(v) for k, v in end.items()},
            "kept": kept, "seconds": round(time.perf_counter() - t0, 1),
        }

    def apply(self, nodes: dict[str, NodePlan], weights: dict[str, torch.Tensor], means: dict[str, list[torch.Tensor]]) -> dict[str, NodePlan]:
        """The node plans with the refined weights and the bias corrections recomputed from them."""
        new_qw = {id(t.qw): t.quantized() for t in self.distinct}
        out = dict(nodes)
        for key, per_group in self.targets.items():
            n = nodes[key]
            groups = [None if t is None else new_qw[id(t.qw)] for t in per_group]
            weight = new_qw[id(n.weight)] if id(n.weight) in new_qw else n.weight
            corr = n.bias_correction
            if corr is not None and key in means:
                w = weights[key].detach().float()
                rows = [corr[g] if q is None else bias_correction(w, q, means[key][g]).cpu() for g, q in enumerate(groups)]
                corr = torch.stack(rows)
            out[key] = dataclasses.replace(n, weight=weight, group_weights=None if n.group_weights is None else groups, bias_correction=corr)
        return out


    def close(self) -> None:
        """Drop the kept calls, references and rounding variables (Dynamo's cache may keep the captured graph)."""
        self.calls, self.held, self.references, self.held_references = [], [], [], []
        self.targets, self.distinct, self.means = {}, [], {}


def split_rows(call: Call, every: int = 5) -> tuple[Call, Call] | None:
    """(fit, held-out) parts of one call: every ``every``-th row held out of each tensor argument whose first dim is the
    batch (that of the first tensor argument); None where the batch has fewer than ``every`` rows."""
    args, kwargs = call
    first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.dim() > 0), None)
    if first is None or first.shape[0] < every:
        return None
    rows = torch.arange(first.shape[0])
    held, fit = rows[rows % every == every - 1], rows[rows % every != every - 1]

    def part(index: torch.Tensor) -> Call:
        take = lambda a: a[index.to(a.device)] if isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == first.shape[0] else a  # noqa: E731
        return tuple(take(a) for a in args), {k: take(v) for k, v in kwargs.items()}

    return part(fit), part(held)


def refinable(n: NodePlan) -> bool:
    """Nodes whose rounding the joint step refines: integer, unsplit, unsmoothed linear weights."""
    ws = [n.weight] if n.group_weights is None else n.group_weights
    return (n.quantized and n.kind is OpKind.LINEAR and n.split is None and n.smooth is None
            and any(w is not None for w in ws) and all(w is None or w.fmt != "fp8_e4m3" for w in ws))


def joint_rounding(model: torch.nn.Module, nodes: dict[str, NodePlan], weights: dict[str, torch.Tensor], means: dict[str, list[torch.Tensor]],
                   calls: list[list[Call]], iters: int, seed: int, progress: bool = True,
                   hessians: dict[str, torch.Tensor] | None = None) -> tuple[dict[str, NodePlan], dict[str, Any]]:
    """Refine the rounding of the plan's refinable linears jointly on the denoiser output (see the module docstring).

    ``weights``: each node's float weight; ``means``: per node, each timestep group's input mean (bias correction;
    absent: none); ``calls``: the kept calls per timestep group. Returns the node plans and a record for the plan."""
    if not any(refinable(n) for n in nodes.values()) or not any(calls):
        return nodes, {"skipped": "no integer linear weight to refine" if any(calls) else "no kept calls"}
    jr = JointRounding(model, nodes, weights, means, calls, hessians)
    missing = sorted(set(jr.targets) - jr.captured)
    if missing:  # the re-capture did not reach them (e.g. after a graph break fell back to eager): not refined
        for key in missing:
            jr.targets.pop(key)
        jr.distinct = [t for t in jr.distinct if any(t in per for per in jr.targets.values())]
    record = jr.fit(iters, seed, progress)
    if missing:
        record["not_captured"] = missing
    out = jr.apply(nodes, weights, means) if record["kept"] else nodes
    jr.close()
    return out, record

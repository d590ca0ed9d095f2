"""Horizontal fusion: quantized linears that read the same input become one GEMM.

After :mod:`.convert`, attention's ``to_q`` / ``to_k`` / ``to_v`` are three calls of the lowering's ``linear``
function on the same input node, each a GEMM with N = hidden size: too few output tiles to fill a large
GPU, and three launches. When their quantization is interchangeable (same formats, per-output-channel
weight scales or group-wise ones of one group size, the same activation scale and zero point *values*, same K),
the weights, weight scales and per-output-channel extras (bias, ``bias_corr``, ``colsum``) are concatenated along
N into new buffers, the members become one call with ``weight_shape=(sum N, K)``, and ``torch.split`` hands each
former user its columns (views of the fused output). Every weight row (packed int4 bytes and its groups' scales
included) is one output column, computed independently, so the result is that of the separate calls.

Only the same input *node* groups calls (no looking through views). Calls with a split op (``splits``),
smoothing (``act_smooth``), an outlier split, or keywords added by later passes
(``act``, ``x_quant``, ``out_scale``, ``out_dtype``) are left alone, as are calls whose bias is not a
buffer (a graph input, e.g. a parameter Dynamo lifted: it cannot be concatenated at compile time).
Run it right after ``convert``. ``QDIFF_FUSE_SIBLINGS=0`` turns it off (read by the backend per compile).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx as fx

from ..switches import env_switch
from .annotate import ANNOTATION_KEY
from .convert import add_buffer
from .sites import META_KEY, Site, fetch_attr

SIBLINGS_KEY = "qdiff_fused_siblings"
# per-output-channel tensor keywords and whether a member without one contributes zeros (else: all or none)
_PER_CHANNEL = {"bias_corr": True, "colsum": False}
_PLAIN = {"wfmt", "group_size", "weight_shape", "afmt", "asym"}
SHAPE_META = ("example_value", "val", "tensor_meta")  # node meta that records the tensor (not copied to a new node)


@dataclass(frozen=True)
class Sibling:
    """One member of a fused call: its site, the converted node it was, and its output columns ``[start, stop)``."""

    site: Site
    source_node: str
    start: int
    stop: int

    @property
    def key(self) -> str:
        return self.site.key


def enabled_from_env() -> bool:
    """``QDIFF_FUSE_SIBLINGS`` (default 1): 0 turns sibling fusion off, for A/B measurements."""
    return env_switch("QDIFF_FUSE_SIBLINGS", True)


def siblings_of(node: fx.Node) -> tuple[Sibling, ...] | None:
    """The members a fused call stands for (None for any other node)."""
    return node.meta.get(SIBLINGS_KEY)


def weight_names(node: fx.Node) -> list[str]:
    """Qualified names of the float weights a converted (possibly fused) node replaced."""
    members = siblings_of(node)
    if members is not None:
        return [m.site.weight_name for m in members]
    site = node.meta.get(META_KEY)
    return [] if site is None else [site.weight_name]


def _attr(gm: fx.GraphModule, node) -> torch.Tensor | None:
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    t = fetch_attr(gm, node.target)
    return t if isinstance(t, torch.Tensor) else None


def _group_key(gm: fx.GraphModule, node: fx.Node, linear_fn: Callable):
    """A hashable key equal for calls that can share one GEMM, or None if ``node`` cannot take part."""
    if node.op != "call_function" or node.target is not linear_fn or len(node.args) != 6 or node.meta.get(META_KEY) is None:
        return None
    kw = node.kwargs
    if set(kw) - _PLAIN - set(_PER_CHANNEL) or len(kw.get("weight_shape", ())) != 2:
        return None
    x, wdata, wscale, bias, a_scale, a_zp = node.args
    tensors = [_attr(gm, a) for a in (wdata, wscale, a_scale, a_zp)]
    if not isinstance(x, fx.Node) or any(t is None for t in tensors):
        return None
    if bias is not None and _attr(gm, bias) is None:  # a graph input (lifted parameter): not concatenable here
        return None
    w, s, sa, za = tensors
    n, k = kw["weight_shape"]
    if w.dim() != 2 or w.shape[0] != n or s.shape[0] != n or s.dim() > 2:
        return None
    if kw.get("group_size") is None and s.dim() == 2 and s.shape[1] != 1:  # per channel: one scale per row
        return None
    extras = {}
    for name in _PER_CHANNEL:
        if name in kw:
            t = _attr(gm, kw[name])
            if t is None or t.shape != (n,):
                return None
            extras[name] = t.dtype
    required = tuple(sorted(name for name in extras if not _PER_CHANNEL[name]))  # members must all have these, or none
    return (x, kw["wfmt"], kw["afmt"], bool(kw["asym"]), kw.get("group_size"), k, w.dtype, w.shape[1], s.dtype, tuple(s.shape[1:]),
            w.device, required,
            sa.dtype, tuple(sa.flatten().tolist()), za.dtype, tuple(za.flatten().tolist()))


def _cat_per_channel(gm, members: list[fx.Node], get: Callable[[fx.Node], object], zeros_ok: bool) -> torch.Tensor | None:
    """Concatenation along N of one per-output-channel tensor of every member (zeros where a member has none)."""
    tensors = [_attr(gm, get(m)) for m in members]
    present = [t for t in tensors if t is not None]
    if not present:
        return None
    if len(present) != len(tensors) and not zeros_ok:
        raise ValueError(f"sibling calls {[m.name for m in members]} disagree on a per-channel tensor that has no neutral value")
    dtype = present[0].dtype if all(t.dtype == present[0].dtype for t in present) else torch.float32
    parts = [torch.zeros(m.kwargs["weight_shape"][0], dtype=dtype, device=present[0].device) if t is None else t.to(dtype)
             for m, t in zip(members, tensors)]
    return torch.cat(parts)


def _fuse(gm: fx.GraphModule, members: list[fx.Node], index: int, linear_fn: Callable) -> None:
    first = members[0]
    x, _, _, _, a_scale, a_zp = first.args
    ns = [m.kwargs["weight_shape"][0] for m in members]
    k = first.kwargs["weight_shape"][1]
    values = {
        "weight": torch.cat([_attr(gm, m.args[1]) for m in members]),
        "weight_scale": torch.cat([_attr(gm, m.args[2]) for m in members]),
        "bias": _cat_per_channel(gm, members, lambda m: m.args[3], True),
        **{name: _cat_per_channel(gm, members, lambda m, name=name: m.kwargs.get(name), zeros_ok) for name, zeros_ok in _PER_CHANNEL.items()},
    }
    prefix = f"qdiff_siblings_{index}_"
    nodes = {}
    with gm.graph.inserting_before(first):
        for name, value in values.items():
            if value is not None:
                nodes[name] = add_buffer(gm, prefix + name, value)
        kwargs = {key: v for key, v in first.kwargs.items() if key not in _PER_CHANNEL}
        kwargs["weight_shape"] = (sum(ns), k)
        kwargs.update({name: nodes[name] for name in _PER_CHANNEL if name in nodes})
        fused = gm.graph.call_function(linear_fn, (x, nodes["weight"], nodes["weight_scale"], nodes.get("bias"), a_scale, a_zp), kwargs)
        parts = gm.graph.call_function(torch.split, (fused, ns), {"dim": -1})
        outs = [gm.graph.call_function(operator.getitem, (parts, i)) for i in range(len(members))]
    fused.meta.update({k_: v for k_, v in first.meta.items() if k_ not in SHAPE_META})
    fused.meta[ANNOTATION_KEY] = first.meta.get(ANNOTATION_KEY)
    bounds = [0]
    for n in ns:
        bounds.append(bounds[-1] + n)
    fused.meta[SIBLINGS_KEY] = tuple(
        Sibling(m.meta[META_KEY], m.meta.get("qdiff_source_node", m.name), a, b) for m, a, b in zip(members, bounds, bounds[1:]))
    old_targets = {a.target for m in members for a in m.all_input_nodes if a.op == "get_attr"}
    for m, out in zip(members, outs):
        _reshape_views(m)
        m.replace_all_uses_with(out)
    for m in members:
        inputs = [a for a in m.all_input_nodes if a.op == "get_attr"]
        gm.graph.erase_node(m)
        for a in inputs:
            if not a.users:
                gm.graph.erase_node(a)
    _delete_unused(gm, old_targets)


def _reshape_views(member: fx.Node) -> None:
    """``out.view(...)`` -> ``out.reshape(...)`` on a member's output: a column slice of the fused output is not
    contiguous, and a view merging its last dim with another would fail (reshape copies only then)."""
    for u in member.users:
        if u.op == "call_method" and u.target == "view" and u.args[0] is member:
            u.target = "reshape"
        elif u.op == "call_function" and u.target is torch.Tensor.view and u.args[0] is member:
            u.target = torch.Tensor.reshape


def _delete_unused(gm: fx.GraphModule, targets: set[str]) -> None:
    """Delete the attributes ``targets`` of ``gm`` that no get_attr node reads any more (no doubled memory)."""
    read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for target in targets - read:
        owner_path, _, name = target.rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        if name in owner._buffers:
            del owner._buffers[name]
        elif name in owner._parameters:
            del owner._parameters[name]
        elif hasattr(owner, name):
            delattr(owner, name)


def fuse_siblings(gm: fx.GraphModule, linear_fn: Callable, min_members: int = 2) -> tuple[fx.GraphModule, int]:
    """Fuse calls of ``linear_fn`` that read the same input node and quantize it alike (module docstring);
    returns the graph and how many fused calls were made."""
    if min_members < 2:
        raise ValueError(f"min_members must be at least 2, got {min_members}")
    groups: dict[tuple, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        key = _group_key(gm, node, linear_fn)
        if key is not None:
            groups.setdefault(key, []).append(node)
    count = 0
    existing = sum(1 for n in gm.graph.nodes if SIBLINGS_KEY in n.meta)
    for members in groups.values():
        if len(members) < min_members:
            continue
        _fuse(gm, members, existing + count, linear_fn)
        count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
    return gm, count


__all__ = ["SIBLINGS_KEY", "Sibling", "enabled_from_env", "fuse_siblings", "siblings_of", "weight_names"]

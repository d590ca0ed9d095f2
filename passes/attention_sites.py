"""Find the attention calls of a Dynamo graph that the fp8 attention path can take, and observe their inputs.

An *attention site* is a ``F.scaled_dot_product_attention`` call (diffusers' ``AttnProcessor2_0``, and the calls
:mod:`.decompose` writes for PyTorch's fused transformer layers). Sites are keyed by the enclosing module's qualified
name from ``node.meta["nn_module_stack"]`` plus ``.sdpa`` (``transformer_blocks.0.attn1.sdpa``; ``#1``, ``#2``... for
further calls in one module), stable across recompiles, batch sizes and timestep groups. Each site is written to
``node.meta[ATTENTION_META_KEY]``.

A site is ``unsupported`` (kept in full precision, named in the backend's warning) where ``qdiff::fp8_attention``
cannot compute it: an attention mask, ``is_causal``, dropout, grouped-query attention, inputs that are not 4-d
``(B, H, S, D)`` with one head dim, a head dim outside 32-160 or not a multiple of 8, or a head dim unknown at
compile time. The reference lowering keeps the same sites in float, so both lowerings run the same numerics.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F

from .sites import qualified_name

ATTENTION_META_KEY = "qdiff_attention_site"
HEAD_DIM_META_KEY = "qdiff_head_dim"  # written by passes/decompose.py on the calls it creates (no example value there)
SDPA_TARGETS = {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}
MIN_HEAD_DIM, MAX_HEAD_DIM, HEAD_DIM_MULTIPLE = 32, 160, 8  # qdiff::fp8_attention's range (lowering/kernels/fp8_attention.py)
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}
INPUTS = ("q", "k", "v")  # the observed / quantized input edges, in argument order
SUFFIX = "sdpa"


@dataclass
class AttentionSite:
    """One attention call in one graph."""

    key: str
    node: str  # FX node name in the graph it was found in
    head_dim: int | None
    scale: float | None  # the call's softmax scale (None: 1 / sqrt(head_dim))
    unsupported: str | None = None  # why the fp8 kernel cannot take it


def sdpa_args(node: fx.Node) -> dict[str, Any]:
    """The call's arguments by name, defaults filled in."""
    bound = dict(_SDPA_DEFAULTS)
    bound.update(zip(_SDPA_ARGS, node.args))
    bound.update(node.kwargs)
    return bound


_TOP_LEVEL = re.compile(r"[LG]\['[^']*'\]")  # the compiled module itself


def module_path(node: fx.Node) -> str:
    """The innermost enclosing module's qualified name (``''`` at the top level or when Dynamo recorded none).

    ``L['self'].__dict__['_modules']['transformer_blocks'].0.attn1`` -> ``transformer_blocks.0.attn1``."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return "" if _TOP_LEVEL.fullmatch(path) else qualified_name(path)


def _shape(arg: Any) -> tuple | None:
    value = arg.meta.get("example_value") if isinstance(arg, fx.Node) else None
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def _static(d: Any) -> int | None:
    return d if isinstance(d, int) else None


def _unsupported(node: fx.Node, a: dict[str, Any]) -> tuple[int | None, str | None]:
    """(head dim, reason the kernel cannot take the call or None)."""
    if a["attn_mask"] is not None:
        return None, "attention mask"
    if a["is_causal"] is not False:
        return None, "causal attention"
    if not isinstance(a["dropout_p"], (int, float)) or a["dropout_p"] != 0:
        return None, f"dropout_p={a['dropout_p']}"
    if a["enable_gqa"] is not False:
        return None, "grouped-query attention (enable_gqa)"
    if a["scale"] is not None and not isinstance(a["scale"], (int, float)):
        return None, "softmax scale computed in the graph"
    shapes = [_shape(a[n]) for n in ("query", "key", "value")]
    if all(s is None for s in shapes):
        d = node.meta.get(HEAD_DIM_META_KEY)
        if d is None:
            return None, "q / k / v shapes unknown at compile time"
    else:
        if any(s is None or len(s) != 4 for s in shapes):
            return None, f"q / k / v are not 4-d (B, H, S, D): {shapes}"
        q, k, v = shapes
        dims = {_static(s[3]) for s in shapes}
        heads = {_static(s[1]) for s in shapes}
        if None in dims or len(dims) != 1:
            return None, f"head dims of q / k / v differ or are dynamic: {q[3]}, {k[3]}, {v[3]}"
        if None in heads or len(heads) != 1:
            return None, f"q / k / v head counts differ (grouped-query) or are dynamic: {q[1]}, {k[1]}, {v[1]}"
        d = dims.pop()
    if not (MIN_HEAD_DIM <= d <= MAX_HEAD_DIM and d % HEAD_DIM_MULTIPLE == 0):
        return d, f"head dim {d} outside the fp8 kernel's {MIN_HEAD_DIM}-{MAX_HEAD_DIM} (multiples of {HEAD_DIM_MULTIPLE})"
    return d, None


def find_attention_sites(gm: fx.GraphModule) -> list[AttentionSite]:
    """All ``scaled_dot_product_attention`` calls of ``gm`` in graph order, each recorded in ``node.meta``."""
    sites, seen = [], {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in SDPA_TARGETS:
            continue
        a = sdpa_args(node)
        base = ".".join(p for p in (module_path(node), SUFFIX) if p)
        n = seen.get(base, 0)
        seen[base] = n + 1
        d, reason = _unsupported(node, a)
        scale = float(a["scale"]) if isinstance(a["scale"], (int, float)) else None
        site = AttentionSite(base if n == 0 else f"{base}#{n}", node.name, d, scale, reason)
        node.meta[ATTENTION_META_KEY] = site
        sites.append(site)
    return sites


def insert_attention_observers(gm: fx.GraphModule, make_observer: Callable[[AttentionSite, str], torch.nn.Module]) -> fx.GraphModule:
    """Put ``make_observer(site, "q" | "k" | "v")`` on the q, k and v edges of every supported attention site.

    The observer sits on the edge: other consumers of the same tensor (a q / k / v used elsewhere) are not affected."""
    count = 0
    for node in list(gm.graph.nodes):
        site: AttentionSite | None = node.meta.get(ATTENTION_META_KEY)
        if site is None or site.unsupported:
            continue
        for i, name in enumerate(INPUTS):
            inp = node.args[i] if len(node.args) > i else node.kwargs[_SDPA_ARGS[i]]
            mod = f"qdiff_attn_observer_{count}"
            count += 1
            gm.add_submodule(mod, make_observer(site, name))
            with gm.graph.inserting_before(node):
                obs = gm.graph.call_module(mod, (inp,))
            if len(node.args) > i:
                node.update_arg(i, obs)
            else:
                node.update_kwarg(_SDPA_ARGS[i], obs)
    gm.graph.lint()
    gm.recompile()
    return gm

"""Find the quantizable ops of a Dynamo graph by what they compute.

A *site* is a ``linear`` / ``conv{1,2,3}d`` / ``conv_transpose{1,2,3}d`` call whose weight is a
model parameter (or buffer). Sites are keyed by the weight's qualified name (``blocks.0.attn.to_q``),
which is stable across recompiles, batch sizes and graph breaks; a weight used twice in one
graph gets ``#1``, ``#2``... Each site is written to ``node.meta["qdiff_site"]``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.fx as fx

from ..config import OpKind

LINEAR_TARGETS = {torch._C._nn.linear, torch.nn.functional.linear}
CONV_TARGETS = {
    torch.conv1d: (OpKind.CONV, 1),
    torch.conv2d: (OpKind.CONV, 2),
    torch.conv3d: (OpKind.CONV, 3),
    torch.conv_transpose1d: (OpKind.CONV_TRANSPOSE, 1),
    torch.conv_transpose2d: (OpKind.CONV_TRANSPOSE, 2),
    torch.conv_transpose3d: (OpKind.CONV_TRANSPOSE, 3),
}
_LINEAR_ARGS = ("input", "weight", "bias")
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_T_ARGS = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")
_CONV_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1, "output_padding": 0}

META_KEY = "qdiff_site"


@dataclass
class Site:
    """One quantizable op in one graph."""

    key: str
    kind: OpKind
    node: str  # FX node name in the graph it was found in
    weight_name: str  # qualified name of the weight parameter
    weight_shape: tuple[int, ...]
    conv_args: dict[str, Any] = field(default_factory=dict)  # stride, padding, ... (convs)
    unsupported: str | None = None  # why it cannot be quantized, if it cannot

    @property
    def signature(self) -> str:
        """What must match between calibration and compilation."""
        return f"{self.key}:{self.kind.value}:{'x'.join(map(str, self.weight_shape))}"


_SOURCE_TOKEN = re.compile(r"\.([A-Za-z_]\w*)|\.(\d+)|\['([^']*)'\]|\[(\d+)\]")
_CONTAINERS = {"__dict__", "_modules", "_parameters", "_buffers"}


def qualified_name(source_name: str) -> str:
    """Dynamo source -> module-relative name.

    ``L['self']._modules['conv']._parameters['weight']`` and
    ``L['self'].__dict__['_modules']['conv']._parameters['weight']`` both give ``conv.weight``; numeric attribute
    tokens are kept (``...['blocks'].0.attn1`` -> ``blocks.0.attn1``, as ``nn_module_stack`` paths write them).
    """
    head = re.match(r"^[LG]\['[^']*'\]", source_name)
    rest = source_name[head.end():] if head else source_name
    parts = ["".join(m) for m in _SOURCE_TOKEN.findall(rest)]
    parts = [p for p in parts if p not in _CONTAINERS]
    return ".".join(parts) if parts else source_name


def _source_name(node: fx.Node) -> str | None:
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    if source is None:
        return None
    name = source.name
    return name() if callable(name) else name


def parameter_tensors(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> dict[str, tuple[str, torch.Tensor]]:
    """Node name -> (qualified name, tensor) for graph inputs and attributes that hold weights."""
    found: dict[str, tuple[str, torch.Tensor]] = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, value in zip(placeholders, example_inputs):
        if isinstance(value, torch.Tensor) and (isinstance(value, torch.nn.Parameter) or _is_module_state(node)):
            src = _source_name(node)
            found[node.name] = (qualified_name(src) if src else node.target, value)
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            value = fetch_attr(gm, node.target)
            if isinstance(value, torch.Tensor):
                found[node.name] = (node.target, value)
    return found


def _is_module_state(node: fx.Node) -> bool:
    src = _source_name(node) or ""
    return "._parameters[" in src or "._buffers[" in src


def example_tensor(node: Any) -> torch.Tensor | None:
    """The tensor Dynamo / make_fx recorded for ``node`` (``example_value`` or ``val`` meta), or None (not a node, no
    record, or not a tensor)."""
    v = node.meta.get("example_value", node.meta.get("val")) if isinstance(node, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def fetch_attr(gm: fx.GraphModule, target: str) -> Any:
    """The attribute a ``get_attr`` target names (dotted path; None if absent)."""
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj


def bind(node: fx.Node, names: tuple[str, ...], defaults: dict) -> dict[str, Any]:
    """A call node's arguments by name: ``defaults``, then its positional args named by ``names``, then its kwargs."""
    bound = dict(defaults)
    bound.update(zip(names, node.args))
    bound.update(node.kwargs)
    return bound


def op_kind(node: fx.Node) -> tuple[OpKind, int] | None:
    """(kind, spatial dims) of a quantizable op node, else None."""
    if node.op != "call_function":
        return None
    if node.target in LINEAR_TARGETS:
        return OpKind.LINEAR, 0
    return CONV_TARGETS.get(node.target)


def bound_args(node: fx.Node) -> dict[str, Any]:
    """The op's arguments by name (input, weight, bias, and conv parameters)."""
    kind, _ = op_kind(node)
    if kind is OpKind.LINEAR:
        return bind(node, _LINEAR_ARGS, {"bias": None})
    names = _CONV_T_ARGS if kind is OpKind.CONV_TRANSPOSE else _CONV_ARGS
    return bind(node, names, _CONV_DEFAULTS)


def _key_of(weight_name: str) -> str:
    """``blocks.0.proj.weight`` -> ``blocks.0.proj``; ``attn.in_proj_weight`` -> ``attn.in_proj``."""
    for suffix in (".weight", "_weight"):
        if weight_name.endswith(suffix):
            return weight_name[: -len(suffix)]
    return weight_name


def find_sites(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> list[Site]:
    """All linear/conv ops of ``gm`` in graph order, each recorded in ``node.meta[META_KEY]``."""
    params = parameter_tensors(gm, example_inputs)
    sites: list[Site] = []
    seen: dict[str, int] = {}
    for node in gm.graph.nodes:
        kind_dims = op_kind(node)
        if kind_dims is None:
            continue
        kind, _ = kind_dims
        args = bound_args(node)
        w = args["weight"]
        conv_args = {k: args[k] for k in ("stride", "padding", "dilation", "groups", "output_padding") if k in args and kind is not OpKind.LINEAR}
        if not isinstance(w, fx.Node) or w.name not in params:
            producer = w.name if isinstance(w, fx.Node) else repr(w)
            site = Site(f"<{node.name}>", kind, node.name, producer, (), conv_args, f"weight is computed in the graph (by '{producer}')")
        else:
            wname, wt = params[w.name]
            key = _key_of(wname)
            n = seen.get(key, 0)
            seen[key] = n + 1
            site = Site(key if n == 0 else f"{key}#{n}", kind, node.name, wname, tuple(wt.shape), conv_args)
            site.unsupported = _unsupported(site, wt)
        node.meta[META_KEY] = site
        sites.append(site)
    return sites


def _unsupported(site: Site, weight: torch.Tensor) -> str | None:
    if not weight.is_floating_point():
        return f"weight dtype {weight.dtype} is not floating point"
    if site.kind is OpKind.CONV_TRANSPOSE and site.conv_args.get("groups", 1) != 1:
        return "grouped transposed convolution"
    if isinstance(site.conv_args.get("padding"), str) and site.conv_args["padding"] not in ("same", "valid"):
        return f"padding mode {site.conv_args['padding']!r}"
    return None

"""Channel provenance: which quantized ops read a concatenation along their input channels.

UNet skip connections join deep and shallow features with ``cat`` along the channel dim; the
parts have very different ranges, so one activation scale for the joined tensor wastes the grid.
This pass walks back from the input edge of every quantized op (conv: dim 1, linear: the last dim)
through ops that keep every channel where it was — elementwise activations, adds / muls of
per-channel broadcasts (time embeddings) or of parameters (per-channel affine), LayerNorm,
GroupNorm whose groups do not straddle a boundary, BatchNorm / InstanceNorm, padding of other dims,
spatial resampling, and permutes / views that move the channel dim without merging it — to a
``cat`` along that dim. The op then reads channel slices ``[p_i, p_i+1)`` of the cat's parts: it
can quantize each slice with its own scale (see :mod:`.annotate`, ``Annotation.splits``).

Ops that break the correspondence (a reshape that merges the channel dim, slicing or padding it,
a GroupNorm whose groups straddle a boundary, an add of a full tensor of other provenance, an op
this pass does not know) refuse the split with a reason, if a ``cat`` lies behind them. Quantized
ops (convs, linears) end every walk: what they output has no provenance.

Each decision is written to the op's ``node.meta[SPLIT_KEY]`` and returned.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Union

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from ..config import OpKind
from .annotate import Annotation
from .observe import INPUT_EDGE
from .sites import META_KEY, Site, bound_args

SPLIT_KEY = "qdiff_split"


@dataclass(frozen=True)
class SplitDecision:
    """The provenance decision for one quantized op's input edge."""

    key: str  # site key
    node: str  # graph node of the op
    points: tuple[int, ...] | None  # channel split points [0, c1, ..., C]; None: refused
    reason: str | None  # why not split
    source: str  # the cat node
    path: tuple[str, ...] = ()  # "op(node)" from the cat to the op, in data-flow order

    @property
    def split(self) -> bool:
        return self.points is not None

    @property
    def sizes(self) -> tuple[int, ...]:
        p = self.points or ()
        return tuple(b - a for a, b in zip(p, p[1:]))

    def describe(self) -> str:
        """One line for reports: ``split 40+40 (cat x_5 > add_12 > h_24)`` or ``not split: ...``."""
        via = " > ".join((f"cat({self.source})", *self.path))
        if self.split:
            return f"split {'+'.join(map(str, self.sizes))} ({via})"
        return f"not split: {self.reason} ({via})"


# -- results of the backward walk --------------------------------------------------------------
@dataclass(frozen=True)
class _Found:
    points: tuple[int, ...]
    source: str
    path: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Refused:
    reason: str
    source: str
    path: tuple[str, ...] = ()


_Result = Union[_Found, _Refused, None]  # None: no cat behind this tensor

# -- op tables (by name; the callable must come from torch or operator) --------------------------
_CAT = {"cat", "concat", "concatenate"}
_ELEMENTWISE = {
    # activations and pointwise math
    "relu", "relu_", "relu6", "silu", "silu_", "gelu", "sigmoid", "tanh", "leaky_relu", "elu", "selu", "celu",
    "mish", "hardswish", "hardsigmoid", "hardtanh", "softplus", "softsign", "logsigmoid", "tanhshrink",
    "neg", "abs", "exp", "log", "sqrt", "rsqrt", "square", "sin", "cos", "erf", "reciprocal", "clamp", "clip",
    "clamp_min", "clamp_max", "pow", "__pow__",
    # binary arithmetic
    "add", "sub", "mul", "div", "truediv", "true_divide", "rsub", "iadd", "isub", "imul", "itruediv",
    "__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__", "__rtruediv__",
    "maximum", "minimum", "addcmul",
    # identity-like
    "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout",
    "clone", "contiguous", "detach", "float", "half", "bfloat16", "double", "to", "type",
}
_SPATIAL = {  # per-channel ops over the dims after the channel dim (1)
    "interpolate", "upsample", "upsample_nearest", "upsample_bilinear", "upsample_nearest1d", "upsample_nearest2d",
    "upsample_nearest3d", "upsample_bilinear2d", "avg_pool1d", "avg_pool2d", "avg_pool3d", "max_pool1d", "max_pool2d",
    "max_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "pixel_norm",
}
_PER_CHANNEL_NORM = {"batch_norm", "instance_norm"}  # statistics per channel (dim 1)
_LAYER_NORM = {"layer_norm", "rms_norm"}
_GROUP_NORM = {"group_norm"}
_PAD = {"pad", "constant_pad_nd"}
_PERMUTE = {"permute"}
_TRANSPOSE = {"transpose", "transpose_", "swapaxes", "swapdims"}
_MOVEDIM = {"movedim", "moveaxis"}
_RESHAPE = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "expand", "expand_as", "view_as", "reshape_as"}
_GETITEM = {"getitem"}


def _op_name(node: fx.Node) -> str | None:
    """The op's name when it is a torch / operator callable or a tensor method, else None."""
    t = node.target
    if node.op == "call_method":
        return t
    if node.op != "call_function":
        return None
    if isinstance(t, torch._ops.OpOverload):
        return t._opname
    if isinstance(t, torch._ops.OpOverloadPacket):
        return t._qualified_op_name.split("::")[-1]
    module = getattr(t, "__module__", None) or ""
    objclass = getattr(t, "__objclass__", None)
    if module.startswith("torch") or module == "_operator" or objclass is torch._C.TensorBase:
        return getattr(t, "__name__", None)
    return None


def _shape(node: Any) -> tuple[int | None, ...] | None:
    """The static shape of a node's tensor value (None per symbolic size), if known."""
    if not isinstance(node, fx.Node):
        return None
    val = node.meta.get("example_value", node.meta.get("val"))
    if isinstance(val, torch.Tensor):
        sizes = val.shape
    else:
        meta = node.meta.get("tensor_meta")
        sizes = getattr(meta, "shape", None)
        if sizes is None:
            return None
    return tuple(int(s) if is_concrete_int(s) else None for s in sizes)  # never guards on a symbolic size


def _is_state(node: fx.Node) -> bool:
    """A parameter / buffer / constant: a get_attr, or a placeholder Dynamo lifted from module state."""
    if node.op == "get_attr":
        return True
    if node.op != "placeholder":
        return False
    source = getattr(node.meta.get("grapharg"), "source", None)
    name = getattr(source, "name", "")
    name = name() if callable(name) else str(name)
    return "._parameters[" in name or "._buffers[" in name


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _int_dims(args: Any) -> list[int] | None:
    """``permute(x, 0, 2, 1)`` and ``permute(x, (0, 2, 1))`` both give [0, 2, 1]."""
    if len(args) == 1 and isinstance(args[0], (tuple, list)):
        args = args[0]
    return list(args) if all(isinstance(a, int) for a in args) else None


class _Walker:
    """Backward provenance walk over one graph, memoized per (node, dim)."""

    def __init__(self) -> None:
        self.memo: dict[tuple[str, int], _Result] = {}
        self.cat_memo: dict[str, str | None] = {}

    # -- entry -------------------------------------------------------------------------------
    def trace(self, node: Any, dim: int) -> _Result:
        """Provenance of dim ``dim`` (non-negative) of ``node``'s output."""
        if not isinstance(node, fx.Node):
            return None
        key = (node.name, dim)
        if key not in self.memo:
            self.memo[key] = None  # cycles cannot occur in a DAG; this guards re-entry
            self.memo[key] = self._trace(node, dim)
        return self.memo[key]

    def _trace(self, node: fx.Node, dim: int) -> _Result:
        if node.op in ("placeholder", "get_attr", "output") or node.meta.get(META_KEY) is not None:
            return None  # graph inputs and quantized ops: no provenance
        name = _op_name(node)
        if name is None:
            return self._blocked(node, f"'{node.name}' ({node.target}) is not known to keep channels in place")
        shape = _shape(node)
        if name in _CAT:
            return self._cat(node, dim, shape)
        if name in _GETITEM:
            return self._getitem(node, dim)
        if shape is None:
            return self._blocked(node, f"'{node.name}' ({name}) has no shape information")
        if name in _ELEMENTWISE:
            return self._elementwise(node, dim, shape)
        if name in _LAYER_NORM:
            return self._through(node, node.args[0], dim)
        if name in _GROUP_NORM:
            return self._group_norm(node, dim, shape)
        if name in _PER_CHANNEL_NORM or name in _SPATIAL:
            if dim != 1:
                return self._blocked(node, f"'{node.name}' ({name}) works along dim {dim}, the split dim")
            return self._through(node, node.args[0], dim)
        if name in _PAD:
            return self._pad(node, dim, shape)
        if name in _PERMUTE:
            perm = _int_dims(node.args[1:]) if len(node.args) > 1 else _int_dims([node.kwargs.get("dims", ())])
            if perm is None:
                return self._blocked(node, f"'{node.name}' permutes by computed dims")
            return self._through(node, node.args[0], perm[dim] % len(shape))
        if name in _TRANSPOSE:
            a, b = (_arg(node, 1, "dim0"), _arg(node, 2, "dim1"))
            if not isinstance(a, int) or not isinstance(b, int):
                return self._blocked(node, f"'{node.name}' transposes computed dims")
            a, b = a % len(shape), b % len(shape)
            return self._through(node, node.args[0], b if dim == a else a if dim == b else dim)
        if name in _MOVEDIM:
            return self._movedim(node, dim, shape)
        if name in _RESHAPE:
            return self._reshape(node, dim, shape)
        return self._blocked(node, f"'{node.name}' ({name}) is not known to keep channels in place")

    # -- helpers -------------------------------------------------------------------------------
    def _through(self, node: fx.Node, inp: Any, dim: int) -> _Result:
        """Continue the walk at ``inp`` (dim ``dim`` there), recording ``node`` on the path."""
        return _extend(self.trace(inp, dim), _label(node))

    def _blocked(self, node: fx.Node, reason: str) -> _Result:
        """Provenance is broken at ``node``: refused if a cat lies behind it, else nothing."""
        cat = self._cat_behind(node)
        return None if cat is None else _Refused(reason, cat, (_label(node),))

    def _cat_behind(self, start: fx.Node) -> str | None:
        """The nearest cat (not along the batch dim) upstream of ``start`` short of quantized ops."""
        if start.name in self.cat_memo:
            return self.cat_memo[start.name]
        found, seen, frontier = None, {start.name}, list(start.all_input_nodes)
        while frontier and found is None:
            nxt = []
            for n in frontier:
                if n.name in seen or n.op in ("placeholder", "get_attr") or n.meta.get(META_KEY) is not None:
                    continue
                seen.add(n.name)
                if _op_name(n) in _CAT and _cat_dim(n) != 0:
                    found = n.name
                    break
                nxt.extend(n.all_input_nodes)
            frontier = nxt
        self.cat_memo[start.name] = found
        return found

    def _cat(self, node: fx.Node, dim: int, shape: tuple | None) -> _Result:
        parts = [p for p in (_arg(node, 0, "tensors") or ()) if isinstance(p, fx.Node)]
        cat_dim = _cat_dim(node)
        if shape is None or cat_dim is None:
            return _Refused(f"cat '{node.name}' has no static shape or dim", node.name)
        if cat_dim != dim:  # parts side by side along another dim: each keeps its channels
            return self._combine(node, [(p, dim) for p in parts])
        points = [0]
        for p in parts:
            size = (_shape(p) or (None,) * len(shape))[dim]
            if size is None:
                return _Refused(f"cat '{node.name}' joins parts of symbolic size", node.name)
            if size == 0:
                continue
            inner = self.trace(p, dim)  # a part that is itself a cat along the dim splits further
            base = points[-1]
            if isinstance(inner, _Found) and inner.points[-1] == size:
                points.extend(base + q for q in inner.points[1:])
            else:
                points.append(base + size)
        if len(points) < 3:
            return None  # one non-empty part: nothing to split
        return _Found(tuple(points), node.name)

    def _combine(self, node: fx.Node, operands: list[tuple[fx.Node, int]]) -> _Result:
        """Several full operands meet at ``node``: they must all come from the same split."""
        results = [(op, self.trace(op, d)) for op, d in operands]
        found = [r for _, r in results if isinstance(r, _Found)]
        refused = [r for _, r in results if isinstance(r, _Refused)]
        if refused:
            return _extend(refused[0], _label(node))
        if not found:
            return None
        if any(r.points != found[0].points for r in found):
            return _Refused(f"'{node.name}' joins tensors split differently", found[0].source, (*found[0].path, _label(node)))
        others = [op.name for op, r in results if r is None]
        if others:
            return _Refused(
                f"'{node.name}' combines it with '{others[0]}', a full tensor of other provenance",
                found[0].source, (*found[0].path, _label(node)),
            )
        return _extend(found[0], _label(node))

    def _elementwise(self, node: fx.Node, dim: int, shape: tuple) -> _Result:
        operands = []
        for a in [*node.args, *node.kwargs.values()]:
            if not isinstance(a, fx.Node) or _is_state(a):
                continue  # scalars, dtypes, parameters (per-channel / per-element affine)
            s = _shape(a)
            if s is None:
                return self._blocked(node, f"'{node.name}' combines it with '{a.name}' of unknown shape")
            if not _broadcast_along_channels(s, shape, dim):
                operands.append((a, dim - (len(shape) - len(s))))
        if not operands:
            return self._blocked(node, f"'{node.name}' has no full tensor operand")
        return self._combine(node, operands)

    def _group_norm(self, node: fx.Node, dim: int, shape: tuple) -> _Result:
        groups = _arg(node, 1, "num_groups")
        if dim != 1 or not isinstance(groups, int):
            return self._blocked(node, f"'{node.name}' (group_norm) normalizes groups along the split dim {dim}")
        r = self._through(node, node.args[0], dim)
        if isinstance(r, _Found) and shape[1] is not None:
            size = shape[1] // groups
            straddled = [p for p in r.points[1:-1] if p % size]
            if straddled:
                return _Refused(
                    f"group_norm '{node.name}' has groups of {size} channels straddling the split at {straddled[0]}",
                    r.source, r.path,
                )
        return r

    def _pad(self, node: fx.Node, dim: int, shape: tuple) -> _Result:
        pad = _arg(node, 1, "pad")
        if not isinstance(pad, (tuple, list)) or not all(isinstance(p, int) for p in pad):
            return self._blocked(node, f"'{node.name}' pads by computed amounts")
        n = len(shape)
        for i in range(len(pad) // 2):
            if n - 1 - i == dim and (pad[2 * i] or pad[2 * i + 1]):
                return self._blocked(node, f"'{node.name}' pads the split dim")
        return self._through(node, node.args[0], dim)

    def _movedim(self, node: fx.Node, dim: int, shape: tuple) -> _Result:
        src, dst = _arg(node, 1, "source"), _arg(node, 2, "destination")
        src = [src] if isinstance(src, int) else src
        dst = [dst] if isinstance(dst, int) else dst
        if not (isinstance(src, (list, tuple)) and isinstance(dst, (list, tuple))):
            return self._blocked(node, f"'{node.name}' moves computed dims")
        n = len(shape)
        src, dst = [s % n for s in src], [d % n for d in dst]
        order = [d for d in range(n) if d not in src]  # the output's dims, by input dim
        perm = [None] * n
        for s, d in zip(src, dst):
            perm[d] = s
        rest = iter(order)
        perm = [p if p is not None else next(rest) for p in perm]
        return self._through(node, node.args[0], perm[dim])

    def _reshape(self, node: fx.Node, dim: int, shape: tuple) -> _Result:
        inp = node.args[0]
        in_shape = _shape(inp)
        mapped = _map_reshape(in_shape, shape, dim)
        if mapped is None:
            return self._blocked(node, f"'{node.name}' ({_op_name(node)}) merges or splits the split dim")
        return self._through(node, inp, mapped)

    def _getitem(self, node: fx.Node, dim: int) -> _Result:
        src, idx = node.args[0], node.args[1]
        in_shape = _shape(src)
        if in_shape is None:
            return None  # indexing a tuple (e.g. chunk / split results): no tensor provenance here
        idx = idx if isinstance(idx, tuple) else (idx,)
        if any(isinstance(i, fx.Node) or (not isinstance(i, (int, slice, type(None))) and i is not Ellipsis) for i in idx):
            return self._blocked(node, f"'{node.name}' indexes with tensors")
        consumed = sum(1 for i in idx if i is not None and i is not Ellipsis)
        expanded: list[Any] = []
        for i in idx:
            if i is Ellipsis:
                expanded.extend([slice(None)] * (len(in_shape) - consumed))
            else:
                expanded.append(i)
        expanded.extend([slice(None)] * (len(in_shape) - sum(1 for i in expanded if i is not None)))
        in_dim = out_dim = 0
        for i in expanded:
            if i is None:
                if out_dim == dim:
                    return None  # a new size-1 dim: not a cat's dim
                out_dim += 1
                continue
            if isinstance(i, int):
                in_dim += 1
                continue
            if out_dim == dim:
                full = i.step in (None, 1) and (i.start in (None, 0)) and (i.stop is None or (in_shape[in_dim] is not None and i.stop >= in_shape[in_dim]))
                if not full:
                    return self._blocked(node, f"'{node.name}' slices the split dim")
                return self._through(node, src, in_dim)
            in_dim += 1
            out_dim += 1
        return None


def _broadcast_along_channels(s: tuple, out: tuple, dim: int) -> bool:
    """Whether an operand of shape ``s`` is broadcast in a way that cannot blur the split.

    Either it has size 1 along the split dim (the same value for every channel), or it is a
    per-channel broadcast like a time embedding ``(B, C, 1, 1)``: size 1 along every dim but the
    batch and the channel dim, where the output is larger along at least one of those dims.
    """
    offset = len(out) - len(s)
    if dim - offset < 0 or s[dim - offset] == 1:
        return True
    others = [i for i in range(1, len(out)) if i != dim]
    if not any(out[i] != 1 for i in others):
        return False  # nothing to broadcast over: a same-shape operand is a full tensor
    return all(i - offset < 0 or s[i - offset] == 1 for i in others)


def _label(node: fx.Node) -> str:
    return f"{_op_name(node) or node.op}({node.name})"


def _extend(r: _Result, name: str) -> _Result:
    if r is None:
        return None
    return type(r)(*(getattr(r, f) for f in r.__dataclass_fields__ if f != "path"), path=(*r.path, name))


def _cat_dim(node: fx.Node) -> int | None:
    dim = _arg(node, 1, "dim", 0)
    shape = _shape(node)
    if not isinstance(dim, int):
        return None
    return dim % len(shape) if shape else dim


def _map_reshape(in_shape: tuple | None, out_shape: tuple, dim: int) -> int | None:
    """The input dim that becomes output dim ``dim`` of a view / reshape, if it is carried whole."""
    if in_shape is None or any(s is None for s in in_shape) or any(s is None for s in out_shape):
        return None
    size, prefix = out_shape[dim], math.prod(out_shape[:dim])
    for j, s in enumerate(in_shape):
        if s == size and math.prod(in_shape[:j]) == prefix:
            return j
    return None


def input_channel_dim(node: fx.Node, site: Site) -> int | None:
    """The dim of the op's input that its weight reduces over: 1 for convs, the last for linears."""
    if site.kind is not OpKind.LINEAR:
        return 1
    shape = _shape(bound_args(node)["input"])
    return None if shape is None else len(shape) - 1


def find_splits(gm: fx.GraphModule) -> list[SplitDecision]:
    """The split decision of every supported quantized op whose input has a cat behind it."""
    walker = _Walker()
    decisions = []
    for node in gm.graph.nodes:
        site: Site | None = node.meta.get(META_KEY)
        if site is None or site.unsupported or node.op != "call_function":
            continue
        dim = input_channel_dim(node, site)
        inp = bound_args(node)["input"]
        if dim is None or not isinstance(inp, fx.Node):
            continue
        r = walker.trace(inp, dim)
        if r is None:
            continue
        if isinstance(r, _Found):
            channels = (_shape(inp) or (None,) * (dim + 1))[dim]
            groups = site.conv_args.get("groups", 1)
            if groups != 1:
                r = _Refused(f"grouped convolution (groups={groups})", r.source, r.path)
            elif channels != r.points[-1]:
                r = _Refused(f"split points {r.points} do not cover the {channels} input channels", r.source, r.path)
        d = SplitDecision(
            site.key, node.name, r.points if isinstance(r, _Found) else None,
            r.reason if isinstance(r, _Refused) else None, r.source, r.path,
        )
        node.meta[SPLIT_KEY] = d
        decisions.append(d)
    return decisions


def apply_split(ann: Annotation, decision: SplitDecision | None, enabled: bool) -> Annotation:
    """``ann`` with its input edge split where provenance holds, the config enables it and the
    op's activation is quantized (the split is a per-slice activation quantizer)."""
    if decision is None or not decision.split or not enabled or not ann.quantized or ann.act.get(INPUT_EDGE) is None:
        return ann
    return replace(ann, splits={**ann.splits, INPUT_EDGE: decision.points})


def split_note(decision: SplitDecision | None, ann: Annotation, enabled: bool) -> str | None:
    """The decision as a line for ``inspect``: the split, or why the op is not split (None: no cat behind it)."""
    if decision is None:
        return None
    if not decision.split:
        return decision.describe()
    if not enabled:
        return f"not split: config.split_shortcuts is off (would {decision.describe()})"
    if not ann.quantized:
        return f"not split: op kept in full precision (would {decision.describe()})"
    if ann.act.get(INPUT_EDGE) is None:
        return f"not split: input not quantized (would {decision.describe()})"
    return decision.describe()

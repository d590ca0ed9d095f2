"""Convert: replace each annotated op by its quantized form, with the weights stored quantized.

Quantized weights, their scales and the activation scale / zero point become buffers of the
GraphModule (``get_attr`` nodes), so graphs that differ only in scales share their code. The op
itself becomes a call of a lowering function (by default :mod:`qcompile.lowering.reference`).
A split op (the weight has ``splits``) passes its split points to the lowering as ``splits=`` and
has one activation scale / zero point per slice. An op whose input has an outlier split
(``QuantizedOp.act_outlier_scale``) passes the outlier quantizer's scale(s) as ``outlier_scale=``.

A bias that is module state (a lifted parameter whose value the backend passes in ``constants``) is
folded with the op's bias correction into one fp32 buffer at conversion time, as the weight is
quantized then: the compiled graph computes no ``bias.float() + bias_corr`` per call (one small kernel
launch per quantized op). Like the quantized weight, it is a snapshot: changing the module's bias
after compiling does not reach the compiled graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx

from ..config import OpKind
from ..lowering import reference
from ..lowering.weights import QuantizedWeight
from .annotate import ANNOTATION_KEY
from .sites import META_KEY, Site, bound_args


@dataclass(frozen=True)
class QuantizedOp:
    """What replaces one op: its quantized weight and (optionally) its input quantizer."""

    weight: QuantizedWeight
    act_fmt: str | None = None
    act_symmetric: bool = True
    act_scale: float | tuple[float, ...] = 1.0  # a tuple: one per slice of a split op
    act_zero_point: int | tuple[int, ...] = 0
    bias_correction: torch.Tensor | None = None  # added to the bias (per output channel)
    act_smooth: torch.Tensor | None = None  # inverse smoothing factors (per input channel)
    act_outlier_scale: float | tuple[float, ...] | None = None  # outlier split's second quantizer (per slice; 0: none)


@dataclass(frozen=True)
class Lowering:
    """The functions quantized ops lower to (the reference lowering by default)."""

    linear: Callable[..., torch.Tensor] = reference.qlinear
    conv: Callable[..., torch.Tensor] = reference.qconv
    linear_fused: Callable[..., torch.Tensor] | None = None  # linear + activation epilogue (``act=``), if the lowering has one
    # extra per-op tensors the lowering wants precomputed once (e.g. int8 weight column sums): (op, kind) -> {kwarg: tensor}
    aux: Callable[[QuantizedOp, str], dict[str, torch.Tensor]] | None = None
    # why an op has no kernel in this lowering and runs the reference (None: it has one), for the backend's warning
    fallback: Callable[[QuantizedOp], str | None] | None = None
    # the weight stored in another layout, once, at conversion: (op, kind) -> (tensor, layout name) or None (as planned);
    # the op is then called with ``weight_layout=`` that name
    stored_weight: Callable[[QuantizedOp, str], tuple[torch.Tensor, str] | None] | None = None
    # fp8 attention (passes/convert_attention.py): (q, k, v, q_scale, k_scale, v_scale, sm_scale=) -> output
    attention: Callable[..., torch.Tensor] = reference.qattention
    # a q / k / v projection written as fp8 attention heads (passes/attention_heads.py), if the lowering has it, and
    # why an (M, N, K) projection should not take it (None: it may)
    linear_heads: Callable[..., torch.Tensor] | None = None
    heads_unsupported: Callable[[int, int, int], str | None] | None = None
    # residual add + LayerNorm + modulation + fp8 quantization in one call (passes/norm_quant.py), if the lowering has it
    norm_quant: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None


def _check_slices(q: QuantizedOp, node: fx.Node) -> None:
    """Per-slice activation parameters must match the weight's split points."""
    want = None if q.weight.splits is None else len(q.weight.splits) - 1
    for name in ("act_scale", "act_zero_point", "act_outlier_scale"):
        v = getattr(q, name)
        if name == "act_outlier_scale" and v is None:
            continue
        if q.act_fmt is not None and (len(v) if isinstance(v, tuple) else None) != want:
            raise ValueError(f"node '{node.name}': {name} {v} does not match the weight's split points {q.weight.splits}")


def add_buffer(gm: fx.GraphModule, name: str, value: torch.Tensor) -> fx.Node:
    """Register ``value`` as buffer ``name`` of ``gm`` and return a ``get_attr`` node reading it (at the insert point)."""
    gm.register_buffer(name, value)
    return gm.graph.get_attr(name)


def _folded_bias(bias: Any, q: QuantizedOp, constants: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """``bias + bias_correction`` in fp32 when the bias is known now (module state, or absent), else None."""
    if bias is None:
        return q.bias_correction
    value = constants.get(bias.name) if isinstance(bias, fx.Node) else None
    if type(value) not in (torch.Tensor, torch.nn.Parameter) or value.is_meta:  # (fake or subclass tensors: not folded)
        return None
    value = value.detach().float().reshape(-1)
    return value if q.bias_correction is None else value + q.bias_correction.to(value.device)


def convert(
    gm: fx.GraphModule, ops: dict[str, QuantizedOp], device: torch.device, lowering: Lowering = Lowering(),
    constants: dict[str, torch.Tensor] | None = None,
) -> fx.GraphModule:
    """Rewrite every site named in ``ops``; the rest keep their full-precision op.

    ``constants``: values of graph inputs that are module state (placeholder name -> tensor); a quantized op's
    bias found there is folded with its bias correction into one fp32 buffer."""
    constants = constants or {}
    for i, node in enumerate(list(gm.graph.nodes)):
        site: Site | None = node.meta.get(META_KEY)
        if site is None or site.key not in ops:
            continue
        q = ops[site.key]
        args = bound_args(node)
        prefix = f"qdiff_{i}_"
        with gm.graph.inserting_before(node):
            stored = lowering.stored_weight(q, site.kind.value) if lowering.stored_weight is not None else None
            wdata = add_buffer(gm, prefix + "weight", (q.weight.data if stored is None else stored[0]).to(device))
            wscale = add_buffer(gm, prefix + "weight_scale", q.weight.scale.to(device))
            a_scale = add_buffer(gm, prefix + "act_scale", torch.tensor(q.act_scale, dtype=torch.float32, device=device))
            a_zp = add_buffer(gm, prefix + "act_zero_point", torch.tensor(q.act_zero_point, dtype=torch.int32, device=device))
            common: dict[str, Any] = dict(
                wfmt=q.weight.fmt, group_size=q.weight.group_size, weight_shape=tuple(q.weight.shape),
                afmt=q.act_fmt, asym=not q.act_symmetric,
            )
            bias = args["bias"]
            folded = _folded_bias(bias, q, constants)
            if folded is not None:
                bias = add_buffer(gm, prefix + "bias", folded.to(device))
            elif q.bias_correction is not None:
                common["bias_corr"] = add_buffer(gm, prefix + "bias_correction", q.bias_correction.to(device))
            if q.act_smooth is not None:
                common["act_smooth"] = add_buffer(gm, prefix + "act_smooth", q.act_smooth.to(device))
            if stored is not None:
                common["weight_layout"] = stored[1]
            if q.weight.splits is not None:
                common["splits"] = q.weight.splits
            if q.act_fmt is not None and q.act_outlier_scale is not None:
                common["outlier_scale"] = add_buffer(gm, prefix + "outlier_scale", torch.tensor(q.act_outlier_scale, dtype=torch.float32, device=device))
            if lowering.aux is not None:  # stored as buffers: computed once, not per call
                for name, t in lowering.aux(q, site.kind.value).items():
                    common[name] = add_buffer(gm, prefix + name, t.to(device))
            _check_slices(q, node)
            if site.kind is OpKind.LINEAR:
                fn = lowering.linear
            else:
                fn = lowering.conv
                common.update(kind=site.kind.value, **{k: site.conv_args[k] for k in ("stride", "padding", "dilation", "groups")})
                if site.kind is OpKind.CONV_TRANSPOSE:
                    common["output_padding"] = site.conv_args["output_padding"]
            new = gm.graph.call_function(fn, (args["input"], wdata, wscale, bias, a_scale, a_zp), common)
        new.meta[META_KEY] = site
        new.meta[ANNOTATION_KEY] = node.meta.get(ANNOTATION_KEY)
        new.meta["qdiff_source_node"] = node.name
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return gm

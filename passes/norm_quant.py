"""Block boundaries of adaLN transformers as one kernel: residual add + LayerNorm + modulation + fp8 quantization.

After :mod:`.act_quant` an fp8 GEMM whose input is quantized by its producer (``x_quant="producer"``) reads the output
of Inductor's kernel for the code before it. In DiT / PixArt blocks (any model written the same way) that code is::

    h = r + gate * y          # or r + y (no gate), or absent (the first block's input)
    x = layer_norm(h, (C,), None, None, eps) * (1 + scale) + shift

with ``gate`` / ``scale`` / ``shift`` per (batch, channel) and ``y`` the previous branch's output. This pass replaces it
by one call of the lowering's ``norm_quant`` function (``qdiff::add_norm_modulate_fp8``:
``lowering/kernels/norm_quant.py``), which returns the new residual (for ``h``'s other users) and the GEMM's input as
fp8 codes (the GEMM then takes them as quantized, like an input written by a previous GEMM's epilogue).

Matched by graph structure and shapes only: a ``layer_norm`` without affine parameters over the last dimension of a
3-D ``(B, S, C)`` tensor, whose only user is ``mul`` by ``1 + scale`` then ``add`` of ``shift`` (either operand order),
``scale`` / ``shift`` (and ``gate``) broadcasting as ``(B, 1, C)``, feeding only the GEMM. Scalar identities between
``y`` and the gate (diffusers' ``/ rescale_output_factor`` of 1.0) are looked through. Anything else is left alone.

On by default (``QDIFF_NORM_QUANT=0`` turns it off). Inductor's two looped-reduction kernels per DiT-XL/2 block took
37-53 us on an H200, ~3x their bytes' time; the kernel takes 23.7 us per boundary, and DiT-XL/2 with CUDA graphs went
from 15.06 to 14.27 ms per step with it (and attention's fp8 output), PixArt-alpha from 25.94 to 24.55 ms
(2026-12-03, docs/benchmarks.md).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..switches import env_switch
from .sites import example_tensor

ENV = "QDIFF_NORM_QUANT"


def enabled_from_env() -> bool:
    """``QDIFF_NORM_QUANT`` (default 1, see the module docstring): 0 leaves the block boundaries to Inductor."""
    return env_switch(ENV, True)


@dataclass(frozen=True)
class Boundary:
    """One matched block boundary: ``x = LayerNorm(r + gate * y) * (1 + scale) + shift`` (``h`` = the LayerNorm input)."""

    x: fx.Node  # the modulated output (the GEMM's input)
    h: fx.Node
    residual: fx.Node
    branch: fx.Node | None
    gate: fx.Node | None
    scale: fx.Node
    shift: fx.Node
    eps: float


def _is(node, target) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is target


def _operands(node: fx.Node, pick: Callable[[object], bool]) -> tuple[object, object] | None:
    """``(a, b)`` of a binary ``node`` with ``pick(a)`` (either order), or None."""
    a, b = node.args[:2]
    if pick(a):
        return a, b
    if pick(b):
        return b, a
    return None


def _through_identity(node):
    """``node`` without trailing ``x / 1.0`` / ``x * 1.0`` steps (each used once)."""
    while (_is(node, operator.truediv) or _is(node, operator.mul)) and len(node.users) == 1 and node.args[1] == 1.0 \
            and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


TensorOf = Callable[[object], "torch.Tensor | None"]


def _per_batch(node, batch: int, channels: int) -> bool:
    """Whether ``node`` is a tensor broadcasting as (B, 1, C) against (B, S, C) with unit channel stride."""
    t = example_tensor(node)
    return (t is not None and t.dim() == 3 and tuple(t.shape) == (batch, 1, channels) and t.stride(-1) == 1
            and t.dtype.is_floating_point)


def match_boundary(x: fx.Node, tensor_of: TensorOf = example_tensor) -> Boundary | None:
    """The boundary computing ``x`` (module docstring), or None. ``tensor_of``: a node's tensor (shape, strides, dtype)
    for the residual add's operands, default the one Dynamo recorded."""
    if not (_is(x, operator.add) and len(x.users) == 1):
        return None
    mul_shift = _operands(x, lambda a: _is(a, operator.mul))
    if mul_shift is None:
        return None
    mul, shift = mul_shift
    if len(mul.users) != 1:
        return None
    norm_scale = _operands(mul, lambda a: _is(a, F.layer_norm))
    if norm_scale is None:
        return None
    norm, one_plus = norm_scale
    if len(norm.users) != 1 or not _is(one_plus, operator.add) or len(one_plus.users) != 1:
        return None
    one_scale = _operands(one_plus, lambda a: not isinstance(a, fx.Node) and a == 1)
    if one_scale is None:
        return None
    scale = one_scale[1]
    h, shape, weight, bias, eps = (list(norm.args) + [None] * 5)[:5]
    eps = norm.kwargs.get("eps", 1e-5 if eps is None else eps)
    weight, bias = norm.kwargs.get("weight", weight), norm.kwargs.get("bias", bias)
    t = example_tensor(h)
    if t is None or t.dim() != 3 or weight is not None or bias is not None or tuple(shape or ()) != (t.shape[-1],):
        return None
    B, _, C = t.shape
    if not (_per_batch(scale, B, C) and _per_batch(shift, B, C)) or not t.is_contiguous():
        return None
    residual, branch, gate = h, None, None
    if _is(h, operator.add) and all(isinstance(a, fx.Node) for a in h.args[:2]):
        gated = _operands(h, lambda a: _is(a, operator.mul) and len(a.users) == 1
                          and any(_per_batch(g, B, C) for g in a.args[:2]))
        if gated is not None:
            mul_g, residual = gated
            gate, branch = _operands(mul_g, lambda a: _per_batch(a, B, C))
            branch = _through_identity(branch)
        else:
            residual, branch = h.args[:2]
        same = [tensor_of(n) for n in (residual, branch)]
        if any(s is None or tuple(s.shape) != tuple(t.shape) or not s.is_contiguous() or s.dtype != t.dtype for s in same):
            residual, branch, gate = h, None, None
    return Boundary(x, h, residual, branch, gate, scale, shift, float(eps))


def _erase_unused(gm: fx.GraphModule, node: fx.Node) -> None:
    """Erase ``node`` and, recursively, the inputs it leaves without users (the replaced boundary's chain)."""
    if node.users or node.op != "call_function":
        return
    inputs = list(node.all_input_nodes)
    gm.graph.erase_node(node)
    for a in inputs:
        _erase_unused(gm, a)


def _output_of(node, linear_fns: tuple[Callable, ...]) -> torch.Tensor | None:
    """``node``'s recorded tensor; for a call of the lowering's GEMMs (created by earlier passes, with no record) a meta
    tensor of its output: its input's leading dims by the weight's out features, contiguous, in the dtype it writes
    (fp8 with an ``out_scale``, ``out_dtype`` for an fp8 input, else its input's)."""
    t = example_tensor(node)
    if t is not None or not (isinstance(node, fx.Node) and node.op == "call_function" and node.target in linear_fns):
        return t
    x = _output_of(node.args[0], linear_fns)
    if x is None or "weight_shape" not in node.kwargs:
        return None
    dtype = torch.float8_e4m3fn if node.kwargs.get("out_scale") is not None else node.kwargs.get("out_dtype") or x.dtype
    return torch.empty((*x.shape[:-1], node.kwargs["weight_shape"][0]), dtype=dtype, device="meta")


def _candidates(gm: fx.GraphModule, linear_fns: tuple[Callable, ...]) -> list[fx.Node]:
    """fp8 GEMM calls (unsplit, no smoothing) whose input is quantized by its producer."""
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in linear_fns and n.kwargs.get("x_quant") == "producer"
            and n.kwargs.get("afmt") == "fp8_e4m3" and n.kwargs.get("splits") is None and n.kwargs.get("act_smooth") is None]


def fuse_norm_quant(gm: fx.GraphModule, linear_fns: tuple[Callable, ...], norm_quant: Callable) -> tuple[fx.GraphModule, int]:
    """Replace each matched boundary before an fp8 GEMM quantized by its producer with a ``norm_quant`` call; returns
    the graph and how many were fused. A branch output computed by one of ``linear_fns`` (no recorded tensor) is
    checked by the shape and dtype the call writes (:func:`_output_of`)."""
    fused = 0
    for n in _candidates(gm, linear_fns):
        x = n.args[0]
        b = match_boundary(x, lambda node: _output_of(node, linear_fns)) if isinstance(x, fx.Node) else None
        if b is None:
            continue
        t = example_tensor(x)
        dtype = (t if t is not None else example_tensor(b.h)).dtype  # what the GEMM would output for x
        with gm.graph.inserting_before(n):
            call = gm.graph.call_function(norm_quant, (b.residual, b.branch, b.gate, b.scale, b.shift, n.args[4], b.eps))
            q = gm.graph.call_function(operator.getitem, (call, 1))
        # the codes' tensor, for the matching of later boundaries (a GEMM reading them may produce a later branch)
        q.meta["example_value"] = torch.empty(example_tensor(b.h).shape, dtype=torch.float8_e4m3fn, device="meta")
        if b.branch is not None:  # the new residual for h's other users (the next residual add)
            with gm.graph.inserting_after(call):
                h_new = gm.graph.call_function(operator.getitem, (call, 0))
            h_new.meta.update({k: v for k, v in b.h.meta.items() if k in ("example_value", "val")})
            b.h.replace_all_uses_with(h_new)
        n.args = (q, *n.args[1:])
        n.kwargs = {**{k: v for k, v in n.kwargs.items() if k != "x_quant"}, "out_dtype": dtype}
        _erase_unused(gm, b.x)
        _erase_unused(gm, b.h)  # the residual add the call replaced (no users left; kept when it is the call's input)
        fused += 1
    if fused:
        gm.graph.lint()
        gm.recompile()
    return gm, fused


__all__ = ["Boundary", "ENV", "enabled_from_env", "fuse_norm_quant", "match_boundary"]

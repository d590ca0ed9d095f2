"""The latency cost of quantizing an op: our fp8 kernel against the float op at the op's own shapes, on the GPU.

Issue 5: where a quantized op cannot beat bf16 (cuDNN / cuBLAS) at its shape, keep it in bf16. :func:`time_fp8_ops`
times, per W8A8-FP8 node of a calibrated plan (its calibrated input shape, random data, bf16), in CUDA graphs (no launch
overhead, as in a compiled ``mode="reduce-overhead"`` step):

* the float op: ``F.linear`` / ``F.conv2d`` (channels-last) in bf16, with bias;
* the quantized op as the compiled graph runs it: linears and 3x3 convs as our fp8 GEMM on a pre-quantized input (in a
  compiled graph the input's quantization is fused into its producer, ``passes/act_quant.py``, and a 3x3 conv's
  im2col columns too, ``lowering/conv_im2col.py``), plus, for im2col convs, a copy of the fp8 column matrix standing
  in for the extra column write and read the fused producer does; ``direct`` convs (:func:`..lowering.conv_im2col.
  conv_engine`, per shape under the default ``auto``) as ``qdiff::conv2d_fp8_prequant`` on an fp8 NHWC activation;
  1x1 convs as the GEMM quantizing in its prologue.
  The producer's own work is not counted on either side. A linear whose producer is an extern kernel (attention,
  another GEMM) quantizes in the prologue too; its time here (the pre-quantized path, the TMA kernel for large shapes)
  is then optimistic, so the guard may keep such an op quantized where bf16 would be faster, never the reverse.

Sibling linears, linears reading the same input tensor with the same input quantizer (q / k / v of an attention
block), are one GEMM in the compiled graph (``passes/fuse_siblings.py``) on one quantized copy of the input made by
its producer (``passes/act_quant.py``). :func:`sibling_groups` finds them from the plan's ``shared_statistics``
metadata (calibration's record of sites reading one graph node, the node the fusion pass groups by), and
:func:`keep_slower_in_float` decides per group: the summed quantized time against ``margin`` x the summed float time,
the whole group quantized or the whole group kept in full precision (keeping one member in float would break the fused
GEMM and make the producer write a float copy as well); the reason names the group and both sums. An op with no
timed sibling keeps the per-op rule: its quantized time against ``margin`` x its float time, the two times as the
reason. The backend's one warning and ``qdiff inspect`` show the reasons. Other formats (int8, W4) and ops no fp8
kernel takes are not timed: they stay as the plan has them.

Not counted:

* the fused GEMM itself: this module times each member's GEMM alone and sums them; one GEMM with the summed N
  usually takes less than the sum (more output tiles on the GPU, one launch), so a group's quantized side is
  pessimistic and the guard may keep a group in float that the fused GEMM would have made faster;
* the float copy a producer writes when some of its consumers stay in float while others read its quantized copy
  (the float op's read of that copy is in its float time, the producer's extra write is on neither side). Within a
  sibling group the guard never splits a group, so this arises only between consumers the plan does not link: a
  linear and a conv on one tensor, members with different input quantizers (smoothing, an input split, other
  formats) or untimed members; convs are not grouped at all (the fusion pass fuses linears only, and each conv
  quantizes its own input or columns).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .plan import NodePlan, QuantPlan

FP8 = torch.float8_e4m3fn


@dataclass(frozen=True)
class OpTiming:
    """One node's times (us): our quantized path and the float op, at the node's calibrated input shape."""

    key: str
    route: str  # "linear", "conv 1x1", "im2col conv" or "direct conv"
    quantized_us: float
    float_us: float

    @property
    def speedup(self) -> float:
        return self.float_us / self.quantized_us


def cuda_graph_timer(fn: Callable[[], object]) -> float:
    """Median time of ``fn`` in us, replayed in a CUDA graph (``triton.testing.do_bench_cudagraph``)."""
    from triton.testing import do_bench_cudagraph

    fn()  # compile / autotune outside the graph
    return do_bench_cudagraph(fn, rep=50, return_mode="median") * 1e3


def _conv_params(n: NodePlan) -> tuple[tuple[int, ...], ...] | None:
    """(stride, padding, dilation) pairs of a 2-D conv node as the Triton lowering reads them, or None."""
    from .lowering.triton_lowering import numeric_padding, pair

    st, dil = pair(n.conv_args.get("stride", 1)), pair(n.conv_args.get("dilation", 1))
    pad = None if dil is None else numeric_padding(n.conv_args.get("padding", 0), tuple(n.weight_shape[2:]), dil)
    return None if st is None or pad is None else (st, pad, dil)


def _fp8_route(n: NodePlan) -> str | None:
    """How the Triton lowering runs a W8A8-FP8 node (unsplit, on CUDA): ``linear``, ``conv 1x1``, ``im2col conv`` or
    ``direct conv`` (the engine of :func:`..lowering.conv_im2col.conv_engine`); None when this module does not time it
    (other formats, split ops, the implicit-GEMM convs of ``QDIFF_CONV_ENGINE=implicit`` or of ``im2col`` with columns
    over the bound: such convs are left to the guard's other checks)."""
    from .lowering.conv_im2col import conv_engine

    act = n.acts[0] if n.acts else None
    w = n.weight_for(0)
    if w is None or act is None or (w.fmt, act.fmt) != ("fp8_e4m3", "fp8_e4m3") or n.split is not None or n.input_shape is None:
        return None
    if n.kind.value == "linear":
        return "linear"
    params = _conv_params(n) if n.kind.value == "conv" and len(n.weight_shape) == 4 else None
    if params is None or n.conv_args.get("groups", 1) != 1 or n.weight_shape[1] % 16:
        return None
    if n.weight_shape[2:] == (1, 1) and params[:2] == ((1, 1), (0, 0)):
        return "conv 1x1"
    engine = conv_engine(n.input_shape, n.weight_shape, *params)
    return None if engine == "implicit" else f"{engine} conv"


def _gemm_mkn(n: NodePlan, route: str) -> tuple[int, int, int]:
    """(M, K, N) of the GEMM the node runs: rows of the flattened input, or of the conv's im2col matrix."""
    from .lowering.conv_im2col import column_shape

    if route == "linear":
        return math.prod(n.input_shape[:-1]), n.input_shape[-1], n.weight_shape[0]
    return (*column_shape(n.input_shape, n.weight_shape, *_conv_params(n)), n.weight_shape[0])


def _fp8_nhwc_input(n: NodePlan, device: torch.device, g: torch.Generator) -> torch.Tensor:
    """Random fp8 codes in the layout a conv node's producer writes them: (B, H, W, C)."""
    b, c, h, w = n.input_shape
    return torch.randn(b, h, w, c, device=device, generator=g).clamp(-448, 448).to(FP8)


def _column_writer(n: NodePlan, xq: torch.Tensor, device: torch.device, g: torch.Generator) -> Callable[[], object]:
    """The extra work of an im2col conv's columns, as the lowering writes them (:func:`..lowering.conv_im2col.column_writer`)."""
    from .lowering.conv_im2col import column_writer
    from .lowering.kernels.im2col import gather_columns

    if column_writer() == "kernel":
        act = _fp8_nhwc_input(n, device, g)
        stride, padding, dilation = _conv_params(n)
        return lambda: gather_columns(act, tuple(n.weight_shape[2:]), stride, padding, dilation)
    spare = torch.empty_like(xq)
    return lambda: spare.copy_(xq)


def _signature(n: NodePlan, route: str) -> tuple:
    """What a node's timing depends on: its route, input and weight shapes and conv arguments."""
    conv = tuple(sorted((k, repr(v)) for k, v in n.conv_args.items())) if route != "linear" else ()
    return (route, tuple(n.input_shape), tuple(n.weight_shape), conv)


def time_node(n: NodePlan, device: torch.device, timer: Callable[[Callable[[], object]], float] = cuda_graph_timer) -> OpTiming | None:
    """:class:`OpTiming` of one W8A8-FP8 node, or None (not an fp8 route this module times)."""
    from .lowering.kernels.conv import conv2d_fp8_prequant
    from .lowering.kernels.fp8_linear import fp8_linear, fp8_linear_prequant

    route = _fp8_route(n)
    if route is None:
        return None
    m, k, nout = _gemm_mkn(n, route)
    g = torch.Generator(device=device).manual_seed(0)
    bias = torch.randn(nout, device=device, generator=g)
    xq = torch.randn(m, k, device=device, generator=g).clamp(-448, 448).to(FP8)
    wq = torch.randn(nout, k, device=device, generator=g).clamp(-448, 448).to(FP8)
    w_scale = torch.full((nout, 1), 1e-3, device=device)
    a_scale = torch.tensor(1e-2, device=device)
    if route == "conv 1x1":  # 1x1 convs quantize in the GEMM's prologue (passes/act_quant.py places linears only)
        xb = torch.randn(m, k, device=device, generator=g, dtype=torch.bfloat16)
        gemm = lambda: fp8_linear(xb, wq, w_scale, bias, a_scale)  # noqa: E731
    elif route == "direct conv":  # the implicit GEMM on the producer's fp8 NHWC activation (no columns)
        act = _fp8_nhwc_input(n, device, g)
        stride, padding, dilation = _conv_params(n)
        gemm = lambda: conv2d_fp8_prequant(act, wq, w_scale, bias, a_scale, torch.bfloat16,  # noqa: E731
                                           kernel=tuple(n.weight_shape[2:]), stride=stride, padding=padding, dilation=dilation)
    else:
        gemm = lambda: fp8_linear_prequant(xq, wq, w_scale, bias, a_scale, torch.bfloat16)  # noqa: E731
    quantized = timer(gemm)
    if route == "im2col conv":  # writing the columns: qdiff::im2col from the producer's fp8 activation (or, with
        # QDIFF_IM2COL_WRITER=inductor, a copy of the column matrix for the fused producer's extra write)
        quantized += timer(_column_writer(n, xq, device, g))
    b16 = bias.to(torch.bfloat16)
    if route == "linear":
        x = torch.randn(m, k, device=device, generator=g, dtype=torch.bfloat16)
        w = torch.randn(nout, k, device=device, generator=g, dtype=torch.bfloat16)
        float_us = timer(lambda: F.linear(x, w, b16))
    else:
        x = torch.randn(*n.input_shape, device=device, generator=g, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
        w = torch.randn(*n.weight_shape, device=device, generator=g, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
        args = {k: n.conv_args[k] for k in ("stride", "padding", "dilation", "groups") if k in n.conv_args}
        float_us = timer(lambda: F.conv2d(x, w, b16, **args))
    return OpTiming(n.key, route, quantized, float_us)


def time_fp8_ops(plan: QuantPlan, device: torch.device | str = "cuda",
                 timer: Callable[[Callable[[], object]], float] = cuda_graph_timer, reuse: bool = True) -> list[OpTiming]:
    """:func:`time_node` for every W8A8-FP8 node of ``plan`` (needs CUDA, or Triton's interpreter with a test timer).

    ``reuse``: time each distinct shape once (route, input and weight shapes, conv arguments) and give its times to
    every node of that shape; a UNet repeats its blocks' shapes (on an H200 the guard's timings of the bundled UNet's 93
    ops took 165 s, and SD's 282 ran past a 400 s bench row)."""
    device = torch.device(device)
    if plan.groups.count > 1 or plan.allocation is not None:
        raise ValueError("time_fp8_ops / keep_slower_in_float take single-group plans without a bit allocation "
                         f"(this plan: {plan.groups.count} timestep groups, allocation {'yes' if plan.allocation else 'no'})")
    if device.type != "cuda" and timer is cuda_graph_timer:
        raise RuntimeError("time_fp8_ops measures GPU kernels: pass a CUDA device (no GPU here?)")
    seen: dict[tuple, OpTiming | None] = {}
    out = []
    for n in plan.quantized_nodes():
        route = _fp8_route(n)
        if route is None:
            continue
        sig = _signature(n, route) if reuse else n.key
        if sig not in seen:
            seen[sig] = time_node(n, device, timer)
        t = seen[sig]
        if t is not None:
            out.append(OpTiming(n.key, t.route, t.quantized_us, t.float_us))
    return out


def sibling_groups(plan: QuantPlan, timings: list[OpTiming]) -> list[list[OpTiming]]:
    """``timings`` grouped by sibling group (module docstring), in the order of each group's first member; an op with
    no timed sibling is a group of one. Linears group when the plan records that they read one input tensor
    (``plan.meta["shared_statistics"]``) and quantize it alike: the same activation quantizer, no smoothing, no
    outlier split, per-channel weight scales (what the fusion pass also needs, as the plan records it). Convs and
    everything else stay alone."""
    shared = plan.meta.get("shared_statistics", {})  # site -> the site whose input statistics it shares
    groups: dict[object, list[OpTiming]] = {}
    for t in timings:
        n = plan.nodes[t.key]
        act = n.acts[0]
        if t.route == "linear" and n.smooth is None and act.outlier is None and n.weight.group_size is None:
            key = ("input", shared.get(t.key, t.key), act)
        else:
            key = ("alone", t.key)
        groups.setdefault(key, []).append(t)
    return list(groups.values())


def _keep_in_float(n: NodePlan, reason: str) -> None:
    """Drop ``n``'s quantization (weights, activation quantizers and their extras) and record why."""
    n.weight, n.group_weights = None, None
    n.acts = [None] * len(n.acts)
    n.bias_correction = n.smooth = n.split = None
    n.reason = reason


def keep_slower_in_float(plan: QuantPlan, timings: list[OpTiming], margin: float = 1.0) -> list[str]:
    """Keep in full precision (all timestep groups) what is slower quantized than ``margin`` x float: a sibling group
    (:func:`sibling_groups`) as a whole by its summed times, any other op by its own; returns the kept keys. The
    reason names both times (a group's: its members and both sums)."""
    if margin <= 0:
        raise ValueError(f"margin must be positive, got {margin}")
    kept = []
    for group in sibling_groups(plan, timings):
        quantized, float_ = sum(t.quantized_us for t in group), sum(t.float_us for t in group)
        if quantized <= margin * float_:
            continue
        names = ", ".join(t.key for t in group)
        for t in group:
            if len(group) == 1:
                reason = f"latency: fp8 {t.route} {t.quantized_us:.1f} us vs bf16 {t.float_us:.1f} us at this shape"
            else:
                reason = (f"latency: sibling group {names} (one input, one fused GEMM): fp8 {quantized:.1f} us vs bf16 "
                          f"{float_:.1f} us summed (this op: {t.quantized_us:.1f} vs {t.float_us:.1f} us)")
            _keep_in_float(plan.nodes[t.key], f"{reason} (keep_slower_in_float, margin {margin:g})")
            kept.append(t.key)
    return kept

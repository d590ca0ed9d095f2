"""Quantized attention's q / k / v written as fp8 heads by their projection GEMM (Triton lowering).

After :mod:`.convert_attention`, :mod:`.fuse_siblings` and :mod:`.act_quant`, a quantized attention call reads its
q / k / v from quantized linears through ``split`` -> ``reshape(B, S, H, D)`` -> ``transpose(1, 2)``, and the lowering
quantizes them in a separate pass before its kernel (~43 us per DiT-XL/2 layer, 1.4 ms per step on an H200,
docs/kernels.md). This pass gives such a projection the attention's static q / k / v scales, one per output column,
and makes it ``linear_heads(..., heads=HeadsLayout.fields(), out_scale=...)``: its GEMM epilogue writes the fp8 heads in the
layout the attention kernel reads (:mod:`..lowering.heads`), and the attention call gets views of that buffer.

A projection is rewritten when all of it feeds attention calls this way (every column; q / k sections before V
sections), it is a plain fp8 x fp8 linear (no split op, smoothing, activation or fp8 input / output, its input a float
tensor) and its heads are whole heads of one head dim; a role that does not qualify keeps its float input, which the
attention call quantizes as before (the lowering takes mixed inputs).

**Off by default** (``QDIFF_ATTN_HEADS=1`` turns it on): on an H200 (2026-12-02) the tiled GEMM kernel's heads epilogue
(the route of projections with M < 1024 or N, K < 512) lost V entries (every odd column of some row groups; exact in
Triton's interpreter), and its first version lost them on the persistent TMA route too; after the V stores were
transposed the TMA route's exact test passed on the GPU and the tiled route's did not. On 2026-12-03 the TMA test failed
with another autotuned config: ``examples/heads_store_check.py`` found the V stores exact for 128 x 128 x 128 tiles with
8 warps only (both kernels), so the TMA heads launch autotunes over that config alone (``fp8_tma.HEADS_CONFIGS``;
docs/kernels.md). The lowering's
``heads_unsupported`` keeps projections off the TMA route out of this pass (DiT / PixArt's q / k / v projections are
on it; PixArt's text k / v and SD 1.5's narrow ones are not). DiT-XL/2 with the first version and CUDA graphs: 14.15 ms
against 15.00 ms without (docs/benchmarks.md), a timing of a kernel then wrong; not re-timed since.

What this pass leaves, :func:`write_fp8_projections` takes (``QDIFF_ATTN_FP8_QKV``, on by default): the same
projections write plain fp8 output with one scale per column, laid out for the kernel by the attention call.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx as fx

from ..lowering.heads import HeadsLayout, heads_view
from ..lowering.kernels._common import FLOAT_DTYPES
from ..lowering.kernels.fp8_attention import qk_width
from ..switches import env_switch
from .convert import add_buffer
from .fuse_siblings import SHAPE_META
from .sites import example_tensor, fetch_attr

ENV = "QDIFF_ATTN_HEADS"
FP8_QKV_ENV = "QDIFF_ATTN_FP8_QKV"
_PLAIN_KWARGS = {"wfmt", "group_size", "weight_shape", "afmt", "asym", "bias_corr", "x_quant"}


def enabled_from_env() -> bool:
    """``QDIFF_ATTN_HEADS`` (default 0, see the module docstring): 1 has the projections write fp8 heads."""
    return env_switch(ENV, False)


def fp8_qkv_from_env() -> bool:
    """``QDIFF_ATTN_FP8_QKV`` (default 1 since 2026-12-03, :func:`write_fp8_projections`): the projections write plain
    fp8 output; 0 leaves their float output to the attention call's quantize pass. On an H200 (docs/benchmarks.md,
    one run, CUDA graphs): DiT-XL/2 13.50 ms against 13.83 ms without."""
    return env_switch(FP8_QKV_ENV, True)


@dataclass(frozen=True)
class Section:
    """Columns ``[start, stop)`` of a projection that are one attention call's q, k or v (``role`` 0 / 1 / 2)."""

    attention: fx.Node
    role: int
    start: int
    stop: int
    chain: tuple[fx.Node, ...]  # the split's getitem, the reshape and the transpose (single-user nodes), last first


def _is(node, names: set[str]) -> bool:
    if node.op == "call_method":
        return node.target in names
    return (node.op == "call_function" and getattr(node.target, "__name__", None) in names
            and (getattr(node.target, "__module__", None) or "").startswith("torch"))


def _trace(arg: fx.Node) -> tuple[fx.Node, int, int, tuple[fx.Node, ...]] | None:
    """``(projection, start, stop, chain)`` when ``arg`` is ``transpose(1, 2)`` of ``reshape(B, S, H, D)`` of columns
    ``[start, stop)`` of a projection (a ``split`` getitem or the whole output), every step used once."""
    value = example_tensor(arg)
    if value is None or value.dim() != 4 or not _is(arg, {"transpose"}) or len(arg.users) != 1:
        return None
    if sorted(int(d) % 4 for d in arg.args[1:3]) != [1, 2]:
        return None
    shaped = arg.args[0]
    if not isinstance(shaped, fx.Node) or not _is(shaped, {"reshape", "view"}) or len(shaped.users) != 1:
        return None
    cols = shaped.args[0]
    chain = (arg, shaped)
    if isinstance(cols, fx.Node) and cols.op == "call_function" and cols.target is operator.getitem and len(cols.users) == 1:
        split, index = cols.args
        if not (isinstance(split, fx.Node) and _is(split, {"split"}) and isinstance(split.args[1], (list, tuple))):
            return None
        if split.kwargs.get("dim", split.args[2] if len(split.args) > 2 else 0) not in (-1, _ndim(split.args[0]) - 1):
            return None
        sizes = [int(s) for s in split.args[1]]
        start = sum(sizes[:index])
        return split.args[0], start, start + sizes[index], chain + (cols,)
    n = example_tensor(cols).shape[-1] if isinstance(cols, fx.Node) and example_tensor(cols) is not None else None
    return (cols, 0, n, chain) if n is not None else None


def _ndim(node) -> int:
    v = example_tensor(node)
    return v.dim() if v is not None else -1


def _plain_fp8_linear(node: fx.Node, linear_fn: Callable) -> bool:
    kw = node.kwargs
    x = example_tensor(node.args[0]) if node.args else None
    return (node.op == "call_function" and node.target is linear_fn and set(kw) <= _PLAIN_KWARGS and kw.get("group_size") is None
            and (kw.get("wfmt"), kw.get("afmt")) == ("fp8_e4m3", "fp8_e4m3") and x is not None and x.dtype in FLOAT_DTYPES)


def _sections(gm: fx.GraphModule, attention_fn: Callable) -> dict[fx.Node, list[Section]]:
    """Every projection column range feeding a float q / k / v of an attention call, by projection."""
    found: dict[fx.Node, list[Section]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not attention_fn:
            continue
        for role, arg in enumerate(node.args[:3]):
            traced = _trace(arg) if isinstance(arg, fx.Node) and example_tensor(arg) is not None and example_tensor(arg).dtype in FLOAT_DTYPES else None
            if traced is not None:
                proj, start, stop, chain = traced
                found.setdefault(proj, []).append(Section(node, role, start, stop, chain))
    return found


def _layout(proj: fx.Node, sections: list[Section]) -> HeadsLayout | None:
    """The heads layout of a projection whose every column is in ``sections`` (q / k first, V last), or None."""
    heads = [example_tensor(s.chain[0]) for s in sections]  # (B, H, S, D) each
    n = proj.kwargs.get("weight_shape", (None,))[0]
    if any(h is None for h in heads) or n is None:
        return None
    b, _, s, d = heads[0].shape
    if any((h.shape[0], h.shape[2], h.shape[3]) != (b, s, d) for h in heads):
        return None
    if not _covers(proj, sections):
        return None  # not every column feeds attention
    ordered = sorted(sections, key=lambda x: x.start)
    is_v = [x.role == 2 for x in ordered]
    if is_v != sorted(is_v):
        return None  # a V section before a q / k section
    n_rm = sum(x.stop - x.start for x in ordered if x.role != 2)
    try:
        return HeadsLayout(batch=b, seq=s, n_rm=n_rm, n_vt=n - n_rm, head_dim=d, head_width=qk_width(d))
    except ValueError:
        return None


def _covers(proj: fx.Node, sections: list[Section]) -> bool:
    """Whether ``sections`` are every column of the projection, each once."""
    bounds = sorted((s.start, s.stop) for s in sections)
    n = proj.kwargs.get("weight_shape", (None,))[0]
    return bool(bounds) and bounds[0][0] == 0 and bounds[-1][1] == n and all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))


def _column_scales(gm: fx.GraphModule, sections: list[Section], columns: int) -> torch.Tensor:
    """Each column's static scale: that of the attention input (q / k / v) its section feeds."""
    scales = torch.empty(columns, dtype=torch.float32)
    for sec in sections:
        scales[sec.start:sec.stop] = float(fetch_attr(gm, sec.attention.args[3 + sec.role].target))
    return scales


def _explicit_softmax_args(attention: fx.Node, q: torch.Tensor) -> None:
    """fp8 q codes carry neither the head dim's default softmax scale nor the output dtype: set both from the float q."""
    sm_scale = attention.kwargs.get("sm_scale")
    attention.kwargs = {**attention.kwargs, "sm_scale": q.shape[-1] ** -0.5 if sm_scale is None else sm_scale, "out_dtype": q.dtype}


def _only_feeds(proj: fx.Node, sections: list[Section]) -> bool:
    """Whether the projection's output goes nowhere but through ``sections``' chains (one split, or one reshape)."""
    tops = {sec.chain[-1] for sec in sections}
    if all(len(sec.chain) == 3 for sec in sections):  # split -> getitems
        splits = {top.args[0] for top in tops}
        return len(splits) == 1 and set(proj.users) == splits and set(next(iter(splits)).users) == tops
    return len(sections) == 1 and set(proj.users) == tops


def fuse_attention_heads(gm: fx.GraphModule, linear_fn: Callable, attention_fn: Callable, heads_fn: Callable,
                         unsupported: Callable[[int, int, int], str | None] | None = None) -> tuple[fx.GraphModule, int]:
    """Rewrite projections feeding quantized attention into ``heads_fn`` calls (module docstring); returns the graph
    and how many projections now write fp8 heads. ``unsupported(M, N, K)``: why a projection of that GEMM shape must
    keep the separate pass (the lowering's rule; None: it may be rewritten)."""
    found = _sections(gm, attention_fn)
    # each attention call's original (float) q: its head dim (the default softmax scale) and the output dtype
    q_of = {sec.attention: example_tensor(sec.attention.args[0]) for secs in found.values() for sec in secs}
    views: dict[fx.Node, dict[int, fx.Node]] = {}  # attention call -> role -> its fp8 heads view
    count = 0
    for proj, sections in found.items():
        layout = _layout(proj, sections) if _plain_fp8_linear(proj, linear_fn) and _only_feeds(proj, sections) else None
        if layout is None or (unsupported is not None and unsupported(layout.rows, layout.columns, proj.kwargs["weight_shape"][1])):
            continue
        scales = _column_scales(gm, sections, layout.columns)
        device = fetch_attr(gm, proj.args[2].target).device  # (the weight scale's)
        with gm.graph.inserting_before(proj):
            buf = add_buffer(gm, f"qdiff_heads_{count}_out_scale", scales.to(device))
            new = gm.graph.call_function(heads_fn, proj.args, {**proj.kwargs, "heads": layout.fields(), "out_scale": buf})
            for sec in sections:
                views.setdefault(sec.attention, {})[sec.role] = gm.graph.call_function(heads_view, (new, layout.fields(), sec.start, sec.stop))
        new.meta.update({k: v for k, v in proj.meta.items() if k not in SHAPE_META})
        for sec in sections:  # detach the float chain from the attention call (rebuilt below), then delete it
            args = list(sec.attention.args)
            args[sec.role] = views[sec.attention][sec.role]
            sec.attention.args = tuple(args)
        for node in [n for sec in sections for n in sec.chain] + [n for n in {sec.chain[-1].args[0] for sec in sections} if n is not proj]:
            gm.graph.erase_node(node)
        gm.graph.erase_node(proj)
        count += 1
    for attention in views:
        _explicit_softmax_args(attention, q_of[attention])
    if count:
        gm.graph.lint()
        gm.recompile()
    return gm, count


def write_fp8_projections(gm: fx.GraphModule, linear_fn: Callable, attention_fn: Callable) -> tuple[fx.GraphModule, int]:
    """Give each plain fp8 projection whose every column feeds a quantized attention call's q / k / v (through
    ``split`` -> ``reshape`` -> ``transpose``, as :func:`fuse_attention_heads` matches) an ``out_scale`` of one static
    scale per column, the attention's q / k / v scale of its section: its GEMM epilogue writes fp8 codes in its plain
    (M, N) layout (an ``OUT_COLS`` store, as every fp8-output GEMM stores), and the views carry them to the attention
    call, whose lowering only lays them out (q / k zero-padded, V keys contiguous: one copy of fp8 bytes each, where the
    separate pass read the projection's bf16 output). Returns the graph and how many projections write fp8.

    Any GEMM route takes it (no heads layout): the GEMM stores are those of the fp8 output of fc1 for fc2."""
    found = _sections(gm, attention_fn)
    q_of = {sec.attention: example_tensor(sec.attention.args[0]) for secs in found.values() for sec in secs}
    touched: set[fx.Node] = set()
    count = 0
    for proj, sections in found.items():
        if not (_plain_fp8_linear(proj, linear_fn) and _only_feeds(proj, sections) and _covers(proj, sections)):
            continue
        scales = _column_scales(gm, sections, proj.kwargs["weight_shape"][0])
        device = fetch_attr(gm, proj.args[2].target).device  # (the weight scale's)
        with gm.graph.inserting_before(proj):
            buf = add_buffer(gm, f"qdiff_fp8_projection_{count}_out_scale", scales.to(device))
        proj.kwargs = {**proj.kwargs, "out_scale": buf}
        touched.update(sec.attention for sec in sections)
        count += 1
    for attention in touched:
        _explicit_softmax_args(attention, q_of[attention])
    if count:
        gm.graph.lint()
        gm.recompile()
    return gm, count


__all__ = ["ENV", "FP8_QKV_ENV", "enabled_from_env", "fp8_qkv_from_env", "fuse_attention_heads", "write_fp8_projections"]

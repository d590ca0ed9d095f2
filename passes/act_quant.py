"""Place the activation quantization of fp8 GEMMs (Triton lowering): producer, previous epilogue or prologue.

After :mod:`.convert` and :mod:`.fuse_epilogue`, each fp8 x fp8 linear is a call of the lowering's
``linear`` / ``linear_fused`` function whose input is a float tensor. Its static quantization
``q(x) = fp8(clamp(x / s))`` can happen in three places; this pass picks one per call:

1. **previous GEMM's epilogue** (``out_scale`` on the producer call, ``out_dtype`` on this one): when the
   input is the output of another fp8 linear (typically fc1 + GELU -> fc2) and that output has no other
   user, the producer's epilogue writes fp8 codes (1 byte instead of 2, no separate pass);
2. **producer** (``x_quant="producer"``): the quantization becomes plain aten pointwise ops before the
   GEMM, which Inductor fuses into the kernel it generates for the producer (LayerNorm + modulate, SiLU,
   a layout copy); the GEMM reads 1-byte A tiles;
3. **prologue** (``x_quant="prologue"``): inside the GEMM, when the producer is an extern kernel
   (attention, another GEMM or conv, a graph input) and the GEMM is narrow: a separate quantize kernel would cost
   a full extra read and write of the activation. A large, wide GEMM (``N >= pass_min_n``, default
   :data:`PASS_MIN_N`, and at least :data:`PASS_MIN_M` input rows) quantizes each input tile in its prologue once
   per 128-column output tile, so there the
   input gets a separate quantize pass (Inductor-generated, mode 2) and the GEMM reads fp8: at DiT's attention
   output (8192 x 1152 x 1152, 9 output tiles) the prologue route took 49.4 us against 26.3 us for the fp8-input
   route, and the pass moves 28 MB (~7 us) (docs/kernels.md, "GEMM level at DiT shapes").

An extern producer reached through a no-op ``.to`` (same dtype: diffusers' attention processors cast SDPA's output to
the query's dtype, so every attention output projection of DiT / PixArt / SD) also gets the separate pass, whatever
its width: until 2026-12-02 (eighth session) the cast was taken for an Inductor-generated producer, so these GEMMs got
a separate pass in every measured row. That is kept, and counted as ``producer_pass``, until a GPU A/B of the prologue
route at the narrow ones (SD 1.5's N = 320 / 640, the bench's ``-extern-prologue`` variants). The rule of
``PASS_MIN_N`` thus changed nothing on DiT / PixArt, whose attention outputs had the pass already.

4. **attention's epilogue** (on by default, ``QDIFF_ATTN_FP8_OUT=0`` turns it off; ``out_scale`` on the lowering's attention call): when
   the input is a quantized attention call's output reached through views and no-op casts only, each used once, the
   attention kernel writes fp8 codes with this GEMM's scale (the no-op casts are removed: on fp8 codes they would
   convert). This replaces the separate pass after attention (DiT-XL/2: 28 x 8.4 us per step, PixArt-alpha: 56 x 8.3 us,
   docs/benchmarks.md ninth session). Timed together with :mod:`.norm_quant` on an H200 (2026-12-03): DiT-XL/2 15.06 ->
   14.27 ms per step, PixArt-alpha 25.94 -> 24.55 ms (CUDA graphs, docs/benchmarks.md).

``QDIFF_FP8_ACT_QUANT`` = ``auto`` (default, the rules above), ``producer`` (1 and 2 for all), ``prologue``
(3 for all: the v1 behaviour) selects the policy for A/B measurements; ``QDIFF_FP8_PASS_MIN_N`` (an integer, or
``off``: no separate pass after an extern kernel, the cast rule included) the width from which ``auto`` adds the pass
after an extern kernel.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Callable

import torch
import torch.fx as fx

from ..switches import env_switch
from .sites import example_tensor

POLICIES = ("auto", "producer", "prologue")
PASS_MIN_N = 1024  # auto: a separate quantize pass after an extern producer for GEMMs at least this wide
PASS_MIN_M = 4096  # and with at least this many input rows (smaller GEMMs: the pass's launch is not paid back)
PASS_MIN_N_ENV = "QDIFF_FP8_PASS_MIN_N"
_VIEW_METHODS = {"view", "reshape", "permute", "transpose", "flatten", "contiguous", "unsqueeze", "squeeze", "unflatten"}
_VIEW_FUNCTIONS = {torch.reshape, torch.permute, torch.transpose, torch.flatten, torch.unsqueeze, torch.squeeze}
# producers Inductor does not generate (extern kernels): quantizing after them would be a separate pass
_EXTERN_NAME_PARTS = ("scaled_dot_product", "linear", "matmul", "bmm", "addmm", "conv", "einsum", "attention", "mm")


def policy_from_env() -> str:
    p = os.environ.get("QDIFF_FP8_ACT_QUANT", "auto")
    if p not in POLICIES:
        raise ValueError(f"QDIFF_FP8_ACT_QUANT must be one of {', '.join(POLICIES)}, got {p!r}")
    return p


def pass_min_n_from_env() -> int | None:
    """``QDIFF_FP8_PASS_MIN_N``: an integer, ``off`` (None: never a separate pass after an extern producer), or
    unset (:data:`PASS_MIN_N`)."""
    value = os.environ.get(PASS_MIN_N_ENV, str(PASS_MIN_N))
    if value == "off":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{PASS_MIN_N_ENV} must be an integer or 'off', got {value!r}") from None


ATTN_FP8_OUT_ENV = "QDIFF_ATTN_FP8_OUT"


def attention_fp8_out_from_env() -> bool:
    """``QDIFF_ATTN_FP8_OUT`` (default 1): quantized attention writes its output as fp8 for the next GEMM; 0: float."""
    return env_switch(ATTN_FP8_OUT_ENV, True)


def _wide_and_large(node: fx.Node, min_n: int) -> bool:
    """Whether the GEMM ``node`` has at least ``min_n`` output features and :data:`PASS_MIN_M` input rows (its input's
    example value; unknown shapes: no)."""
    shape = node.kwargs.get("weight_shape")
    val = example_tensor(node.args[0])
    if not shape or not isinstance(val, torch.Tensor) or val.dim() == 0:
        return False
    if not all(isinstance(d, int) for d in val.shape) or val.shape[-1] == 0:  # (symbolic sizes: no guard added here)
        return False
    return int(shape[0]) >= min_n and val.numel() // val.shape[-1] >= PASS_MIN_M


def _is_fp8_call(node: fx.Node, targets: set) -> bool:
    kw = node.kwargs
    return (node.op == "call_function" and node.target in targets and kw.get("wfmt") == "fp8_e4m3"
            and kw.get("afmt") == "fp8_e4m3" and kw.get("splits") is None and kw.get("outlier_scale") is None)


def _noop_cast_input(node) -> fx.Node | None:
    """The input of ``node`` if ``node`` is a ``.to(...)`` that keeps its input's dtype and device (diffusers' attention
    processors cast SDPA's output to the query's dtype): Inductor generates no kernel for it. Else None."""
    if not (isinstance(node, fx.Node) and node.op == "call_method" and node.target == "to" and node.args
            and isinstance(node.args[0], fx.Node)):
        return None
    out, inp = example_tensor(node), example_tensor(node.args[0])
    same = isinstance(out, torch.Tensor) and isinstance(inp, torch.Tensor) and (out.dtype, out.device) == (inp.dtype, inp.device)
    return node.args[0] if same else None


def _walk(node, single_use: bool) -> tuple[object, list[fx.Node]]:
    """The node that computes ``node``'s data, through views and no-op casts (:func:`_noop_cast_input`), and the casts
    passed; ``single_use``: stop at a node with more than one user."""
    casts = []
    while isinstance(node, fx.Node) and (not single_use or len(node.users) == 1):
        if (node.op == "call_method" and node.target in _VIEW_METHODS) or (node.op == "call_function" and node.target in _VIEW_FUNCTIONS):
            node = node.args[0]
        elif (inner := _noop_cast_input(node)) is not None:
            casts.append(node)
            node = inner
        else:
            break
    return node, casts


def _producer(node) -> tuple[object, bool]:
    """The node that computes ``node``'s data (:func:`_walk`) and whether a no-op cast was on the way."""
    p, casts = _walk(node, single_use=False)
    return p, bool(casts)


def _attention_epilogue(gm: fx.GraphModule, n: fx.Node, attention_fns: set) -> bool:
    """Give the attention call producing ``n``'s input (views and no-op casts only, each used once) ``n``'s input scale
    as its ``out_scale``, and ``n`` the float ``out_dtype`` (case 4 of the module docstring); False if it does not
    apply."""
    attention, casts = _walk(n.args[0], single_use=True)
    scale = n.args[4] if len(n.args) > 4 else None
    dtype = _float_dtype(n.args[0])
    if (not isinstance(attention, fx.Node) or attention.target not in attention_fns or len(attention.users) != 1
            or attention.kwargs.get("out_scale") is not None or n.kwargs.get("act_smooth") is not None or dtype is None
            or not isinstance(scale, fx.Node) or scale.op != "get_attr"):
        return False
    for cast in casts:  # (a no-op on the float output; on fp8 codes it would convert them)
        cast.replace_all_uses_with(cast.args[0])
        gm.graph.erase_node(cast)
    with gm.graph.inserting_before(attention):
        out_scale = gm.graph.get_attr(scale.target)
    attention.kwargs = {**attention.kwargs, "out_scale": out_scale}
    n.kwargs = {**n.kwargs, "out_dtype": dtype}
    return True


def generated_producer(node, lowering_fns: set) -> bool:
    """Whether ``node`` (through views and no-op casts) is computed by a kernel Inductor generates (so it can absorb a
    pointwise op)."""
    p, _ = _producer(node)
    if not isinstance(p, fx.Node) or p.op not in ("call_function", "call_method") or p.target in lowering_fns:
        return False
    name = (p.target if isinstance(p.target, str) else getattr(p.target, "__name__", str(p.target))).lower()
    return not any(part in name for part in _EXTERN_NAME_PARTS)


def _float_dtype(node) -> torch.dtype | None:
    val = example_tensor(node)
    return val.dtype if isinstance(val, torch.Tensor) and val.dtype.is_floating_point else None


_DROPOUTS = {torch.nn.functional.dropout, torch.dropout}


def _is_identity_dropout(node: fx.Node) -> bool:
    """An eval-mode (``training=False``) or ``p == 0`` dropout call: the identity."""
    if node.op != "call_function" or node.target not in _DROPOUTS:
        return False
    args, kw = node.args, node.kwargs
    p = kw.get("p", args[1] if len(args) > 1 else 0.5)
    training = kw.get("training", kw.get("train", args[2] if len(args) > 2 else node.target is torch.nn.functional.dropout))
    return (training is False or p == 0) and not kw.get("inplace", args[3] if len(args) > 3 else False)


def bypass_identity_dropouts(gm: fx.GraphModule, targets: set) -> int:
    """Remove identity dropouts (eval mode, as diffusers' FeedForward has between fc1 and fc2) that read a lowering
    call, so that the call's consumer sees it directly and the pair can chain through an fp8 epilogue."""
    count = 0
    for node in list(gm.graph.nodes):
        if _is_identity_dropout(node) and isinstance(node.args[0], fx.Node) and node.args[0].target in targets:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            count += 1
    return count


def place_act_quant(gm: fx.GraphModule, linear: Callable, fused: Callable, *, extra_fns: tuple = (),
                    policy: str | None = None, attention_fns: tuple = ()) -> tuple[fx.GraphModule, Counter]:
    """Mark every fp8 linear call of ``gm`` with where its input is quantized; returns the graph and counts
    (``producer_pass``: calls after an extern producer given a separate quantize pass, counted in ``producer`` too;
    the width from which that pass is added: ``QDIFF_FP8_PASS_MIN_N``, see the module docstring;
    ``attention_epilogue``: inputs written as fp8 by ``attention_fns``' calls, with ``QDIFF_ATTN_FP8_OUT=1``)."""
    policy = policy or policy_from_env()
    pass_min_n = pass_min_n_from_env()
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    targets = {linear, fused}
    lowering_fns = targets | set(extra_fns)
    counts: Counter = Counter()
    if policy != "prologue" and (bypassed := bypass_identity_dropouts(gm, targets)):
        counts["identity_dropout_removed"] = bypassed
    calls = [n for n in gm.graph.nodes if _is_fp8_call(n, targets)]
    chained = set()
    if policy != "prologue":
        for n in calls:
            users = list(n.users)
            if len(users) != 1 or n.kwargs.get("out_scale") is not None:
                continue
            u = users[0]
            dtype = _float_dtype(n.args[0])
            scale = u.args[4] if len(u.args) > 4 else None
            if (u in chained or not _is_fp8_call(u, targets) or u.args[0] is not n or u.kwargs.get("act_smooth") is not None
                    or dtype is None or not isinstance(scale, fx.Node) or scale.op != "get_attr"):
                continue
            with gm.graph.inserting_before(n):  # the consumer's scale buffer, read before the producer runs
                out_scale = gm.graph.get_attr(scale.target)
            n.kwargs = {**n.kwargs, "out_scale": out_scale}
            u.kwargs = {**u.kwargs, "out_dtype": dtype}
            chained.add(u)
            counts["epilogue"] += 1
    if policy != "prologue" and attention_fns and attention_fp8_out_from_env():
        for n in calls:
            if n not in chained and _attention_epilogue(gm, n, set(attention_fns)):
                chained.add(n)
                counts["attention_epilogue"] += 1
    for n in calls:
        if n in chained:
            continue
        if policy == "producer" or (policy == "auto" and generated_producer(n.args[0], lowering_fns)):
            mode = "producer"
        elif policy == "auto" and pass_min_n is not None and (_wide_and_large(n, pass_min_n) or _producer(n.args[0])[1]):
            mode = "producer"  # a separate quantize pass after the extern producer (see the module docstring)
            counts["producer_pass"] += 1
        else:
            mode = "prologue"
        n.kwargs = {**n.kwargs, "x_quant": mode}
        counts[mode] += 1
    if counts:
        gm.graph.lint()
        gm.recompile()
    return gm, counts


__all__ = ["ATTN_FP8_OUT_ENV", "PASS_MIN_M", "attention_fp8_out_from_env", "PASS_MIN_N", "POLICIES", "bypass_identity_dropouts", "generated_producer", "pass_min_n_from_env", "place_act_quant",
           "policy_from_env"]

"""Fuse an activation that follows a quantized linear into the linear's epilogue.

After :mod:`.convert`, a quantized linear is a call of the lowering's ``linear`` function. When its
only user is a SiLU or a tanh-approximated GELU (DiT / PixArt feed-forwards, adaLN embedders), and
the lowering has a fused variant, the pair becomes one call with ``act=...``: the kernel applies the
activation in registers instead of writing and re-reading the GEMM output.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.fx as fx

_SILU = {torch.nn.functional.silu, torch.ops.aten.silu.default, torch.ops.aten.silu}
_GELU = {torch.nn.functional.gelu, torch._C._nn.gelu, torch.ops.aten.gelu.default, torch.ops.aten.gelu}


def activation_of(node: fx.Node) -> str | None:
    """``"silu"`` / ``"gelu_tanh"`` if ``node`` applies that activation to its first input only, else None."""
    if node.op == "call_module":
        return None
    if node.op == "call_method":
        return "silu" if node.target == "silu" and len(node.args) == 1 and not node.kwargs else None
    if node.op != "call_function":
        return None
    if node.target in _SILU and len(node.args) == 1 and not node.kwargs.get("inplace", False):
        return "silu"
    if node.target in _GELU and len(node.args) == 1 and node.kwargs.get("approximate") == "tanh":
        return "gelu_tanh"
    return None


def fuse_epilogues(gm: fx.GraphModule, linear: Callable, fused: Callable) -> tuple[fx.GraphModule, int]:
    """Rewrite ``act(linear(...))`` into ``fused(..., act=act)``; returns the graph and how many were fused."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not linear or len(node.users) != 1:
            continue
        user = next(iter(node.users))
        act = activation_of(user)
        if act is None or user.args[0] is not node:
            continue
        with gm.graph.inserting_before(user):
            new = gm.graph.call_function(fused, node.args, {**node.kwargs, "act": act})
        new.meta.update(node.meta)
        new.meta["qdiff_fused_activation"] = act
        user.replace_all_uses_with(new)
        gm.graph.erase_node(user)
        gm.graph.erase_node(node)
        count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
    return gm, count


__all__ = ["activation_of", "fuse_epilogues"]

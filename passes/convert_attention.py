"""Convert: replace each planned attention site's ``scaled_dot_product_attention`` by the lowering's fp8 attention.

The q / k / v scales become 0-d fp32 buffers of the GraphModule (``get_attr``), so the graphs of different timestep
groups differ only in buffer values and share their code (as :mod:`.convert` does for weight ops). The call keeps the
site's softmax scale (``sm_scale``; None: ``1 / sqrt(head dim)``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx as fx

from ..lowering import reference
from .attention_sites import ATTENTION_META_KEY, INPUTS, AttentionSite, sdpa_args
from .convert import add_buffer


@dataclass(frozen=True)
class QuantizedAttention:
    """The static per-tensor e4m3 scales of one attention site in one timestep group."""

    q_scale: float
    k_scale: float
    v_scale: float

    def __post_init__(self) -> None:
        for name in ("q_scale", "k_scale", "v_scale"):
            v = getattr(self, name)
            if not (isinstance(v, float) and 0.0 < v < float("inf")):
                raise ValueError(f"{name} must be a finite positive float, got {v!r}")


def convert_attention(gm: fx.GraphModule, ops: dict[str, QuantizedAttention], device: torch.device,
                      fn: Callable[..., torch.Tensor] = reference.qattention) -> fx.GraphModule:
    """Rewrite every supported attention site named in ``ops`` into ``fn(q, k, v, q_scale, k_scale, v_scale,
    sm_scale=...)``; the rest keep their full-precision call."""
    changed = False
    for i, node in enumerate(list(gm.graph.nodes)):
        site: AttentionSite | None = node.meta.get(ATTENTION_META_KEY)
        if site is None or site.unsupported or site.key not in ops:
            continue
        a, q = sdpa_args(node), ops[site.key]
        with gm.graph.inserting_before(node):
            scales = [add_buffer(gm, f"qdiff_attn_{i}_{name}_scale", torch.tensor(s, dtype=torch.float32, device=device))
                      for name, s in zip(INPUTS, (q.q_scale, q.k_scale, q.v_scale))]
            new = gm.graph.call_function(fn, (a["query"], a["key"], a["value"], *scales), {"sm_scale": site.scale})
        new.meta[ATTENTION_META_KEY] = site
        new.meta["qdiff_source_node"] = node.name
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()
    return gm

"""Preparing a Dynamo graph for quantization: the passes every path (calibrate, compile, inspect) runs."""

from __future__ import annotations

from typing import Any, Sequence

import torch.fx as fx

from .config import OpKind
from .debug import log_graph
from .passes.attention_sites import find_attention_sites
from .passes.decompose import decompose_fused_attention, fused_attention_leftovers
from .passes.sites import Site, find_sites


def prepare(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> tuple[fx.GraphModule, list[Site]]:
    """Decompose fused attention, then find the quantizable sites and the attention sites (recorded in ``node.meta``).

    Fused attention ops the rewrite had to leave are reported as unsupported sites, so that the
    warning about full-precision ops names them.
    """
    log_graph("capture (Dynamo)", gm)
    gm = decompose_fused_attention(gm)
    log_graph("decompose_fused_attention", gm)
    sites = find_sites(gm, example_inputs)
    find_attention_sites(gm)  # recorded in node.meta (qcompile.attention.attention_sites)
    for name in fused_attention_leftovers(gm):
        sites.append(Site(f"<{name}>", OpKind.LINEAR, name, name, (), {}, "fused attention op with a mask or attention weights"))
    return gm, sites

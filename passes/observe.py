"""Insert activation observers on the input edges of the sites the quantizer annotated."""

from __future__ import annotations

from typing import Callable

import torch
import torch.fx as fx

from .annotate import ANNOTATION_KEY
from .sites import META_KEY, Site

INPUT_EDGE = 0  # the activation input of linear / conv ops


def input_of(node: fx.Node) -> fx.Node:
    """The activation input of a linear / conv site's node (the edge observers sit on)."""
    return node.args[INPUT_EDGE] if node.args else node.kwargs["input"]


def insert_observers(gm: fx.GraphModule, make_observer: Callable[[Site, int], torch.nn.Module]) -> fx.GraphModule:
    """Put ``make_observer(site, edge)`` on the activation input edge of every supported site.

    Every supported site is observed, also where the config quantizes no activation (weight-only
    presets): the statistics serve bias correction, weight clipping, inspection and bit allocation.
    The observer sits on the edge, so other consumers of the same tensor are not affected.
    """
    count = 0
    for node in list(gm.graph.nodes):
        site: Site | None = node.meta.get(META_KEY)
        if site is None or node.meta.get(ANNOTATION_KEY) is None or site.unsupported:
            continue
        inp = input_of(node)
        name = f"qdiff_observer_{count}"
        count += 1
        gm.add_submodule(name, make_observer(site, INPUT_EDGE))
        with gm.graph.inserting_before(node):
            obs = gm.graph.call_module(name, (inp,))
        node.replace_input_with(inp, obs)
    gm.graph.lint()
    gm.recompile()
    return gm

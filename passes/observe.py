"""Insert activation observers on the input edges the quantizer annotated."""

from __future__ import annotations

from typing import Callable

import torch
import torch.fx as fx

from .annotate import ANNOTATION_KEY
from .sites import META_KEY, Site


def insert_observers(gm: fx.GraphModule, make_observer: Callable[[Site, int], torch.nn.Module], observe_all: bool = True) -> fx.GraphModule:
    """Put ``make_observer(site, edge)`` on each observed input edge of each annotated site.

    With ``observe_all`` every supported site's input is observed, also where the current
    config quantizes no activation (statistics serve inspection and later bit allocation).
    """
    for i, node in enumerate(list(gm.graph.nodes)):
        site: Site | None = node.meta.get(META_KEY)
        ann = node.meta.get(ANNOTATION_KEY)
        if site is None or ann is None or site.unsupported:
            continue
        edges = sorted(ann.act) if not observe_all else [0]
        for edge in edges:
            inp = node.args[edge] if edge < len(node.args) else node.kwargs["input"]
            name = f"qdiff_observer_{len([m for m in gm._modules if m.startswith('qdiff_observer_')])}"
            gm.add_submodule(name, make_observer(site, edge))
            with gm.graph.inserting_before(node):
                obs = gm.graph.call_module(name, (inp,))
            node.replace_input_with(inp, obs)
    gm.graph.lint()
    gm.recompile()
    return gm

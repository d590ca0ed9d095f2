"""Embedding lookup tables stored int8: each row with one fp32 scale (``QuantConfig.embedding_tables``).

A *table* is the weight of an ``F.embedding`` call (``nn.Embedding``) that is module state: diffusers' DiT-XL/2
keeps a 1001 x 1152 class-label table in every block (28 of them: 4.6 % of its bf16 bytes), which no linear or
conv quantizes. Calibration stores each table int8 in the plan (:func:`quantize_table`, keyed by the weight's
qualified name); :func:`convert_tables` replaces the lookup with :func:`qcompile.lowering.reference.qembedding`
on int8 buffers, so the float table has no reader left and ``release_float_weights`` frees it. Lookups with
``max_norm`` (which renormalizes the table in place) stay in float and are named in one warning.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from ..errors import PlanMismatchError
from ..lowering import reference
from ..lowering.weights import QuantizedWeight, quantize_weight
from .convert import add_buffer
from .sites import bind

EMBEDDING_TARGETS = {torch.nn.functional.embedding}
_ARGS = ("input", "weight", "padding_idx", "max_norm")
_DEFAULTS = {"padding_idx": None, "max_norm": None}
META_KEY = "qdiff_table"  # on a converted lookup: the table's qualified name


@dataclass(frozen=True)
class TableSite:
    """One lookup of a module-state table in one graph."""

    node: str
    weight_name: str
    shape: tuple[int, ...]
    unsupported: str | None = None


def find_tables(gm: fx.GraphModule, params: dict[str, tuple[str, torch.Tensor]]) -> list[tuple[TableSite, torch.Tensor]]:
    """Every ``F.embedding`` of ``gm`` whose table is module state (``params``: :func:`parameter_tensors` of ``gm``), with
    the table, in graph order (lookups of computed tables are not tables)."""
    found = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in EMBEDDING_TARGETS:
            continue
        args = bind(node, _ARGS, _DEFAULTS)
        w = args["weight"]
        if not isinstance(w, fx.Node) or w.name not in params:
            continue
        name, table = params[w.name]
        why = None
        if args["max_norm"] is not None:
            why = "max_norm renormalizes the table in place"
        elif not table.is_floating_point() or table.dim() != 2:
            why = f"table is {table.dtype} with {table.dim()} dims"
        found.append((TableSite(node.name, name, tuple(table.shape), why), table))
    return found


def quantize_table(table: torch.Tensor) -> QuantizedWeight:
    """A (V, D) float table as int8 with one scale per row (the row's absolute maximum / 127)."""
    return quantize_weight(table.detach().float(), "int8", "linear", clip_search=False)


def convert_tables(gm: fx.GraphModule, params: dict[str, tuple[str, torch.Tensor]], tables: dict[str, QuantizedWeight],
                   device: torch.device) -> tuple[fx.GraphModule, list[str]]:
    """Lookups of the tables in ``tables`` read their int8 rows (``params``: :func:`parameter_tensors` of the graph's
    inputs); returns the graph and the names of module-state tables it looks up that stay in float (not in ``tables``,
    or unsupported). A table whose shape differs from the stored one raises :class:`PlanMismatchError` naming it."""
    nodes = {n.name: n for n in gm.graph.nodes}
    left: list[str] = []
    for i, (site, table) in enumerate(find_tables(gm, params)):
        q = tables.get(site.weight_name)
        if q is None or site.unsupported:
            left.append(site.weight_name + ("" if site.unsupported is None else f" ({site.unsupported})"))
            continue
        if tuple(q.shape) != site.shape:
            raise PlanMismatchError(f"plan does not fit this graph: table '{site.weight_name}' is {site.shape} here but "
                                    f"{tuple(q.shape)} in the plan; recalibrate for this model")
        node = nodes[site.node]
        with gm.graph.inserting_before(node):
            data = add_buffer(gm, f"qdiff_table_{i}_weight", q.data.to(device))
            scale = add_buffer(gm, f"qdiff_table_{i}_weight_scale", q.scale.to(device))
            new = gm.graph.call_function(reference.qembedding, (bind(node, _ARGS, _DEFAULTS)["input"], data, scale),
                                         {"out_dtype": table.dtype})
        new.meta[META_KEY] = site.weight_name
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return gm, left

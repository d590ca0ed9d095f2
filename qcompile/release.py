"""Releasing the float weights the quantized graphs no longer read (``options={"release_float_weights": True}``).

Dynamo lifts the module's parameters as graph inputs (placeholders named by their source,
``L['self']._modules['proj']._parameters['weight']``). After conversion, the placeholder of a
quantized op's weight has no user left: the graph reads the quantized buffers instead, but the
module still owns its float tensor. Releasing frees that tensor's storage in place
(``untyped_storage().resize_(0)``, as FSDP does with unsharded parameters): the Parameter object
and its shape, strides, dtype and device stay, so Dynamo's guards still pass and nothing
recompiles; only the data are gone. A parameter is released only when

- every op reading it is quantized in every timestep group of the plan (a node kept in full
  precision in one group keeps its weight: that group's graph reads it; int8 embedding tables are
  quantized in every group),
- its placeholder has no user in the graph being compiled (biases, norms, ops left in full
  precision keep theirs), and
- no other tensor shares its storage (resizing would empty that tensor too), and the storage is
  resizable (not memory-mapped or borrowed from numpy); weights kept for these reasons are listed in one warning.

Released inputs are removed from the graph handed to Inductor (the runner drops their arguments),
so AOTAutograd, Inductor and CUDA graphs never see them. Every later compile (new shapes, another
group, the next frame after a graph break) checks that no released parameter is read: a graph
that still reads one fails with an error naming it instead of reading freed memory. Dynamo traces
a released parameter from its metadata only (checked on torch 2.13; FSDP2 relies on the same).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from .errors import ConfigError, QdiffError
from .passes.fuse_siblings import weight_names
from .passes.sites import META_KEY, parameter_tensors
from .passes.tables import META_KEY as TABLE_KEY
from .plan import QuantPlan

SHARED = "its storage is shared with another tensor"
FLOAT_IN_A_GROUP = "an op reading it stays in full precision in some timestep group"  # expected: not warned about


def is_released(t: Any) -> bool:
    """Whether ``t`` is a tensor with elements whose storage was freed (its data are gone)."""
    if type(t) not in (torch.Tensor, torch.nn.Parameter) or t.numel() == 0 or t.is_meta:
        return False
    return t.untyped_storage().nbytes() == 0


def storage_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor's storage holds (0 once released)."""
    return t.untyped_storage().nbytes()


def released_parameters(model: torch.nn.Module) -> list[str]:
    """Names of ``model``'s parameters and buffers whose storage was released."""
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    return [name for name, t in named if is_released(t)]


def check_not_released(model: torch.nn.Module, what: str) -> None:
    """Raise if ``model``'s float weights were released: ``what`` (e.g. calibration) needs them."""
    names = released_parameters(model)
    if names:
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        raise QdiffError(
            f"{what} runs the float model, but {len(names)} of its weights were released by a qdiff compile with "
            f"release_float_weights=True ({shown}); use a model whose float weights were not released"
        )


def _placeholders(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "placeholder"]


def _source_names(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> dict[str, str]:
    """Placeholder name -> qualified parameter name (placeholders holding module state only)."""
    names = {n.name for n in _placeholders(gm)}
    return {node: qname for node, (qname, _) in parameter_tensors(gm, example_inputs).items() if node in names}


def check_released_unread(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> set[int]:
    """Indices of released graph inputs; raises ConfigError if the (converted) graph still reads one."""
    names = _source_names(gm, example_inputs)
    released = set()
    for i, (node, value) in enumerate(zip(_placeholders(gm), example_inputs)):
        if not is_released(value):
            continue
        if node.users:
            readers = ", ".join(sorted(u.name for u in node.users))
            raise ConfigError(
                f"parameter '{names.get(node.name, node.name)}' was released by release_float_weights=True, but this graph "
                f"still reads its float data (node(s) {readers}): it is no longer quantized everywhere it is used (another "
                "plan, a full-precision op, or code after a graph break reads it). Load the model again and compile it "
                "without release_float_weights, or with a plan that quantizes every use of this parameter"
            )
        released.add(i)
    return released


@dataclass
class ReleasePlan:
    """Which graph inputs of one compiled graph release their float data, and why quantized weights keep theirs."""

    release: dict[int, str] = field(default_factory=dict)  # placeholder index -> qualified name
    kept: dict[str, str] = field(default_factory=dict)  # quantized weight name -> why it keeps its float data


def plan_release(gm: fx.GraphModule, example_inputs: Sequence[Any], plan: QuantPlan) -> ReleasePlan:
    """The weights of ``gm``'s quantized ops that no graph of ``plan`` reads in float (see the module docstring)."""
    groups = range(plan.groups.count)
    float_somewhere = {n.weight_name for n in plan.nodes.values() if any(n.weight_for(g) is None for g in groups)}
    converted = {w for n in gm.graph.nodes if META_KEY in n.meta and "qdiff_source_node" in n.meta for w in weight_names(n)}
    converted |= {n.meta[TABLE_KEY] for n in gm.graph.nodes if TABLE_KEY in n.meta}  # int8 embedding tables
    names = _source_names(gm, example_inputs)
    out = ReleasePlan()
    for i, (node, value) in enumerate(zip(_placeholders(gm), example_inputs)):
        qname = names.get(node.name)
        if qname not in converted or is_released(value):
            continue
        if qname in float_somewhere:
            out.kept[qname] = FLOAT_IN_A_GROUP
        elif node.users:
            out.kept[qname] = "the graph still reads it (" + ", ".join(sorted(u.name for u in node.users)) + ")"
        elif torch._C._storage_Use_Count(value.untyped_storage()._cdata) > 2:  # its TensorImpl and the storage object asked for
            out.kept[qname] = SHARED
        elif not value.untyped_storage().resizable():
            out.kept[qname] = "its storage cannot be freed (memory-mapped, or borrowed from numpy / a buffer)"
        else:
            out.release[i] = qname
    for qname in sorted(converted - set(names.values())):  # e.g. Inductor freezing: Dynamo keeps parameters as attributes
        out.kept[qname] = "not a graph input: Dynamo kept it as a graph attribute (torch._inductor.config.freezing?)"
    return out


def release(tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    """Free each tensor's storage in place (metadata kept); returns the bytes freed per name."""
    freed = {}
    for name, t in tensors.items():
        freed[name] = storage_bytes(t)
        t.untyped_storage().resize_(0)
    return freed


def warn_kept(plan: QuantPlan, kept: dict[str, str]) -> None:
    """One warning per plan for quantized weights that keep their float data for an unexpected reason."""
    unexpected = {k: r for k, r in kept.items() if r != FLOAT_IN_A_GROUP and f"kept:{k}" not in plan.warned}
    if unexpected:
        plan.warned.update(f"kept:{k}" for k in unexpected)
        warnings.warn(
            f"qdiff: release_float_weights keeps the float data of {len(unexpected)} quantized weight(s):\n"
            + "\n".join(f"  {k}: {r}" for k, r in unexpected.items()),
            stacklevel=3,
        )


def without_inputs(gm: fx.GraphModule, example_inputs: Sequence[Any], drop: set[int]) -> tuple[fx.GraphModule, list[Any]]:
    """A copy of ``gm`` without the (unused) placeholders at ``drop``, and the inputs left (buffers shared, not copied)."""
    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    for i, node in enumerate([n for n in graph.nodes if n.op == "placeholder"]):
        if i in drop:
            if node.users:
                raise QdiffError(f"cannot drop graph input '{node.name}': it has users")
            graph.erase_node(node)
    pruned = fx.GraphModule(gm, graph)
    pruned.meta.update(gm.meta)
    return pruned, [x for i, x in enumerate(example_inputs) if i not in drop]


def dropping_inputs(fn: Callable[..., Any], drop: set[int], count: int) -> Callable[..., Any]:
    """``fn`` called with the arguments at ``drop`` (out of ``count``) left out."""
    keep = [i for i in range(count) if i not in drop]

    def run(*args: Any) -> Any:
        return fn(*[args[i] for i in keep])

    return run

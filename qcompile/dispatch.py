"""Timestep groups as guarded specializations: one compiled graph per group, chosen by Dynamo guards.

Dynamo picks a compiled graph by evaluating guards on the frame's inputs at frame entry; it never
guards on tensor *values* (the timestep is data), so the group must be computed before the frame
is entered. :class:`GroupDispatch` does that: it finds the timestep in the call, sets
``ACTIVE.group`` (a Python int in this module) and calls the model compiled with the qdiff backend.
For every graph it compiles, the backend reads ``ACTIVE.group``, builds that group's quantizers and
adds the guard ``ACTIVE.group == g`` to the frame being compiled (:func:`guard_on_active_group`).
Every frame - including the ones after graph breaks and the recompiles for new shapes - thus gets
one cache entry per group, and Dynamo's own guard check selects it: no lookup inside a graph, no
recompile per step. The guard is added by the backend, not read by traced code, so Dynamo's
automatic-dynamic never turns the group into a SymInt.
"""

from __future__ import annotations

import contextlib
import inspect as pyinspect
import os
import threading
from typing import Any, Iterator

import torch

from .errors import QdiffError
from .plan import QuantPlan
from .timesteps import find_timestep, timestep_value


class _GroupState(threading.local):
    """The value Dynamo guards on: the timestep group of the call being run (per thread)."""

    def __init__(self) -> None:
        self.group: int | None = None


ACTIVE = _GroupState()


def active_group() -> int | None:
    """The group :class:`GroupDispatch` is running (None outside a dispatching call)."""
    return ACTIVE.group


@contextlib.contextmanager
def group_scope(group: int) -> Iterator[None]:
    """Run with ``ACTIVE.group = group`` (restored afterwards, so calls may nest)."""
    prior, ACTIVE.group = ACTIVE.group, group
    try:
        yield
    finally:
        ACTIVE.group = prior


def guard_on_active_group() -> int:
    """Specialize the frame Dynamo is compiling on ``ACTIVE.group``; returns the group.

    Must be called from a backend while Dynamo compiles a frame: adds an ``EQUALS_MATCH`` guard on
    ``qcompile.dispatch.ACTIVE.group`` (this module is made reachable from the frame's globals the
    way Dynamo does for modules that inlined code imports).
    """
    from torch._dynamo.guards import GuardBuilder
    from torch._dynamo.source import AttrSource
    from torch._dynamo.symbolic_convert import InstructionTranslator
    from torch._guards import TracingContext

    group = ACTIVE.group
    tx = InstructionTranslator.current_tx()
    context = TracingContext.try_get()
    if group is None or tx is None or context is None:
        raise QdiffError("guard_on_active_group must run inside a qdiff backend call made by GroupDispatch")
    source = AttrSource(AttrSource(tx.import_source(__name__), "ACTIVE"), "group")
    context.guards_context.dynamo_guards.add(source.make_guard(GuardBuilder.EQUALS_MATCH))
    return group


def raise_recompile_limits(groups: int) -> None:
    """Let every Dynamo frame hold its usual 8 cache entries per group (K > 8 is served, not run in eager).

    Dynamo counts cache entries per code object and falls back to eager past ``recompile_limit``;
    with guards on the group each frame needs one entry per group (two with the dynamic-batch
    recompile). The limits are global Dynamo settings, checked only when a frame compiles, so they
    are raised once here (never lowered) rather than patched around every call.
    """
    cfg = torch._dynamo.config
    names = ("recompile_limit", "accumulated_recompile_limit") if hasattr(cfg, "recompile_limit") else ("cache_size_limit", "accumulated_cache_size_limit")
    for name, needed in zip(names, (8 * groups, 32 * groups)):
        if getattr(cfg, name) < needed:
            setattr(cfg, name, needed)


def _argument_position(signature: pyinspect.Signature, names: tuple[str, ...]) -> tuple[str, int] | None:
    """(name, positional index) of the first timestep argument the signature declares, if plain."""
    params = list(signature.parameters.values())
    for name in names:
        for i, p in enumerate(params):
            if p.name == name and p.kind is p.POSITIONAL_OR_KEYWORD:
                return name, i
    return None


def _scalar(name: str, value: Any) -> float:
    """The call's timestep value: one host read (a device sync for CUDA tensors), one value per batch."""
    if isinstance(value, torch.Tensor):
        values = value.detach().reshape(-1).tolist()
        if not values or min(values) != max(values):
            return timestep_value(name, value)  # raises the calibration's error for empty / mixed batches
        return float(values[0])
    return timestep_value(name, value)


class GroupDispatch(torch.nn.Module):
    """A multi-group plan's compiled model: per call, the timestep's group selects a compiled graph.

    Built by :func:`compile`; raises Dynamo's recompile limits for K groups (:func:`raise_recompile_limits`).
    """

    def __init__(self, model: torch.nn.Module, plan: QuantPlan, options: dict[str, Any], compile_kwargs: dict[str, Any]):
        super().__init__()
        self._orig_mod = model
        self.qdiff_plan = plan
        self._signature = pyinspect.signature(model.forward)
        self._names = plan.config.calibration.timestep_args
        self.compiled = torch.compile(model, backend="qdiff", options={**options, "plan": plan}, **compile_kwargs)
        self._position = _argument_position(self._signature, self._names)
        raise_recompile_limits(plan.groups.count)

    def group_of(self, args: tuple, kwargs: dict) -> int:
        """The timestep group of one call (the timestep is found as calibration found it)."""
        found = None
        if self._position is not None:  # fast path: the argument's name / position, read off the signature once
            name, index = self._position
            value = kwargs[name] if name in kwargs else (args[index] if index < len(args) else None)
            if value is not None:
                found = name, _scalar(name, value)
        if found is None:
            found = find_timestep(self._signature, args, kwargs, self._names)
        if found is None:
            raise QdiffError(
                f"the plan has {self.qdiff_plan.groups.count} timestep groups but this call has no argument named "
                f"{' / '.join(self._names)} (QuantConfig.calibration.timestep_args)"
            )
        return self.qdiff_plan.groups.group_of(found[1])

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        group = self.group_of(args, kwargs)
        with group_scope(group):
            return self.compiled(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._orig_mod, name)  # config, dtype, ... of the model, as torch.compile's wrapper does


def compile(model: torch.nn.Module, plan: QuantPlan | str | os.PathLike, *, dynamic: bool | None = None, **options: Any) -> torch.nn.Module:
    """Compile ``model`` with the qdiff backend for ``plan``; the one entry point for any number of groups.

    One group: exactly ``torch.compile(model, backend="qdiff", options={"plan": plan, **options})``.
    More: a :class:`GroupDispatch` that compiles one graph per group (per Dynamo frame), chosen by guards.
    ``options`` are the backend's (``inductor``, ``lowering``, ``release_float_weights``, ...). With
    ``release_float_weights=True`` the float weights of ops quantized in every group are freed once compiled:
    ``model`` itself can no longer run (nor be calibrated or inspected) afterwards, only the returned module.
    """
    if not isinstance(plan, QuantPlan):
        plan = QuantPlan.load(plan)
    if plan.groups.count == 1 or "group" in options:
        return torch.compile(model, backend="qdiff", options={**options, "plan": plan}, dynamic=dynamic)
    return GroupDispatch(model, plan, options, {"dynamic": dynamic})

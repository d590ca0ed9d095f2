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
from .timesteps import find_timestep


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


class GroupDispatch(torch.nn.Module):
    """A multi-group plan's compiled model: per call, the timestep's group selects a compiled graph.

    Built by :func:`compile`. Dynamo's recompile limit counts cache entries per frame, and every
    frame has one per group, so calls raise ``recompile_limit`` (and the accumulated limit) to the
    configured value times the number of groups: K above the default limit of 8 is served, not
    silently run in eager.
    """

    def __init__(self, model: torch.nn.Module, plan: QuantPlan, options: dict[str, Any], compile_kwargs: dict[str, Any]):
        super().__init__()
        self._orig_mod = model
        self.qdiff_plan = plan
        self._signature = pyinspect.signature(model.forward)
        self._names = plan.config.calibration.timestep_args
        self.compiled = torch.compile(model, backend="qdiff", options={**options, "plan": plan}, **compile_kwargs)
        cfg = torch._dynamo.config
        k = plan.groups.count
        names = ("recompile_limit", "accumulated_recompile_limit") if hasattr(cfg, "recompile_limit") else ("cache_size_limit", "accumulated_cache_size_limit")
        self._limits = {names[0]: max(getattr(cfg, names[0]), 8 * k), names[1]: max(getattr(cfg, names[1]), 32 * k)}

    def group_of(self, args: tuple, kwargs: dict) -> int:
        """The timestep group of one call (the timestep is found as calibration found it)."""
        found = find_timestep(self._signature, args, kwargs, self._names)
        if found is None:
            raise QdiffError(
                f"the plan has {self.qdiff_plan.groups.count} timestep groups but this call has no argument named "
                f"{' / '.join(self._names)} (QuantConfig.calibration.timestep_args)"
            )
        return self.qdiff_plan.groups.group_of(found[1])

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        group = self.group_of(args, kwargs)
        with group_scope(group), torch._dynamo.config.patch(self._limits):
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
    """
    if not isinstance(plan, QuantPlan):
        plan = QuantPlan.load(plan)
    if plan.groups.count == 1 or "group" in options:
        return torch.compile(model, backend="qdiff", options={**options, "plan": plan}, dynamic=dynamic)
    return GroupDispatch(model, plan, options, {"dynamic": dynamic})

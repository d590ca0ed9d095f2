"""``@qcompile.quantize``: quantize the denoiser of a pipeline function.

    @qcompile.quantize(cfg, plan_path="sd.qplan", denoiser="unet")
    def generate(pipe, prompts):
        return pipe(prompts).images

The first call finds ``pipe.unet`` among the arguments, loads the plan file if it exists or else
calibrates by running the function in full precision (progress bar) and saves the plan, then
compiles the denoiser with the qdiff backend. Every call runs the function with the compiled
denoiser swapped in for its duration; the pipeline object is left as it was.

Graphs: Dynamo's automatic dynamic shapes (``dynamic=None``) compile one graph for the first
denoiser batch size and, when the batch size changes, one more with a dynamic batch dimension
that serves every later batch size >= 2 (a batch of 1 gets its own graph: Dynamo specializes
sizes 0 and 1). The tables in docs/usage.md give the counts per diffusers pipeline. A denoiser
call that runs none of the plan's graphs (Dynamo fell back to eager, e.g. after hitting
``torch._dynamo.config.recompile_limit``) would run in full precision: the wrapper warns.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .calibrate import calibrate
from .config import QuantConfig
from .dispatch import compile as compile_plan
from .errors import ConfigError, PlanMismatchError
from .plan import QuantPlan


@contextlib.contextmanager
def swapped_attribute(holder: Any, name: str, value: Any) -> Iterator[None]:
    """Temporarily make ``holder.name`` return ``value`` (instance dict; nn.Modules and pipelines alike)."""
    had = name in vars(holder)
    old = vars(holder).get(name)
    object.__setattr__(holder, name, value)
    try:
        yield
    finally:
        if had:
            object.__setattr__(holder, name, old)
        else:
            object.__delattr__(holder, name)


def find_holder(args: tuple, kwargs: dict, denoiser: str) -> Any:
    """The first argument that has a ``denoiser`` attribute holding an nn.Module."""
    for value in (*args, *kwargs.values()):
        if isinstance(getattr(value, denoiser, None), torch.nn.Module):
            return value
    kinds = ", ".join(type(v).__name__ for v in (*args, *kwargs.values())) or "none"
    raise ConfigError(f"@qcompile.quantize(denoiser={denoiser!r}): no argument has a '{denoiser}' nn.Module attribute (arguments: {kinds})")


@dataclass
class QuantizeState:
    """What a decorated function has built: a plan and a compiled denoiser per denoiser module."""

    plans: "weakref.WeakKeyDictionary[torch.nn.Module, QuantPlan]" = field(default_factory=weakref.WeakKeyDictionary)
    compiled: "weakref.WeakKeyDictionary[torch.nn.Module, torch.nn.Module]" = field(default_factory=weakref.WeakKeyDictionary)
    float_calls: "weakref.WeakKeyDictionary[torch.nn.Module, int]" = field(default_factory=weakref.WeakKeyDictionary)

    def graphs(self, model: torch.nn.Module) -> int:
        """How many graphs the qdiff backend has compiled for ``model`` (0 before its first call)."""
        plan = self.plans.get(model)
        return 0 if plan is None else len(plan.compiled)


# The quantized graphs get their own recompile budget: calibration's graphs of the same forward
# (and other torch.compile calls on the class) do not count against it, where torch.compile has the option.
_ISOLATED = {"isolate_recompiles": True} if "isolate_recompiles" in inspect.signature(torch.compile).parameters else {}


def _graph_calls(plan: QuantPlan) -> int:
    return sum(record.calls for record in plan.compiled)


def watch_for_float_calls(compiled: torch.nn.Module, model: torch.nn.Module, plan: QuantPlan, state: QuantizeState, name: str) -> None:
    """Warn when a call of ``compiled`` runs none of the plan's graphs (it then ran in full precision)."""
    before: list[int] = []

    def pre(module: torch.nn.Module, args: tuple) -> None:
        before.append(_graph_calls(plan))

    def post(module: torch.nn.Module, args: tuple, output: Any) -> None:
        if _graph_calls(plan) > before.pop():
            return
        count = state.float_calls[model] = state.float_calls.get(model, 0) + 1
        if count == 1:
            warnings.warn(
                f"qdiff: a call of the quantized '{name}' ({type(model).__name__}) ran in full precision: Dynamo ran "
                f"none of its {len(plan.compiled)} qdiff graph(s), e.g. after hitting torch._dynamo.config.recompile_limit "
                f"({torch._dynamo.config.recompile_limit}); run with TORCH_LOGS=recompiles to see why it recompiled",
                RuntimeWarning,
                stacklevel=2,
            )

    compiled.register_forward_pre_hook(pre)
    compiled.register_forward_hook(post)


def quantize(
    config: QuantConfig,
    plan_path: str | Path | None = None,
    denoiser: str = "unet",
    *,
    inductor: bool | None = None,
    dynamic: bool | None = None,
    progress: bool = True,
    release_float_weights: bool = False,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: run a pipeline function with its denoiser calibrated, quantized and compiled.

    ``dynamic`` goes to ``torch.compile``: None (default) lets Dynamo make the batch dimension
    dynamic when it first changes; True compiles dynamic shapes from the first call; False
    compiles one static graph per input shape. ``release_float_weights``: free the float weights
    of the quantized ops once compiled (the backend option of that name); the pipeline's denoiser
    module then can no longer run outside the decorated function (nor be calibrated again).
    """
    if not isinstance(config, QuantConfig):
        raise TypeError(f"quantize needs a QuantConfig, got {type(config).__name__}")

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        state = QuantizeState()

        def plan_for(model: torch.nn.Module, holder: Any, args: tuple, kwargs: dict) -> QuantPlan:
            if plan_path is not None and Path(plan_path).is_file():
                plan = QuantPlan.load(plan_path)
                model_class = f"{type(model).__module__}.{type(model).__qualname__}"
                if plan.model_class != model_class:
                    raise PlanMismatchError(f"plan file '{plan_path}' was calibrated for {plan.model_class}, not {model_class}")
                return plan

            def run(stand_in: Any) -> None:
                with swapped_attribute(holder, denoiser, stand_in):
                    fn(*args, **kwargs)

            plan = calibrate(model, run, config, progress=progress)
            if plan_path is not None:
                plan.save(plan_path)
            return plan

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            holder = find_holder(args, kwargs, denoiser)
            model = getattr(holder, denoiser)
            compiled = state.compiled.get(model)
            if compiled is None:
                plan = state.plans[model] = plan_for(model, holder, args, kwargs)
                if plan.groups.count == 1:
                    options = {"plan": plan, "inductor": inductor, "release_float_weights": release_float_weights}
                    compiled = torch.compile(model, backend="qdiff", options=options, dynamic=dynamic, **_ISOLATED)
                    watch_for_float_calls(compiled, model, plan, state, denoiser)
                else:  # one graph per timestep group, chosen by Dynamo guards
                    compiled = compile_plan(model, plan, dynamic=dynamic, inductor=inductor, release_float_weights=release_float_weights)
                state.compiled[model] = compiled
            with swapped_attribute(holder, denoiser, compiled):
                return fn(*args, **kwargs)

        wrapper.qdiff = state  # type: ignore[attr-defined]
        return wrapper

    return decorate

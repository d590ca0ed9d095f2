"""``@qcompile.quantize``: quantize the denoiser of a pipeline function.

    @qcompile.quantize(cfg, plan_path="sd.qplan", denoiser="unet")
    def generate(pipe, prompts):
        return pipe(prompts).images

The first call finds ``pipe.unet`` among the arguments, loads the plan file if it exists or else
calibrates by running the function in full precision (progress bar) and saves the plan, then
compiles the denoiser with the qdiff backend. Every call runs the function with the compiled
denoiser swapped in for its duration; the pipeline object is left as it was.
"""

from __future__ import annotations

import contextlib
import functools
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


def quantize(
    config: QuantConfig,
    plan_path: str | Path | None = None,
    denoiser: str = "unet",
    *,
    inductor: bool | None = None,
    progress: bool = True,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: run a pipeline function with its denoiser calibrated, quantized and compiled."""
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
                compiled = state.compiled[model] = compile_plan(model, plan, inductor=inductor)
            with swapped_attribute(holder, denoiser, compiled):
                return fn(*args, **kwargs)

        wrapper.qdiff = state  # type: ignore[attr-defined]
        return wrapper

    return decorate

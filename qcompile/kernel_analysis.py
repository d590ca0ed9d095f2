"""Memoized mutation analysis of user-defined Triton kernels while the qdiff backend compiles a graph.

Every ``wrap_triton`` launch in a traced graph makes PyTorch find which tensor arguments the kernel writes
(``torch._higher_order_ops.triton_kernel_wrap.identify_mutated_tensors``, ``identify_accessed_tensors`` from
torch 2.13): it generates the kernel's TTIR and walks it. That runs once per launch and per phase (AOT metadata,
AOT tracing, Inductor lowering), with no cache, so a quantized SD 1.5 UNet (282 launches) paid it ~850 times:
``aot_collect_metadata`` took 29.0 s against bf16's 1.2 s (H200, 2026-12-03, the row's ``torch_compile_phases_s``).
Most launches repeat a few (kernel, arguments) combinations (28 identical transformer blocks), and the answer
depends only on the kernel and on its arguments' kinds and values, so :func:`memoized_kernel_analysis` caches
it by exactly those while the backend's ``compile_fx`` runs, and puts PyTorch's function back afterwards. On a
torch without either function it changes nothing.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch

ANALYSES = ("identify_mutated_tensors", "identify_accessed_tensors")  # torch <= 2.12, torch >= 2.13
_CACHE: dict[tuple, Any] = {}
_STATS = {"hits": 0, "misses": 0}


def _describe(value: Any) -> Any:
    """What of an argument the analysis can depend on: a tensor's (or Inductor buffer's) dtype, a scalar's value;
    raises TypeError for what cannot be a key (symbolic sizes)."""
    if isinstance(value, torch.Tensor):
        return ("tensor", value.dtype)
    if hasattr(value, "get_dtype"):  # Inductor's TensorBox / buffers
        return ("tensor", value.get_dtype())
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        raise TypeError("symbolic argument")
    hash(value)
    return value


def _key(kernel: Any, kwargs: dict[str, Any], rest: tuple) -> tuple | None:
    try:
        # (the kernel object itself stays in the key, so its id cannot be reused while the entry lives)
        return (id(kernel), kernel, tuple(sorted((k, _describe(v)) for k, v in kwargs.items())), repr(rest))
    except TypeError:  # (unhashable or symbolic arguments: analysed every time, as without the cache)
        return None


def _memoized(analysis: Callable[..., Any]) -> Callable[..., Any]:
    def run(kernel: Any, kwargs: dict[str, Any], *rest: Any) -> Any:
        key = _key(kernel, kwargs, rest)
        if key is None:
            return analysis(kernel, kwargs, *rest)
        if key not in _CACHE:
            _STATS["misses"] += 1
            _CACHE[key] = analysis(kernel, kwargs, *rest)
        else:
            _STATS["hits"] += 1
        found = _CACHE[key]
        return list(found) if isinstance(found, list) else found  # (callers may extend a list)

    run.__wrapped__ = analysis  # type: ignore[attr-defined]
    return run


@contextlib.contextmanager
def memoized_kernel_analysis() -> Iterator[dict[str, int]]:
    """Within the block, PyTorch's Triton-kernel mutation analysis is cached (see the module docstring); yields the
    hit / miss counters of the whole process."""
    from torch._higher_order_ops import triton_kernel_wrap as wrap

    patched = {name: getattr(wrap, name) for name in ANALYSES if callable(getattr(wrap, name, None))}
    for name, fn in patched.items():
        setattr(wrap, name, _memoized(fn))
    try:
        yield _STATS
    finally:
        for name, fn in patched.items():
            setattr(wrap, name, fn)

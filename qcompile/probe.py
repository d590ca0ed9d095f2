"""A probe: the arguments of one denoiser call, stored in a plan without pickle.

Tensors go to safetensors under ``probe/<i>``; the surrounding structure (tuples, lists, dicts
with string keys, None, numbers, strings, booleans) is JSON.
"""

from __future__ import annotations

from typing import Any

import torch


class UnsupportedProbe(TypeError):
    """An argument that cannot be stored without pickle."""


def encode(args: tuple, kwargs: dict) -> tuple[Any, dict[str, torch.Tensor]]:
    """(JSON structure, tensors) for a call's ``(args, kwargs)``; raises UnsupportedProbe."""
    tensors: dict[str, torch.Tensor] = {}

    def enc(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            name = f"probe/{len(tensors)}"
            tensors[name] = v.detach().cpu().clone()
            return {"tensor": name}
        if v is None or isinstance(v, (bool, int, float, str)):
            return {"value": v}
        if isinstance(v, (list, tuple)):
            return {type(v).__name__: [enc(x) for x in v]}
        if isinstance(v, dict) and all(isinstance(k, str) for k in v):
            return {"dict": {k: enc(x) for k, x in v.items()}}
        raise UnsupportedProbe(f"cannot store a {type(v).__name__} argument in a plan")

    return enc((list(args), kwargs)), tensors


def decode(structure: Any, tensors: dict[str, torch.Tensor], device: torch.device | str | None = None) -> tuple[tuple, dict]:
    """Inverse of :func:`encode`: ``(args, kwargs)`` with tensors moved to ``device``."""

    def dec(d: dict) -> Any:
        (tag, v), = d.items()
        if tag == "tensor":
            t = tensors[v]
            return t if device is None else t.to(device)
        if tag == "value":
            return v
        if tag == "list":
            return [dec(x) for x in v]
        if tag == "tuple":
            return tuple(dec(x) for x in v)
        if tag == "dict":
            return {k: dec(x) for k, x in v.items()}
        raise ValueError(f"unknown probe tag {tag!r}")

    args, kwargs = dec(structure)
    return tuple(args), kwargs

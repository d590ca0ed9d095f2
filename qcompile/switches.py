"""On/off switches read from the environment (A/B measurements of kernel and pass choices; ``qdiff bench`` sets them
per row process)."""

from __future__ import annotations

import os


def env_switch(name: str, default: bool | None) -> bool | None:
    """The switch ``name``: ``"1"`` on, ``"0"`` off, unset ``default`` (None: the caller decides); any other value is an error naming it."""
    value = os.environ.get(name)
    if value is None:
        return default
    if value not in ("0", "1"):
        raise ValueError(f"{name} must be 0 or 1, got {value!r}")
    return value == "1"

"""``QDIFF_DEBUG=1``: log each pass's graph to the ``qcompile`` logger (stderr)."""

from __future__ import annotations

import logging
import os

import torch.fx as fx

logger = logging.getLogger("qcompile")


def debug_enabled() -> bool:
    return os.environ.get("QDIFF_DEBUG", "") not in ("", "0")


def log_graph(stage: str, gm: fx.GraphModule) -> None:
    """Log ``gm``'s code after ``stage`` when QDIFF_DEBUG is set."""
    if not debug_enabled():
        return
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[qdiff] %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
    logger.debug("graph after %s:\n%s", stage, gm.print_readable(print_output=False))

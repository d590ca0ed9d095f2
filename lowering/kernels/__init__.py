"""Triton kernels for quantized linear / conv ops (registered as ``torch.ops.qdiff.*`` triton_ops).

Each module holds the ``@triton.jit`` kernel(s), their autotune configs, the checked wrapper and
the ``torch.library.triton_op`` registration (with a fake implementation, so graphs that call
them trace). :mod:`qcompile.lowering.triton_lowering` dispatches the converted graph's calls here.
"""

from ._common import INTERPRET, kernels_usable_on
from .fp8_linear import fp8_linear, fp8_linear_prequant

__all__ = ["INTERPRET", "kernels_usable_on", "fp8_linear", "fp8_linear_prequant"]

"""Triton kernels for quantized linear / conv ops, registered as ``torch.ops.qdiff.*`` triton_ops, and an fp8
attention forward (``qdiff::fp8_attention``, reached through ``triton_lowering.qattention`` for ``config.attention``).

Each module holds the ``@triton.jit`` kernel(s), their autotune configs, the checked wrapper and
the ``torch.library.triton_op`` registration (with a fake implementation, so graphs calling them
trace). :mod:`qcompile.lowering.triton_lowering` dispatches the converted graph's calls here.

Kernels run on CUDA tensors, or on CPU tensors when Triton runs in its interpreter
(``TRITON_INTERPRET=1`` set before ``triton`` is first imported; see ``tests/lowering/kernels``).
"""

from ._common import INTERPRET, kernels_usable_on
from .conv import conv2d_fp8_prequant, conv2d_w8a8
from .fp8_attention import fp8_attention
from .fp8_linear import fp8_linear, fp8_linear_prequant
from .im2col import gather_columns
from .int8_linear import int8_linear, weight_colsum
from .norm_quant import add_norm_modulate_fp8
from .w4_linear import w4a8_linear, weight_only_linear

__all__ = [
    "INTERPRET", "kernels_usable_on", "add_norm_modulate_fp8", "conv2d_fp8_prequant", "conv2d_w8a8", "fp8_attention", "fp8_linear", "fp8_linear_prequant", "gather_columns", "int8_linear",
    "weight_colsum", "w4a8_linear", "weight_only_linear",
]

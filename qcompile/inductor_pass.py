"""The qdiff post-grad pass handed to Inductor, and its cache identity.

Inductor caches compiled graphs by their code and config; a custom pass takes part in that key
through ``uuid()``. Ours includes the plan's digest, the lowering and the pass version, so a
cached artifact of another plan is never reused. The pass itself checks that every quantized op
reached the post-grad graph as a qdiff Triton kernel (``torch.library.triton_op``: Inductor sees
them as user-defined Triton kernels and still fuses the elementwise work around them) and
records which kernels, so ``inspect`` and tests can see what actually runs.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter

import torch
import torch.fx as fx
from torch._inductor.custom_graph_pass import CustomGraphPass

PASS_VERSION = 7  # 2: fp8 activation quantization placed by passes.act_quant; 3: conv split-K; 4: fp8 conv engine (im2col);
# 5: im2col columns written by qdiff::im2col; 6: the direct fp8 conv engine (qdiff::conv2d_fp8_prequant); 7: fp8 conv
# engine auto (per shape) by default
# environment switches the kernels' wrappers read while the graph is traced: the graph Inductor keys its cache on is
# the same with either value, so they must be part of the key (switches read by our graph passes change the graph)
KERNEL_SWITCHES = ("QDIFF_CONV_SPLITK", "QDIFF_FP8_TMA", "QDIFF_CONV_ENGINE", "QDIFF_IM2COL_WRITER")


def _kernel_name(node: fx.Node) -> str | None:
    """The qdiff kernel a post-grad node launches, if any."""
    if node.op != "call_function":
        return None
    target = node.target
    name = getattr(target, "name", None)
    if callable(name):
        qualified = target.name()
        if qualified.startswith("qdiff::"):
            return qualified
    if "triton_kernel_wrapper" in str(target):
        from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

        kernel = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
        fn = getattr(kernel, "fn", kernel)
        while hasattr(fn, "fn"):  # Autotuner / Heuristics wrap the JITFunction
            fn = fn.fn
        module = getattr(fn, "__module__", "") or ""
        if module.startswith("qcompile.lowering.kernels"):
            return f"{module.rsplit('.', 1)[-1]}.{fn.__name__}"
    return None


class QdiffKernelPass(CustomGraphPass):
    """Post-grad pass: counts the qdiff kernels Inductor will run; uuid carries the plan digest."""

    def __init__(self, plan_digest: str, lowering: str):
        self.plan_digest = plan_digest
        self.lowering = lowering
        self.kernels: Counter[str] = Counter()

    def __call__(self, graph: fx.Graph) -> None:
        self.kernels = Counter(k for k in (_kernel_name(n) for n in graph.nodes) if k is not None)

    def uuid(self) -> str:
        switches = ",".join(f"{k}={os.environ.get(k, '')}" for k in KERNEL_SWITCHES)
        return hashlib.sha256(f"qdiff-kernel-pass:{PASS_VERSION}:{self.lowering}:{self.plan_digest}:{torch.__version__}:{switches}".encode()).hexdigest()

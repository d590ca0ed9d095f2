"""Sibling fusion on the Triton kernels (interpreter on CPU): one fused GEMM gives the separate GEMMs' result."""

import pytest
import torch

from qcompile.passes.act_quant import place_act_quant
from qcompile.passes.fuse_siblings import SIBLINGS_KEY, fuse_siblings
from tests.passes.test_fuse_siblings import QKV, TRITON, calibrated, calls, converted

from .helpers import needs_kernels

pytestmark = needs_kernels


@pytest.mark.parametrize("preset", ["w8a8-fp8", "w8a8-int8"])
def test_fused_kernel_call_matches_the_separate_calls(preset):
    torch.manual_seed(0)
    model = QKV(bias=True).eval()
    x = torch.randn(2, 8, 32)
    plan = calibrated(model, preset)
    gm, inputs = converted(model, plan, (x,), TRITON)
    gm, _ = place_act_quant(gm, TRITON.linear, TRITON.linear_fused)
    before = gm(*inputs)[0]
    gm, _ = converted(model, plan, (x,), TRITON)
    gm, count = fuse_siblings(gm, TRITON.linear)
    gm, placed = place_act_quant(gm, TRITON.linear, TRITON.linear_fused)
    fused = [n for n in calls(gm, TRITON.linear) if SIBLINGS_KEY in n.meta]
    assert count == 1 and len(fused) == 1
    if preset == "w8a8-fp8":  # the LayerNorm output is quantized once, in the producer, for the one GEMM
        assert fused[0].kwargs["x_quant"] == "producer"
    torch.testing.assert_close(gm(*inputs)[0], before, rtol=0, atol=0)


@pytest.mark.parametrize("m", [2, 16])  # the GEMV kernel (M <= 4 rows) and the tensor-core kernel
def test_fused_group_wise_int4_call_matches_the_separate_calls(m):
    """W4A16 with groups of 16 (two per row of K = 32): the packed rows and their groups' scales concatenate along N,
    and the one weight-only call gives the separate calls' output exactly."""
    import qcompile
    from qcompile import QuantConfig
    from qcompile.config import Format, WeightSpec

    torch.manual_seed(0)
    model = QKV(bias=True).eval()
    x = torch.randn(1, m, 32)
    cfg = QuantConfig.preset("w4a16").replace(weight=WeightSpec(Format.INT4, group_size=16), first_last="quantize")
    plan = qcompile.calibrate(model, lambda mod: [mod(torch.randn(2, 8, 32)) for _ in range(3)], cfg, progress=False)
    gm, inputs = converted(model, plan, (x,), TRITON)
    before = gm(*inputs)[0]
    gm, count = fuse_siblings(gm, TRITON.linear)
    fused = [n for n in calls(gm, TRITON.linear) if SIBLINGS_KEY in n.meta]
    assert count == 1 and len(fused) == 1 and fused[0].kwargs["group_size"] == 16
    torch.testing.assert_close(gm(*inputs)[0], before, rtol=0, atol=0)

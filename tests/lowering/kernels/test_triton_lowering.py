"""The dispatcher: same signature as the reference lowering, kernels where supported, reference elsewhere."""

import inspect

import pytest
import torch

from qcompile.lowering import reference, triton_lowering
from qcompile.lowering.weights import quantize_weight
from qcompile.metrics import sqnr_db

from .helpers import DEVICE, act_qparams, needs_kernels, randn

pytestmark = needs_kernels


def test_signatures_match_the_reference():
    # extras: fp8 quantization placement (passes.act_quant) and precomputed buffers (aux_buffers), keyword-only, default None
    for name, extras in (("qlinear", {"x_quant", "out_scale", "out_dtype", "colsum"}), ("qconv", {"colsum"})):
        ours = inspect.signature(getattr(triton_lowering, name)).parameters
        ref = inspect.signature(getattr(reference, name)).parameters
        assert list(ours)[: len(ref)] == list(ref) and all(ours[k] == ref[k] for k in ref)
        extra = {k: p for k, p in ours.items() if k not in ref}
        assert set(extra) == extras
        assert all(p.kind is p.KEYWORD_ONLY and p.default is None for p in extra.values())


ROUTES = [
    ("fp8_e4m3", "fp8_e4m3", False, None, "fp8"),
    ("int8", "int8", True, None, "int8"),
    ("int4", "int8", True, 64, "w4a8"),
    ("int4", "fp8_e4m3", False, 64, "w4a8"),
    ("int4", None, False, 64, "weight_only"),
    ("int8", None, False, None, "weight_only"),
    ("fp8_e4m3", None, False, None, None),  # fp8 weight-only: reference
    ("int8", "fp8_e4m3", False, None, None),  # mixed pair: reference
    ("fp8_e4m3", "int8", True, None, None),
    ("int4", None, False, 16, None),  # groups smaller than a K tile: reference
]


@pytest.mark.parametrize("wfmt,afmt,asym,group,route", ROUTES)
def test_qlinear_routes_and_matches_reference(wfmt, afmt, asym, group, route):
    x = randn(6, 64, shift=0.2)
    assert triton_lowering.linear_route(x, wfmt=wfmt, afmt=afmt, group_size=group) == route
    qw = quantize_weight(torch.randn(24, 64), wfmt, "linear", group, clip_search=False)
    s, z = act_qparams(x, afmt or "int8", asym)
    args = (x, qw.data.to(DEVICE), qw.scale.to(DEVICE), randn(24), s, z)
    kw = dict(wfmt=wfmt, group_size=group, weight_shape=qw.shape, afmt=afmt, asym=asym)
    out, ref = triton_lowering.qlinear(*args, **kw), reference.qlinear(*args, **kw)
    if route is None:
        assert torch.equal(out, ref)
    else:
        assert sqnr_db(ref, out) > 45


def test_float64_inputs_take_the_reference():
    assert triton_lowering.linear_route(randn(2, 8, dtype=torch.float64), wfmt="int8", afmt="int8", group_size=None) is None


def test_fused_activation_through_the_fallback_too():
    x = randn(3, 32)
    qw = quantize_weight(torch.randn(8, 32), "fp8_e4m3", "linear", None, clip_search=False)
    args = (x, qw.data.to(DEVICE), qw.scale.to(DEVICE), None, None, None)
    kw = dict(wfmt="fp8_e4m3", group_size=None, weight_shape=qw.shape)  # weight-only fp8: reference + activation
    out = triton_lowering.qlinear_fused(*args, **kw, act="silu")
    assert torch.equal(out, torch.nn.functional.silu(reference.qlinear(*args, **kw)))
    with pytest.raises(ValueError, match="unknown activation"):
        triton_lowering.qlinear_fused(*args, **kw, act="tanh")

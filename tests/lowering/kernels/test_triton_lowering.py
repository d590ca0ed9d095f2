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
    # extras: fp8 quantization placement (passes.act_quant), precomputed buffers (aux_buffers) and the stored weight's
    # layout (stored_weight), keyword-only, default None
    for name, extras in (("qlinear", {"x_quant", "out_scale", "out_dtype", "colsum"}), ("qconv", {"colsum", "weight_layout"})):
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


# -- split ops ----------------------------------------------------------------------------------------------------
SPLIT_ROUTES = [
    ("fp8_e4m3", "fp8_e4m3", None, (0, 20, 64), "fp8"),
    ("int8", "int8", None, (0, 20, 40, 64), "int8"),
    ("int8", "int8", None, (0, 8, 16, 24, 32, 64), None),  # 5 slices: more than the kernels take
    ("int4", "int8", 64, (0, 20, 64), None),  # W4A8: reference (named by fallback_reason)
    ("int4", None, 64, (0, 20, 64), None),
    ("int8", None, None, (0, 20, 64), None),  # weight-only
]


@pytest.mark.parametrize("wfmt,afmt,group,splits,route", SPLIT_ROUTES)
def test_split_ops_route_to_the_split_kernels_and_fallbacks_are_named(wfmt, afmt, group, splits, route):
    from qcompile.passes.convert import QuantizedOp

    x = randn(6, 64)
    assert triton_lowering.linear_route(x, wfmt=wfmt, afmt=afmt, group_size=group, splits=splits) == route
    qw = quantize_weight(torch.randn(24, 64), wfmt, "linear", group, clip_search=False, splits=splits)
    ns = len(splits) - 1
    q = QuantizedOp(qw, afmt, True, (0.1,) * ns, (0,) * ns)
    reason = triton_lowering.fallback_reason(q)
    assert (reason is None) == (route is not None)
    if reason is not None:
        assert "split" in reason and "reference" in reason
    s, z = torch.full((ns,), float(x.abs().max()) / 100, device=DEVICE), torch.zeros(ns, dtype=torch.int32, device=DEVICE)
    args = (x, qw.data.to(DEVICE), qw.scale.to(DEVICE), randn(24), s, z)
    kw = dict(wfmt=wfmt, group_size=group, weight_shape=qw.shape, afmt=afmt, splits=splits)
    out, ref = triton_lowering.qlinear(*args, **kw), reference.qlinear(*args, **kw)
    assert torch.equal(out, ref) if route is None else sqnr_db(ref, out) > 45


class SkipCatUNet(torch.nn.Module):
    """An up block in miniature: the skip connection's cat (16 + 16 channels) + time embedding, GroupNorm with groups
    inside the slices -> SiLU -> 3x3 conv (implicit GEMM) and a 1x1 shortcut conv (GEMM) reading the cat."""

    def __init__(self):
        super().__init__()
        self.down, self.deep = torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.Conv2d(16, 16, 3, padding=1)
        self.temb = torch.nn.Linear(1, 32)
        self.norm = torch.nn.GroupNorm(4, 32)
        self.conv = torch.nn.Conv2d(32, 16, 3, padding=1)
        self.shortcut = torch.nn.Conv2d(32, 16, 1)

    def forward(self, x, t):
        skip = self.down(x)
        h = torch.cat((8.0 * torch.nn.functional.silu(self.deep(skip)), 0.1 * skip), dim=1)
        h = h + self.temb(t[:, None])[:, :, None, None]
        return self.conv(torch.nn.functional.silu(self.norm(h))) + self.shortcut(h)


@pytest.fixture(scope="module")
def skipcat_plans():
    import qcompile
    from qcompile import QuantConfig

    torch.manual_seed(0)
    model = SkipCatUNet().eval().to(DEVICE)  # (on the GPU where there is one: the lowering's kernels run there)
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1)).to(DEVICE)

    def run(m):
        for t in (0.9, 0.5, 0.1):
            m(x, torch.full((2,), t, device=DEVICE))

    plans = {name: qcompile.calibrate(model, run, QuantConfig.preset(name).replace(first_last="quantize"), progress=False)
             for name in ("w8a8-int8", "w8a8-fp8", "w4a8")}
    return model, x, plans


def _compile_and_spy(monkeypatch, model, x, plan):
    """Run the model under the Triton lowering (no Inductor); record which kernel wrappers got split ops."""
    import warnings

    from qcompile.lowering import conv_im2col

    calls = []
    for module, name in [(triton_lowering, n) for n in ("conv2d_w8a8", "conv2d_fp8_im2col", "int8_linear", "fp8_linear")] + [
        (conv_im2col, "columns_weight"), (conv_im2col, "plan_weight")
    ]:
        real = getattr(module, name)

        def spy(*a, _real=real, _name=name, **k):
            calls.append((_name, k.get("splits", a[2] if _name.endswith("_weight") else None)))
            return _real(*a, **k)

        monkeypatch.setattr(module, name, spy)
    torch._dynamo.reset()
    plan.warned.clear()
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        out = torch.compile(model, backend="qdiff", options={"plan": plan, "lowering": "triton", "inductor": False})(x, torch.full((2,), 0.5, device=DEVICE))
    fallback = [str(w.message) for w in caught if "run the reference lowering" in str(w.message)]
    return out, calls, fallback


@pytest.mark.parametrize("preset", ["w8a8-int8", "w8a8-fp8"])
def test_split_ops_of_a_skip_cat_take_the_kernels(skipcat_plans, monkeypatch, preset):
    model, x, plans = skipcat_plans
    plan = plans[preset]
    assert plan.nodes["conv"].weight.splits == (0, 16, 32) and plan.nodes["shortcut"].weight.splits == (0, 16, 32)
    out, calls, fallback = _compile_and_spy(monkeypatch, model, x, plan)
    gemm = "int8_linear" if preset == "w8a8-int8" else "fp8_linear"
    conv = "conv2d_w8a8" if preset == "w8a8-int8" else "conv2d_fp8_im2col"
    assert (conv, (0, 16, 32)) in calls  # the 3x3 conv: implicit GEMM (int8) / im2col + the fp8 GEMM's split path
    assert (gemm, (0, 16, 32)) in calls  # the 1x1 shortcut: GEMM kernel, split path
    assert fallback == []  # nothing runs the reference
    # the fp8 conv's weight is stored in column order once, at conversion, and read as stored (no reorder per call)
    reorders = [c for c in calls if c[0].endswith("_weight")]
    spatial = [k for k, nd in plan.nodes.items() if nd.weight is not None and len(nd.weight.shape) == 4
               and tuple(nd.weight.shape[2:]) != (1, 1) and nd.weight.shape[1] % 16 == 0]  # (the 3-channel input conv: cuDNN)
    if preset == "w8a8-fp8":
        assert {c[0] for c in reorders} == {"columns_weight"} and len(reorders) == len(spatial) and ("columns_weight", (0, 16, 32)) in reorders
    else:
        assert reorders == []
    torch._dynamo.reset()
    with torch.no_grad():
        ref = torch.compile(model, backend="qdiff", options={"plan": plan, "lowering": "reference", "inductor": False})(x, torch.full((2,), 0.5, device=DEVICE))
    assert sqnr_db(ref, out) > 40


def test_w4_split_ops_run_the_reference_and_the_warning_names_them(skipcat_plans, monkeypatch):
    model, x, plans = skipcat_plans
    plan = plans["w4a8"]
    assert plan.nodes["conv"].weight.splits == (0, 16, 32) and plan.nodes["conv"].weight.fmt == "int4"
    _, calls, fallback = _compile_and_spy(monkeypatch, model, x, plan)
    assert not any(splits is not None for _, splits in calls)
    assert len(fallback) == 1
    for key in ("conv", "shortcut"):
        assert f"  {key}: split op (int4 weight / int8 activation" in fallback[0]

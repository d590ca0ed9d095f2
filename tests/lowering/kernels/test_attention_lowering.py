"""The Triton lowering's attention call: ``qdiff::fp8_attention`` where it can, the reference elsewhere; a tiny DiT
compiled with ``w8a8-fp8-attn`` under the Triton lowering matches the reference lowering."""

import importlib

import pytest
import torch

from qcompile.lowering import reference, triton_lowering
from qcompile.metrics import sqnr_db

from .helpers import DEVICE, calibrated_tiny_dit_attn, needs_kernels, randn

pytestmark = needs_kernels


def _scales(*ts):
    return [torch.tensor(float(t.abs().max()) / 448, device=t.device) for t in ts]


def test_qattention_takes_the_kernel_and_matches_the_reference(monkeypatch):
    q, k, v = (randn(2, 2, 24, 32) for _ in range(3))  # one key tile in the interpreter: the reference's arithmetic
    k = k.transpose(1, 2).contiguous().transpose(1, 2)  # (B, S, H, D) storage as diffusers' view + transpose
    calls = []
    real = triton_lowering.reference.qattention
    monkeypatch.setattr(triton_lowering.reference, "qattention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    out = triton_lowering.qattention(q, k, v, *_scales(q, k, v), sm_scale=0.2)
    assert calls == []  # the kernel ran
    ref = real(q, k, v, *_scales(q, k, v), sm_scale=0.2)
    # the interpreter does the reference's fp32 arithmetic (> 90 dB); Hopper's fp8 tensor cores accumulate with fewer
    # mantissa bits than fp32 (48.8 dB on an H200, 2026-12-01), still far above the fp8 rounding itself (~25 dB vs bf16)
    assert out.shape == ref.shape and sqnr_db(ref, out) > (60 if q.device.type == "cpu" else 40)
    narrow = [t[..., :16] for t in (q, k, v)]
    assert "head dim 16" in triton_lowering.attention_route(*narrow)
    with pytest.warns(UserWarning, match="runs the reference attention.*head dim 16"):
        triton_lowering.qattention(*narrow, *_scales(q, k, v))
    assert calls == [1]  # unsupported shapes run the reference, and say so


@pytest.mark.parametrize("d,ones", [(72, True), (40, True), (64, False)])
def test_qattention_stores_the_ones_row_where_the_head_dim_has_room(d, ones, monkeypatch):
    """With ``$QDIFF_ATTN_V_ONES=1`` the lowering's V copy by keys holds the kernel's ones row (``v_ones_dim``) at
    D = 72 / 40, from float and from fp8 V alike; not at D = 64 (no padding column), nor for fp8 V already stored by keys
    (the heads layout); by default (off until timed on a GPU) nowhere."""
    fa = importlib.import_module("qcompile.lowering.kernels.fp8_attention")
    monkeypatch.setenv(triton_lowering.V_ONES_ENV, "1")
    seen = []
    real = fa.fp8_attention
    monkeypatch.setattr(fa, "fp8_attention", lambda *a, **kw: seen.append(kw["v_ones_dim"]) or real(*a, **kw))
    q, k, v = (randn(1, 2, 24, d) for _ in range(3))
    s = _scales(q, k, v)
    triton_lowering.qattention(q, k, v, *s)
    q8, k8, v8 = (fa.formats.quantize_fp8(t, sc) for t, sc in zip((q, k, v), s))
    triton_lowering.qattention(q8, k8, v8, *s, sm_scale=d ** -0.5, out_dtype=torch.float32)
    triton_lowering.qattention(q8, k8, fa.keys_contiguous_codes(v8), *s, sm_scale=d ** -0.5, out_dtype=torch.float32)
    assert seen == [d if ones else 0] * 2 + [0]
    monkeypatch.delenv(triton_lowering.V_ONES_ENV)
    triton_lowering.qattention(q, k, v, *s)
    assert seen[-1] == 0
    monkeypatch.setenv(triton_lowering.V_ONES_ENV, "yes")
    with pytest.raises(ValueError, match="QDIFF_ATTN_V_ONES must be 0 or 1"):
        triton_lowering.qattention(q, k, v, *s)


@pytest.mark.parametrize("d", [40, 72])
def test_plain_fp8_projection_output_takes_the_kernel(monkeypatch, d):
    """q / k / v written as plain fp8 by their projection (``QDIFF_ATTN_FP8_QKV``) have V's head dim, not the kernel's
    padded width: the lowering runs the kernel on them (on 2026-12-03 D = 72 fp8 q / k ran the reference attention on
    the H200, 3.8x slower than float q / k / v), q / k as they are (the kernel pads them in registers), with the codes
    and the result the float route gives."""
    module = importlib.import_module("qcompile.lowering.kernels.fp8_attention")
    from qcompile.lowering import formats

    q, k, v = (randn(1, 2, 24, d) for _ in range(3))
    scales = _scales(q, k, v)
    codes = [formats.quantize_fp8(t, s) for t, s in zip((q, k, v), scales)]
    assert triton_lowering.attention_route(*codes) is None
    seen = []
    real = module.fp8_attention
    monkeypatch.setattr(module, "fp8_attention", lambda *a, **kw: seen.append(a[:3]) or real(*a, **kw))
    out = triton_lowering.qattention(*codes, *scales, sm_scale=d ** -0.5, out_dtype=q.dtype)
    float_route = triton_lowering.qattention(q, k, v, *scales)
    assert len(seen) == 2
    for fp8_arg, float_arg in zip(seen[0], seen[1]):  # the same codes (the float route stores rows padded to 16 bytes)
        assert fp8_arg.shape == float_arg.shape and torch.equal(fp8_arg.float(), float_arg.float())
    assert seen[0][0] is codes[0] and seen[0][1] is codes[1]  # fp8 q / k: no copy
    assert torch.equal(out, float_route)


def test_qattention_gives_head_dim_40_to_the_kernel_unpadded(monkeypatch):
    """SD 1.5's D = 40 heads: the lowering quantizes q / k without zero columns (the kernel pads them to 64 in
    registers, one Q K^T dot) and v stored by keys, and keeps the default softmax scale of D = 40."""
    module = importlib.import_module("qcompile.lowering.kernels.fp8_attention")  # (the package re-exports the function)

    q, k, v = (randn(1, 2, 24, 40) for _ in range(3))
    seen = []
    real = module.fp8_attention
    monkeypatch.setattr(module, "fp8_attention", lambda *a, **kw: seen.append((a[0].shape[-1], module.keys_contiguous(a[2]))) or real(*a, **kw))
    out = triton_lowering.qattention(q, k, v, *_scales(q, k, v))
    assert seen == [(40, True)] and out.shape == v.shape
    ref = reference.qattention(q, k, v, *_scales(q, k, v))
    assert sqnr_db(ref, out) > (60 if q.device.type == "cpu" else 40)


def test_triton_lowering_runs_fp8_attention_in_the_model(monkeypatch):
    case, args, kwargs, plan = calibrated_tiny_dit_attn()
    launched = []
    real = triton_lowering.qattention
    monkeypatch.setattr(triton_lowering, "qattention", lambda *a, **kw: launched.append(triton_lowering.attention_route(*a[:3])) or real(*a, **kw))
    outs = {}
    for lowering in ("triton", "reference"):
        torch._dynamo.reset()
        with torch.no_grad():
            compiled = torch.compile(case.model, backend="qdiff", options={"plan": plan, "lowering": lowering, "inductor": False})
            outs[lowering] = case.output(compiled(*args, **{**kwargs, "timestep": torch.full((2,), 400, device=DEVICE)}))
        graph = plan.compiled[-1].converted
        want = triton_lowering.qattention if lowering == "triton" else reference.qattention
        assert sum(n.target is want for n in graph.graph.nodes) == 2
    assert launched == [None, None]  # both attention calls took the kernel
    assert sqnr_db(outs["reference"], outs["triton"]) > 30

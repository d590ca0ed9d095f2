"""How the kernels are launched: eager calls launch directly (no torch.library dispatch), traced calls go through
the triton_ops (so Inductor inlines the kernels), the persistent TMA kernel's dispatch rule, and its launch with
the fp8-output epilogue (in the interpreter here; the CUDA tests run it on the GPU)."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

from qcompile.lowering.kernels import _common, fp8_linear, fp8_linear_prequant, fp8_tma
from qcompile.lowering.kernels.fp8_linear import quantize_input_fp8
from qcompile.lowering.reference import qlinear
from qcompile.lowering.weights import quantize_weight
from qcompile.metrics import sqnr_db

from .helpers import DEVICE, act_qparams, needs_kernels, randn

FP8 = torch.float8_e4m3fn


def _fp8_case(m, k, n):
    qw = quantize_weight(torch.randn(n, k), "fp8_e4m3", "linear", clip_search=False)
    x = randn(m, k)
    s, z = act_qparams(x, "fp8_e4m3", False)
    ref = qlinear(x, qw.data.to(DEVICE), qw.scale.to(DEVICE), None, s, z, wfmt="fp8_e4m3", group_size=None, weight_shape=qw.shape,
                  afmt="fp8_e4m3")
    return x, qw.data.to(DEVICE).view(FP8), qw.scale.to(DEVICE).reshape(-1), s, ref


# --- dispatch decisions (pure Python) -----------------------------------------------------------
def test_tma_dispatch_rule():
    ok = dict(has_tma=True, capability=(9, 0))
    assert fp8_tma.tma_eligible(8192, 1152, 4608, 4608, 0, **ok)
    assert fp8_tma.tma_eligible(1024, 512, 512, 512, 0, **ok)
    assert fp8_tma.tma_eligible(2048, 4608, 1152, 1152, 0, has_tma=True, capability=(10, 0))
    assert not fp8_tma.tma_eligible(1023, 4608, 1152, 1152, 0, **ok)  # M below the threshold
    assert not fp8_tma.tma_eligible(8192, 320, 1152, 1152, 0, **ok)  # N
    assert not fp8_tma.tma_eligible(8192, 1152, 320, 320, 0, **ok)  # K
    assert not fp8_tma.tma_eligible(8192, 1152, 1160, 1160, 0, **ok)  # rows not 16-byte aligned
    assert not fp8_tma.tma_eligible(8192, 1152, 1152, 1160, 0, **ok)  # padded row stride not aligned
    assert not fp8_tma.tma_eligible(8192, 1152, 1152, 1152, 8, **ok)  # base not aligned
    assert not fp8_tma.tma_eligible(8192, 1152, 1152, 1152, 0, has_tma=True, capability=(8, 0))  # Ampere
    assert not fp8_tma.tma_eligible(8192, 1152, 1152, 1152, 0, has_tma=True, capability=None)  # not CUDA
    assert not fp8_tma.tma_eligible(8192, 1152, 1152, 1152, 0, has_tma=False, capability=(9, 0))  # Triton < 3.4


def test_use_tma_is_off_for_float_inputs_and_off_cuda():
    w = torch.empty(1152, 1152, dtype=FP8)
    assert not fp8_tma.use_tma(torch.empty(8192, 1152, dtype=FP8), w)  # CPU (and the interpreter)
    assert not fp8_tma.use_tma(torch.empty(8192, 1152, dtype=torch.bfloat16), w)


def test_tma_table_has_no_config_that_was_wrong_in_the_sweep():
    """The sweep's wrong configs (bf16 input, 128x256x128 s3 w8 without FLATTEN) stay out; all use FLATTEN."""
    for c in fp8_tma.PROD_CONFIGS:
        assert c.kwargs["FLATTEN"] is True
    rows = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_stages, c.num_warps) for c in fp8_tma.PROD_CONFIGS]
    assert (128, 256, 128, 3, 8) not in rows


def test_eager_call_only_for_plain_tensors_outside_tracing():
    assert _common.eager_call(torch.empty(2, 2))
    with FakeTensorMode():
        assert not _common.eager_call(torch.empty(2, 2))
    seen = []
    make_fx(lambda t: seen.append(_common.eager_call(t)) or t * 2)(torch.empty(2, 2))
    assert seen == [False]


# --- launches in the interpreter ----------------------------------------------------------------
@needs_kernels
def test_direct_launcher_resolves_the_config_once(monkeypatch):
    x, w, ws, s, ref = _fp8_case(24, 64, 32)
    launcher = _common.direct(fp8_linear.__globals__["_small"])
    assert launcher is _common.direct(fp8_linear.__globals__["_small"])  # one per kernel
    launcher._resolved.clear()
    calls = []
    real = launcher.autotuner.run
    monkeypatch.setattr(launcher.autotuner, "run", lambda *a, **k: calls.append(1) or real(*a, **k))
    outs = [fp8_linear(x, w, ws, None, s) for _ in range(3)]
    assert len(calls) == 1 and len(launcher._resolved) == 1  # the autotuner ran for the first launch only
    for out in outs:
        assert torch.equal(out, outs[0]) and sqnr_db(ref, out) > 40


@needs_kernels
def test_eager_wrapper_and_the_op_agree():
    x, w, ws, s, _ = _fp8_case(19, 96, 40)
    xq = quantize_input_fp8(x, s)
    direct = fp8_linear_prequant(xq, w, ws, None, s, torch.float32)
    via_op = torch.ops.qdiff.fp8_linear_prequant(xq, w, ws, None, s.float(), 0, torch.float32, None)
    assert torch.equal(direct, via_op)
    assert torch.equal(fp8_linear(x, w, ws, None, s), torch.ops.qdiff.fp8_linear(x, w, ws, None, s.float(), None, 0, None))


@needs_kernels
def test_split_ops_eager_and_through_the_ops_and_traced():
    """Split ops (``splits``): the eager wrappers and the triton_ops agree, and the ops trace (fake implementations
    with the extra argument), for the three kernels with a split path."""
    from qcompile.lowering.kernels import conv2d_w8a8, int8_linear

    splits = (0, 20, 48)
    x = randn(5, 48)
    q8 = quantize_weight(torch.randn(16, 48), "fp8_e4m3", "linear", clip_search=False, splits=splits)
    w8, ws8 = q8.data.to(DEVICE).view(FP8), q8.scale.to(DEVICE)
    s = torch.tensor([0.01, 0.02], device=DEVICE)
    direct = fp8_linear(x, w8, ws8, None, s, splits=splits)
    assert torch.equal(direct, torch.ops.qdiff.fp8_linear(x, w8, ws8, None, s, None, 0, None, list(splits)))
    qi = quantize_weight(torch.randn(16, 48), "int8", "linear", clip_search=False, splits=splits)
    wi, wsi = qi.data.to(DEVICE), qi.scale.to(DEVICE)
    zp = torch.tensor([3, -5], dtype=torch.int32, device=DEVICE)
    direct = int8_linear(x, wi, wsi, None, s, zp, splits=splits)
    colsum = torch.stack([wi[:, :20].sum(1, dtype=torch.int32), wi[:, 20:].sum(1, dtype=torch.int32)], 1)
    assert torch.equal(direct, torch.ops.qdiff.int8_linear(x, wi, wsi, colsum, None, s, zp, None, 0, list(splits)))
    xc = randn(1, 48, 3, 4)
    qc = quantize_weight(torch.randn(16, 48, 3, 3), "int8", "conv", clip_search=False, splits=splits)
    out = conv2d_w8a8(xc, qc.data.to(DEVICE), qc.scale.to(DEVICE), None, s, zp, weight_shape=qc.shape, stride=(1, 1), padding=(1, 1),
                      dilation=(1, 1), splits=splits)
    assert out.shape == (1, 16, 3, 4)
    graph = make_fx(lambda x, w, ws, s: fp8_linear(x, w, ws, None, s, splits=splits), tracing_mode="fake")(x, w8, ws8, s)
    assert any("qdiff.fp8_linear" in str(n.target) for n in graph.graph.nodes)
    conv = lambda x, w, ws, s, zp: conv2d_w8a8(x, w, ws, None, s, zp, weight_shape=qc.shape, stride=(1, 1),  # noqa: E731
                                               padding=(1, 1), dilation=(1, 1), splits=splits)
    graph = make_fx(conv, tracing_mode="fake")(xc, qc.data.to(DEVICE), qc.scale.to(DEVICE), s, zp)
    assert any("qdiff.conv2d_w8a8" in str(n.target) for n in graph.graph.nodes)


@needs_kernels
@pytest.mark.filterwarnings("ignore:overflow encountered in exp")
@pytest.mark.skipif(not fp8_tma.HAS_TMA, reason="Triton without tensor descriptors")
def test_tma_production_launch_with_fp8_output():
    """The autotuned persistent kernel (interpreter config) with bias, GELU and the fp8-output epilogue."""
    x, w, ws, s, ref = _fp8_case(40, 64, 48)
    bias = randn(48)
    ref = torch.nn.functional.gelu(ref + bias, approximate="tanh")
    s_out, _ = act_qparams(ref, "fp8_e4m3", False)
    xq = quantize_input_fp8(x, s)
    out = torch.empty(40, 48, dtype=FP8, device=DEVICE)
    fp8_tma.launch_autotuned(xq, w, ws, bias, s, out, _common.activation_code("gelu_tanh"), s_out, _common.direct)
    assert (out.float() == quantize_input_fp8(ref, s_out).float()).float().mean() > 0.97
    y = torch.empty(40, 48, dtype=torch.float32, device=DEVICE)
    fp8_tma.launch_autotuned(xq, w, ws, bias, s, y, _common.activation_code("gelu_tanh"), None, _common.direct)
    assert sqnr_db(ref, y) > 40


@needs_kernels
def test_single_feature_inputs_with_any_stride():
    """A (M, 1) input may carry any stride in its size-1 dim (a transposed (1, M) view: the time embedding's
    first linear); the kernels must take it as it is."""
    x, w, ws, s, ref = _fp8_case(24, 1, 16)
    xt = x.reshape(1, 24).t()
    assert xt.stride() == (1, 24)
    assert torch.equal(fp8_linear(xt, w, ws, None, s), fp8_linear(x, w, ws, None, s))
    assert sqnr_db(ref, fp8_linear(xt, w, ws, None, s)) > 40

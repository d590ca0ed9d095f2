"""Placement of fp8 activation quantization: previous epilogue, producer (Inductor-fused) or GEMM prologue."""

import pytest
import torch
import torch.nn.functional as F

import qcompile
from qcompile.backend import build_quantized_graph
from qcompile.lowering import triton_lowering
from qcompile.metrics import sqnr_db
from qcompile.passes.act_quant import bypass_identity_dropouts, place_act_quant
from qcompile.passes.convert import Lowering
from qcompile.passes.fuse_epilogue import fuse_epilogues

TRITON = Lowering(linear=triton_lowering.qlinear, conv=triton_lowering.qconv, linear_fused=triton_lowering.qlinear_fused,
                  aux=triton_lowering.aux_buffers)


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = torch.nn.LayerNorm(16)
        self.fc1 = torch.nn.Linear(16, 32)
        self.fc2 = torch.nn.Linear(32, 16)
        self.proj = torch.nn.Linear(16, 16)
        self.drop = torch.nn.Dropout(0.1)  # identity in eval mode (diffusers' FeedForward has one between fc1 and fc2)

    def forward(self, x):
        h = self.fc2(self.drop(F.gelu(self.fc1(self.norm(x)), approximate="tanh")))  # LayerNorm -> fc1 (+GELU) -> fc2
        a = torch.matmul(torch.softmax(x @ x.transpose(-1, -2), -1), x)  # an extern (matmul) producer
        return h + self.proj(a)


def _graph(preset="w8a8-fp8", lowering=TRITON):
    torch.manual_seed(0)
    model = Block().eval()
    plan = qcompile.calibrate(model, lambda m: [m(torch.randn(2, 8, 16)) for _ in range(3)], qcompile.QuantConfig.preset(preset),
                              progress=False)
    graphs = []

    def grab(gm, example_inputs):
        graphs.append((build_quantized_graph(gm, example_inputs, plan, 0, lowering)[1], list(example_inputs)))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=grab)(torch.randn(2, 8, 16))
    gm, inputs = graphs[0]
    gm, _ = fuse_epilogues(gm, TRITON.linear, TRITON.linear_fused)
    return gm, inputs


def _calls(gm):
    return [n for n in gm.graph.nodes if n.target in (TRITON.linear, TRITON.linear_fused)]


def test_auto_policy_chains_fc1_into_fc2_and_quantizes_in_the_producer_or_prologue():
    gm, inputs = _graph()
    before = gm(*inputs)
    gm, counts = place_act_quant(gm, TRITON.linear, TRITON.linear_fused, policy="auto")
    assert counts == {"epilogue": 1, "producer": 1, "prologue": 1, "identity_dropout_removed": 1}
    assert not any(n.target is F.dropout for n in gm.graph.nodes)
    calls = {n.kwargs.get("act", "none") + ("/out" if n.kwargs.get("out_scale") is not None else ""): n for n in _calls(gm)}
    fc1 = calls["gelu_tanh/out"]
    fc2 = next(iter(fc1.users))
    assert fc2.kwargs["out_dtype"] == torch.float32 and "x_quant" not in fc2.kwargs
    assert fc1.kwargs["x_quant"] == "producer"  # LayerNorm output
    proj = [n for n in _calls(gm) if n not in (fc1, fc2)][0]
    assert proj.kwargs["x_quant"] == "prologue"  # matmul output
    assert sqnr_db(before[0], gm(*inputs)[0]) > 30  # one fewer rounding to float between fc1 and fc2


@pytest.mark.parametrize("policy,expected", [("prologue", {"prologue": 3}), ("producer", {"epilogue": 1, "producer": 2, "identity_dropout_removed": 1})])
def test_fixed_policies(policy, expected):
    gm, inputs = _graph()
    before = gm(*inputs)
    gm, counts = place_act_quant(gm, TRITON.linear, TRITON.linear_fused, policy=policy)
    assert counts == expected
    assert sqnr_db(before[0], gm(*inputs)[0]) > 30


def _extern_then_linear(rows: int, n: int) -> torch.fx.GraphModule:
    """x -> matmul (an extern producer) -> an fp8 linear with ``n`` output features over ``rows`` input rows."""
    g = torch.fx.Graph()
    x = g.placeholder("x")
    x.meta["example_value"] = torch.empty(rows, 64)
    a = g.call_function(torch.matmul, (x, x))
    a.meta["example_value"] = torch.empty(rows, 64)
    lin = g.call_function(TRITON.linear, (a, None, None, None, None, None),
                          {"wfmt": "fp8_e4m3", "afmt": "fp8_e4m3", "weight_shape": (n, 64), "group_size": None})
    g.output(lin)
    return torch.fx.GraphModule(torch.nn.Module(), g)


@pytest.mark.parametrize("rows,n,env,mode", [(8192, 1152, None, "producer"), (8192, 320, None, "prologue"),
                                             (512, 1280, None, "prologue"), (8192, 1152, "off", "prologue"),
                                             (8192, 320, "256", "producer")])
def test_wide_gemms_after_extern_kernels_get_a_quantize_pass(rows, n, env, mode, monkeypatch):
    """After an extern producer (attention, matmul), a GEMM of at least PASS_MIN_N outputs and PASS_MIN_M rows reads
    fp8 written by a separate (Inductor-generated) quantize pass: its prologue would requantize each input tile once
    per output tile (DiT's attention output: 9 times). ``QDIFF_FP8_PASS_MIN_N`` moves the width (``off``: never)."""
    if env is not None:
        monkeypatch.setenv("QDIFF_FP8_PASS_MIN_N", env)
    gm, counts = place_act_quant(_extern_then_linear(rows, n), TRITON.linear, TRITON.linear_fused, policy="auto")
    (lin,) = _calls(gm)
    assert lin.kwargs["x_quant"] == mode and counts["producer_pass"] == (mode == "producer")
    monkeypatch.setenv("QDIFF_FP8_PASS_MIN_N", "wide")
    with pytest.raises(ValueError, match="QDIFF_FP8_PASS_MIN_N must be an integer or 'off'"):
        place_act_quant(_extern_then_linear(rows, n), TRITON.linear, TRITON.linear_fused, policy="auto")


def _extern_cast_linear(cast_to: torch.dtype) -> torch.fx.GraphModule:
    """x (bf16) -> matmul (extern) -> .to(cast_to) -> reshape -> a narrow fp8 linear (SD 1.5's attention output: N = 320)."""
    g = torch.fx.Graph()
    x = g.placeholder("x")
    x.meta["example_value"] = torch.empty(8192, 64, dtype=torch.bfloat16)
    a = g.call_function(torch.matmul, (x, x))
    a.meta["example_value"] = torch.empty(8192, 64, dtype=torch.bfloat16)
    c = g.call_method("to", (a, cast_to))
    c.meta["example_value"] = torch.empty(8192, 64, dtype=cast_to)
    r = g.call_method("reshape", (c, 2, 4096, 64))
    lin = g.call_function(TRITON.linear, (r, None, None, None, None, None),
                          {"wfmt": "fp8_e4m3", "afmt": "fp8_e4m3", "weight_shape": (320, 64), "group_size": None})
    g.output(lin)
    return torch.fx.GraphModule(torch.nn.Module(), g)


@pytest.mark.parametrize("cast_to,env,mode,passes", [(torch.bfloat16, None, "producer", 1), (torch.bfloat16, "off", "prologue", 0),
                                                     (torch.float32, None, "producer", 0), (torch.float32, "off", "producer", 0)])
def test_a_no_op_cast_after_an_extern_kernel_is_seen_through(cast_to, env, mode, passes, monkeypatch):
    """diffusers casts SDPA's output to the query's dtype: a no-op ``.to``, no Inductor kernel to fuse into. The GEMM
    after it keeps the separate quantize pass its measured rows had (now counted as one), ``off`` moves it to the
    prologue; a real cast is a generated producer."""
    if env is not None:
        monkeypatch.setenv("QDIFF_FP8_PASS_MIN_N", env)
    gm, counts = place_act_quant(_extern_cast_linear(cast_to), TRITON.linear, TRITON.linear_fused, policy="auto")
    (lin,) = _calls(gm)
    assert lin.kwargs["x_quant"] == mode and counts["producer_pass"] == passes


def test_only_identity_dropouts_are_removed():
    g = torch.fx.Graph()
    x = g.placeholder("x")
    lin = g.call_function(TRITON.linear, (x,))
    keep = [g.call_function(F.dropout, (lin, 0.1, True, False)), g.call_function(F.dropout, (lin, 0.1)),
            g.call_function(F.dropout, (x, 0.1, False, False))]  # training; training by default; not after a lowering call
    drop = [g.call_function(F.dropout, (lin, 0.1, False, False)), g.call_function(F.dropout, (lin,), {"p": 0.0}),
            g.call_function(torch.dropout, (lin, 0.5, False))]
    g.output(tuple(keep + drop))
    gm = torch.fx.GraphModule(torch.nn.Module(), g)
    assert bypass_identity_dropouts(gm, {TRITON.linear}) == 3
    left = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in (F.dropout, torch.dropout)]
    assert left == keep and list(gm.graph.nodes)[-1].args[0][3:] == (lin, lin, lin)


def test_unknown_policy_is_refused(monkeypatch):
    gm, _ = _graph()
    monkeypatch.setenv("QDIFF_FP8_ACT_QUANT", "fast")
    with pytest.raises(ValueError, match="QDIFF_FP8_ACT_QUANT"):
        place_act_quant(gm, TRITON.linear, TRITON.linear_fused)


def test_int8_weight_column_sums_are_conversion_time_buffers():
    gm, inputs = _graph("w8a8-int8")
    calls = _calls(gm)
    assert calls and all(n.kwargs["colsum"].op == "get_attr" for n in calls if n.kwargs.get("asym"))
    assert any(n.kwargs.get("asym") for n in calls)
    for n in calls:
        if "colsum" in n.kwargs:
            w = getattr(gm, n.args[1].target)
            assert torch.equal(getattr(gm, n.kwargs["colsum"].target), w.sum(dim=1, dtype=torch.int32))
    ref_gm, _ = _graph("w8a8-int8", Lowering())
    assert sqnr_db(ref_gm(*inputs)[0], gm(*inputs)[0]) > 35


def test_attention_fp8_output_is_on_by_default(monkeypatch):
    """``QDIFF_ATTN_FP8_OUT`` defaults to 1 (timed faster on an H200, 2026-12-03); 0 turns attention's fp8 epilogue off."""
    from qcompile.passes.act_quant import ATTN_FP8_OUT_ENV, attention_fp8_out_from_env

    monkeypatch.delenv(ATTN_FP8_OUT_ENV, raising=False)
    assert attention_fp8_out_from_env()
    monkeypatch.setenv(ATTN_FP8_OUT_ENV, "0")
    assert not attention_fp8_out_from_env()

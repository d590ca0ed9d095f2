"""Epilogue fusion: act(qlinear(x)) becomes one fused call, with the same result."""

import pytest
import torch

import qcompile
from qcompile.backend import build_quantized_graph, choose_lowering
from qcompile.errors import ConfigError
from qcompile.lowering import reference, triton_lowering
from qcompile.metrics import sqnr_db
from qcompile.passes.convert import Lowering
from qcompile.passes.fuse_epilogue import activation_of, fuse_epilogues


class FeedForward(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(16, 32)
        self.emb = torch.nn.Linear(16, 16)
        self.down = torch.nn.Linear(32, 16)

    def forward(self, x, t):
        h = torch.nn.functional.gelu(self.up(x), approximate="tanh")  # fusable
        e = torch.nn.functional.silu(self.emb(x))  # fusable
        g = torch.nn.functional.gelu(self.down(h))  # exact gelu: not fused
        return g + e * t


def _captured(model, args, plan):
    graphs = []

    def grab(gm, example_inputs):
        graphs.append((build_quantized_graph(gm, example_inputs, plan, 0, Lowering())[1], list(example_inputs)))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=grab)(*args)
    return graphs[0]


def test_fuses_silu_and_tanh_gelu_only_and_keeps_the_result():
    torch.manual_seed(0)
    model = FeedForward().eval()
    x, t = torch.randn(4, 16), torch.tensor(0.5)
    plan = qcompile.calibrate(model, lambda m: [m(torch.randn(4, 16), t) for _ in range(3)], qcompile.QuantConfig.preset("w8a8-int8"), progress=False)
    gm, inputs = _captured(model, (x, t), plan)
    before = gm(*inputs)
    gm, count = fuse_epilogues(gm, reference.qlinear, triton_lowering.qlinear_fused)
    assert count == 2
    fused = [n for n in gm.graph.nodes if n.target is triton_lowering.qlinear_fused]
    assert sorted(n.kwargs["act"] for n in fused) == ["gelu_tanh", "silu"]
    assert sum(1 for n in gm.graph.nodes if n.target is reference.qlinear) == 1  # the exact-gelu one
    if triton_lowering.kernels_usable_on(torch.device("cpu")):  # the kernel tests' interpreter mode is on
        assert sqnr_db(before[0], gm(*inputs)[0]) > 40
    else:  # the fused call falls back to the reference + activation: bit-identical
        torch.testing.assert_close(gm(*inputs), before, rtol=0, atol=0)


def test_activation_of_rejects_other_ops():
    g = torch.fx.Graph()
    x = g.placeholder("x")
    assert activation_of(g.call_function(torch.nn.functional.silu, (x,))) == "silu"
    assert activation_of(g.call_function(torch.nn.functional.gelu, (x,), {"approximate": "tanh"})) == "gelu_tanh"
    assert activation_of(g.call_function(torch.nn.functional.gelu, (x,))) is None
    assert activation_of(g.call_function(torch.nn.functional.relu, (x,))) is None
    assert activation_of(g.call_function(torch.nn.functional.silu, (x,), {"inplace": True})) is None


def test_lowering_choice():
    assert choose_lowering("auto", torch.device("cpu"))[0] == "reference"
    assert choose_lowering("reference", torch.device("cpu"))[0] == "reference"
    name, _ = choose_lowering("triton", torch.device("cpu")) if triton_lowering.kernels_usable_on(torch.device("cpu")) else ("skip", None)
    if name == "skip":
        with pytest.raises(ConfigError, match="needs CUDA inputs"):
            choose_lowering("triton", torch.device("cpu"))


def test_unknown_lowering_option_is_refused():
    model = FeedForward().eval()
    t = torch.tensor(0.5)
    plan = qcompile.calibrate(model, lambda m: m(torch.randn(4, 16), t), qcompile.QuantConfig.preset("w8a8-int8"), progress=False)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="lowering"):
        torch.compile(model, backend="qdiff", options={"plan": plan, "lowering": "fast"})(torch.randn(4, 16), t)

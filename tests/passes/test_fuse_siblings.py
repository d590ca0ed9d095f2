"""Sibling fusion: quantized linears reading the same input node become one GEMM, with the same result."""

import copy
import operator

import pytest
import torch

import qcompile
from qcompile import QuantConfig
from qcompile.backend import build_quantized_graph
from qcompile.lowering import reference, triton_lowering
from qcompile.passes.convert import Lowering
from qcompile.passes.fuse_siblings import SIBLINGS_KEY, enabled_from_env, fuse_siblings, weight_names
from tests.models.test_diffusers_models import trajectory, with_timestep
from tests.tiny_models import tiny_dit

TRITON = Lowering(linear=triton_lowering.qlinear, conv=triton_lowering.qconv, linear_fused=triton_lowering.qlinear_fused,
                  aux=triton_lowering.aux_buffers)
PRESETS = ("w8a8-fp8", "w8a8-int8")


class QKV(torch.nn.Module):
    """q / k / v on one normalized input, ``o`` on another node (must not join them)."""

    def __init__(self, bias=False):
        super().__init__()
        self.norm = torch.nn.LayerNorm(32)
        self.q = torch.nn.Linear(32, 32, bias=bias)
        self.k = torch.nn.Linear(32, 32, bias=bias)
        self.v = torch.nn.Linear(32, 48, bias=bias)
        self.o = torch.nn.Linear(32, 32, bias=bias)

    def forward(self, x):
        h = self.norm(x)
        q, k, v = self.q(h), self.k(h), self.v(h)
        a = torch.softmax(q @ k.transpose(-1, -2), -1) @ v[..., :32]
        return self.o(a).view(-1, 32) + v.view(-1, 48)[:, 16:]  # views of a fused output's columns


def calibrated(model, preset):
    cfg = QuantConfig.preset(preset).replace(first_last="quantize")
    return qcompile.calibrate(model, lambda m: [m(torch.randn(2, 8, 32)) for _ in range(3)], cfg, progress=False)


def converted(model, plan, args, lowering=Lowering()):
    """(converted graph, its example inputs) of ``model`` captured by Dynamo."""
    graphs = []

    def grab(gm, example_inputs):
        graphs.append((build_quantized_graph(gm, example_inputs, plan, 0, lowering)[1], list(example_inputs)))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=grab)(*args)
    return graphs[0]


def calls(gm, fn=reference.qlinear):
    return [n for n in gm.graph.nodes if n.target is fn]


@pytest.mark.parametrize("preset", PRESETS)
def test_qkv_become_one_call_with_the_same_output(preset):
    torch.manual_seed(0)
    model = QKV().eval()
    gm, inputs = converted(model, calibrated(model, preset), (torch.randn(2, 8, 32),))
    before = gm(*inputs)[0]
    buffers = dict(gm.named_buffers())
    gm, count = fuse_siblings(gm, reference.qlinear)
    assert count == 1 and len(calls(gm)) == 2
    fused = next(n for n in calls(gm) if SIBLINGS_KEY in n.meta)
    assert [m.key for m in fused.meta[SIBLINGS_KEY]] == ["q", "k", "v"]
    assert [(m.start, m.stop) for m in fused.meta[SIBLINGS_KEY]] == [(0, 32), (32, 64), (64, 112)]
    assert fused.kwargs["weight_shape"] == (112, 32) and weight_names(fused) == ["q.weight", "k.weight", "v.weight"]
    w = getattr(gm, fused.args[1].target)
    assert w.shape == (112, 32) and w.dtype == buffers[calls(gm)[1].args[1].target].dtype
    left = dict(gm.named_buffers())
    assert len(left) < len(buffers) and sum(t.numel() for t in left.values()) <= sum(t.numel() for t in buffers.values())
    columns = [n for n in gm.graph.nodes if n.target is operator.getitem and n.args[0].target is torch.split]
    assert len(columns) == 3 and "reshape" in [u.target for u in columns[2].users]  # v.view(-1, 48) of a column slice
    assert torch.equal(gm(*inputs)[0], before)  # per-channel math: every column computed as before


def test_asymmetric_int8_column_sums_and_missing_biases_concatenate():
    torch.manual_seed(1)
    model = QKV(bias=True).eval()
    model.v.bias = None  # v without bias: zeros in the fused bias
    plan = calibrated(model, "w8a8-int8")
    gm, inputs = converted(model, plan, (torch.randn(2, 8, 32),), TRITON)
    assert all(n.args[3].op == "get_attr" for n in calls(gm, TRITON.linear) if n.args[3] is not None)  # folded by convert
    assert all(n.kwargs["asym"] and "colsum" in n.kwargs for n in calls(gm, TRITON.linear))
    before = gm(*inputs)[0]
    # each member's bias buffer as convert left it (v: no bias, so its bias correction alone, or none)
    member_bias = {n.meta["qdiff_site"].key: n.args[3] for n in calls(gm, TRITON.linear)}
    member_bias = {k: torch.zeros(48) if b is None else getattr(gm, b.target).clone() for k, b in member_bias.items()}
    gm, count = fuse_siblings(gm, TRITON.linear)
    fused = next(n for n in calls(gm, TRITON.linear) if SIBLINGS_KEY in n.meta)
    colsum, bias = getattr(gm, fused.kwargs["colsum"].target), getattr(gm, fused.args[3].target)
    assert count == 1 and colsum.shape == (112,) and torch.equal(colsum, getattr(gm, fused.args[1].target).sum(1, dtype=torch.int32))
    assert bias.dtype == torch.float32 and torch.equal(bias, torch.cat([member_bias[k] for k in ("q", "k", "v")]))
    torch.testing.assert_close(gm(*inputs)[0], before, rtol=0, atol=0 if not triton_lowering.kernels_usable_on(torch.device("cpu")) else 1e-5)


def test_different_activation_scales_are_not_fused():
    torch.manual_seed(0)
    model = QKV().eval()
    gm, inputs = converted(model, calibrated(model, "w8a8-fp8"), (torch.randn(2, 8, 32),))
    k = next(n for n in calls(gm) if n.meta["qdiff_site"].key == "k")
    getattr(gm, k.args[4].target).mul_(2)  # k's input quantizer differs in value, not in structure
    gm, count = fuse_siblings(gm, reference.qlinear)
    fused = next(n for n in calls(gm) if SIBLINGS_KEY in n.meta)
    assert count == 1 and [m.key for m in fused.meta[SIBLINGS_KEY]] == ["q", "v"] and k in calls(gm)


def test_bias_graph_inputs_are_left_alone(monkeypatch):
    model = QKV(bias=True).eval()
    monkeypatch.setattr("qcompile.backend.parameter_tensors", lambda gm, example_inputs: {})  # convert cannot fold them
    gm, _ = converted(model, calibrated(model, "w8a8-fp8"), (torch.randn(2, 8, 32),))
    assert all(n.args[3].op == "placeholder" for n in calls(gm))  # Dynamo lifts parameters as graph inputs
    code = gm.code
    gm, count = fuse_siblings(gm, reference.qlinear)
    assert count == 0 and gm.code == code


def test_calls_marked_by_later_passes_or_split_are_left_alone():
    model = QKV().eval()
    gm, _ = converted(model, calibrated(model, "w8a8-fp8"), (torch.randn(2, 8, 32),))
    for n in calls(gm)[:2]:
        n.kwargs = {**n.kwargs, "x_quant": "producer"}
    gm, count = fuse_siblings(gm, reference.qlinear)
    assert count == 0
    with pytest.raises(ValueError, match="min_members"):
        fuse_siblings(gm, reference.qlinear, min_members=1)


def _compile(model, plan, monkeypatch, **options):
    """The backend with the Triton lowering's functions (they run the reference where no kernel can run), eager."""
    monkeypatch.setattr("qcompile.backend.choose_lowering", lambda name, device: ("triton", TRITON))
    torch._dynamo.reset()
    return torch.compile(model, backend="qdiff", options={"plan": plan, "inductor": False, **options})


@pytest.mark.parametrize("env,expected", [(None, 1), ("1", 1), ("0", 0)])
def test_backend_fuses_unless_switched_off(env, expected, monkeypatch):
    torch.manual_seed(0)
    model = QKV().eval()
    plan = calibrated(model, "w8a8-fp8")
    x = torch.randn(2, 8, 32)
    if env is None:
        monkeypatch.delenv("QDIFF_FUSE_SIBLINGS", raising=False)
    else:
        monkeypatch.setenv("QDIFF_FUSE_SIBLINGS", env)
    with torch.no_grad():
        out = _compile(model, plan, monkeypatch)(x)
    record = plan.compiled[-1]
    assert record.fused_siblings == expected
    assert len(calls(record.converted, TRITON.linear)) == 4 - 2 * expected
    fused = [n for n in calls(record.converted, TRITON.linear) if SIBLINGS_KEY in n.meta]
    assert all(n.kwargs["x_quant"] == "producer" for n in fused)  # the LayerNorm quantizes once for the one GEMM
    monkeypatch.setenv("QDIFF_FUSE_SIBLINGS", "0")
    with torch.no_grad():
        unfused = _compile(model, plan, monkeypatch)(x)
    assert torch.equal(out, unfused) or triton_lowering.kernels_usable_on(torch.device("cpu"))


def test_bad_switch_value_is_refused(monkeypatch):
    monkeypatch.setenv("QDIFF_FUSE_SIBLINGS", "yes")
    with pytest.raises(ValueError, match="QDIFF_FUSE_SIBLINGS"):
        enabled_from_env()


def test_release_frees_every_member_weight(monkeypatch):
    torch.manual_seed(0)
    model = QKV().eval()
    plan = calibrated(model, "w8a8-fp8")
    x = torch.randn(2, 8, 32)
    with torch.no_grad():
        want = _compile(copy.deepcopy(model), plan, monkeypatch)(x)
        got = _compile(model, plan, monkeypatch, release_float_weights=True)(x)
    assert plan.compiled[-1].fused_siblings == 1
    assert sorted(plan.compiled[-1].released) == ["k.weight", "o.weight", "q.weight", "v.weight"]
    assert model.q.weight.untyped_storage().nbytes() == 0 and torch.equal(got, want)


@pytest.mark.parametrize("preset", PRESETS)
def test_diffusers_dit_attention_qkv_become_one_call(preset):
    case = tiny_dit()
    model = case.model
    cfg = QuantConfig.preset(preset)
    plan = qcompile.calibrate(model, lambda m: trajectory(case, m), cfg, progress=False)
    args, kwargs = with_timestep(case, 500)
    graphs = []

    def grab(gm, example_inputs):
        graphs.append((build_quantized_graph(gm, example_inputs, plan, 0, Lowering())[1], list(example_inputs)))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=grab)(*args, **kwargs)
    gm, inputs = graphs[0]
    layers = len(model.transformer_blocks)
    qkv = [[f"transformer_blocks.{i}.attn1.to_{p}" for p in "qkv"] for i in range(layers)]
    # calibration shares one observer among sites reading the same tensor: q, k and v get one input quantizer
    for keys in qkv:
        assert len({plan.nodes[k].acts[0].scale for k in keys}) == 1
    assert all(n.args[3] is None or n.args[3].op == "get_attr" for n in calls(gm))  # biases folded by convert
    before = gm(*inputs)
    n_calls = len(calls(gm))
    gm, count = fuse_siblings(gm, reference.qlinear)
    groups = [[m.key for m in n.meta[SIBLINGS_KEY]] for n in calls(gm) if SIBLINGS_KEY in n.meta]
    assert count == layers and len(calls(gm)) == n_calls - 2 * layers and groups == qkv
    after = gm(*inputs)
    assert all(torch.equal(a, b) for a, b in zip(after, before))


@pytest.mark.parametrize("group_size", [None, 16, 64])  # (16: two groups per row of K = 32)
def test_int4_weights_fuse_with_per_channel_or_group_scales(group_size):
    from qcompile.config import Format, WeightSpec

    torch.manual_seed(0)
    model = QKV().eval()
    cfg = QuantConfig.preset("w4a16").replace(weight=WeightSpec(Format.INT4, group_size=group_size), first_last="quantize")
    plan = qcompile.calibrate(model, lambda m: [m(torch.randn(2, 8, 32)) for _ in range(3)], cfg, progress=False)
    gm, inputs = converted(model, plan, (torch.randn(2, 8, 32),))
    before = gm(*inputs)[0]
    gm, count = fuse_siblings(gm, reference.qlinear)
    assert count == 1
    assert torch.equal(gm(*inputs)[0], before)  # int4 rows (packed along K) and their groups' scales are output channels

"""The latency guard: per-op timing routes and shapes, and keeping ops slower than bf16 in full precision.

The kernels' timings need a GPU (tests/test_cuda.py); here a scripted timer stands in for the clock."""

import warnings

import pytest
import torch
import torch.nn as nn

import qcompile
from qcompile import QuantConfig
from qcompile.latency import keep_slower_in_float, sibling_groups, time_fp8_ops
from qcompile.plan import QuantPlan


class ConvLinearToy(nn.Module):
    """A 3x3 conv (im2col route), a 1x1 conv (GEMM route) and a linear, timestep-scaled."""

    def __init__(self):
        super().__init__()
        self.c3 = nn.Conv2d(16, 32, 3, padding=1)
        self.c1 = nn.Conv2d(32, 16, 1)
        self.fc = nn.Linear(16 * 4 * 4, 24)

    def forward(self, x, t):
        h = torch.nn.functional.silu(self.c3(x) * (1 + t.reshape(-1, 1, 1, 1)))
        return self.fc(self.c1(h).flatten(1))


@pytest.fixture(scope="module")
def fp8_plan():
    torch.manual_seed(0)
    model = ConvLinearToy().eval()
    x = torch.randn(3, 16, 4, 4)

    def run(m):
        for t in (0.9, 0.5, 0.1):
            m(x, torch.full((3,), t))

    plan = qcompile.calibrate(model, run, QuantConfig.preset("w8a8-fp8").replace(first_last="quantize"), progress=False)
    return model, x, plan


class ScriptedTimer:
    """Returns the next scripted time per call (without running the kernels) and counts the calls."""

    def __init__(self, times):
        self.times, self.calls = list(times), 0

    def __call__(self, fn):
        self.calls += 1
        return self.times.pop(0)


def test_routes_and_times_per_fp8_node(fp8_plan):
    _, _, plan = fp8_plan
    assert sorted(n.key for n in plan.quantized_nodes()) == ["c1", "c3", "fc"]
    # call order follows the plan: per node the quantized path (im2col convs: GEMM, then the column copy), then float
    order = [n.key for n in plan.quantized_nodes()]
    script = {"c3": [10.0, 2.0, 20.0], "c1": [5.0, 4.0], "fc": [3.0, 2.0]}
    timer = ScriptedTimer([v for k in order for v in script[k]])
    timings = {t.key: t for t in time_fp8_ops(plan, "cpu", timer)}
    assert timer.calls == 7 and not timer.times
    assert timings["c3"].route == "im2col conv" and timings["c3"].quantized_us == 12.0 and timings["c3"].float_us == 20.0
    assert timings["c1"].route == "conv 1x1" and timings["c1"].speedup == pytest.approx(0.8)
    assert timings["fc"].route == "linear" and timings["fc"].speedup == pytest.approx(2 / 3)


def test_direct_engine_convs_are_timed_on_the_direct_kernel(fp8_plan, monkeypatch):
    """``QDIFF_CONV_ENGINE=direct``: the 3x3 conv is timed as qdiff::conv2d_fp8_prequant alone (no column copy)."""
    _, _, plan = fp8_plan
    monkeypatch.setenv("QDIFF_CONV_ENGINE", "direct")
    order = [n.key for n in plan.quantized_nodes()]
    script = {"c3": [10.0, 20.0], "c1": [5.0, 4.0], "fc": [3.0, 2.0]}
    timer = ScriptedTimer([v for k in order for v in script[k]])
    timings = {t.key: t for t in time_fp8_ops(plan, "cpu", timer)}
    assert {k: t.route for k, t in timings.items()} == {"c3": "direct conv", "c1": "conv 1x1", "fc": "linear"}
    assert timings["c3"].quantized_us == 10.0 and timings["c3"].float_us == 20.0
    assert timer.calls == 6 and not timer.times


@pytest.mark.parametrize("engine,route", [("implicit", None), ("im2col", "im2col conv"), ("auto", "im2col conv")])
def test_the_timed_route_follows_the_conv_engine(fp8_plan, monkeypatch, engine, route):
    """The guard times what the lowering runs: implicit-GEMM convs are not timed; ``auto`` picks per shape (the toy's
    48 output pixels: the column GEMM)."""
    from qcompile.latency import _fp8_route

    monkeypatch.setenv("QDIFF_CONV_ENGINE", engine)
    assert _fp8_route(fp8_plan[2].nodes["c3"]) == route


def test_slower_ops_are_kept_in_float_with_both_times(fp8_plan, tmp_path):
    model, x, plan = fp8_plan
    plan = QuantPlan.load(plan.save(tmp_path / "p.qplan"))  # (a copy: the fixture's plan stays whole)
    order = [n.key for n in plan.quantized_nodes()]
    script = {"c3": [10.0, 2.0, 20.0], "c1": [5.0, 4.0], "fc": [3.0, 2.0]}
    timings = time_fp8_ops(plan, "cpu", ScriptedTimer([v for k in order for v in script[k]]))
    assert keep_slower_in_float(plan, timings, margin=1.3) == ["fc"]  # c1: 1.25x slower, within the margin
    assert sorted(n.key for n in plan.quantized_nodes()) == ["c1", "c3"]
    reason = plan.nodes["fc"].reason
    assert reason.startswith("latency: fp8 linear 3.0 us vs bf16 2.0 us")
    # the plan still saves, loads and compiles; the one warning names the op and why
    again = QuantPlan.load(plan.save(tmp_path / "kept.qplan"))
    assert again.nodes["fc"].reason == reason and again.digest() == plan.digest()
    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        out = torch.compile(model, backend="qdiff", options={"plan": again})(x, torch.full((3,), 0.5))
    ours = [str(w.message) for w in caught if "stay in full precision" in str(w.message)]
    assert len(ours) == 1 and "fc: latency: fp8 linear 3.0 us vs bf16 2.0 us" in ours[0]
    assert torch.isfinite(out).all()


class SiblingToy(nn.Module):
    """q / k / v read one LayerNorm output (one sibling group, fused into one GEMM when compiled); o reads another tensor."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(16)
        self.q, self.k, self.v, self.o = (nn.Linear(16, 16) for _ in range(4))

    def forward(self, x):
        h = self.norm(x)
        a = torch.softmax(self.q(h) @ self.k(h).transpose(-1, -2), -1) @ self.v(h)
        return self.o(a)


@pytest.fixture(scope="module")
def sibling_plan(tmp_path_factory):
    torch.manual_seed(0)
    model = SiblingToy().eval()
    x = torch.randn(2, 8, 16)
    cfg = QuantConfig.preset("w8a8-fp8").replace(first_last="quantize")
    plan = qcompile.calibrate(model, lambda m: [m(x * (1 + i)) for i in range(3)], cfg, progress=False)
    assert plan.meta["shared_statistics"] == {"k": "q", "v": "q"}
    return model, x, plan.save(tmp_path_factory.mktemp("siblings") / "p.qplan")


def _sibling_timings(path, script):
    """A fresh copy of the sibling plan and its scripted timings (per linear: quantized, then float; each timed, though
    the four linears share one shape)."""
    plan = QuantPlan.load(path)
    order = [n.key for n in plan.quantized_nodes()]
    timer = ScriptedTimer([v for k in order for v in script[k]])
    timings = time_fp8_ops(plan, "cpu", timer, reuse=False)
    assert not timer.times and [t.route for t in timings] == ["linear"] * 4
    return plan, timings


def test_ops_of_one_shape_are_timed_once(sibling_plan):
    """q / k / v / o share one shape: one quantized and one float timing serve all four (``reuse=False`` times each)."""
    plan = QuantPlan.load(sibling_plan[2])
    timer = ScriptedTimer([4.0, 2.0])
    timings = time_fp8_ops(plan, "cpu", timer)
    assert timer.calls == 2 and [(t.key, t.quantized_us, t.float_us) for t in timings] == [(k, 4.0, 2.0) for k in "qkvo"]
    timer = ScriptedTimer([1.0] * 8)
    assert len(time_fp8_ops(plan, "cpu", timer, reuse=False)) == 4 and timer.calls == 8


def test_siblings_are_grouped_by_shared_input(sibling_plan):
    _, _, path = sibling_plan
    plan, timings = _sibling_timings(path, {k: [1.0, 1.0] for k in "qkvo"})
    assert [[t.key for t in g] for g in sibling_groups(plan, timings)] == [["q", "k", "v"], ["o"]]


def test_a_group_faster_in_sum_stays_quantized_whole_and_a_lone_op_is_decided_alone(sibling_plan):
    _, _, path = sibling_plan
    # q alone is slower quantized (5 vs 4 us), the group is faster (9 vs 12 us); o, alone, is slower (3 vs 2 us)
    plan, timings = _sibling_timings(path, {"q": [5.0, 4.0], "k": [2.0, 4.0], "v": [2.0, 4.0], "o": [3.0, 2.0]})
    assert keep_slower_in_float(plan, timings) == ["o"]
    assert sorted(n.key for n in plan.quantized_nodes()) == ["k", "q", "v"]
    assert plan.nodes["o"].reason.startswith("latency: fp8 linear 3.0 us vs bf16 2.0 us at this shape")


def test_a_group_slower_in_sum_is_kept_in_float_whole_with_both_sums(sibling_plan):
    model, x, path = sibling_plan
    # v alone is faster quantized (3 vs 4 us), the group is slower (12 vs 10 us); o is faster
    plan, timings = _sibling_timings(path, {"q": [5.0, 3.0], "k": [4.0, 3.0], "v": [3.0, 4.0], "o": [1.0, 2.0]})
    assert keep_slower_in_float(plan, timings) == ["q", "k", "v"]
    assert [n.key for n in plan.quantized_nodes()] == ["o"]
    for key, own in (("q", "5.0 vs 3.0"), ("k", "4.0 vs 3.0"), ("v", "3.0 vs 4.0")):
        reason = plan.nodes[key].reason
        assert reason.startswith("latency: sibling group q, k, v (one input, one fused GEMM): fp8 12.0 us vs bf16 10.0 us summed")
        assert f"this op: {own} us" in reason and "margin 1" in reason
    # a margin decides on the sums: 12 <= 1.25 x 10 keeps the group quantized
    plan, timings = _sibling_timings(path, {"q": [5.0, 3.0], "k": [4.0, 3.0], "v": [3.0, 4.0], "o": [1.0, 2.0]})
    assert keep_slower_in_float(plan, timings, margin=1.25) == []
    # the kept group compiles; the one warning names the group for each member
    plan, timings = _sibling_timings(path, {"q": [5.0, 3.0], "k": [4.0, 3.0], "v": [3.0, 4.0], "o": [1.0, 2.0]})
    keep_slower_in_float(plan, timings)
    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        out = torch.compile(model, backend="qdiff", options={"plan": plan})(x)
    ours = [str(w.message) for w in caught if "stay in full precision" in str(w.message)]
    assert len(ours) == 1 and all(f"{k}: latency: sibling group q, k, v" in ours[0] for k in "qkv")
    assert torch.isfinite(out).all()


def test_only_single_group_plans_without_allocation_are_timed(fp8_plan):
    model, x, _ = fp8_plan

    def run(m):
        for t in (0.9, 0.5, 0.1):
            m(x, torch.full((3,), t))

    grouped = qcompile.calibrate(model, run, QuantConfig.preset("w8a8-fp8").replace(timestep_groups=2), progress=False)
    with pytest.raises(ValueError, match="single-group plans"):
        time_fp8_ops(grouped, "cpu", ScriptedTimer([]))
    with pytest.raises(ValueError, match="margin must be positive"):
        keep_slower_in_float(grouped, [], margin=0)


def test_the_real_timer_needs_a_gpu(fp8_plan):
    with pytest.raises(RuntimeError, match="GPU"):
        time_fp8_ops(fp8_plan[2], "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_real_timings_on_the_gpu():
    """The CUDA-graph timer on SD-like shapes: every fp8 node timed, finite positive times, margins decide."""
    from qcompile.latency import cuda_graph_timer, time_node

    torch.manual_seed(0)
    model = ConvLinearToy().eval().to("cuda", torch.bfloat16)
    x = torch.randn(3, 16, 4, 4, device="cuda", dtype=torch.bfloat16)

    def run(m):
        for t in (0.9, 0.5, 0.1):
            m(x, torch.full((3,), t, device="cuda", dtype=torch.bfloat16))

    plan = qcompile.calibrate(model, run, QuantConfig.preset("w8a8-fp8").replace(first_last="quantize"), progress=False)
    timings = time_fp8_ops(plan, "cuda")
    assert {t.key: t.route for t in timings} == {"c3": "im2col conv", "c1": "conv 1x1", "fc": "linear"}
    with pytest.MonkeyPatch.context() as mp:  # the direct engine's kernel, timed at the same shape
        mp.setenv("QDIFF_CONV_ENGINE", "direct")
        direct = time_node(plan.nodes["c3"], torch.device("cuda"))
    assert direct.route == "direct conv" and 0 < direct.quantized_us < 1e4, direct
    assert all(0 < t.quantized_us < 1e4 and 0 < t.float_us < 1e4 for t in timings), timings
    print({t.key: (round(t.quantized_us, 1), round(t.float_us, 1)) for t in timings})
    assert keep_slower_in_float(plan, timings, margin=1e9) == []
    # an SD 1.5 attention projection at 64x64 (M = 8192, K = N = 320): printed for the record
    node = plan.nodes["fc"]
    big = type(node)(**{**node.__dict__, "input_shape": (8192, 320), "weight_shape": (320, 320)})
    print("SD to_q 8192x320x320:", time_node(big, torch.device("cuda"), cuda_graph_timer))

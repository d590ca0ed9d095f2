"""Per-timestep-group bit allocation (temporal mixed precision), per-group weights in plans, INT5."""

import copy
import dataclasses
import json

import pytest
import torch

import qcompile
from qcompile import AllocationSpec, PlanFileError, QuantConfig, QuantPlan
from qcompile.lowering.formats import int_range
from qcompile.lowering.reference import qlinear
from qcompile.lowering.weights import quantize_weight
from qcompile.passes.allocate import brute_force_allocate, exact_allocate, lagrangian_allocate
from qcompile.rdreport import bits_matrix, plot_bits_per_layer
from qcompile.sensitivity import calibrate_with_allocator
from tests.toy_models import ConvTransformerToy, TinyMLP, run_steps

NOBF16 = ("int4", "int4g32", "int5", "int6", "int8", "fp8_e4m3")


@pytest.fixture(scope="module")
def grouped():
    torch.manual_seed(0)
    model = ConvTransformerToy().eval()
    x = torch.randn(2, 1, 16, 16)
    spec = AllocationSpec(candidates=NOBF16, calls_per_group=2, per_group=True)
    cfg = QuantConfig.preset("w4a8").replace(weight_bit_budget=5.0, timestep_groups=3, allocation=spec)
    torch._dynamo.reset()
    plan, allocator = calibrate_with_allocator(model, lambda m: run_steps(m, x, 9), cfg, progress=False)
    yield model, plan, allocator
    allocator.close()


def _shared_tables(allocator):
    """The same measured tables, allocated with one choice per node for all groups."""
    saved = allocator.spec
    allocator.spec = dataclasses.replace(saved, per_group=False)
    try:
        return allocator.rd_tables(allocator.tables)
    finally:
        allocator.spec = saved


def test_per_group_allocation_meets_budget_and_beats_shared(grouped):
    _, plan, allocator = grouped
    rec = plan.allocation
    assert rec.per_group and len(rec.group_weights) == 3 and abs(sum(rec.group_weights) - 1) < 1e-9
    assert rec.average_bits <= 5.0 + 1e-9 and rec.average_bits > 4.5
    for key, entry in rec.nodes.items():  # every (node, group) pair got a choice; bits are their call-weighted mean
        assert len(entry["choice"]) == 3
        assert entry["bits"] == pytest.approx(sum(w * qcompile.config.CANDIDATE_BITS[c] for w, c in zip(rec.group_weights, entry["choice"])))
    budget = 5.0 * allocator.total_params
    per_group = allocator.rd_tables(allocator.tables)
    assert len(per_group) == 3 * len(allocator.candidates) and all("@" in t.key for t in per_group)
    shared = lagrangian_allocate(_shared_tables(allocator), budget)
    assert rec.predicted <= shared.distortion * (1 + 1e-9)
    # the exact optima order the same way: per-group choices include every shared choice
    unit = budget / 4000
    assert exact_allocate(per_group, budget, unit).distortion <= exact_allocate(_shared_tables(allocator), budget, unit).distortion * (1 + 1e-9)
    # the plan records the DP gap check, and the Lagrangian is within 5% of the DP optimum on the toy
    assert rec.solver["exact_dp_distortion"] <= rec.predicted * (1 + 1e-6) and rec.predicted <= 1.05 * rec.solver["exact_dp_distortion"]


def test_lagrangian_is_exact_at_its_own_rate_on_group_tables(grouped):
    _, _, allocator = grouped
    tables = allocator.rd_tables(allocator.tables)[:7]  # a small slice: brute force over 6^7 combinations
    for frac in (0.3, 0.6):
        lo, hi = sum(min(t.rates) for t in tables), sum(max(t.rates) for t in tables)
        lag = lagrangian_allocate(tables, lo + frac * (hi - lo), fill=False)
        exact = brute_force_allocate(tables, lag.rate)
        assert lag.distortion == pytest.approx(exact.distortion, rel=1e-9)


def test_measured_mixed_plan_uses_each_groups_choice(grouped):
    _, plan, allocator = grouped
    rec = plan.allocation
    differs = [k for k, e in rec.nodes.items() if len(set(e["choice"])) > 1]
    choices = {k: rec.group_choices(k) for k in rec.nodes}
    assert allocator.measure_choice(choices) == pytest.approx(rec.measured, rel=1e-9)
    for key in differs:  # the plan's node holds each group's own weight, shared between groups of one format
        node = plan.nodes[key]
        labels = [None if w is None else qcompile.plan.weight_label(w) for w in node.group_weights]
        for g, c in enumerate(choices[key]):
            assert qcompile.config.candidate_holds(c, node.group_weights[g].fmt, node.group_weights[g].group_size)
        for g, h in [(g, h) for g in range(3) for h in range(3) if labels[g] == labels[h]]:
            assert node.group_weights[g] is node.group_weights[h]


def test_per_group_plan_roundtrip_and_validation(grouped, tmp_path):
    from tests.test_plan import _rewrite

    _, plan, _ = grouped
    path = plan.save(tmp_path / "groups.qplan")
    loaded = QuantPlan.load(path)
    assert loaded.digest() == plan.digest() and loaded.allocation == plan.allocation
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        names = set(f.keys())
    for key, node in plan.nodes.items():
        if node.group_weights is None:
            continue
        stored = {n for n in names if n.startswith(f"nodes/{key}/weight@")}
        assert stored == {f"nodes/{key}/weight@{lb}" for lb in node.stored_weights()}  # one tensor per format, not per group
        assert f"nodes/{key}/weight" not in names
        for g in range(3):
            assert torch.equal(loaded.nodes[key].weight_for(g).data, node.weight_for(g).data)
    key = next(k for k, e in plan.allocation.nodes.items() if len(set(e["choice"])) > 1)

    def lie(doc, tensors):
        entry = doc["allocation"]["nodes"][key]
        entry["choice"] = [entry["choice"][1], entry["choice"][0], entry["choice"][2]] if entry["choice"][0] != entry["choice"][1] else entry["choice"][::-1]
    _rewrite(path, lie)
    with pytest.raises(PlanFileError, match=f"node '{key}' holds .* weight in group . but its bit allocation chose"):
        QuantPlan.load(path)
    path = plan.save(tmp_path / "groups2.qplan")

    def missing(doc, tensors):
        nd = next(n for n in doc["nodes"] if n["key"] == key)
        nd["group_weights"][0] = "int8" if nd["group_weights"][0] != "int8" else "int6"
    _rewrite(path, missing)
    with pytest.raises(PlanFileError, match=f"node '{key}' stores weights"):
        QuantPlan.load(path)


def test_inspect_and_heatmap_show_bits_per_group(grouped, tmp_path):
    _, plan, _ = grouped
    keys, choices = bits_matrix(plan)
    assert keys == [k for k in plan.nodes if k in plan.allocation.nodes] and all(len(c) == 3 for c in choices)
    text = str(qcompile.inspect(plan))
    assert "weight bits per op per timestep group" in text and "g2" in text
    assert plot_bits_per_layer(plan, tmp_path / "heat.png").stat().st_size > 2000


def test_int5_weights_reference_numerics():
    torch.manual_seed(0)
    w = torch.randn(24, 40)
    qw = quantize_weight(w, "int5", "linear", clip_search=False)
    assert qw.data.dtype == torch.int8 and int_range("int5", True) == (-16, 15)
    assert int(qw.data.min()) >= -16 and int(qw.data.max()) <= 15 and int(qw.data.max()) == 15  # per-channel absmax maps to 15
    scale = qw.scale  # (24, 1)
    assert torch.equal(qw.dequantize(), qw.data.float() * scale)  # exact: integer times scale
    assert float((qw.dequantize() - w).abs().max()) <= float(scale.max()) / 2 + 1e-7
    errs = {f: float((quantize_weight(w, f, "linear", clip_search=False).dequantize() - w).pow(2).mean()) for f in ("int5", "int6")}
    err4 = float((quantize_weight(w, "int4", "linear", clip_search=False).dequantize() - w).pow(2).mean())
    assert err4 > errs["int5"] > errs["int6"] and 2.5 < errs["int5"] / errs["int6"] < 6  # one bit: ~4x the error
    x = torch.randn(5, 40)
    y = qlinear(x, qw.data, qw.scale, None, None, None, wfmt="int5", group_size=None, weight_shape=(24, 40))
    assert torch.equal(y, torch.nn.functional.linear(x, qw.data.float() * scale))


def test_dispatch_picks_each_groups_weight(tmp_path):
    torch.manual_seed(1)
    model = TinyMLP().eval()
    x = torch.randn(8, 16)
    steps = (0.9, 0.7, 0.3, 0.1)
    cfg = QuantConfig.preset("w4a8").replace(first_last="quantize", timestep_groups=2)
    plan = qcompile.calibrate(model, lambda m: [m(x, torch.full((8,), t)) for t in steps], cfg, progress=False)
    node = plan.nodes["b"]
    w8 = quantize_weight(model.b.weight, "int8", "linear")
    mixed = copy.copy(plan)
    mixed.nodes = {**plan.nodes, "b": dataclasses.replace(node, group_weights=[node.weight, w8])}
    only8 = copy.copy(plan)
    only8.nodes = {**plan.nodes, "b": dataclasses.replace(node, weight=w8)}
    mixed = QuantPlan.load(mixed.save(tmp_path / "mixed.qplan"))  # through the file: weight@int4g64, weight@int8
    group_of = {t: plan.groups.group_of(t) for t in steps}
    assert set(group_of.values()) == {0, 1}
    refs = {}
    for t, g in group_of.items():
        torch._dynamo.reset()
        single = torch.compile(model, backend="qdiff", options={"plan": plan if g == 0 else only8, "group": g})
        with torch.no_grad():
            refs[t] = single(x, torch.full((8,), t))
    torch._dynamo.reset()
    qm = qcompile.compile(model, mixed, inductor=False)
    with torch.no_grad():
        for t in steps:  # warm-up over both groups, then no recompiles
            qm(x, torch.full((8,), t))
        with torch.compiler.set_stance("fail_on_recompile"):
            for t, g in group_of.items():
                assert torch.equal(qm(x, torch.full((8,), t)), refs[t]), (t, g)
    doc = json.loads(json.dumps(mixed.nodes["b"]._json()))
    assert doc["group_weights"] == ["int4g64", "int8"] and sorted(doc["weights"]) == ["int4g64", "int8"]

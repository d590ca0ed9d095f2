import math

import pytest
import torch

import qcompile
from qcompile import AllocationSpec, CalibrationError, ConfigError, PlanFileError, QuantConfig, QuantPlan
from qcompile.plan import NodePlan
from qcompile.rdreport import pearson, plot_bits_per_layer, spearman
from qcompile.sensitivity import CallSample, calibrate_with_allocator, nmse
from qcompile.timesteps import TimestepGroups
from tests.toy_models import ConvTransformerToy, TinyMLP, run_steps


@pytest.fixture(scope="module")
def toy():
    torch.manual_seed(0)
    model = ConvTransformerToy().eval()
    x = torch.randn(2, 1, 16, 16)
    cfg = QuantConfig.preset("w4a8").replace(weight_bit_budget=5.0, allocation=AllocationSpec(calls_per_group=2))
    plan, allocator = calibrate_with_allocator(model, lambda m: run_steps(m, x), cfg, progress=False)
    yield model, plan, allocator
    allocator.close()


def _only(plan: QuantPlan, key: str, node: NodePlan) -> QuantPlan:
    """A copy of ``plan`` with every node in full precision except ``key``, which becomes ``node``."""
    nodes = {}
    for k, n in plan.nodes.items():
        nodes[k] = node if k == key else NodePlan(
            n.key, n.kind, n.weight_name, n.weight_shape, n.conv_args, None, [None] * plan.groups.count, "test: float",
        )
    return QuantPlan(plan.config, nodes, plan.groups, plan.subgraphs, plan.model_class)


def test_measured_distortion_is_exactly_the_single_node_plan_output_error(toy):
    model, plan, allocator = toy
    for key, cand in [("enc.linear1", "int4"), ("head", "int6"), ("unpatch", "fp8_e4m3")]:
        single = _only(plan, key, allocator.plans[key][cand])
        torch._dynamo.reset()
        qmodel = torch.compile(model, backend="qdiff", options={"plan": single})
        with torch.no_grad():
            errs = [nmse(model(*a, **k), qmodel(*a, **k)) for a, k in allocator.model.calls[0]]
        assert math.isclose(sum(errs) / len(errs), allocator.tables[key][cand][0], rel_tol=1e-5), (key, cand)


def test_allocation_meets_budget_and_records_tables(toy):
    _, plan, allocator = toy
    rec = plan.allocation
    assert rec is not None and rec.estimator == "measured" and rec.budget_bits == 5.0
    assert 4.0 < rec.average_bits <= 5.0
    assert {n["choice"] for n in rec.nodes.values()} >= {"int4"} and len({n["choice"] for n in rec.nodes.values()}) >= 2
    for key, entry in rec.nodes.items():
        node = plan.nodes[key]
        assert (node.weight.fmt if node.quantized else "bf16") == entry["choice"]
        assert entry["distortion"]["bf16"] == [0.0]
    # the first and last op (first_last='8bit') only got >= 8-bit candidates
    assert set(rec.nodes["patch"]["distortion"]) == {"int8", "fp8_e4m3", "bf16"}
    # cost: one forward per (node, quantized candidate, kept call), plus references and the final check
    quantized_cands = sum(len([c for c in d["distortion"] if c != "bf16"]) for d in rec.nodes.values())
    assert rec.forward_passes == (quantized_cands + 2) * sum(rec.calls)
    assert rec.predicted > 0 and rec.measured > 0


def test_additivity_holds_roughly_on_the_toy(toy):
    _, _, allocator = toy
    rd = allocator.rd_tables(allocator.tables)
    for cand in ("int4", "int8"):
        choice = {t.key: (cand if cand in t.options else "int8") for t in rd}
        predicted = sum(t.distortions[t.options.index(choice[t.key])] for t in rd)
        measured = allocator.measure_choice(choice)
        assert 0.6 < measured / predicted < 1.5, (cand, predicted, measured)


def test_mixed_plan_roundtrips_compiles_and_inspects(toy, tmp_path):
    model, plan, _ = toy
    loaded = QuantPlan.load(plan.save(tmp_path / "mixed.qplan"))
    assert loaded.digest() == plan.digest() and loaded.allocation == plan.allocation
    fmts = {n.weight.fmt for n in loaded.quantized_nodes()}
    assert len(fmts) >= 2
    torch._dynamo.reset()
    qmodel = torch.compile(model, backend="qdiff", options={"plan": loaded})
    x = torch.randn(2, 1, 16, 16)
    t = torch.full((2,), 0.5)
    with torch.no_grad():
        assert qcompile.metrics.sqnr_db(model(x, t), qmodel(x, t)) > 20
    text = str(qcompile.inspect(loaded))
    assert "bit allocation (measured)" in text and "w bits" in text


def test_allocation_record_is_validated_on_load(toy, tmp_path):
    from tests.test_plan import _rewrite

    _, plan, _ = toy
    path = plan.save(tmp_path / "m.qplan")
    key = next(k for k, n in plan.allocation.nodes.items() if n["choice"] == "int4")

    def lie(doc, tensors):
        doc["allocation"]["nodes"][key]["choice"] = "int8"
    _rewrite(path, lie)
    with pytest.raises(PlanFileError, match=f"node '{key}' holds int4g64 weight in group 0 but its bit allocation chose int8"):
        QuantPlan.load(path)


def test_fisher_estimate_ranks_like_the_measurement(toy, tmp_path):
    _, plan, allocator = toy
    allocator.model.distortions()  # (re)captures the graph if an earlier test reset Dynamo
    switches = sum(map(len, allocator.model.switches.values()))
    fisher = allocator.fisher()
    # the same captured graphs as the measurement (grad is enabled inside them): no second capture, every node estimated
    assert sum(map(len, allocator.model.switches.values())) == switches and set(fisher) == set(allocator.tables)
    pairs = [(allocator.tables[k][c][0], fisher[k][c][0]) for k in fisher for c in fisher[k] if c != "bf16"]
    assert spearman([m for m, _ in pairs], [f for _, f in pairs]) > 0.9
    assert all(f > 0 for _, f in pairs)
    assert plot_bits_per_layer(plan, tmp_path / "bits.png").stat().st_size > 1000


def test_correlations():
    assert pearson([1, 2, 3], [2, 4, 6.5]) > 0.99 and spearman([1, 2, 3, 4], [1, 10, 100, 1000]) == pytest.approx(1.0)
    assert spearman([1, 2, 2, 3], [3, 2, 2, 1]) == pytest.approx(-1.0)


def test_additivity_on_a_tiny_mlp_and_fisher_estimator():
    torch.manual_seed(1)
    model = TinyMLP().eval()
    x = torch.randn(64, 16)
    run = lambda m: [m(x, torch.full((64,), t)) for t in (0.9, 0.5, 0.1)]  # noqa: E731
    cfg = QuantConfig.preset("w4a8").replace(
        weight_bit_budget=4.5, first_last="quantize", allocation=AllocationSpec(calls_per_group=3, estimator="fisher", probes=4)
    )
    plan, allocator = calibrate_with_allocator(model, run, cfg, progress=False)
    try:
        rec = plan.allocation
        assert rec.estimator == "fisher" and rec.backward_passes == 12 and rec.average_bits <= 4.5
        measured = allocator.measure()
        for key in measured:  # the analytic estimate is within a factor 3 of the measurement
            for c in ("int4", "int6", "int8"):
                assert 1 / 3 < rec.nodes[key]["distortion"][c][0] / measured[key][c][0] < 3, (key, c)
        rd = allocator.rd_tables(measured)
        choice = {"a": "int4", "b": "int4", "c": "int4"}
        predicted = sum(t.distortions[t.options.index("int4")] for t in rd)
        assert 0.8 < allocator.measure_choice(choice) / predicted < 1.25
    finally:
        allocator.close()


def test_budget_validation():
    cfg = QuantConfig.preset("w4a8")
    with pytest.raises(ConfigError, match=r"weight_bit_budget 3.5 is outside \[4, 16\]"):
        cfg.replace(weight_bit_budget=3.5)
    with pytest.raises(ConfigError, match=r"outside \[4, 8\]"):
        cfg.replace(weight_bit_budget=9, allocation=AllocationSpec(candidates=("int4", "int8")))
    with pytest.raises(ConfigError, match="unknown allocation candidate"):
        AllocationSpec(candidates=("int4", "int3"))
    with pytest.raises(ConfigError, match="at least two"):
        AllocationSpec(candidates=("int8",))
    mixed = cfg.replace(weight_bit_budget=4.5)
    assert QuantConfig.from_dict(mixed.to_dict()) == mixed
    old = cfg.to_dict()
    del old["allocation"], old["weight_bit_budget"]
    assert QuantConfig.from_dict(old) == cfg  # configs of older plans still load


def test_infeasible_budget_names_the_first_last_policy():
    model = TinyMLP().eval()
    x = torch.randn(4, 16)
    cfg = QuantConfig.preset("w4a8").replace(weight_bit_budget=4.0)
    with pytest.raises(CalibrationError, match="smallest achievable average of .* first_last='8bit'"):
        qcompile.calibrate(model, lambda m: m(x, torch.ones(4)), cfg, progress=False)


def test_call_sample_is_bounded_merges_and_spreads_over_groups():
    g = torch.Generator().manual_seed(0)
    sample = CallSample(2, g)
    x = torch.zeros(3)
    for i in range(10):
        sample.offer(i % 5, float(i % 5), (x + i,), {"t": i})
    assert all(len(kept) == 2 and seen == 2 for seen, kept in sample.bins.values())
    x += 100  # kept calls are copies
    assert all(float(c[0][0][0]) < 100 for _, kept in sample.bins.values() for _, c in kept)
    sample.merge(4, 3)
    assert 4 not in sample.bins and sample.bins[3][0] == 4 and len(sample.bins[3][1]) == 2
    picked = sample.select(TimestepGroups((2.5,)), 3)
    assert [len(p) for p in picked] == [3, 2]  # bins 3 and 4 merged into one of two kept calls
    assert {c[1]["t"] % 5 for c in picked[0]} <= {0, 1, 2} and {c[1]["t"] % 5 for c in picked[1]} <= {3, 4}

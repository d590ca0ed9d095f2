import pytest
import torch

import qcompile
from qcompile import QdiffError, QuantConfig
from tests.toy_models import ComputedWeightToy, ConvTransformerToy, run_steps


@pytest.fixture
def compiled():
    model = ConvTransformerToy().eval()
    x = torch.randn(2, 1, 16, 16)
    plan = qcompile.calibrate(model, lambda m: run_steps(m, x), QuantConfig.preset("w8a8-int8"), progress=False)
    return torch.compile(model, backend="qdiff", options={"plan": plan}), plan


def test_report_rows_formats_and_sqnr(compiled):
    qmodel, plan = compiled
    report = qcompile.inspect(qmodel)  # compiles on demand, uses the plan's probe
    assert [r.key for r in report.rows] == list(plan.nodes)
    for r in report.rows:
        assert r.weight_format == "int8" and r.act_format == "int8/asym"
        assert 25 < r.sqnr_local_db < 80 and r.sqnr_cumulative_db is not None
        assert r.input_shape is not None and r.weight_scale_range[0] > 0
    assert 20 < report.output_sqnr_db < 60
    text = str(report)
    assert "enc.self_attn.in_proj" in text and "SQNR local" in text and "7/7 ops quantized" in text


def test_explicit_probe_and_plan_only_report(compiled):
    qmodel, plan = compiled
    report = qcompile.inspect(qmodel, torch.randn(3, 1, 16, 16), torch.full((3,), 0.2))
    assert report.rows[0].sqnr_local_db is not None
    plan_only = qcompile.inspect(plan)
    assert plan_only.rows[0].sqnr_local_db is None and "patch" in str(plan_only)


def test_float_ops_show_their_reason():
    model = ComputedWeightToy().eval()
    x = torch.randn(2, 16)
    plan = qcompile.calibrate(model, lambda m: run_steps(m, x), QuantConfig.preset("w8a8-int8"), progress=False)
    report = qcompile.inspect(torch.compile(model, backend="qdiff", options={"plan": plan}))
    row = report.rows[0]
    assert row.weight_format == "float" and "computed in the graph" in row.note


def test_dot_and_svg(compiled, tmp_path):
    qmodel, _ = compiled
    report = qcompile.inspect(qmodel)
    dot = report.to_dot(tmp_path / "g.dot").read_text()
    assert dot.startswith("digraph") and "enc.linear1" in dot and "->" in dot
    svg = report.to_svg(tmp_path / "g.svg").read_text()
    assert "<svg" in svg


def test_inspect_needs_a_qdiff_module():
    with pytest.raises(QdiffError, match="backend='qdiff'"):
        qcompile.inspect(torch.nn.Linear(2, 2))


def test_debug_env_logs_each_pass(monkeypatch, caplog):
    monkeypatch.setenv("QDIFF_DEBUG", "1")
    model = ConvTransformerToy().eval()
    x = torch.randn(2, 1, 16, 16)
    with caplog.at_level("DEBUG", logger="qcompile"):
        plan = qcompile.calibrate(model, lambda m: run_steps(m, x, 2), QuantConfig.preset("w8a8-int8"), progress=False)
        torch.compile(model, backend="qdiff", options={"plan": plan})(x, torch.ones(2))
    stages = [r.getMessage().split(":")[0] for r in caplog.records]
    for stage in ("graph after capture (Dynamo)", "graph after decompose_fused_attention", "graph after convert"):
        assert stage in stages


def test_inspect_after_calls_with_other_strides(compiled):
    qmodel, _ = compiled
    with torch.no_grad():
        qmodel(torch.randn(2, 1, 16, 16), torch.tensor(0.3).expand(2))  # a stride-0 timestep gets its own graph
    report = qcompile.inspect(qmodel)  # the stored probe is contiguous: it needs another graph, which is tapped too
    assert all(r.sqnr_local_db is not None for r in report.rows)

"""Timestep groups dispatched by Dynamo guards: one graph per group and frame, no recompiles after warm-up."""

import pytest
import torch
import torch.nn as nn

import qcompile
from qcompile import ConfigError, QuantConfig
from qcompile.dispatch import GroupDispatch


class DriftToy(nn.Module):
    """Activation ranges that grow with the timestep, and a graph break between the two linears."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 16)
        self.b = nn.Linear(16, 16)

    def forward(self, x, timestep):
        h = self.a(x * (1 + 20 * timestep.reshape(-1, 1)))
        torch._dynamo.graph_break()
        return self.b(torch.relu(h))


def sampling_loop(model, x, steps):
    for t in torch.linspace(1, 0, steps):
        model(x, t.expand(x.shape[0]))


def calibrated(k, steps):
    model = DriftToy().eval()
    x = torch.randn(2, 16)
    cfg = QuantConfig.preset("w8a8-int8").replace(timestep_groups=k)
    plan = qcompile.calibrate(model, lambda m: sampling_loop(m, x, steps), cfg, progress=False)
    assert plan.groups.count == k
    return model, x, plan


def test_plain_torch_compile_of_a_multi_group_plan_points_to_qcompile_compile():
    model, x, plan = calibrated(2, 4)
    with pytest.raises(Exception, match=r"qcompile.compile\(model, plan\)"):
        torch.compile(model, backend="qdiff", options={"plan": plan})(x, torch.ones(2))


def test_one_graph_per_group_and_no_recompiles_after_warm_up():
    k, steps = 3, 9
    model, x, plan = calibrated(k, steps)
    qmodel = qcompile.compile(model, plan)
    assert isinstance(qmodel, GroupDispatch)
    with torch.no_grad():
        sampling_loop(qmodel, x, steps)
        frames = len(plan.subgraphs)
        assert frames == 2  # the graph break splits the model into two frames
        assert len(plan.compiled) == k * frames  # one graph per group and frame, not one per step
        with torch.compiler.set_stance("fail_on_recompile"):
            sampling_loop(qmodel, x, steps)
            sampling_loop(qmodel, torch.randn(2, 16), 2 * steps)
    assert len(plan.compiled) == k * frames


def test_single_group_path_is_plain_torch_compile():
    model, x, plan = calibrated(1, 4)
    qmodel = qcompile.compile(model, plan)
    assert not isinstance(qmodel, GroupDispatch) and hasattr(qmodel, "_orig_mod")


@pytest.mark.parametrize("k", [10, 12])
def test_more_groups_than_the_recompile_limit_each_use_their_own_scales(k):
    """Every group's output equals the graph compiled for that group alone (exact, reference lowering)."""
    with torch._dynamo.config.patch(recompile_limit=8, accumulated_recompile_limit=256):  # the defaults, restored after
        assert k > torch._dynamo.config.recompile_limit
        check_groups_beyond_the_recompile_limit(k)


def check_groups_beyond_the_recompile_limit(k):
    model, x, plan = calibrated(k, k)
    steps = torch.linspace(1, 0, k)
    expected = {}
    with torch.no_grad():
        for t in steps:
            g = plan.groups.group_of(float(t))
            ref = torch.compile(model, backend="qdiff", options={"plan": plan, "group": g})
            expected[g] = (t, ref(x, t.expand(2)))
            torch._dynamo.reset()
        assert sorted(expected) == list(range(k))
        plan.compiled.clear()
        qmodel = qcompile.compile(model, plan)
        outs = {g: qmodel(x, t.expand(2)) for g, (t, _) in expected.items()}
        assert len(plan.compiled) == 2 * k  # nothing fell back to eager at the recompile limit
        with torch.compiler.set_stance("fail_on_recompile"):
            again = {g: qmodel(x, t.expand(2)) for g, (t, _) in expected.items()}
    for g, (_, ref) in expected.items():
        assert torch.equal(outs[g], ref), f"group {g}"
        assert torch.equal(again[g], ref), f"group {g} after warm-up"
    assert len({float(plan.nodes["a"].acts[g].scale) for g in range(k)}) == k  # the groups really differ


def test_missing_timestep_is_an_error_naming_the_argument():
    model, x, plan = calibrated(2, 4)
    qmodel = qcompile.compile(model, plan)
    with pytest.raises(Exception, match="timestep"):
        qmodel(x)
    with pytest.raises(Exception, match="different values in one batch"):
        qmodel(x, torch.tensor([0.0, 1.0]))
    assert qmodel.group_of((x,), {"timestep": 0.9}) == 1 and qmodel.group_of((x, torch.zeros(2)), {}) == 0


def test_inspect_shows_the_groups_and_uses_the_probe_group(tmp_path):
    model, x, plan = calibrated(3, 9)
    path = plan.save(tmp_path / "p.qplan")
    text = str(qcompile.inspect(qcompile.QuantPlan.load(path)))
    assert "timestep groups: 3 (uniform in step index" in text and "activation scale per group" in text
    assert text.count(" 3      3") == 3  # each group: 3 calibration calls, 3 distinct steps
    qmodel = qcompile.compile(model, plan)
    report = qcompile.inspect(qmodel, x, torch.full((2,), 0.1))
    assert report.group == 0 and report.rows[0].act_range == (plan.nodes["a"].acts[0].lo, plan.nodes["a"].acts[0].hi)
    assert report.rows[0].sqnr_local_db is not None and "table for group 0" in str(report)


def test_cli_inspect_prints_the_groups(tmp_path, capsys):
    from qcompile.cli import main

    _, _, plan = calibrated(2, 4)
    main(["inspect", str(plan.save(tmp_path / "p.qplan"))])
    out = capsys.readouterr().out
    assert "timestep groups: 2" in out and "g1" in out


def test_threads_dispatch_their_own_groups():
    import threading

    model, x, plan = calibrated(2, 4)
    qmodel = qcompile.compile(model, plan)
    ts = {0: torch.zeros(2), 1: torch.ones(2)}
    with torch.no_grad():
        expected = {g: qmodel(x, t) for g, t in ts.items()}
        results, errors = {}, []

        def worker(g):
            try:
                with torch.no_grad():  # grad mode is per thread; the stance is process-wide (set once below)
                    results[g] = [qmodel(x, ts[g]) for _ in range(20)]
            except Exception as e:  # reported below
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(g,)) for g in (0, 1)]
        with torch.compiler.set_stance("fail_on_recompile"):
            for th in threads:
                th.start()
            for th in threads:
                th.join()
    assert not errors
    assert all(torch.equal(o, expected[g]) for g, outs in results.items() for o in outs)

"""release_float_weights: the float weights no compiled graph reads are freed in place, nothing recompiles."""

import copy
import dataclasses
import warnings

import pytest
import torch
import torch.nn as nn

import qcompile
from qcompile import ConfigError, QdiffError, QuantConfig
from qcompile.lowering.weights import quantize_weight
from qcompile.release import is_released, released_parameters
from tests.toy_models import TinyMLP

STEPS = (0.9, 0.7, 0.3, 0.1)


def calibrated(model, x, steps=STEPS, **changes):
    cfg = QuantConfig.preset("w8a8-int8").replace(first_last="quantize", **changes)
    return qcompile.calibrate(model, lambda m: [m(x, torch.full((x.shape[0],), t)) for t in steps], cfg, progress=False)


def compiled_outputs(model, plan, calls, release, **options):
    """Outputs of ``calls`` (x, t) through a fresh compile of ``model`` (Dynamo reset first)."""
    torch._dynamo.reset()
    qm = qcompile.compile(model, plan, release_float_weights=release, **options)
    with torch.no_grad():
        return qm, [qm(x, t) for x, t in calls]


def nbytes(*tensors):
    return sum(t.untyped_storage().nbytes() for t in tensors)


def test_releases_exactly_the_quantized_weights_outputs_unchanged_no_recompile():
    model = TinyMLP().eval()
    x = torch.randn(8, 16)
    plan = calibrated(model, x, skip_names=("b",))  # b stays in full precision: keeps its weight
    assert plan.nodes["b"].weight is None and plan.nodes["a"].weight is not None
    t = torch.full((8,), 0.5)
    _, want = compiled_outputs(copy.deepcopy(model), plan, [(x, t)], release=False)
    expected = {"a.weight": nbytes(model.a.weight), "c.weight": nbytes(model.c.weight)}
    qm, got = compiled_outputs(model, plan, [(x, t)], release=True)
    assert plan.compiled[-1].released == expected  # biases, b (float op) keep theirs
    assert released_parameters(model) == ["a.weight", "c.weight"]
    assert model.a.weight.shape == (64, 16) and model.a.weight.dtype == torch.float32  # metadata kept for the guards
    assert nbytes(model.b.weight) == 64 * 64 * 4 and nbytes(model.a.bias) == 64 * 4
    assert torch.equal(got[0], want[0])
    with torch.no_grad(), torch.compiler.set_stance("fail_on_recompile"):
        assert torch.equal(qm(x, t), want[0])


def test_new_batch_size_recompiles_without_the_float_data():
    model = TinyMLP().eval()
    x, x5 = torch.randn(8, 16), torch.randn(5, 16)
    plan = calibrated(model, x)
    calls = [(x, torch.full((8,), 0.5)), (x5, torch.full((5,), 0.5)), (torch.randn(3, 16), torch.full((3,), 0.2))]
    _, want = compiled_outputs(copy.deepcopy(model), plan, calls, release=False)
    graphs = len(plan.compiled)
    _, got = compiled_outputs(model, plan, calls, release=True)
    assert len(plan.compiled) - graphs == graphs >= 2  # the recompile (dynamic batch) traced the released parameters
    assert sorted(plan.compiled[graphs].released) == ["a.weight", "b.weight", "c.weight"]
    assert all(not r.released for r in plan.compiled[graphs + 1 :])  # nothing left to release
    assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_multi_group_plan_keeps_a_weight_one_group_reads_in_float():
    model = TinyMLP().eval()
    x = torch.randn(8, 16)
    plan = calibrated(model, x, timestep_groups=2)
    node = plan.nodes["b"]
    plan.nodes = {**plan.nodes, "b": dataclasses.replace(node, group_weights=[node.weight, None])}  # bf16 in group 1
    group_of = {t: plan.groups.group_of(t) for t in STEPS}
    assert group_of[0.9] != group_of[0.1]
    first = 0.9 if group_of[0.9] == 0 else 0.1  # group 0 compiles first: b is quantized there but read in group 1
    calls = [(x, torch.full((8,), t)) for t in (first, *STEPS)]
    _, want = compiled_outputs(copy.deepcopy(model), plan, calls, release=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an op kept in float in a group is expected: no warning
        qm, got = compiled_outputs(model, plan, calls, release=True)
    assert released_parameters(model) == ["a.weight", "c.weight"]
    assert sum(len(r.released) for r in plan.compiled) == 2
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    with torch.no_grad(), torch.compiler.set_stance("fail_on_recompile"):
        for (xi, ti), w in zip(calls, want):
            assert torch.equal(qm(xi, ti), w)


class ReadAfterBreak(nn.Module):
    """The quantized linear's weight is read again by plain code after a graph break (another frame)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 16)

    def forward(self, x, t):
        h = self.a(x)
        torch._dynamo.graph_break()
        return h * self.a.weight.abs().mean() * t.reshape(-1, 1)


def test_a_graph_reading_a_released_weight_fails_naming_it():
    model = ReadAfterBreak().eval()
    x = torch.randn(4, 16)
    plan = calibrated(model, x)
    compiled = torch.compile(model, backend="qdiff", options={"plan": plan, "release_float_weights": True})
    with torch.no_grad(), pytest.raises(Exception, match=r"parameter 'a.weight' was released .* still reads"):
        compiled(x, torch.full((4,), 0.5))


def test_another_plan_that_reads_a_released_weight_fails_naming_it():
    model = TinyMLP().eval()
    x = torch.randn(8, 16)
    plan = calibrated(model, x)
    keep_b = calibrated(copy.deepcopy(model), x, skip_names=("b",))
    compiled_outputs(model, plan, [(x, torch.full((8,), 0.5))], release=True)
    torch._dynamo.reset()
    again = torch.compile(model, backend="qdiff", options={"plan": keep_b})
    with torch.no_grad(), pytest.raises(Exception, match=r"parameter 'b.weight' was released"):
        again(x, torch.full((8,), 0.5))


def test_calibrate_and_inspect_refuse_a_released_model():
    model = TinyMLP().eval()
    x = torch.randn(8, 16)
    plan = calibrated(model, x)
    qm, _ = compiled_outputs(model, plan, [(x, torch.full((8,), 0.5))], release=True)
    with pytest.raises(QdiffError, match=r"inspect .* 3 of its weights were released .*a.weight"):
        qcompile.inspect(qm, x, torch.full((8,), 0.5))
    with pytest.raises(QdiffError, match="calibration runs the float model"):
        calibrated(model, x)


class SharedStorage(nn.Module):
    """Two parameters viewing one storage: releasing one would empty the other."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 16)
        self.b = nn.Linear(16, 16)
        self.b.weight = nn.Parameter(self.a.weight.detach())

    def forward(self, x, t):
        return self.b(torch.relu(self.a(x))) * t.reshape(-1, 1)


def test_shared_storage_is_kept_with_one_warning():
    model = SharedStorage().eval()
    x = torch.randn(4, 16)
    plan = calibrated(model, x)
    with pytest.warns(UserWarning, match=r"keeps the float data of 2 quantized weight\(s\)[\s\S]*a.weight: its storage is shared"):
        compiled_outputs(model, plan, [(x, torch.full((4,), 0.5))], release=True)
    assert released_parameters(model) == [] and not is_released(model.b.weight)


def test_borrowed_storage_is_kept_with_one_warning():
    model = TinyMLP().eval()
    model.b.weight = nn.Parameter(torch.from_numpy(model.b.weight.detach().numpy().copy()))  # numpy's memory
    x = torch.randn(8, 16)
    plan = calibrated(model, x)
    with pytest.warns(UserWarning, match=r"b.weight: its storage cannot be freed"):
        compiled_outputs(model, plan, [(x, torch.full((8,), 0.5))], release=True)
    assert released_parameters(model) == ["a.weight", "c.weight"]


def test_option_must_be_a_bool():
    model = TinyMLP().eval()
    x = torch.randn(8, 16)
    plan = calibrated(model, x)
    compiled = torch.compile(model, backend="qdiff", options={"plan": plan, "release_float_weights": "yes"})
    with torch.no_grad(), pytest.raises(Exception, match=r"release_float_weights'\] must be True or False"):
        compiled(x, torch.full((8,), 0.5))
    assert released_parameters(model) == []


@pytest.mark.inductor
def test_inductor_never_sees_released_weights():
    model = TinyMLP().eval()
    x = torch.randn(8, 16)
    plan = calibrated(model, x)
    calls = [(x, torch.full((8,), 0.5)), (torch.randn(5, 16), torch.full((5,), 0.5))]
    _, want = compiled_outputs(copy.deepcopy(model), plan, calls, release=False, inductor=True)
    graphs = len(plan.compiled)
    qm, got = compiled_outputs(model, plan, calls, release=True, inductor=True)
    assert sorted(plan.compiled[graphs].released) == ["a.weight", "b.weight", "c.weight"]
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    with torch.no_grad(), torch.compiler.set_stance("fail_on_recompile"):
        for (xi, ti), w in zip(calls, want):
            assert torch.equal(qm(xi, ti), w)

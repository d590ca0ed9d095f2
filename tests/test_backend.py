import warnings

import pytest
import torch

import qcompile
from qcompile import CalibrationError, QuantConfig
from qcompile.metrics import sqnr_db
from tests.toy_models import ComputedWeightToy, ConvTransformerToy, GraphBreakToy, NanToy, NothingToQuantize, run_steps


def calibrated(model, x, preset="w8a8-int8"):
    return qcompile.calibrate(model, lambda m: run_steps(m, x), QuantConfig.preset(preset), progress=False)


def test_backend_is_registered_by_entry_point():
    from torch._dynamo.backends.registry import list_backends, lookup_backend

    assert "qdiff" in list_backends(exclude_tags=())
    assert lookup_backend("qdiff") is qcompile.qdiff_backend


def test_compiling_without_plan_says_how_to_calibrate():
    compiled = torch.compile(GraphBreakToy(), backend="qdiff")
    with pytest.raises(Exception, match=r"qcompile.calibrate\(model"):
        compiled(torch.randn(2, 16), torch.rand(2))


def test_unknown_option_is_an_error():
    plan = calibrated(GraphBreakToy().eval(), torch.randn(2, 16))
    with pytest.raises(Exception, match="unknown qdiff backend option"):
        torch.compile(GraphBreakToy(), backend="qdiff", options={"plan": plan, "bits": 3})(torch.randn(2, 16), torch.rand(2))


def test_graph_breaks_every_subgraph_is_quantized():
    model = GraphBreakToy().eval()
    x = torch.randn(4, 16)
    plan = calibrated(model, x)
    assert plan.subgraphs == [["a"], ["b"]]
    compiled = torch.compile(model, backend="qdiff", options={"plan": plan})
    with torch.no_grad():
        out, ref = compiled(x, torch.full((4,), 0.5)), model(x, torch.full((4,), 0.5))
    assert len(plan.compiled) == 2
    assert all(any("qlinear" in str(n.target) for n in r.converted.graph.nodes) for r in plan.compiled)
    assert sqnr_db(ref, out) > 30


def test_unsupported_ops_stay_float_with_one_warning_listing_them():
    model = ComputedWeightToy().eval()
    x = torch.randn(2, 16)
    plan = calibrated(model, x)
    assert "computed in the graph" in plan.nodes["<linear>"].reason
    compiled = torch.compile(model, backend="qdiff", options={"plan": plan})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            compiled(x, torch.rand(2))
            compiled(torch.randn(3, 16), torch.rand(3))  # a recompile must not repeat the warning
    ours = [w for w in caught if "stay in full precision" in str(w.message)]
    assert len(ours) == 1 and "<linear>" in str(ours[0].message) and "computed in the graph" in str(ours[0].message)


def test_a_planned_weight_read_by_an_opaque_call_is_named_in_the_warning(monkeypatch):
    """A plan op whose weight this graph feeds to a call qdiff cannot quantize (here: the MHA call as the decomposition
    left it before it rewrote ``F.multi_head_attention_forward``) runs in float: the one warning must name it."""
    from qcompile.evaluate import mha_fastpath_off
    from qcompile.passes import decompose

    model = ConvTransformerToy().eval()
    x = torch.randn(4, 1, 16, 16)
    with mha_fastpath_off():
        plan = calibrated(model, x)
        assert "enc.self_attn.in_proj" in plan.nodes and "enc.self_attn.out_proj" in plan.nodes
        monkeypatch.setattr(decompose, "_rewrite_mha_forward", lambda g, node: False)
        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always")
            torch.compile(model, backend="qdiff", options={"plan": plan})(x, torch.full((4,), 0.5))
    ours = [str(w.message) for w in caught if "stay in full precision" in str(w.message)]
    assert len(ours) == 1
    for key, weight in (("enc.self_attn.in_proj", "enc.self_attn.in_proj_weight"), ("enc.self_attn.out_proj", "enc.self_attn.out_proj.weight")):
        assert f"{key}: planned, but this graph reads its weight '{weight}' through multi_head_attention_forward" in ours[0]
    assert "enc.linear1" not in ours[0]  # quantized as planned


def test_nothing_quantizable_compiles_to_float_with_warning():
    model = NothingToQuantize()
    x = torch.randn(2, 8)
    with pytest.warns(UserWarning, match="nothing quantizable"):
        plan = calibrated(model, x)
    compiled = torch.compile(model, backend="qdiff", options={"plan": plan})
    with pytest.warns(UserWarning, match="quantizes nothing"):
        out = compiled(x, torch.full((2,), 0.3))
    assert torch.equal(out, model(x, torch.full((2,), 0.3)))


def test_nan_in_calibration_names_the_node():
    model = NanToy().eval()
    with pytest.raises(Exception, match="non-finite values .* node 'b'"):
        calibrated(model, torch.randn(2, 4))


@pytest.mark.parametrize(
    "model_cls",
    [
        GraphBreakToy,
        pytest.param(
            ConvTransformerToy,
            marks=pytest.mark.xfail(
                torch.__version__ < "2.13",
                reason="torch 2.11's Dynamo graph-breaks on the encoder-layer fast path once the batch is dynamic",
                strict=False,
            ),
        ),
    ],
)
def test_batch_size_change_recompiles_once_then_never(model_cls):
    model = model_cls().eval()
    shape = (1, 16, 16) if model_cls is ConvTransformerToy else (16,)
    plan = calibrated(model, torch.randn(2, *shape))
    compiled = torch.compile(model, backend="qdiff", options={"plan": plan})
    with torch.no_grad():
        for b in (2, 4):
            compiled(torch.randn(b, *shape), torch.rand(b))
        n = len(plan.compiled)
        with torch.compiler.set_stance("fail_on_recompile"):
            for b in (3, 5, 8):
                compiled(torch.randn(b, *shape), torch.rand(b))
    assert len(plan.compiled) == n  # static first graph(s), then dynamic-batch graph(s), then nothing new
    assert n == 2 * len(plan.subgraphs)


def test_plan_path_option_loads_the_file(tmp_path):
    model = GraphBreakToy().eval()
    x = torch.randn(2, 16)
    path = calibrated(model, x).save(tmp_path / "p.qplan")
    compiled = torch.compile(model, backend="qdiff", options={"plan": str(path)})
    with torch.no_grad():
        assert sqnr_db(model(x, torch.ones(2)), compiled(x, torch.ones(2))) > 30


@pytest.mark.inductor
def test_reference_lowering_through_inductor_matches_eager():
    model = ConvTransformerToy().eval()
    x = torch.randn(2, 1, 16, 16)
    plan = calibrated(model, x)
    t = torch.full((2,), 0.4)
    with torch.no_grad():
        eager = torch.compile(model, backend="qdiff", options={"plan": plan, "inductor": False})(x, t)
        torch._dynamo.reset()
        inductor = torch.compile(model, backend="qdiff", options={"plan": plan, "inductor": True})(x, t)
    assert sqnr_db(eager, inductor) > 60
    # each compile records its phases: qdiff's passes, and Inductor's compile_fx where it ran
    without, with_inductor = plan.compiled[0].compile_s, plan.compiled[-1].compile_s
    assert set(without) == {"passes"} and set(with_inductor) == {"passes", "inductor"}
    assert min(without.values()) > 0 and with_inductor["inductor"] > with_inductor["passes"] > 0

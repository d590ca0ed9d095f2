"""Embedding tables stored int8 (passes/tables.py): found in Dynamo graphs, stored in the plan, looked up from int8
buffers, their float data released; lookups that cannot be converted stay float and are named."""

import copy
import warnings

import pytest
import torch
import torch.nn as nn

import qcompile
from qcompile import QuantConfig
from qcompile.errors import PlanFileError, PlanMismatchError
from qcompile.lowering import reference
from qcompile.metrics import sqnr_db
from qcompile.passes.tables import META_KEY, quantize_table
from qcompile.plan import QuantPlan
from qcompile.release import released_parameters

STEPS = (0.9, 0.5, 0.1)


class LabelToy(nn.Module):
    """A class-conditioned MLP: a label table (as diffusers' LabelEmbedding) added to a projected input."""

    def __init__(self, classes=11, dim=32, max_norm=None):
        super().__init__()
        self.labels = nn.Embedding(classes, dim, max_norm=max_norm)
        self.proj = nn.Linear(16, dim)
        self.out = nn.Linear(dim, 16)

    def forward(self, x, t, y):
        return self.out(torch.nn.functional.silu(self.proj(x) + self.labels(y) * t[:, None]))


def calibrated(model, x, y, **changes):
    cfg = QuantConfig.preset("w4a16").replace(**changes)
    return qcompile.calibrate(model, lambda m: [m(x, torch.full((x.shape[0],), t), y) for t in STEPS], cfg, progress=False)


def test_quantize_table_rows_are_int8_within_half_a_step():
    table = torch.randn(50, 24) * torch.logspace(-3, 1, 50)[:, None]  # rows of very different ranges: one scale each
    q = quantize_table(table)
    assert q.data.dtype == torch.int8 and q.data.shape == (50, 24) and q.scale.shape == (50, 1)
    assert torch.equal(q.scale[:, 0], table.abs().amax(dim=1) / 127)
    assert ((q.dequantize() - table).abs() <= q.scale / 2 + 1e-7).all()
    idx = torch.tensor([[3, 49], [0, 3]])
    got = reference.qembedding(idx, q.data, q.scale, out_dtype=torch.bfloat16)
    assert got.dtype == torch.bfloat16 and got.shape == (2, 2, 24)
    assert torch.equal(got, q.dequantize()[idx].to(torch.bfloat16))


def test_w4a16_plan_stores_the_table_and_the_compiled_lookup_reads_int8():
    torch.manual_seed(0)
    model = LabelToy().eval()
    x, y = torch.randn(6, 16), torch.tensor([0, 3, 3, 7, 10, 1])
    plan = calibrated(model, x, y)
    assert list(plan.tables) == ["labels.weight"]
    t = torch.full((6,), 0.5)
    with torch.no_grad():
        want = model(x, t, y)
    torch._dynamo.reset()
    qm = qcompile.compile(copy.deepcopy(model), plan)
    with torch.no_grad():
        got = qm(x, t, y)
    graph = plan.compiled[-1].converted
    lookups = [n for n in graph.graph.nodes if META_KEY in n.meta]
    assert [n.target for n in lookups] == [reference.qembedding] and lookups[0].meta[META_KEY] == "labels.weight"
    assert not any(n.target is torch.nn.functional.embedding for n in graph.graph.nodes)
    assert graph.get_buffer(lookups[0].args[1].target).dtype == torch.int8
    assert sqnr_db(want, got) > 20  # int4 linears and the int8 table
    report = str(qcompile.inspect(qm, x, t, y))
    assert "embedding tables: 1 stored int8 with a scale per row (0.0 MB; 0.0 MB in 16-bit)" in report


def test_tables_follow_the_config_and_the_plan_file(tmp_path):
    torch.manual_seed(0)
    model = LabelToy().eval()
    x, y = torch.randn(4, 16), torch.tensor([1, 2, 3, 4])
    assert calibrated(model, x, y, embedding_tables=None).tables == {}  # w8a8 presets and custom configs: float tables
    plan = calibrated(model, x, y)
    back = QuantPlan.load(plan.save(tmp_path / "p.safetensors"))
    assert back.digest() == plan.digest() and back.fingerprint == plan.fingerprint
    assert torch.equal(back.tables["labels.weight"].data, plan.tables["labels.weight"].data)
    assert calibrated(model, x, y, embedding_tables=None).fingerprint != plan.fingerprint
    other = calibrated(LabelToy(classes=12).eval(), x, y)
    other.tables["labels.weight"] = plan.tables["labels.weight"]  # an 11-row table for a 12-row model
    torch._dynamo.reset()
    with pytest.raises(Exception, match="table 'labels.weight' is \\(12, 32\\) here but \\(11, 32\\)") as info:
        qcompile.compile(LabelToy(classes=12).eval(), other)(x, torch.ones(4), y)
    assert isinstance(info.value, PlanMismatchError) or "PlanMismatchError" in str(info.value)  # (Dynamo wraps it)


def test_a_table_file_with_the_wrong_shape_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    torch.manual_seed(0)
    plan = calibrated(LabelToy().eval(), torch.randn(4, 16), torch.tensor([1, 2, 3, 4]))
    path = plan.save(tmp_path / "p.safetensors")
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors["tables/labels.weight/weight_scale"] = tensors["tables/labels.weight/weight_scale"][:5]
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(PlanFileError, match="table 'labels.weight' tensor 'tables/labels.weight/weight_scale' is torch.float32 \\(5, 1\\)"):
        QuantPlan.load(path)


def test_released_table_and_max_norm_lookup_kept_float_with_a_warning():
    torch.manual_seed(0)
    model = LabelToy().eval()
    x, y, t = torch.randn(6, 16), torch.tensor([0, 3, 3, 7, 10, 1]), torch.full((6,), 0.5)
    plan = calibrated(model, x, y)
    torch._dynamo.reset()
    with torch.no_grad():
        want = qcompile.compile(copy.deepcopy(model), plan)(x, t, y)
    torch._dynamo.reset()
    qm = qcompile.compile(model, plan, release_float_weights=True)
    with torch.no_grad():
        assert torch.equal(qm(x, t, y), want)
    assert "labels.weight" in released_parameters(model)

    normed = LabelToy(max_norm=1.0).eval()
    with pytest.warns(UserWarning, match="embedding tables kept in float:\n  labels.weight: max_norm renormalizes"):
        plan = calibrated(normed, x, y)
    assert plan.tables == {}


def test_diffusers_dit_label_tables_are_stored_int8_and_released():
    """A real diffusers DiT: each block's class-label table (CombinedTimestepLabelEmbeddings) is found in the Dynamo graph,
    stored int8, and its float data released; the compiled output stays close to the float model."""
    pytest.importorskip("diffusers")
    from tests.tiny_models import tiny_dit

    case = tiny_dit()
    def run(m):
        for t in (900, 400, 50):
            m(*case.args, **{**case.kwargs, "timestep": torch.full((2,), t)})

    plan = qcompile.calibrate(case.model, run, QuantConfig.preset("w4a16"), progress=False)
    names = sorted(plan.tables)
    assert len(names) == len(case.model.transformer_blocks) and all("class_embedder.embedding_table" in n for n in names)
    with torch.no_grad():
        want = case.run()
    torch._dynamo.reset()
    qm = qcompile.compile(case.model, plan, release_float_weights=True)
    with torch.no_grad():
        got = case.run(qm)
    assert set(names) <= set(released_parameters(case.model))
    assert sqnr_db(want, got) > 15

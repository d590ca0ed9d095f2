"""Split-shortcut quantization end to end: calibrate, plan round trip, compile, inspect, config."""

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import qcompile
from qcompile import ConfigError, PlanFileError, QuantConfig, QuantPlan
from qcompile.metrics import sqnr_db
from tests.toy_models import run_steps


class ConcatToy(nn.Module):
    """A decoder block: cat of a large-range and a small-range part, + time embedding,
    GroupNorm -> SiLU -> conv, and a 1x1 shortcut conv reading the cat."""

    def __init__(self):
        super().__init__()
        self.deep, self.skip = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(1, 4, 3, padding=1)
        self.temb = nn.Linear(1, 8)
        self.norm = nn.GroupNorm(2, 8)
        self.conv = nn.Conv2d(8, 4, 3, padding=1)
        self.shortcut = nn.Conv2d(8, 4, 1)
        with torch.no_grad():  # the shortcut weighs the small part up, as a trained network would
            self.shortcut.weight[:, 4:] *= 600.0

    def forward(self, x, t):
        h = torch.cat((30.0 * F.relu(self.deep(x)), 0.05 * self.skip(x)), dim=1)
        h = h + self.temb(t[:, None])[:, :, None, None]
        return self.conv(F.silu(self.norm(h))) + self.shortcut(h)


def _calibrate(cfg, x):
    torch.manual_seed(0)
    model = ConcatToy().eval()
    return model, qcompile.calibrate(model, lambda m: run_steps(m, x, steps=4), cfg, progress=False)


@pytest.fixture(scope="module")
def split_plan():
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    model, plan = _calibrate(QuantConfig.preset("w8a8-int8"), x)
    return model, plan, x


def test_concat_model_calibrates_and_runs_split(split_plan):
    model, plan, x = split_plan
    for key in ("conv", "shortcut"):
        node = plan.nodes[key]
        assert node.split == (0, 4, 8) and node.weight.splits == (0, 4, 8)
        assert node.weight.scale.shape == (4, 2)  # per output channel per slice
        (act,) = node.acts
        assert len(act.slices) == 2 and act.slices[0].scale != act.slices[1].scale
        assert node.split_note.startswith("split 4+4 (cat(")
    short = plan.nodes["shortcut"].acts[0]
    assert short.slices[0].hi > 20 * short.slices[1].hi  # the raw cat: each part its own range
    assert all(plan.nodes[k].split is None and plan.nodes[k].split_note is None for k in ("deep", "skip", "temb"))

    torch._dynamo.reset()
    _, unsplit = _calibrate(QuantConfig.preset("w8a8-int8").replace(split_shortcuts=False), x)
    assert all(n.split is None for n in unsplit.nodes.values())
    assert "config.split_shortcuts is off" in unsplit.nodes["conv"].split_note
    t = torch.full((2,), 0.5)
    with torch.no_grad():
        ref = model(x, t)
        torch._dynamo.reset()
        with_split = torch.compile(model, backend="qdiff", options={"plan": plan})(x, t)
        torch._dynamo.reset()
        without = torch.compile(model, backend="qdiff", options={"plan": unsplit})(x, t)
    assert sqnr_db(ref, with_split) > 30
    assert sqnr_db(ref, with_split) > sqnr_db(ref, without) + 6


def test_split_plan_round_trip_and_inspect(split_plan, tmp_path):
    model, plan, x = split_plan
    loaded = QuantPlan.load(plan.save(tmp_path / "s.qplan"))
    assert loaded.digest() == plan.digest()
    for key in ("conv", "shortcut"):
        a, b = plan.nodes[key], loaded.nodes[key]
        assert b.split == a.split and b.acts == a.acts and b.split_note == a.split_note
        assert torch.equal(a.weight.scale, b.weight.scale) and b.weight.splits == a.weight.splits
    torch._dynamo.reset()
    report = qcompile.inspect(torch.compile(model, backend="qdiff", options={"plan": loaded}))
    rows = {r.key: r for r in report.rows}
    assert rows["conv"].split.startswith("split 4+4") and len(rows["conv"].act_slice_ranges) == 2
    assert rows["conv"].sqnr_local_db > 30 and rows["deep"].split == ""
    text = str(report)
    assert "split shortcuts: 2 op(s)" in text and "split 4+4 (cat(" in text


def _rewrite(path, edit):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), "pt") as f:
        doc = json.loads(f.metadata()["qdiff_plan"])
    tensors = load_file(str(path))
    edit(doc)
    save_file(tensors, str(path), metadata={"qdiff_plan": json.dumps(doc)})


def test_bad_split_points_are_refused_and_older_plans_load_unsplit(split_plan, tmp_path):
    _, plan, _ = split_plan
    path = plan.save(tmp_path / "s.qplan")

    def bad_points(doc):
        node = next(n for n in doc["nodes"] if n["key"] == "conv")
        node["split"] = [0, 3, 8]

    _rewrite(path, bad_points)
    with pytest.raises(PlanFileError, match="node 'conv' has invalid split points"):
        QuantPlan.load(path)

    path = plan.save(tmp_path / "s.qplan")

    def one_slice_quantizer(doc):
        node = next(n for n in doc["nodes"] if n["key"] == "conv")
        node["acts"][0]["slices"] = node["acts"][0]["slices"][:1]

    _rewrite(path, one_slice_quantizer)
    with pytest.raises(PlanFileError, match="node 'conv' has an activation quantizer in group 0"):
        QuantPlan.load(path)

    torch._dynamo.reset()
    _, unsplit = _calibrate(QuantConfig.preset("w8a8-int8").replace(split_shortcuts=False), torch.randn(2, 1, 8, 8))
    path = unsplit.save(tmp_path / "old.qplan")

    def as_older_qdiff(doc):  # a plan written before split shortcuts existed
        del doc["config"]["split_shortcuts"]
        for n in doc["nodes"]:
            n.pop("split_note", None)

    _rewrite(path, as_older_qdiff)
    old = QuantPlan.load(path)
    assert all(n.split is None and n.weight.splits is None and n.acts[0].slices is None for n in old.nodes.values())


def test_config_field():
    cfg = QuantConfig.preset("w4a8")
    assert cfg.split_shortcuts and not cfg.naive().split_shortcuts
    off = cfg.replace(split_shortcuts=False)
    assert QuantConfig.from_dict(off.to_dict()) == off
    older = cfg.to_dict()
    del older["split_shortcuts"]
    assert QuantConfig.from_dict(older).split_shortcuts is True
    with pytest.raises(ConfigError, match="split_shortcuts must be a bool"):
        cfg.replace(split_shortcuts="yes")


def test_int4_groupwise_split_op_runs():
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    cfg = QuantConfig.preset("w4a8").replace(first_last="quantize")
    model, plan = _calibrate(cfg, x)
    node = plan.nodes["conv"]
    assert node.weight.fmt == "int4" and node.split == (0, 4, 8)
    assert node.weight.scale.shape == (4, 2)  # K = 8 x 9 taps: a group of 64 per 36-wide slice
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(model, backend="qdiff", options={"plan": plan})(x, torch.full((2,), 0.5))
    assert sqnr_db(model(x, torch.full((2,), 0.5)), out) > 15

"""fp8 attention end to end on CPU (reference lowering): config, calibration of q / k / v scales, the plan's attention
record (round trip, tampering refused), conversion, timestep groups, and the full-precision warning."""

import math
import warnings

import pytest
import torch

import qcompile
from qcompile import PlanFileError, PlanMismatchError, QuantConfig, QuantPlan
from qcompile.config import ActSpec, Format, RangeMethod
from qcompile.errors import ConfigError
from qcompile.lowering import reference
from qcompile.metrics import sqnr_db
from tests.test_plan import _rewrite
from tests.tiny_models import tiny_dit, tiny_dit_attn

KEYS = ["transformer_blocks.0.attn1.sdpa", "transformer_blocks.1.attn1.sdpa"]
STEPS = (950, 700, 450, 200, 20)


def _run(case, steps=STEPS):
    def run(m):
        for t in steps:
            m(*case.args, **{**case.kwargs, "timestep": torch.full((2,), t)})
    return run


def _calibrate(case, cfg):
    return qcompile.calibrate(case.model, _run(case), cfg, progress=False)


@pytest.fixture(scope="module")
def dit_plans():
    """The tiny 32-wide-head DiT and its w8a8-fp8 / w8a8-fp8-attn plans (one group) and a two-group attention plan."""
    torch.set_num_threads(1)
    case = tiny_dit_attn()
    attn = QuantConfig.preset("w8a8-fp8-attn")
    plans = {name: _calibrate(case, cfg) for name, cfg in {
        "w8a8-fp8": QuantConfig.preset("w8a8-fp8"), "w8a8-fp8-attn": attn, "k2": attn.replace(timestep_groups=2, name="k2"),
    }.items()}
    torch._dynamo.reset()
    return case, plans


def _out(case, model, t=450):
    with torch.no_grad():
        return case.output(model(*case.args, **{**case.kwargs, "timestep": torch.full((2,), t)}))


# --- config -----------------------------------------------------------------------------------------
def test_config_attention_is_opt_in_validated_and_serialized():
    assert QuantConfig.preset("w8a8-fp8").attention is None
    cfg = QuantConfig.preset("w8a8-fp8-attn")
    assert cfg.attention == ActSpec(Format.FP8_E4M3, range_method=RangeMethod.MINMAX) and "w8a8-fp8-attn" in QuantConfig.PRESETS
    assert cfg.replace(attention=None, name="w8a8-fp8") == QuantConfig.preset("w8a8-fp8")  # w8a8-fp8 plus attention
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg
    mse = cfg.replace(attention=ActSpec(Format.FP8_E4M3, range_method="mse"))
    assert QuantConfig.from_dict(mse.to_dict()) == mse
    older = QuantConfig.preset("w8a8-int8").to_dict()
    del older["attention"]  # a config written before the field existed
    assert QuantConfig.from_dict(older).attention is None
    with pytest.raises(ConfigError, match="attention quantization is fp8_e4m3 only"):
        cfg.replace(attention=ActSpec(Format.INT8))
    with pytest.raises(ConfigError, match="attention must be an ActSpec"):
        cfg.replace(attention="fp8")


# --- calibration ----------------------------------------------------------------------------------------
def test_calibration_gives_finite_positive_scales_per_site_and_group(dit_plans):
    case, plans = dit_plans
    assert plans["w8a8-fp8"].attention is None
    for name, groups in (("w8a8-fp8-attn", 1), ("k2", 2)):
        rec = plans[name].attention
        assert sorted(rec.scales) == KEYS and rec.unsupported == {}
        for triples in rec.scales.values():
            assert len(triples) == groups
            assert all(math.isfinite(s) and s > 0 for t in triples for s in t)
    # max-abs: the scale maps the largest |q| seen onto 448 (e4m3's largest code); checked on the first layer's q
    rec = plans["w8a8-fp8-attn"].attention
    seen = []
    attn = case.model.transformer_blocks[0].attn1
    hook = attn.to_q.register_forward_hook(lambda m, i, o: seen.append(float(o.abs().max())))
    with torch.no_grad():
        _run(case)(case.model)
    hook.remove()
    assert rec.scales[KEYS[0]][0][0] == pytest.approx(max(seen) / 448, rel=1e-5)
    a, b = plans["k2"].attention.scales[KEYS[0]]
    assert a != b  # each group its own scales


def test_unsupported_sites_recorded_with_their_reason():
    case = tiny_dit()  # heads of 16
    plan = _calibrate(case, QuantConfig.preset("w8a8-fp8-attn"))
    assert plan.attention.scales == {}
    assert sorted(plan.attention.unsupported) == KEYS
    assert all("head dim 16" in r for r in plan.attention.unsupported.values())


# --- plan file -----------------------------------------------------------------------------------------------
def test_plan_roundtrip_keeps_the_attention_record(dit_plans, tmp_path):
    _, plans = dit_plans
    for name in ("w8a8-fp8-attn", "k2", "w8a8-fp8"):
        plan = plans[name]
        loaded = QuantPlan.load(plan.save(tmp_path / f"{name}.qplan"))
        assert (loaded.attention is None) == (plan.attention is None)
        if plan.attention is not None:
            assert loaded.attention.scales == plan.attention.scales and loaded.attention.unsupported == plan.attention.unsupported
        assert loaded.fingerprint == plan.fingerprint and loaded.digest() == plan.digest()
    assert plans["w8a8-fp8-attn"].fingerprint != plans["w8a8-fp8"].fingerprint  # attention keys are part of the identity


@pytest.mark.parametrize("edit, match", [
    (lambda d: d["attention"]["scales"][KEYS[0]][0].__setitem__(1, -1.0), "not three finite positive numbers"),
    (lambda d: d["attention"]["scales"][KEYS[0]][0].__setitem__(0, float("nan")), "not three finite positive numbers"),
    (lambda d: d["attention"]["scales"][KEYS[0]].append([1.0, 1.0, 1.0]), "2 scale triples for 1 timestep groups"),
    (lambda d: d["attention"].update(version=9), "attention record version 9"),
    (lambda d: d["attention"]["scales"].update({"other.sdpa": d["attention"]["scales"].pop(KEYS[0])}), "fingerprint"),
    (lambda d: d.update(attention=None), "config quantizes attention but the plan has no attention record"),
    (lambda d: d["attention"]["unsupported"].update({KEYS[0]: "x"}), "both have scales and are kept in full precision"),
])
def test_tampered_attention_record_is_refused(dit_plans, tmp_path, edit, match):
    _, plans = dit_plans
    path = plans["w8a8-fp8-attn"].save(tmp_path / "p.qplan")
    _rewrite(path, lambda d, t: edit(d))
    with pytest.raises(PlanFileError, match=match):
        QuantPlan.load(path)


def test_version_2_plan_without_attention_loads(dit_plans, tmp_path):
    _, plans = dit_plans
    path = plans["w8a8-fp8"].save(tmp_path / "old.qplan")

    def older(d, t):
        d["format_version"] = 2
        del d["attention"]

    _rewrite(path, older)
    assert QuantPlan.load(path).attention is None


# --- compile ------------------------------------------------------------------------------------------------------
def _compiled(case, plan, **options):
    torch._dynamo.reset()
    plan.warned.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = _out(case, qcompile.compile(case.model, plan, **{"inductor": False, **options}))
    return out, [str(w.message) for w in caught if str(w.message).startswith("qdiff:")]


def test_attention_converted_and_close_to_float_and_to_w8a8_fp8(dit_plans):
    case, plans = dit_plans
    ref = _out(case, case.model)
    base, _ = _compiled(case, plans["w8a8-fp8"])
    out, warned = _compiled(case, plans["w8a8-fp8-attn"])
    graph = plans["w8a8-fp8-attn"].compiled[-1].converted
    calls = [n for n in graph.graph.nodes if n.target is reference.qattention]
    assert len(calls) == 2 and not any("scaled_dot_product" in str(n.target) for n in graph.graph.nodes)
    assert all(n.args[3].op == "get_attr" for n in calls)  # scales are buffers
    assert not any("sdpa" in w for w in warned)
    db, db_base = sqnr_db(ref, out), sqnr_db(ref, base)
    assert db > 20 and db > db_base - 3, (db, db_base)  # fp8 q / k / v / P costs a little on top of the fp8 GEMMs
    assert sqnr_db(base, out) > 20


def test_timestep_groups_share_code_and_use_their_own_scales(dit_plans):
    case, plans = dit_plans
    plan = plans["k2"]
    torch._dynamo.reset()
    plan.warned.clear()
    model = qcompile.compile(plan=plan, model=case.model, inductor=False)
    early, late = _out(case, model, 950), _out(case, model, 20)
    assert len(plan.compiled) == 2
    g0, g1 = (r.converted for r in plan.compiled)
    assert g0.code == g1.code
    names = [n.target for n in g0.graph.nodes if n.op == "get_attr" and n.target.startswith("qdiff_attn_")]
    assert len(names) == 6
    assert any(not torch.equal(getattr(g0, n), getattr(g1, n)) for n in names)
    for out, t in ((early, 950), (late, 20)):
        assert sqnr_db(_out(case, case.model, t), out) > 20


def test_unsupported_attention_stays_float_and_is_named_once():
    case = tiny_dit()
    plan = _calibrate(case, QuantConfig.preset("w8a8-fp8-attn"))
    out, warned = _compiled(case, plan)
    graph = plan.compiled[-1].converted
    assert not any(n.target is reference.qattention for n in graph.graph.nodes)
    assert sum("scaled_dot_product_attention" in str(n.target) for n in graph.graph.nodes) == 2
    assert len(warned) == 1
    for key in KEYS:
        assert f"  {key}: unsupported: head dim 16 outside the fp8 kernel's 32-160" in warned[0]
    # without an attention config the same calls are not mentioned (attention is not part of those plans)
    plain = _calibrate(case, QuantConfig.preset("w8a8-fp8"))
    _, warned = _compiled(case, plain)
    assert not any("sdpa" in w for w in warned)


def test_plan_without_a_site_of_the_graph_is_refused(dit_plans):
    case, plans = dit_plans
    plan = plans["w8a8-fp8-attn"]
    scales = dict(plan.attention.scales)
    try:
        del plan.attention.scales[KEYS[1]]
        with pytest.raises(Exception) as info:  # (Dynamo wraps backend errors)
            _compiled(case, plan)
        assert isinstance(info.value, PlanMismatchError) or "PlanMismatchError" in str(info.value)
        assert f"attention call #1 '{KEYS[1]}'" in str(info.value)
    finally:
        plan.attention.scales.update(scales)


# --- variants -------------------------------------------------------------------------------------------------------
def test_eval_and_bench_variants(monkeypatch):
    from qcompile import bench, evaluate

    assert evaluate.variants()["w8a8-fp8-attn"] == QuantConfig.preset("w8a8-fp8-attn")
    assert {"qdiff-w8a8-fp8-attn", "qdiff-w8a8-fp8-attn-cudagraphs"} <= set(bench.VARIANTS)

    def inputs(device, dtype, t):
        args, kwargs = tiny_dit_attn().make_inputs()
        kwargs = {**kwargs, "timestep": torch.full((2,), t)}
        return {"hidden_states": args[0].to(device, dtype), **kwargs}

    monkeypatch.setitem(bench.MODELS, "tiny-attn", bench.BenchModel("tiny-attn", "tiny DiT, 32-wide heads", lambda: tiny_dit_attn().model, inputs))
    row = bench.measure("tiny-attn", "qdiff-w8a8-fp8-attn", "cpu", budget_s=0.05)
    assert row.status == "ok" and row.ms > 0 and row.calibration_s > 0


@pytest.mark.inductor
def test_inductor_compiles_the_reference_attention(dit_plans):
    """The converted graph (reference qattention, e4m3 casts) through AOTAutograd + Inductor's CPU backend."""
    case, plans = dit_plans
    eager, _ = _compiled(case, plans["w8a8-fp8-attn"])
    fused, _ = _compiled(case, plans["w8a8-fp8-attn"], inductor=True)
    assert sqnr_db(eager, fused) > 35

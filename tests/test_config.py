import pytest

from qcompile import ActSpec, ConfigError, FirstLastPolicy, Format, QuantConfig, RangeMethod, WeightSpec


@pytest.mark.parametrize("name", QuantConfig.PRESETS)
def test_presets_roundtrip_through_dict(name):
    cfg = QuantConfig.preset(name)
    assert cfg.name == name
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg


def test_preset_contents():
    assert QuantConfig.preset("w8a8-fp8").act.fmt is Format.FP8_E4M3
    w4a16 = QuantConfig.preset("w4a16")
    assert w4a16.act is None and w4a16.weight.group_size == 64
    assert QuantConfig.preset("w4a8").first_last is FirstLastPolicy.EIGHT_BIT


def test_naive_baseline_disables_range_search():
    naive = QuantConfig.preset("w8a8-int8").naive()
    assert naive.act.range_method is RangeMethod.MINMAX and not naive.weight.clip_search


def test_frozen_and_validated():
    cfg = QuantConfig.preset("w8a8-int8")
    with pytest.raises(Exception):
        cfg.name = "x"
    with pytest.raises(ConfigError, match="unknown preset"):
        QuantConfig.preset("w3a3")
    with pytest.raises(ConfigError, match="group_size"):
        WeightSpec(Format.INT8, group_size=64)
    with pytest.raises(ConfigError, match="4-bit activations"):
        ActSpec(Format.INT4)
    with pytest.raises(ConfigError, match="6-bit activations"):
        ActSpec(Format.INT6)
    assert Format.INT6.bits == 6 and Format.INT6.is_int
    with pytest.raises(ConfigError, match="version"):
        QuantConfig.from_dict({**cfg.to_dict(), "version": 99})
    with pytest.raises(ConfigError, match="ops is empty"):
        cfg.replace(ops=())


def test_fp8_activations_are_always_symmetric():
    assert ActSpec("fp8_e4m3", symmetric=False).symmetric


def test_timestep_groups_round_trip_and_validation():
    for k in (1, 10, "auto"):
        cfg = QuantConfig.preset("w8a8-int8").replace(timestep_groups=k)
        assert QuantConfig.from_dict(cfg.to_dict()) == cfg
    assert QuantConfig.preset("w8a8-int8").replace(timestep_groups="auto").group_boundaries == "segment"
    seg = QuantConfig.preset("w8a8-int8").replace(timestep_groups=5, group_boundaries="segment")
    assert QuantConfig.from_dict(seg.to_dict()).group_boundaries == "segment"
    for bad in (0, -2, "many", 2.5, True):
        with pytest.raises(ConfigError, match="timestep_groups"):
            QuantConfig.preset("w8a8-int8").replace(timestep_groups=bad)
    with pytest.raises(ConfigError, match="group_boundaries"):
        QuantConfig.preset("w8a8-int8").replace(group_boundaries="random")


def test_version_1_dicts_move_timestep_groups_out_of_calibration():
    d = QuantConfig.preset("w8a8-int8").replace(timestep_groups=4).to_dict()
    v1 = {**{k: v for k, v in d.items() if k not in ("timestep_groups", "group_boundaries")}, "version": 1}
    v1["calibration"] = {**d["calibration"], "timestep_groups": 4}
    assert QuantConfig.from_dict(v1) == QuantConfig.preset("w8a8-int8").replace(timestep_groups=4)


def test_weight_rounding_round_trip_validation_and_version_3_dicts():
    from qcompile.config import AllocationSpec, Rounding

    for rounding in Rounding:
        cfg = QuantConfig.preset("w4a8").replace(weight=WeightSpec(Format.INT4, group_size=64, rounding=rounding, rounding_iters=50))
        d = cfg.to_dict()
        assert d["version"] == 5 and d["weight"]["rounding"] == rounding.value
        assert QuantConfig.from_dict(d) == cfg
    assert WeightSpec("int5", rounding="learned").rounding is Rounding.LEARNED
    with pytest.raises(ConfigError, match="learned rounding applies to integer weights"):
        WeightSpec(Format.FP8_E4M3, rounding=Rounding.LEARNED)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ConfigError, match="rounding_iters"):
            WeightSpec(Format.INT4, rounding_iters=bad)
    with pytest.raises(ValueError):
        WeightSpec(Format.INT4, rounding="stochastic")
    # version 3 said gptq: bool
    for gptq, want in ((True, Rounding.GPTQ), (False, Rounding.NEAREST)):
        d = QuantConfig.preset("w4a8").to_dict()
        d["version"] = 3
        d["weight"] = {k: v for k, v in d["weight"].items() if k not in ("rounding", "rounding_iters")} | {"gptq": gptq}
        assert QuantConfig.from_dict(d).weight == WeightSpec(Format.INT4, group_size=64, rounding=want)
    # the allocation's candidates round as the base spec (fp8 and full precision cannot)
    base = WeightSpec(Format.INT4, group_size=64, rounding=Rounding.LEARNED, rounding_iters=77)
    spec = AllocationSpec(candidates=("int4g32", "int6", "fp8_e4m3", "bf16"))
    assert spec.weight_spec("int6", base).rounding is Rounding.LEARNED and spec.weight_spec("int4g32", base).rounding_iters == 77
    assert spec.weight_spec("fp8_e4m3", base).rounding is Rounding.NEAREST and spec.weight_spec("bf16", base) is None


def test_embedding_tables_int8_in_the_w4_presets_and_absent_from_version_4_dicts():
    assert QuantConfig.preset("w4a16").embedding_tables is Format.INT8 and QuantConfig.preset("w4a8").embedding_tables is Format.INT8
    assert QuantConfig.preset("w8a8-fp8").embedding_tables is None
    d = QuantConfig.preset("w4a16").to_dict()
    assert d["embedding_tables"] == "int8" and QuantConfig.from_dict(d) == QuantConfig.preset("w4a16")
    v4 = {k: v for k, v in d.items() if k != "embedding_tables"} | {"version": 4}
    assert QuantConfig.from_dict(v4) == QuantConfig.preset("w4a16").replace(embedding_tables=None)
    for bad in ("int4", Format.FP8_E4M3, True):
        with pytest.raises(ConfigError, match="embedding_tables must be int8 or None"):
            QuantConfig.preset("w4a16").replace(embedding_tables=bad)

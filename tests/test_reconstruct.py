import dataclasses

import pytest
import torch
import torch.nn as nn

import qcompile
from qcompile import QuantConfig, QuantPlan, Rounding
from qcompile.lowering.formats import unpack_int4
from qcompile.metrics import sqnr_db
from qcompile.reconstruct import refinable


class TokenMLP(nn.Module):
    """Tokens through two residual MLP blocks; only the first 4 of 8 tokens reach the output."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(16, 32)
        self.up1, self.down1 = nn.Linear(32, 64), nn.Linear(64, 32)
        self.up2, self.down2 = nn.Linear(32, 64), nn.Linear(64, 32)
        self.norm = nn.LayerNorm(32)
        self.out = nn.Linear(32, 16)

    def forward(self, x, t):
        h = self.inp(x) * (1 + t.reshape(-1, 1, 1))
        h = h + self.down1(torch.nn.functional.gelu(self.up1(h)))
        h = h + self.down2(torch.nn.functional.gelu(self.up2(h)))
        return self.out(self.norm(h))[:, :4]


def _data(seed, n=24):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, 16, generator=g) @ (torch.eye(16) + 0.5 * torch.randn(16, 16, generator=g))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return TokenMLP().eval()


def _run(x):
    return lambda m: [m(x, torch.full((x.shape[0],), t)) for t in (0.9, 0.6, 0.3, 0.1, 0.0)]


def _sqnr(model, plan, x):
    torch._dynamo.reset()
    q = qcompile.compile(model, plan, inductor=False)
    with torch.no_grad():
        return sum(sqnr_db(model(x, torch.full((x.shape[0],), t)), q(x, torch.full((x.shape[0],), t))) for t in (0.8, 0.4, 0.05)) / 3


def test_joint_rounding_beats_layer_wise_rounding_on_unseen_inputs_and_roundtrips(model, tmp_path):
    base = QuantConfig.preset("w4a16").replace(first_last="quantize")
    x_cal, x_test = _data(1, 48), _data(2)
    plans, sqnr = {}, {}
    for rounding in (Rounding.LEARNED, Rounding.JOINT):
        cfg = base.replace(weight=dataclasses.replace(base.weight, rounding=rounding, rounding_iters=200, joint_iters=400))
        torch._dynamo.reset()
        plan = qcompile.calibrate(model, _run(x_cal), cfg, progress=False)
        plans[rounding] = plan = QuantPlan.load(plan.save(tmp_path / f"{rounding.value}.qplan"))
        sqnr[rounding] = _sqnr(model, plan, x_test)
    record = plans[Rounding.JOINT].meta["joint_rounding"]
    assert record["kept"] and record["weights"] == 6 and record["calls_held_out"] == record["calls_fit"] == 5  # rows held out
    assert record["sqnr_db_after"]["held_out"] > record["sqnr_db_before"]["held_out"]
    assert sqnr[Rounding.JOINT] > sqnr[Rounding.LEARNED] + 1.0, sqnr
    assert plans[Rounding.JOINT].config.weight.rounding is Rounding.JOINT and "joint_rounding" not in plans[Rounding.LEARNED].meta
    # same scales and formats; integer storage; only the rounding of some values moved, by at most one step
    for key, n in plans[Rounding.JOINT].nodes.items():
        ref = plans[Rounding.LEARNED].nodes[key]
        assert torch.equal(n.weight.scale, ref.weight.scale) and n.weight.data.dtype == torch.uint8
        diff = unpack_int4(n.weight.data).int() - unpack_int4(ref.weight.data).int()
        assert int(diff.abs().max()) <= 1
        assert not torch.equal(n.bias_correction, ref.bias_correction) or torch.equal(diff, torch.zeros_like(diff))
    assert any(int((unpack_int4(n.weight.data) != unpack_int4(plans[Rounding.LEARNED].nodes[k].weight.data)).sum()) > 0
               for k, n in plans[Rounding.JOINT].nodes.items())


def test_joint_rounding_leaves_fp8_and_full_precision_nodes(model):
    cfg = QuantConfig.preset("w8a8-fp8").replace(first_last="skip")
    with pytest.raises(qcompile.ConfigError, match="joint rounding applies to integer weights"):
        cfg.replace(weight=dataclasses.replace(cfg.weight, rounding=Rounding.JOINT))
    base = QuantConfig.preset("w4a16").replace(first_last="skip", weight=dataclasses.replace(QuantConfig.preset("w4a16").weight, rounding=Rounding.JOINT, rounding_iters=50, joint_iters=20))
    torch._dynamo.reset()
    plan = qcompile.calibrate(model, _run(_data(1, 8)), base, progress=False)
    assert not plan.nodes["inp"].quantized and not plan.nodes["out"].quantized  # first / last skipped: not refined
    assert sorted(plan.meta["joint_rounding"]["nodes"]) == ["down1", "down2", "up1", "up2"]
    assert not refinable(plan.nodes["inp"]) and all(refinable(plan.nodes[k]) for k in ("up1", "down2"))


def test_joint_rounding_refines_per_group_allocations(model):
    from qcompile import AllocationSpec

    base = QuantConfig.preset("w4a16").replace(first_last="quantize")
    cfg = base.replace(
        weight=dataclasses.replace(base.weight, rounding=Rounding.JOINT, rounding_iters=50, joint_iters=60), timestep_groups=2,
        weight_bit_budget=5.0, allocation=AllocationSpec(candidates=("int4", "int5", "int6"), per_group=True, calls_per_group=2),
    )
    torch._dynamo.reset()
    plan = qcompile.calibrate(model, _run(_data(1, 10)), cfg, progress=False)
    differs = [n for n in plan.nodes.values() if n.group_weights is not None and n.group_weights[0] is not n.group_weights[1]]
    assert differs  # some node has other formats in the two groups: each group's weight is refined on its own calls
    record = plan.meta["joint_rounding"]
    assert record["weights"] > len(plan.nodes) and record["calls_fit"] == record["calls_held_out"] > 0
    for n in differs:  # per group: its own weight, its own bias correction row
        for g in range(2):
            assert n.weight_for(g).data.dtype in (torch.uint8, torch.int8)
        assert n.bias_correction.shape[0] == 2


def test_split_rows_holds_out_every_fifth_batch_row():
    from qcompile.reconstruct import split_rows

    x, t, y = torch.arange(10.0).reshape(10, 1), torch.tensor(0.5), torch.arange(10)
    fit, held = split_rows(((x, t), {"y": y}))
    assert held[0][0].flatten().tolist() == [4.0, 9.0] and held[1]["y"].tolist() == [4, 9] and held[0][1] is t
    assert fit[0][0].shape[0] == 8 and fit[1]["y"].tolist() == [0, 1, 2, 3, 5, 6, 7, 8]
    assert split_rows(((torch.zeros(4, 3),), {})) is None  # too few rows: whole calls are held out instead

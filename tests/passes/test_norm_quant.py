"""passes/norm_quant.py: DiT block boundaries (residual add + LayerNorm + modulation + the next fp8 GEMM's input
quantization) become one ``add_norm_modulate_fp8`` call, with the model output of the unfused graph (Triton lowering, in
the interpreter on CPU); what does not match is left alone."""

import operator

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F

from qcompile.lowering.kernels.norm_quant import add_norm_modulate_fp8
from qcompile.metrics import sqnr_db
from qcompile.passes.norm_quant import ENV, enabled_from_env, match_boundary
from tests.lowering.kernels.helpers import calibrated_tiny_dit_attn, compiled_with_switch, needs_kernels


@needs_kernels
def test_dit_block_boundaries_become_one_call_with_the_same_output(monkeypatch):
    case, args, kwargs, plan = calibrated_tiny_dit_attn()
    outs, records = compiled_with_switch(monkeypatch, case, plan, args, kwargs, ENV)
    on, off = records["1"], records["0"]
    calls = [n for n in on.converted.graph.nodes if n.target is add_norm_modulate_fp8]
    # per block: before attention (the first block's without a residual add) and before the feed-forward
    assert on.norm_quant == len(calls) >= 4 and off.norm_quant == 0
    assert sum(n.args[1] is not None for n in calls) >= 3  # with the residual add (and gate) folded in
    assert not any(n.target is F.layer_norm for n in on.converted.graph.nodes if n.users and all(u.target is operator.mul for u in n.users)
                   and any(c.args[0] is n for c in calls))
    assert sqnr_db(outs["0"], outs["1"]) > 30  # fp32 statistics vs the unfused graph's; both quantize to the same grid


def test_the_switch_is_on_by_default(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert enabled_from_env()
    monkeypatch.setenv(ENV, "0")
    assert not enabled_from_env()


def _traced(fn, *shapes):
    """``fn`` traced by FX with example tensors recorded on each node (as Dynamo records them)."""
    gm = fx.symbolic_trace(fn)
    from torch.fx.passes.shape_prop import ShapeProp

    ShapeProp(gm).propagate(*(torch.randn(*s) for s in shapes))
    for n in gm.graph.nodes:
        if "tensor_meta" in n.meta:
            n.meta["example_value"] = torch.empty_strided(n.meta["tensor_meta"].shape, n.meta["tensor_meta"].stride)
    return gm


def test_the_matcher_takes_the_block_code_and_nothing_else():
    def block(r, y, gate, scale, shift):
        h = gate * (y / 1.0) + r
        return F.layer_norm(h, (8,), None, None, 1e-6) * (1 + scale) + shift

    def affine_norm(r, y, gate, scale, shift):
        return F.layer_norm(r, (8,), torch.ones(8), None, 1e-6) * (1 + scale) + shift

    def per_token_scale(r, y, gate, scale, shift):  # scale varies per token: not the adaLN modulation
        return F.layer_norm(r, (8,), None, None, 1e-6) * (1 + y) + shift

    shapes = [(2, 5, 8), (2, 5, 8), (2, 1, 8), (2, 1, 8), (2, 1, 8)]
    gm = _traced(block, *shapes)
    out = [n for n in gm.graph.nodes if n.op == "output"][0].args[0]
    b = match_boundary(out)
    names = {p.name: p for p in gm.graph.nodes if p.op == "placeholder"}
    assert b is not None and b.eps == 1e-6
    assert (b.residual, b.branch, b.gate, b.scale, b.shift) == tuple(names[k] for k in ("r", "y", "gate", "scale", "shift"))
    for fn in (affine_norm, per_token_scale):
        gm = _traced(fn, *shapes)
        assert match_boundary([n for n in gm.graph.nodes if n.op == "output"][0].args[0]) is None, fn.__name__

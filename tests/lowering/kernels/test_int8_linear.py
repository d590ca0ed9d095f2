"""INT8 W8A8 GEMM: exact integer accumulation, and agreement with the reference lowering."""

import pytest
import torch

from qcompile.lowering.kernels import int8_linear, weight_colsum
from qcompile.lowering.reference import qlinear, quantize_activation
from qcompile.lowering.weights import quantize_weight
from qcompile.metrics import sqnr_db

from .helpers import DEVICE, act_qparams, needs_kernels, randn, slice_qparams, spread_slices

pytestmark = needs_kernels


@pytest.mark.parametrize("asym", [True, False])
def test_integer_accumulation_is_exact(asym):
    """Power-of-two scales make every step exact in fp32, so the output must equal the integer product."""
    m, k, n = 21, 80, 40  # K = 80: the last K tile is masked, so padding must contribute (q - zp) = 0
    wq = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    w_scale = torch.full((n, 1), 2.0**-7)
    x = torch.randn(m, k) * 3 + (1.0 if asym else 0.0)
    a_scale = torch.tensor(2.0**-5)
    a_zp = torch.tensor(-17 if asym else 0, dtype=torch.int32)
    xq = quantize_activation(x, a_scale, a_zp, "int8", not asym)  # the pure-PyTorch quantizer
    acc = (xq.long() - a_zp.long()) @ wq.long().T  # exact integer reference
    expected = acc.double() * (2.0**-5 * 2.0**-7)
    assert acc.abs().max() < 2**24
    out = int8_linear(x.to(DEVICE), wq.to(DEVICE), w_scale.to(DEVICE), None, a_scale.to(DEVICE), a_zp.to(DEVICE) if asym else None)
    assert torch.equal(out.double().cpu(), expected)


def test_weight_colsum():
    w = torch.randint(-127, 128, (5, 300), dtype=torch.int8)
    assert torch.equal(weight_colsum(w), w.long().sum(1).int())


@pytest.mark.parametrize("dtype,floor", [(torch.float32, 45), (torch.bfloat16, 35)])
def test_int8_linear_matches_reference(dtype, floor):
    k, n = 96, 48
    qw = quantize_weight(torch.randn(n, k), "int8", "linear", clip_search=False)
    w, ws = qw.data.to(DEVICE), qw.scale.to(DEVICE)
    x = randn(3, 11, k, dtype=dtype, shift=0.7)
    smooth = (torch.rand(k) + 0.5).to(DEVICE)
    s, z = act_qparams(x.float() * smooth, "int8", True)
    b, corr = randn(n), randn(n, scale=0.1)
    out = int8_linear(x, w, ws, b, s, z, act_smooth=smooth, act="silu", bias_corr=corr)
    ref = qlinear(x, w, ws, b, s, z, wfmt="int8", group_size=None, weight_shape=qw.shape, afmt="int8", asym=True,
                  bias_corr=corr, act_smooth=smooth)
    assert out.dtype == dtype and out.shape == (3, 11, n)
    assert sqnr_db(torch.nn.functional.silu(ref.float()), out.float()) > floor


def test_asymmetric_needs_colsum_at_op_level():
    x, w = randn(4, 32), torch.zeros(8, 32, dtype=torch.int8, device=DEVICE)
    one = torch.ones((), device=DEVICE)
    zp = torch.zeros((), dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="column sums"):
        torch.ops.qdiff.int8_linear(x, w, torch.ones(8, device=DEVICE), None, None, one, zp, None, 0)


# -- split ops (split-shortcut quantization): per-slice quantizers and weight scales -------------------------------
# The interpreter's BLOCK_K is 32: bounds 20 / 45 fall inside K tiles (masked to each slice), 32 / 64 on tile edges.
SPLITS = [(0, 20, 72), (0, 32, 64, 96), (0, 20, 45, 72), (0, 128, 256)]  # (bounds on 128: the unmasked EVEN_K path)


@pytest.mark.parametrize("asym", [True, False])
@pytest.mark.parametrize("splits", SPLITS)
def test_split_integer_accumulation_is_exact(splits, asym):
    """Power-of-two scales per slice (and per output channel and slice): every step is exact in fp32, so the output
    must equal sum over slices of the integer product times the slice's scales."""
    m, n = 13, 40
    k, ns = splits[-1], len(splits) - 1
    wq = torch.randint(-63, 64, (n, k), dtype=torch.int8)
    w_scale = 2.0 ** -torch.randint(6, 9, (n, ns)).float()
    a_scale = torch.tensor([2.0**-5, 2.0**-3, 2.0**-6][:ns])
    a_zp = torch.tensor([-17, 5, 0][:ns] if asym else [0] * ns, dtype=torch.int32)
    x = spread_slices(torch.randn(m, k), splits, -1)
    expected = torch.zeros(m, n, dtype=torch.float64)
    for i, (a, b) in enumerate(zip(splits, splits[1:])):
        xq = quantize_activation(x[:, a:b], a_scale[i], a_zp[i], "int8", not asym)  # the pure-PyTorch quantizer
        acc = (xq.long() - a_zp[i].long()) @ wq[:, a:b].long().T  # exact integer product of the slice
        assert acc.abs().max() < 2**18  # (scaled sums stay within fp32's 24 bits: exact)
        expected += acc.double() * (a_scale[i].double() * w_scale[:, i].double())
    out = int8_linear(x.to(DEVICE), wq.to(DEVICE), w_scale.to(DEVICE), None, a_scale.to(DEVICE), a_zp.to(DEVICE) if asym else None,
                      splits=splits)
    assert torch.equal(out.double().cpu(), expected)


def test_split_weight_colsum():
    w = torch.randint(-127, 128, (5, 300), dtype=torch.int8)
    cs = weight_colsum(w, [0, 100, 250, 300])
    assert cs.shape == (5, 3) and torch.equal(cs.sum(1), weight_colsum(w))
    assert torch.equal(cs[:, 1], w[:, 100:250].long().sum(1).int())


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # interpreter: sigmoid of very negative values
@pytest.mark.parametrize("asym", [True, False])
def test_split_int8_linear_matches_reference(asym):
    splits, n = (0, 24, 40, 88), 48
    k = splits[-1]
    qw = quantize_weight(torch.randn(n, k), "int8", "linear", clip_search=False, splits=splits)
    w, ws = qw.data.to(DEVICE), qw.scale.to(DEVICE)
    x = spread_slices(randn(3, 11, k), splits, -1).to(torch.bfloat16)
    smooth = (torch.rand(k) + 0.5).to(DEVICE)
    s, z = slice_qparams(x.float() * smooth, splits, "int8", asym, -1)
    b, corr = randn(n), randn(n, scale=0.1)
    out = int8_linear(x, w, ws, b, s, z if asym else None, act_smooth=smooth, act="silu", bias_corr=corr, splits=splits)
    ref = qlinear(x.float(), w, ws, b, s, z, wfmt="int8", group_size=None, weight_shape=qw.shape, afmt="int8", asym=asym,
                  bias_corr=corr, act_smooth=smooth, splits=splits)
    assert out.dtype == torch.bfloat16 and out.shape == (3, 11, n)
    assert sqnr_db(torch.nn.functional.silu(ref), out.float()) > 40

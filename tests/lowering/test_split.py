"""Split ops in the reference lowering: per-slice activation quantizers and per-slice weight scales."""

import pytest
import torch
import torch.nn.functional as F

from qcompile.lowering.reference import qconv, qlinear
from qcompile.lowering.weights import QuantizedWeight, quantize_weight, storage_shape
from qcompile.metrics import sqnr_db


def _asym(x):
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = (hi - lo) / 255
    return scale, round(-128 - lo / scale)


def _resplit(qw: QuantizedWeight, splits):
    """The same per-channel weight stored as a split weight whose slices all have the unsplit scale."""
    n = len(splits) - 1
    return QuantizedWeight(qw.fmt, qw.data, qw.scale.repeat(1, n).contiguous(), qw.shape, qw.kind, qw.group_size, tuple(splits))


def test_equal_scales_per_slice_equal_the_unsplit_op_exactly():
    torch.manual_seed(0)
    x, w, b = torch.randn(5, 24), torch.randn(16, 24), torch.randn(16)
    qw = quantize_weight(w, "int8", "linear")
    s, z = _asym(x)
    whole = qlinear(x, qw.data, qw.scale, b, torch.tensor(s), torch.tensor(z, dtype=torch.int32),
                    wfmt="int8", group_size=None, weight_shape=qw.shape, afmt="int8", asym=True)
    sw = _resplit(qw, (0, 10, 24))
    split = qlinear(x, sw.data, sw.scale, b, torch.tensor([s, s]), torch.tensor([z, z], dtype=torch.int32),
                    wfmt="int8", group_size=None, weight_shape=sw.shape, afmt="int8", asym=True, splits=sw.splits)
    assert torch.equal(whole, split)

    xc, wc = torch.randn(2, 6, 5, 5), torch.randn(4, 6, 3, 3)
    qc = quantize_weight(wc, "fp8_e4m3", "conv")
    s = torch.tensor(float(xc.abs().max()) / 448)
    kw = dict(wfmt="fp8_e4m3", group_size=None, kind="conv", stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1, afmt="fp8_e4m3")
    whole = qconv(xc, qc.data, qc.scale, None, s, torch.tensor(0, dtype=torch.int32), weight_shape=qc.shape, **kw)
    sc = _resplit(qc, (0, 1, 4, 6))
    split = qconv(xc, sc.data, sc.scale, None, s.repeat(3), torch.zeros(3, dtype=torch.int32), weight_shape=sc.shape, splits=sc.splits, **kw)
    assert torch.equal(whole, split)


@pytest.mark.parametrize("wfmt,group,gain", [("int8", None, 15), ("int4", 64, 10)])  # int4 weight error caps the gain
def test_per_slice_quantization_beats_one_scale_on_a_cat_of_different_ranges(wfmt, group, gain):
    torch.manual_seed(0)
    # a skip concat: shallow features of small range next to deep features of large range
    x = torch.cat((0.05 * torch.randn(8, 48, 6, 6), 8.0 * torch.randn(8, 80, 6, 6).relu()), dim=1)
    w = torch.cat((2.0 * torch.randn(16, 48, 3, 3), 0.02 * torch.randn(16, 80, 3, 3)), dim=1)  # the weight balances them
    ref = F.conv2d(x, w, padding=1)
    kw = dict(wfmt=wfmt, group_size=group, kind="conv", stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1, afmt="int8", asym=True)

    qw = quantize_weight(w, wfmt, "conv", group)
    s, z = _asym(x)
    one = qconv(x, qw.data, qw.scale, None, torch.tensor(s), torch.tensor(z, dtype=torch.int32), weight_shape=qw.shape, **kw)

    splits = (0, 48, 128)
    sw = quantize_weight(w, wfmt, "conv", group, splits=splits)
    params = [_asym(x[:, a:b]) for a, b in zip(splits, splits[1:])]
    scales = torch.tensor([p[0] for p in params])
    zps = torch.tensor([p[1] for p in params], dtype=torch.int32)
    per_slice = qconv(x, sw.data, sw.scale, None, scales, zps, weight_shape=sw.shape, splits=splits, **kw)
    assert sqnr_db(ref, per_slice) > sqnr_db(ref, one) + gain


def test_split_weight_layout():
    torch.manual_seed(0)
    w = torch.randn(8, 40, 3, 3)  # K = 360, 9 taps per input channel
    # group-wise int4: groups restart at the slice boundary, each slice padded to whole groups
    qw = quantize_weight(w, "int4", "conv", 64, splits=(0, 10, 40))  # K segments of 90 and 270
    assert (tuple(qw.data.shape), tuple(qw.scale.shape)) == storage_shape("int4", 8, 360, 64, (0, 10, 40))
    assert qw.scale.shape == (8, 2 + 5) and qw.data.shape == (8, (128 + 320) // 2)
    assert sqnr_db(w, qw.dequantize()) > 15
    # split points on group boundaries (in K): the unsplit layout, bit for bit
    lin = torch.randn(6, 256)
    a, b = quantize_weight(lin, "int4", "linear", 64), quantize_weight(lin, "int4", "linear", 64, splits=(0, 128, 256))
    assert torch.equal(a.data, b.data) and torch.equal(a.scale, b.scale) and torch.equal(a.dequantize(), b.dequantize())
    # per-channel: one scale per output channel per slice, each slice's own absolute maximum
    lin[:, :100] *= 100
    c = quantize_weight(lin, "int8", "linear", None, clip_search=False, splits=(0, 100, 256))
    assert c.scale.shape == (6, 2)
    assert torch.allclose(c.scale[:, 1], lin[:, 100:].abs().amax(dim=1) / 127)
    # transposed conv: input channels are dim 0
    wt = torch.randn(12, 5, 2, 2)
    t = quantize_weight(wt, "int8", "conv_transpose", None, splits=(0, 4, 12))
    assert t.scale.shape == (5, 2) and sqnr_db(wt, t.dequantize()) > 35
    with pytest.raises(ValueError, match="invalid split points"):
        quantize_weight(lin, "int8", "linear", splits=(0, 300, 256))


def test_per_slice_parameters_must_match_the_split():
    x, w = torch.randn(2, 8), torch.randn(4, 8)
    qw = quantize_weight(w, "int8", "linear", splits=(0, 3, 8))
    with pytest.raises(ValueError, match="3 per-slice quantization parameters for 2 slices"):
        qlinear(x, qw.data, qw.scale, None, torch.ones(3), torch.zeros(3, dtype=torch.int32), wfmt="int8", group_size=None,
                weight_shape=qw.shape, afmt="int8", splits=qw.splits)

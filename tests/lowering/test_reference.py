import math

import pytest
import torch
import torch.nn.functional as F

from qcompile.lowering.formats import fake_quantize, quantize_fp8
from qcompile.lowering.reference import attention_probs, dequantize_activation, exp2_codes, qattention, qconv, qlinear, quantize_activation
from qcompile.lowering.weights import quantize_weight
from qcompile.metrics import sqnr_db


def _act(x, fmt, symmetric):
    lo, hi = float(x.min()), float(x.max())
    if fmt == "fp8_e4m3":
        return torch.tensor(max(-lo, hi) / 448), torch.tensor(0, dtype=torch.int32)
    if symmetric:
        return torch.tensor(max(-lo, hi) / 127), torch.tensor(0, dtype=torch.int32)
    scale = (hi - lo) / 255
    return torch.tensor(scale), torch.tensor(round(-128 - lo / scale), dtype=torch.int32)


def test_activation_storage_is_real_int8_and_fp8():
    x = torch.randn(4, 16)
    s, z = _act(x, "int8", False)
    q = quantize_activation(x, s, z, "int8", False)
    assert q.dtype == torch.int8
    assert sqnr_db(x, dequantize_activation(q, s, z, x.dtype)) > 38
    s, z = _act(x, "fp8_e4m3", True)
    q = quantize_activation(x, s, z, "fp8_e4m3", True)
    assert q.dtype == torch.float8_e4m3fn
    assert sqnr_db(x, dequantize_activation(q, s, z, x.dtype)) > 28


def test_qlinear_matches_float_linear():
    x, w, b = torch.randn(8, 64), torch.randn(32, 64), torch.randn(32)
    ref = F.linear(x, w, b)
    for wfmt, afmt, floor in [("int8", "int8", 33), ("fp8_e4m3", "fp8_e4m3", 24), ("int4", None, 15), ("int4", "int8", 15), ("int6", "int8", 24)]:
        qw = quantize_weight(w, wfmt, "linear", 64 if wfmt == "int4" else None)
        s, z = _act(x, afmt or "int8", False)
        out = qlinear(x, qw.data, qw.scale, b, s, z, wfmt=wfmt, group_size=qw.group_size, weight_shape=qw.shape, afmt=afmt, asym=True)
        assert sqnr_db(ref, out) > floor, (wfmt, afmt)


def test_weight_only_qlinear_equals_linear_with_dequantized_weight():
    x, w = torch.randn(3, 40), torch.randn(24, 40)
    qw = quantize_weight(w, "int4", "linear", None)
    out = qlinear(x, qw.data, qw.scale, None, None, None, wfmt="int4", group_size=None, weight_shape=qw.shape)
    assert torch.equal(out, F.linear(x, qw.dequantize()))


def test_qconv_and_transposed_conv_match_float():
    x = torch.randn(2, 8, 10, 10)
    w = torch.randn(16, 8, 3, 3)
    qw = quantize_weight(w, "int8", "conv", None)
    s, z = _act(x, "int8", True)
    out = qconv(x, qw.data, qw.scale, None, s, z, wfmt="int8", group_size=None, weight_shape=qw.shape, kind="conv",
                stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1, afmt="int8", asym=False)
    assert sqnr_db(F.conv2d(x, w, padding=1), out) > 33
    wt = torch.randn(8, 4, 2, 2)
    qt = quantize_weight(wt, "int8", "conv_transpose", None)
    out = qconv(x, qt.data, qt.scale, None, None, None, wfmt="int8", group_size=None, weight_shape=qt.shape,
                kind="conv_transpose", stride=(2, 2), padding=(0, 0), dilation=(1, 1), groups=1, output_padding=(0, 0))
    assert sqnr_db(F.conv_transpose2d(x, wt, stride=2), out) > 35


def test_bf16_activations_keep_their_dtype():
    x, w = torch.randn(4, 32, dtype=torch.bfloat16), torch.randn(16, 32)
    qw = quantize_weight(w, "int8", "linear")
    s, z = _act(x.float(), "int8", True)
    out = qlinear(x, qw.data, qw.scale, None, s, z, wfmt="int8", group_size=None, weight_shape=qw.shape, afmt="int8", asym=False)
    assert out.dtype == torch.bfloat16


def test_int6_conv_is_exactly_the_float_conv_of_the_dequantized_weight():
    x, w = torch.randn(2, 8, 9, 9), torch.randn(16, 8, 3, 3)
    qw = quantize_weight(w, "int6", "conv", None)
    zero = torch.tensor(0, dtype=torch.int32)
    out = qconv(x, qw.data, qw.scale, None, torch.tensor(1.0), zero, wfmt="int6", group_size=None, weight_shape=qw.shape,
                kind="conv", stride=1, padding=1, dilation=1, groups=1)
    assert torch.equal(out, F.conv2d(x, qw.dequantize(), None, 1, 1))


def _attn_case(sq=33, sk=47, d=72):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, sq, d), torch.randn(2, 3, sk, d), torch.randn(2, 3, sk, d)
    return (q, k, v), [torch.tensor(float(t.abs().max()) / 448) for t in (q, k, v)]


def test_qattention_quantizes_qkv_and_probabilities():
    """fp8 q / k / v (same codes from float or fp8 inputs), e4m3 probabilities: close to float attention, and the P
    quantization is really there (not the float softmax of the fake-quantized inputs)."""
    (q, k, v), s = _attn_case()
    out = qattention(q, k, v, *s)
    assert out.dtype == torch.float32 and out.shape == q.shape
    assert sqnr_db(F.scaled_dot_product_attention(q, k, v), out) > 22
    codes = [quantize_fp8(t, sc) for t, sc in zip((q, k, v), s)]
    assert torch.equal(qattention(*codes, *s, out_dtype=torch.float32), out)
    assert qattention(*codes, *s).dtype == torch.bfloat16
    fq = [fake_quantize(t, "fp8_e4m3", sc) for t, sc in zip((q, k, v), s)]
    float_p = F.scaled_dot_product_attention(*fq)
    assert 30 < sqnr_db(float_p, out) < 80


def test_qattention_uniform_scores_average_the_values():
    """All scores equal (k = 0): every P is 448 (the e4m3 maximum), so the output is the mean of the quantized values."""
    v = torch.randn(1, 2, 50, 64)
    sv = torch.tensor(float(v.abs().max()) / 448)
    q, k = torch.randn(1, 2, 9, 64), torch.zeros(1, 2, 50, 64)
    one = torch.tensor(1.0)
    out = qattention(q, k, v, one, one, sv)
    mean = fake_quantize(v, "fp8_e4m3", sv).mean(-2, keepdim=True).expand_as(out)
    torch.testing.assert_close(out, mean, rtol=1e-5, atol=1e-6)


def test_exp2_codes_are_the_nearest_e4m3_codes_but_one_in_a_hundred():
    """The bit-built codes of ``2**x`` (x in [-6, log2 448]) against round-to-nearest: at most 2 % differ, each by one
    code (one e4m3 step); below 2**-6 the absolute error stays under 2**-6; the maximum is exactly 448."""
    x = torch.linspace(-6.0, math.log2(448.0), 200_001)
    bits, nearest = exp2_codes(x - 0.5), torch.exp2(x).to(torch.float8_e4m3fn)
    steps = (bits.view(torch.uint8).int() - nearest.view(torch.uint8).int()).abs()
    assert steps.max() == 1 and 0 < (steps == 1).float().mean() < 0.02
    assert bits[-1].float() == 448.0
    tiny = torch.linspace(-30.0, -6.0, 10_001)
    assert (exp2_codes(tiny - 0.5).float() - torch.exp2(tiny)).abs().max() < 2.0 ** -6


@pytest.mark.parametrize("softmax", ["ex2", "ex2-lv", "bits", "half"])
def test_attention_probs_modes(softmax):
    """Each softmax mode's P lies on the e4m3 grid in [0, 448] with each row's maximum at 448 (P scaled so), and its
    row sum is the quantized P's except in ``ex2`` (the fp32 P's); ``half`` takes the odd columns from the bits."""
    s = torch.randn(3, 40) * 4
    m = s.amax(-1, keepdim=True)
    p8, l = attention_probs(s, m, softmax)
    assert torch.equal(p8, p8.to(torch.float8_e4m3fn).float()) and p8.min() >= 0 and torch.all(p8.amax(-1) == 448)
    exact = torch.exp2(s - m) * 448
    assert torch.allclose(l, (exact if softmax == "ex2" else p8).sum(-1, keepdim=True))
    if softmax == "half":
        assert torch.equal(p8[:, 1::2], attention_probs(s, m, "bits")[0][:, 1::2])
        assert torch.equal(p8[:, ::2], attention_probs(s, m, "ex2")[0][:, ::2])
    with pytest.raises(ValueError, match="softmax mode 'exp'"):
        attention_probs(s, m, "exp")

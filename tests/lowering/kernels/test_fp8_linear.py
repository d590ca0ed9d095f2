"""FP8 W8A8 GEMM against the reference lowering (interpreter on CPU, or the real kernel on CUDA).

In the interpreter the fp8 ``tl.dot`` itself runs (exactly); only the float -> fp8 cast of the
prologue takes an fp32 rounding path, because the interpreter's cast mis-rounds values that round
up to the next power of two (see ``_common.quantize_fp8``).
"""

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from qcompile.lowering.kernels import fp8_linear, fp8_linear_prequant
from qcompile.lowering.reference import qlinear, quantize_activation
from qcompile.lowering.weights import quantize_weight
from qcompile.metrics import sqnr_db

from .helpers import DEVICE, act_qparams, needs_kernels, randn, slice_qparams, spread_slices

pytestmark = needs_kernels


def _weight(n, k):
    qw = quantize_weight(torch.randn(n, k), "fp8_e4m3", "linear", clip_search=False)
    return qw, qw.data.to(DEVICE), qw.scale.to(DEVICE)


def _ref(x, qw, w, ws, b, s, **kw):
    z = torch.zeros(s.shape, dtype=torch.int32, device=x.device)  # (one per slice for split ops)
    return qlinear(x, w, ws, b, s, z, wfmt="fp8_e4m3", group_size=None, weight_shape=qw.shape, afmt="fp8_e4m3", **kw)


@pytest.mark.parametrize("k", [80, 128])  # K tail masked / K a multiple of every tile
def test_fp8_linear_matches_reference(k):
    qw, w, ws = _weight(40, k)
    x = randn(2, 19, k)
    x[0, 3, :5] *= 30  # outliers beyond the scale's range saturate at +-448 like the reference
    s, _ = act_qparams(x, "fp8_e4m3", False)
    s = s / 4
    b, corr = randn(40), randn(40, scale=0.1)
    out = fp8_linear(x, w, ws, b, s, bias_corr=corr)
    ref = _ref(x, qw, w, ws, b, s, bias_corr=corr)
    assert out.shape == (2, 19, 40) and out.dtype == torch.float32
    assert sqnr_db(ref, out) > 45


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # interpreter: sigmoid of very negative values
def test_fp8_linear_bf16_smoothing_and_activations():
    qw, w, ws = _weight(48, 64)
    x = randn(37, 64, dtype=torch.bfloat16)
    smooth = (torch.rand(64) + 0.5).to(DEVICE)
    s, _ = act_qparams(x.float() * smooth, "fp8_e4m3", False)
    ref = _ref(x, qw, w, ws, None, s, act_smooth=smooth).float()
    for act, fn in [("none", lambda y: y), ("silu", F.silu), ("gelu_tanh", lambda y: F.gelu(y, approximate="tanh"))]:
        out = fp8_linear(x, w, ws, None, s, act_smooth=smooth, act=act)
        assert out.dtype == torch.bfloat16
        assert sqnr_db(fn(ref), out.float()) > 35, act


def test_prequantized_fp8_input():
    qw, w, ws = _weight(32, 96)
    x = randn(5, 96)
    s, z = act_qparams(x, "fp8_e4m3", False)
    xq = quantize_activation(x, s, z, "fp8_e4m3", True)
    out = fp8_linear_prequant(xq, w, ws, None, s, out_dtype=torch.float16)
    assert out.dtype == torch.float16
    assert sqnr_db(_ref(x, qw, w, ws, None, s).float(), out.float()) > 40


def test_bad_arguments_name_the_problem():
    qw, w, ws = _weight(16, 32)
    x = randn(4, 32)
    s, _ = act_qparams(x, "fp8_e4m3", False)
    with pytest.raises(TypeError, match="weight must be one of"):
        fp8_linear(x, w.view(torch.int8), ws, None, s)
    with pytest.raises(ValueError, match="K=32"):
        fp8_linear(randn(4, 48), w, ws, None, s)
    with pytest.raises(TypeError, match="activation scale"):
        torch.ops.qdiff.fp8_linear(x, w, ws.reshape(-1), None, s.double(), None, 0, None)
    with pytest.raises(ValueError, match="unknown epilogue activation"):
        fp8_linear(x, w, ws, None, s, act="relu6")


def test_fake_implementations_give_shapes_and_dtypes():
    with FakeTensorMode():
        x = torch.empty(7, 32, dtype=torch.bfloat16)
        w = torch.empty(16, 32, dtype=torch.float8_e4m3fn)
        ws, s = torch.empty(16), torch.empty(())
        y = torch.ops.qdiff.fp8_linear(x, w, ws, None, s, None, 0, None)
        yq = torch.ops.qdiff.fp8_linear_prequant(x.to(torch.float8_e4m3fn), w, ws, None, s, 0, torch.float16, None)
    assert (y.shape, y.dtype) == ((7, 16), torch.bfloat16)
    assert (yq.shape, yq.dtype) == ((7, 16), torch.float16)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")
def test_fp8_output_epilogue_feeds_the_next_gemm():
    """fc1 + GELU with its output quantized for fc2 (fc2's scale) == reference fc1 -> GELU -> fc2."""
    from qcompile.lowering.kernels.fp8_linear import quantize_input_fp8

    qw1, w1, ws1 = _weight(64, 48)
    qw2, w2, ws2 = _weight(24, 64)
    x = randn(21, 48)
    s1, _ = act_qparams(x, "fp8_e4m3", False)
    h_ref = F.gelu(_ref(x, qw1, w1, ws1, None, s1), approximate="tanh")
    s2, _ = act_qparams(h_ref, "fp8_e4m3", False)
    hq = fp8_linear(x, w1, ws1, None, s1, act="gelu_tanh", out_scale=s2)
    assert hq.dtype == torch.float8_e4m3fn and hq.shape == (21, 64)
    # the same fp8 codes as quantizing the reference activation (up to rare one-step flips at rounding ties)
    exact = quantize_input_fp8(h_ref, s2)
    assert (hq.float() == exact.float()).float().mean() > 0.97
    out = fp8_linear_prequant(hq, w2, ws2, None, s2, out_dtype=torch.float32)
    assert sqnr_db(_ref(h_ref, qw2, w2, ws2, None, s2), out) > 35


@pytest.mark.parametrize("x_fp8", [True, False])
def test_fp8_output_with_one_scale_per_column_is_exact(x_fp8):
    """``out_scale`` of N entries (a q / k / v projection's sections, each with its attention input's scale): every
    column quantized with its own scale. Integer codes and power-of-two scales make each step exact, so the codes equal
    the reference's byte for byte; a scale vector of the wrong length is refused."""
    from qcompile.lowering.heads import exact_case
    from qcompile.lowering.kernels.fp8_linear import quantize_input_fp8

    x8, w8, ws, bias, a_scale, out_scale, y = exact_case(40, 64, 216, seed=3, device=DEVICE)
    x = x8.to(torch.float8_e4m3fn) if x_fp8 else x8 * a_scale  # float input: quantized in the prologue to the same codes
    w = w8.to(torch.float8_e4m3fn)
    got = (fp8_linear_prequant(x, w, ws, bias, a_scale, torch.float32, out_scale=out_scale) if x_fp8
           else fp8_linear(x, w, ws, bias, a_scale, out_scale=out_scale))
    assert got.dtype == torch.float8_e4m3fn and len(out_scale.unique()) > 1
    assert torch.equal(got.view(torch.uint8), quantize_input_fp8(y, out_scale).view(torch.uint8))
    with pytest.raises(ValueError, match=r"output scale must have shape \(216,\)"):
        fp8_linear(x8 * a_scale, w, ws, bias, a_scale, out_scale=out_scale[:7])


def test_producer_quantization_matches_the_reference_quantizer():
    from qcompile.lowering.kernels.fp8_linear import quantize_input_fp8

    x = randn(9, 40, dtype=torch.bfloat16)
    smooth = (torch.rand(40) + 0.5).to(DEVICE)
    s, z = act_qparams(x.float() * smooth, "fp8_e4m3", False)
    xs = x * smooth.to(x.dtype)
    assert torch.equal(quantize_input_fp8(x, s, smooth).float(), quantize_activation(xs, s, z, "fp8_e4m3", True).float())


# -- split ops (split-shortcut quantization): per-slice scales inside the K loop ----------------------------------
# The interpreter's BLOCK_K is 32: bounds 20 / 45 / 70 fall inside K tiles (masked to each slice), 32 / 64 on tile edges.
SPLITS = [(0, 20, 72), (0, 32, 64, 96), (0, 20, 45, 72), (0, 128, 256)]  # (bounds on 128: the unmasked EVEN_K path)


@pytest.mark.parametrize("splits", SPLITS)
def test_split_fp8_linear_matches_reference(splits):
    k, n = splits[-1], 40
    qw = quantize_weight(torch.randn(n, k), "fp8_e4m3", "linear", clip_search=False, splits=splits)
    w, ws = qw.data.to(DEVICE), qw.scale.to(DEVICE)
    assert ws.shape == (n, len(splits) - 1)
    x = spread_slices(randn(3, 7, k), splits, -1)
    s, _ = slice_qparams(x, splits, "fp8_e4m3", False, -1)
    b = randn(n)
    out = fp8_linear(x, w, ws, b, s, splits=splits)
    ref = _ref(x, qw, w, ws, b, s, splits=splits)
    assert out.shape == (3, 7, n)
    assert sqnr_db(ref, out) > 45
    # one shared scale per slice would be a different (worse) op: the kernel really applies each slice's scales
    unsplit = _ref(x, qw, w, ws[:, :1].contiguous(), b, s[:1].reshape(()))
    assert sqnr_db(ref, unsplit) < 30


@pytest.mark.parametrize("splits", SPLITS + [(0, 64, 192)])
def test_split_fp8_linear_on_prequantized_slices_matches_reference(splits):
    """Each slice quantized by its producer with its own scale (``quantize_slices_fp8``, as the im2col conv does):
    the kernel's split path skips its prologue and gives the same codes' product as the reference."""
    from qcompile.lowering.kernels.fp8_linear import quantize_slices_fp8

    k, n = splits[-1], 40
    qw = quantize_weight(torch.randn(n, k), "fp8_e4m3", "linear", clip_search=False, splits=splits)
    w, ws = qw.data.to(DEVICE), qw.scale.to(DEVICE)
    x = spread_slices(randn(3, 7, k), splits, -1)
    s, _ = slice_qparams(x, splits, "fp8_e4m3", False, -1)
    b = randn(n)
    xq = quantize_slices_fp8(x, s, splits)
    z = torch.zeros(s.shape, dtype=torch.int32, device=x.device)
    for i, (lo, hi) in enumerate(zip(splits, splits[1:])):  # the reference's per-slice codes, exactly
        assert torch.equal(xq[..., lo:hi].float(), quantize_activation(x[..., lo:hi], s[i], z[i], "fp8_e4m3", True).float())
    out = fp8_linear_prequant(xq, w, ws, b, s, torch.float32, splits=splits)
    assert out.shape == (3, 7, n) and sqnr_db(_ref(x, qw, w, ws, b, s, splits=splits), out) > 45


def test_split_tile_tables():
    """Bounds on 128: the split table unmasked; on 64 only (320 / 960 input channels x 9 taps): the BLOCK_K = 64
    table, unmasked; elsewhere the split table, masked."""
    import importlib

    table = importlib.import_module("qcompile.lowering.kernels.fp8_linear").tile_table  # (the package re-exports a function of that name)
    assert table(8192, 23040, (11520, 0, 0), True, True) == ("split", True)
    assert table(8192, 8640, (5760, 0, 0), True, True) == ("split_k64", True)
    assert table(8192, 72, (20, 0, 0), True, False) == ("split", False)
    assert table(8192, 1152, (0, 0, 0), False, True) == ("large_prequant", True)
    assert table(64, 8640, (5760, 0, 0), True, True) == ("small", False)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # interpreter: sigmoid of very negative values
def test_split_fp8_linear_bf16_smoothing_activation_and_fp8_output():
    splits, n = (0, 24, 56), 48
    k = splits[-1]
    qw = quantize_weight(torch.randn(n, k), "fp8_e4m3", "linear", clip_search=False, splits=splits)
    w, ws = qw.data.to(DEVICE), qw.scale.to(DEVICE)
    x = spread_slices(randn(9, k), splits, -1).to(torch.bfloat16)
    smooth = (torch.rand(k) + 0.5).to(DEVICE)
    s, _ = slice_qparams(x.float() * smooth, splits, "fp8_e4m3", False, -1)
    b, corr = randn(n), randn(n, scale=0.1)
    ref = F.gelu(_ref(x.float(), qw, w, ws, b, s, splits=splits, act_smooth=smooth, bias_corr=corr), approximate="tanh")
    out = fp8_linear(x, w, ws, b, s, act_smooth=smooth, act="gelu_tanh", bias_corr=corr, splits=splits)
    assert out.dtype == torch.bfloat16 and sqnr_db(ref, out.float()) > 35
    o_scale = torch.tensor(float(ref.abs().max()) / 448, device=DEVICE)
    q = fp8_linear(x, w, ws, b, s, act_smooth=smooth, act="gelu_tanh", bias_corr=corr, out_scale=o_scale, splits=splits)
    assert q.dtype == torch.float8_e4m3fn and sqnr_db(ref, q.float() * o_scale) > 25


def test_split_arguments_are_checked():
    qw = quantize_weight(torch.randn(8, 32), "fp8_e4m3", "linear", clip_search=False, splits=(0, 16, 32))
    w, ws, x = qw.data.to(DEVICE), qw.scale.to(DEVICE), randn(4, 32)
    s = torch.ones(2, device=DEVICE)
    with pytest.raises(ValueError, match="increase strictly from 0 to 32"):
        fp8_linear(x, w, ws, None, s, splits=(0, 16, 30))
    with pytest.raises(ValueError, match="at most 4"):
        fp8_linear(x, w, ws, None, s, splits=(0, 4, 8, 12, 16, 32))
    with pytest.raises(TypeError, match="one entry per slice"):
        fp8_linear(x, w, ws, None, torch.ones(3, device=DEVICE), splits=(0, 16, 32))
    with pytest.raises(ValueError, match=r"\(N, slices\) = \(8, 2\)"):
        fp8_linear(x, w, ws[:, :1], None, s, splits=(0, 16, 32))

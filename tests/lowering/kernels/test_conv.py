"""W8A8 conv2d as implicit GEMM and as fp8 im2col + GEMM, 1x1 convs on the GEMM kernels, and the reference fallback."""

import importlib

import pytest
import torch

from qcompile.lowering import reference, triton_lowering
from qcompile.lowering.weights import quantize_weight
from qcompile.metrics import sqnr_db

from .helpers import DEVICE, FP8_SUM_ORDER_SQNR_DB, act_qparams, needs_kernels, randn, slice_qparams, spread_slices

pytestmark = needs_kernels


def _conv_call(x, wshape, wfmt, afmt, asym, group=None, kind="conv", stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1, smooth=True):
    w = torch.randn(*wshape)
    qw = quantize_weight(w, wfmt, kind, group, clip_search=False)
    s, z = act_qparams(x, afmt or "int8", asym)
    c_in = x.shape[1]
    kw = dict(wfmt=wfmt, group_size=group, weight_shape=qw.shape, kind=kind, stride=stride, padding=padding, dilation=dilation,
              groups=groups, afmt=afmt, asym=asym, bias_corr=randn(qw.out_features, scale=0.1),
              act_smooth=(torch.rand(c_in) + 0.5).to(DEVICE) if smooth and afmt else None)
    args = (x, qw.data.to(DEVICE), qw.scale.to(DEVICE), randn(qw.out_features), s, z)
    return args, kw


ENGINES = ("im2col", "implicit", "direct")  # QDIFF_CONV_ENGINE: the fp8 conv engines; int8 convs always take the implicit kernel


def _use_engine(monkeypatch, engine: str, wfmt: str) -> str:
    """Select the fp8 conv engine; the route a conv of ``wfmt`` then takes."""
    monkeypatch.setenv("QDIFF_CONV_ENGINE", engine)
    return engine if wfmt == "fp8_e4m3" else "implicit"


def _engine_cases(cases):
    """Each case with every fp8 engine (int8 cases once: they have one)."""
    return [(*c, e) for c in cases for e in ENGINES if c[0] == "fp8_e4m3" or e == "implicit"]


@pytest.mark.parametrize(
    "wfmt,asym,stride,padding,dilation,engine",
    _engine_cases([("fp8_e4m3", False, (1, 1), (1, 1), (1, 1)), ("int8", True, (2, 1), (1, 2), (1, 2)), ("int8", False, (1, 2), (0, 1), (2, 1)),
                   ("fp8_e4m3", False, (2, 1), (1, 2), (1, 2))]),
)
def test_conv_matches_reference(wfmt, asym, stride, padding, dilation, engine, monkeypatch):
    expected = _use_engine(monkeypatch, engine, wfmt)
    x = randn(2, 48, 7, 9, shift=0.3)  # C = 48: the channel tail of each tap's last block is masked
    args, kw = _conv_call(x, (20, 48, 3, 3), wfmt, wfmt, asym, stride=stride, padding=padding, dilation=dilation)
    route = triton_lowering.conv_route(x, **{k: kw[k] for k in ("wfmt", "afmt", "group_size", "weight_shape", "kind", "stride", "padding", "dilation", "groups")})
    assert route is not None and route[0] == expected
    out = triton_lowering.qconv(*args, **kw)
    ref = reference.qconv(*args, **kw)
    assert out.shape == ref.shape and out.is_contiguous(memory_format=torch.channels_last)
    assert sqnr_db(ref, out) > 45


@pytest.mark.parametrize("engine", ["im2col", "direct"])
@pytest.mark.parametrize("ksize,stride,padding", [((1, 3), (1, 1), (0, 1)), ((3, 1), (2, 1), (1, 0)), ((2, 2), (2, 2), (0, 0))])
def test_fp8_im2col_conv_with_non_square_kernels(ksize, stride, padding, engine, monkeypatch):
    """The im2col and direct engines match the reference for any kernel shape (a 1x3, a 3x1 and a 2x2 patchify conv),
    the plan's weight reordered to column order per call (converted graphs store it so)."""
    _use_engine(monkeypatch, engine, "fp8_e4m3")
    x = randn(2, 32, 6, 7, shift=0.2).contiguous(memory_format=torch.channels_last)
    args, kw = _conv_call(x, (24, 32, *ksize), "fp8_e4m3", "fp8_e4m3", False, stride=stride, padding=padding)
    assert _route(x, {**kw, "splits": None})[0] == engine
    out, ref = triton_lowering.qconv(*args, **kw), reference.qconv(*args, **kw)
    assert out.shape == ref.shape and sqnr_db(ref, out) > 45


@pytest.mark.parametrize("splits", [None, (0, 16, 48)])
def test_fp8_im2col_column_writers_agree(splits, monkeypatch):
    """``qdiff::im2col`` on the once-quantized activation and the all-aten columns (``QDIFF_IM2COL_WRITER=inductor``)
    give the same codes, so the same output."""
    _use_engine(monkeypatch, "im2col", "fp8_e4m3")
    x = randn(2, 48, 6, 7, shift=0.2)
    if splits is None:
        args, kw = _conv_call(x, (24, 48, 3, 3), "fp8_e4m3", "fp8_e4m3", False, stride=(2, 1))
    else:  # smoothing too: it is applied before the quantization on both paths
        args, kw = _split_conv_call(spread_slices(x, splits, 1), 24, 3, "fp8_e4m3", splits, False, (2, 1), (1, 1), smooth=True)
    outs = {}
    for writer in ("kernel", "inductor"):
        monkeypatch.setenv("QDIFF_IM2COL_WRITER", writer)
        outs[writer] = triton_lowering.qconv(*args, **kw)
    assert torch.equal(outs["kernel"], outs["inductor"])
    assert sqnr_db(reference.qconv(*args, **kw), outs["kernel"]) > 45
    monkeypatch.setenv("QDIFF_IM2COL_WRITER", "nope")
    with pytest.raises(ValueError, match="QDIFF_IM2COL_WRITER must be one of kernel, inductor"):
        triton_lowering.qconv(*args, **kw)


# The direct engine (QDIFF_CONV_ENGINE=direct): the producer's fp8 codes are the im2col engine's (same aten ops), and
# its K loop walks taps x channel blocks of BLOCK_K channels, i.e. the column GEMM's K tiles whenever the channel count
# and every slice bound are multiples of BLOCK_K (32 in the interpreter): then the same products are summed in the same
# order and the outputs are equal bit for bit. Otherwise a K tile of the columns spans two taps where the direct kernel
# masks each tap's last channel block, so only the fp32 summation order differs. (On a GPU the two autotuners pick
# their own tiles and the fp8 dots accumulate with reduced precision: FP8_SUM_ORDER_SQNR_DB.)
@pytest.mark.parametrize(
    "c,splits,smooth,exact",
    [(64, None, True, True), (64, (0, 32, 64), True, True), (96, (0, 32, 64, 96), False, True),
     (48, None, True, False), (48, (0, 20, 48), True, False), (48, (0, 16, 20, 48), False, False)],
)
def test_fp8_direct_engine_agrees_with_im2col(c, splits, smooth, exact, monkeypatch):
    x = randn(2, c, 6, 7, shift=0.2)
    if splits is None:
        args, kw = _conv_call(x, (24, c, 3, 3), "fp8_e4m3", "fp8_e4m3", False, stride=(2, 1), smooth=smooth)
    else:
        args, kw = _split_conv_call(spread_slices(x, splits, 1), 24, 3, "fp8_e4m3", splits, False, (1, 2), (1, 1), smooth=smooth)
    outs = {}
    for engine in ("im2col", "direct"):
        _use_engine(monkeypatch, engine, "fp8_e4m3")
        assert _route(args[0], {"splits": None, **kw})[0] == engine
        outs[engine] = triton_lowering.qconv(*args, **kw)
    assert outs["direct"].is_contiguous(memory_format=torch.channels_last)
    ref = reference.qconv(*args, **kw)
    db = {"direct~im2col": sqnr_db(outs["im2col"], outs["direct"]), "ref~direct": sqnr_db(ref, outs["direct"]),
          "ref~im2col": sqnr_db(ref, outs["im2col"])}
    if exact and DEVICE.type == "cpu":
        assert torch.equal(outs["direct"], outs["im2col"])
    elif DEVICE.type == "cpu":
        torch.testing.assert_close(outs["direct"], outs["im2col"], rtol=1e-5, atol=1e-5)
    else:
        assert db["direct~im2col"] > FP8_SUM_ORDER_SQNR_DB, db
    assert db["ref~direct"] > 45, db


def test_fp8_direct_engine_reads_the_stored_column_weight(monkeypatch):
    """A weight stored for the im2col engine (column order, slice by slice) is the direct engine's too: no per-call
    reorder; given in the plan's order it is reordered per call (same result)."""
    from qcompile.lowering import conv_im2col

    _use_engine(monkeypatch, "direct", "fp8_e4m3")
    splits = (0, 20, 48)
    args, kw = _split_conv_call(spread_slices(randn(2, 48, 5, 6), splits, 1), 16, 3, "fp8_e4m3", splits, False, (1, 1), (1, 1))
    stored = conv_im2col.columns_weight(args[1], tuple(kw["weight_shape"]), splits)
    calls, real = [], conv_im2col.columns_weight
    monkeypatch.setattr(conv_im2col, "columns_weight", lambda *a: calls.append(a) or real(*a))
    a = triton_lowering.qconv(args[0], stored, *args[2:], **kw, weight_layout=conv_im2col.COLUMNS_LAYOUT)
    assert calls == []
    b = triton_lowering.qconv(*args, **kw)
    assert len(calls) == 1 and torch.equal(a, b)


def _prequant_args(c=32, n=16, splits=None, dtype=torch.float8_e4m3fn):
    from qcompile.lowering.kernels.fp8_linear import quantize_input_fp8

    xq = quantize_input_fp8(randn(2, 5, 6, c), torch.tensor(0.01, device=DEVICE)) if dtype == torch.float8_e4m3fn else randn(2, 5, 6, c).to(dtype)
    w = randn(n, 9 * c).clamp(-448, 448).to(torch.float8_e4m3fn)
    ns = 1 if splits is None else len(splits) - 1
    w_scale = torch.full((n,) if splits is None else (n, ns), 1e-3, device=DEVICE)
    a_scale = torch.tensor(0.01, device=DEVICE) if splits is None else torch.full((ns,), 0.01, device=DEVICE)
    return xq, w, w_scale, None, a_scale


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(dtype=torch.bfloat16), r"xq \(the producer-quantized activation.*float8_e4m3fn.*got torch.bfloat16"),
        (dict(weight=torch.int8), r"weight must be one of \['torch.float8_e4m3fn'\]"),
        (dict(out_dtype=torch.float8_e4m3fn), r"out_dtype must be one of"),
        (dict(weight_cols=8 * 32), r"weight has 256 columns, expected KH\*KW\*C = 3\*3\*32"),
        (dict(splits=(0, 8, 16)), r"split points \(0, 8, 16\) must increase strictly from 0 to 32 input channels"),
        (dict(nhwc=False), r"xq \(the producer-quantized activation, \(B, H, W, C\)\).*4 dims"),
    ],
)
def test_fp8_prequant_conv_refuses_bad_arguments(change, match):
    from qcompile.lowering.kernels import conv2d_fp8_prequant

    xq, w, w_scale, bias, a_scale = _prequant_args(dtype=change.get("dtype", torch.float8_e4m3fn))
    if "weight" in change:
        w = torch.zeros(w.shape, dtype=change["weight"], device=DEVICE)
    if "weight_cols" in change:
        w = w[:, : change["weight_cols"]].contiguous()
    if change.get("nhwc") is False:
        xq = xq.reshape(2, 30, 32)
    splits = change.get("splits")
    if splits is not None:
        w_scale, a_scale = w_scale[:, None].expand(-1, 2).contiguous(), a_scale.reshape(1).expand(2).contiguous()
    with pytest.raises((TypeError, ValueError), match=match):
        conv2d_fp8_prequant(xq, w, w_scale, bias, a_scale, change.get("out_dtype", torch.float32), kernel=(3, 3), stride=(1, 1),
                            padding=(1, 1), dilation=(1, 1), splits=splits)


@pytest.mark.parametrize("splits", [None, (0, 16, 32)])
def test_fp8_prequant_conv_traced_calls_reach_the_op(splits):
    """Under make_fx's fake tensors (as torch.compile traces) the wrapper calls ``torch.ops.qdiff.conv2d_fp8_prequant``,
    whose fake implementation gives the (B, OH, OW, N) output in ``out_dtype``; the traced graph computes the eager result."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from qcompile.lowering.kernels import conv2d_fp8_prequant

    xq, w, w_scale, bias, a_scale = _prequant_args(splits=splits)

    def f(t, w, w_scale, a_scale):
        return conv2d_fp8_prequant(t, w, w_scale, bias, a_scale, torch.bfloat16, kernel=(3, 3), stride=(2, 2), padding=(1, 1),
                                   dilation=(1, 1), act="silu", splits=splits)

    inputs = (xq, w, w_scale, a_scale)
    gm = make_fx(f, tracing_mode="fake")(*inputs)
    nodes = [n for n in gm.graph.nodes if n.target == torch.ops.qdiff.conv2d_fp8_prequant.default]
    assert len(nodes) == 1
    val = nodes[0].meta["val"]
    assert tuple(val.shape) == (2 * 3 * 3, 16) and val.dtype == torch.bfloat16
    out = f(*inputs)
    assert out.shape == (2, 3, 3, 16) and out.dtype == torch.bfloat16
    assert torch.equal(gm(*inputs), out)


@pytest.mark.parametrize("engine,instead", [("auto", "direct"), ("im2col", "implicit")])
def test_fp8_conv_with_a_large_column_matrix_takes_a_kernel_without_columns(monkeypatch, engine, instead):
    """Columns above MAX_COLUMN_BYTES are not materialized: the direct kernel (``auto``, the default) or the implicit
    one (``im2col`` forced) takes the conv, with the same result."""
    from qcompile.lowering import conv_im2col

    monkeypatch.setenv("QDIFF_CONV_ENGINE", engine)
    x = randn(2, 32, 6, 7, shift=0.2)
    args, kw = _conv_call(x, (24, 32, 3, 3), "fp8_e4m3", "fp8_e4m3", False)
    cols = conv_im2col.column_bytes(x.shape, (24, 32, 3, 3), (1, 1), (1, 1), (1, 1))
    assert cols == 2 * 6 * 7 * 32 * 9
    assert _route(x, {**kw, "splits": None})[0] == "im2col"
    monkeypatch.setattr(conv_im2col, "MAX_COLUMN_BYTES", cols - 1)
    assert _route(x, {**kw, "splits": None})[0] == instead
    assert sqnr_db(reference.qconv(*args, **kw), triton_lowering.qconv(*args, **kw)) > 45


@pytest.mark.parametrize("wfmt,afmt,group", [("int4", None, 64), ("fp8_e4m3", "fp8_e4m3", None)])
def test_pointwise_conv_runs_on_the_gemm_kernels(wfmt, afmt, group):
    x = randn(2, 32, 5, 6).contiguous(memory_format=torch.channels_last)
    args, kw = _conv_call(x, (16, 32, 1, 1), wfmt, afmt, False, group=group, padding=(0, 0))
    route = triton_lowering.conv_route(x, **{k: kw[k] for k in ("wfmt", "afmt", "group_size", "weight_shape", "kind", "stride", "padding", "dilation", "groups")})
    assert route is not None and route[0] == "gemm"
    out = triton_lowering.qconv(*args, **kw)
    assert sqnr_db(reference.qconv(*args, **kw), out) > 45


@pytest.mark.parametrize(
    "case",
    [
        dict(wshape=(16, 4, 3, 3), groups=2, wfmt="int8", afmt="int8"),  # grouped
        dict(wshape=(8, 4, 2, 2), kind="conv_transpose", stride=(2, 2), padding=(0, 0), wfmt="int8", afmt="int8"),
        dict(wshape=(16, 8, 3, 3), wfmt="int4", afmt="int8", group=64),  # int4 3x3: weight groups follow PyTorch's K order
        dict(wshape=(16, 8, 3, 3), wfmt="int8", afmt=None),  # weight-only 3x3
        dict(wshape=(16, 8, 2, 2), padding="same", wfmt="int8", afmt="int8"),  # asymmetric 'same' padding
        dict(wshape=(16, 8, 3, 3), wfmt="fp8_e4m3", afmt="fp8_e4m3"),  # 8 input channels: not a multiple of 16
    ],
)
def test_unsupported_convs_fall_back_to_the_reference(case):
    x = randn(2, 8, 6, 6)
    kw_in = dict(case)
    wshape, wfmt, afmt = kw_in.pop("wshape"), kw_in.pop("wfmt"), kw_in.pop("afmt")
    args, kw = _conv_call(x, wshape, wfmt, afmt, True, **kw_in)
    route = triton_lowering.conv_route(x, **{k: kw[k] for k in ("wfmt", "afmt", "group_size", "weight_shape", "kind", "stride", "padding", "dilation", "groups")})
    assert route is None
    assert torch.equal(triton_lowering.qconv(*args, **kw), reference.qconv(*args, **kw))


# -- split ops (split-shortcut quantization): slices over the input channels --------------------------------------
# The interpreter's BLOCK_K (channels per K step) is 32: bounds 20 / 40 fall inside channel blocks, 16 / 32 do not.
def _split_conv_call(x, n, ksize, wfmt, splits, asym, stride, padding, smooth=False):
    c = x.shape[1]
    qw = quantize_weight(torch.randn(n, c, ksize, ksize), wfmt, "conv", None, clip_search=False, splits=splits)
    sm = (torch.rand(c) + 0.5).to(DEVICE) if smooth else None
    s, z = slice_qparams(x if sm is None else x * sm[None, :, None, None], splits, wfmt, asym, 1)
    kw = dict(wfmt=wfmt, group_size=None, weight_shape=qw.shape, kind="conv", stride=stride, padding=padding, dilation=(1, 1),
              groups=1, afmt=wfmt, asym=asym, bias_corr=randn(n, scale=0.1), act_smooth=sm, splits=splits)
    return (x, qw.data.to(DEVICE), qw.scale.to(DEVICE), randn(n), s, z), kw


def _route(x, kw):
    return triton_lowering.conv_route(x, **{k: kw[k] for k in ("wfmt", "afmt", "group_size", "weight_shape", "kind", "stride", "padding",
                                                               "dilation", "groups", "splits")})


@pytest.mark.parametrize(
    "wfmt,asym,splits,stride,padding,smooth,engine",
    _engine_cases([
        ("fp8_e4m3", False, (0, 20, 48), (1, 1), (1, 1), False),
        ("int8", True, (0, 16, 40, 48), (2, 1), (1, 2), True),
        ("int8", False, (0, 32, 48), (1, 2), (0, 1), False),
        ("fp8_e4m3", False, (0, 16, 20, 48), (2, 2), (1, 1), False),
        ("fp8_e4m3", False, (0, 32, 48), (1, 1), (1, 1), True),
    ]),
)
def test_split_conv_matches_reference(wfmt, asym, splits, stride, padding, smooth, engine, monkeypatch):
    expected = _use_engine(monkeypatch, engine, wfmt)
    x = spread_slices(randn(2, 48, 7, 9), splits, 1)
    args, kw = _split_conv_call(x, 20, 3, wfmt, splits, asym, stride, padding, smooth=smooth)
    assert _route(x, kw)[0] == expected
    out = triton_lowering.qconv(*args, **kw)
    ref = reference.qconv(*args, **kw)
    assert out.shape == ref.shape and out.is_contiguous(memory_format=torch.channels_last)
    assert sqnr_db(ref, out) > 45


@pytest.mark.parametrize("wfmt,asym", [("int8", True), ("fp8_e4m3", False)])
def test_split_conv_with_bounds_on_block_edges(wfmt, asym, monkeypatch):
    """C = 256 split 128 + 128: every bound a multiple of every config's BLOCK_K (the implicit kernel's unmasked EVEN_C path)."""
    _use_engine(monkeypatch, "implicit", wfmt)
    splits = (0, 128, 256)
    x = spread_slices(randn(1, 256, 4, 3), splits, 1)
    args, kw = _split_conv_call(x, 16, 3, wfmt, splits, asym, (1, 1), (1, 1))
    assert _route(x, kw)[0] == "implicit"
    assert sqnr_db(reference.qconv(*args, **kw), triton_lowering.qconv(*args, **kw)) > 45


@pytest.mark.parametrize("asym", [True, False])
def test_split_int8_conv_is_exact_with_power_of_two_scales(asym):
    """Integer path: per-slice int8 codes convolved exactly (float64 conv of integers), times power-of-two scales."""
    splits, n = (0, 20, 48), 16
    x = spread_slices(torch.randn(2, 48, 6, 5), splits, 1)
    wq = torch.randint(-127, 128, (n, 48 * 9), dtype=torch.int8)
    w_scale = 2.0 ** -torch.randint(6, 9, (n, 2)).float()
    a_scale, a_zp = torch.tensor([2.0**-4, 2.0**-6]), torch.tensor([-9, 4] if asym else [0, 0], dtype=torch.int32)
    expected = torch.zeros(2, n, 6, 5, dtype=torch.float64)
    for i, (a, b) in enumerate(zip(splits, splits[1:])):
        xq = reference.quantize_activation(x[:, a:b], a_scale[i], a_zp[i], "int8", not asym).double() - float(a_zp[i])
        wi = wq.reshape(n, 48, 3, 3)[:, a:b].double()
        expected += torch.nn.functional.conv2d(xq, wi, padding=1) * (float(a_scale[i]) * w_scale[:, i].double())[None, :, None, None]
    kw = dict(wfmt="int8", group_size=None, weight_shape=(n, 48, 3, 3), kind="conv", stride=(1, 1), padding=(1, 1), dilation=(1, 1),
              groups=1, afmt="int8", asym=asym, splits=splits)
    out = triton_lowering.qconv(x.to(DEVICE), wq.to(DEVICE), w_scale.to(DEVICE), None, a_scale.to(DEVICE), a_zp.to(DEVICE), **kw)
    assert torch.equal(out.double().cpu(), expected)


@pytest.mark.parametrize("wfmt,asym", [("int8", True), ("fp8_e4m3", False)])
def test_split_pointwise_conv_runs_on_the_gemm_kernels(wfmt, asym):
    splits = (0, 12, 40)
    x = spread_slices(randn(2, 40, 5, 6), splits, 1).contiguous(memory_format=torch.channels_last)
    args, kw = _split_conv_call(x, 16, 1, wfmt, splits, asym, (1, 1), (0, 0))
    assert _route(x, kw) == ("gemm", ("int8" if wfmt == "int8" else "fp8",))
    out = triton_lowering.qconv(*args, **kw)
    assert sqnr_db(reference.qconv(*args, **kw), out) > 45


# -- split-K (small output grids: a second grid axis over K partitions, an fp32 workspace and a reduce kernel) ---------
# The interpreter counts 132 SMs, so the rule (QDIFF_CONV_SPLITK=1) splits these small shapes; the tests force SPLIT_K to cover
# several partition counts (up to more partitions than taps: empty partitions) and compare with SPLIT_K = 1.
conv_kernels = importlib.import_module("qcompile.lowering.kernels.conv")


def test_split_k_rule_splits_small_grids_only():
    rule = conv_kernels.split_k_rule
    assert rule(512, 1280, 9 * 20, 132) == 3  # SD 1.5 16x16 2560 -> 1280 3x3, batch 2: 40 tiles of 128 x 128
    assert rule(128, 1280, 9 * 10, 132) == 8  # 8x8 1280 -> 1280: 10 tiles, capped at SPLITK_MAX
    assert rule(8192, 320, 9 * 3, 132) == 1  # 64x64 320 -> 320: 192 tiles fill the GPU
    assert rule(2048, 640, 9 * 5, 132) == 1  # 32x32 640 -> 640: 80 tiles, 132 // 80 = 1
    assert rule(512, 1280, 9, 132) == 2  # every partition keeps >= 4 K steps
    assert rule(512, 1280, 3, 132) == 1
    assert rule(512, 1280, 180, 132, max_split=2) == 2
    assert rule(2**16, 2**14, 1000, 10**9) == 1  # workspace would reach 2**31 elements


def test_split_k_rule_with_a_symbolic_batch_gives_an_int():
    """Under torch.compile with a dynamic batch M is a SymInt: the rule guards on it and returns a plain int (a constexpr)."""
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv

    env = ShapeEnv()
    m = env.create_symintnode(env.create_symbol(512, source=ConstantSource("M"), dynamic_dim=DimDynamic.DYNAMIC), hint=512)
    split = conv_kernels.split_k_rule(m, 1280, 180, 132)
    assert type(split) is int and split == 3


def test_split_k_choice_on_this_device_and_its_switch(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv(conv_kernels.SPLITK_ENV, raising=False)
    assert conv_kernels.conv_split_k(32, 64, 160, 9, 1, cpu) == 1  # off by default (slower on an H200, kernels.md)
    monkeypatch.setenv(conv_kernels.SPLITK_ENV, "1")
    assert conv_kernels.conv_split_k(32, 64, 160, 9, 1, cpu) == 4  # interpreter: 132 SMs; 9 * 2 K steps of 128 channels
    assert conv_kernels.conv_split_k(32, 64, 2560, 9, 2, cpu) == 8
    assert conv_kernels.conv_split_k(32, 64, 2560, 4, 2, cpu) == 4  # split ops partition taps
    monkeypatch.setenv(conv_kernels.SPLITK_ENV, "0")
    assert conv_kernels.conv_split_k(32, 64, 160, 9, 1, cpu) == 1


def _int8_codes_case(c, n, splits, asym, stride, hw, seed):
    """int8 codes, power-of-two scales and a bias on a 1/16 grid: every fp32 step of the kernel is exact, so the
    result equals a float64 conv of the integer codes (``splits=None``: an unsplit op)."""
    g = torch.Generator().manual_seed(seed)
    pts = splits or (0, c)
    ns = len(pts) - 1
    x = spread_slices(torch.randn(2, c, *hw, generator=g), pts, 1)
    wq = torch.randint(-127, 128, (n, c * 9), dtype=torch.int8, generator=g)
    w_scale = 2.0 ** -torch.randint(6, 9, (n, ns), generator=g).float()
    a_scale = torch.tensor([2.0**-4, 2.0**-6, 2.0**-5][:ns])
    a_zp = torch.tensor([-9, 4, 7][:ns] if asym else [0] * ns, dtype=torch.int32)
    bias = torch.randint(-64, 64, (n,), generator=g).float() / 16
    expected = bias.double()[None, :, None, None]
    for i, (a, b) in enumerate(zip(pts, pts[1:])):
        xq = reference.quantize_activation(x[:, a:b], a_scale[i], a_zp[i], "int8", not asym).double() - float(a_zp[i])
        wi = wq.reshape(n, c, 3, 3)[:, a:b].double()
        expected = expected + torch.nn.functional.conv2d(xq, wi, stride=stride, padding=1) * (
            float(a_scale[i]) * w_scale[:, i].double())[None, :, None, None]
    if splits is None:
        w_scale, a_scale, a_zp = w_scale.reshape(n), a_scale.reshape(()), a_zp.reshape(())
    args = [t.to(DEVICE) for t in (x, wq, w_scale, bias, a_scale)] + [a_zp.to(DEVICE) if asym else None]
    return args, dict(weight_shape=(n, c, 3, 3), stride=stride, padding=(1, 1), dilation=(1, 1), splits=splits), expected


def _with_split_k(monkeypatch, split, fn):
    monkeypatch.setattr(conv_kernels, "conv_split_k", lambda *a: split)
    return fn()


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # (the interpreter's SiLU at large negative inputs)
@pytest.mark.parametrize(
    "c,n,splits,asym,stride,split",
    [
        (64, 32, None, False, (1, 1), 2),
        (160, 96, None, True, (2, 2), 3),  # 8x8 input at stride 2: M = 2x4x4
        (96, 48, None, True, (1, 1), 64),  # more partitions than K steps (27): empty ones write zeros
        (64, 40, (0, 20, 64), True, (1, 1), 3),  # 2 slices, bound inside a channel block
        (96, 32, (0, 32, 64, 96), False, (2, 1), 4),  # 3 slices, bounds on channel blocks
        (160, 64, (0, 20, 90, 160), True, (1, 1), 12),  # 3 slices, more partitions than taps
    ],
)
def test_split_k_int8_conv_is_exact(monkeypatch, c, n, splits, asym, stride, split):
    """SPLIT_K > 1: the exact float64 result (zero-point term once, partitions in final units), and equal to SPLIT_K = 1
    with a fused activation too."""
    from qcompile.lowering.kernels import conv2d_w8a8

    hw = (8, 8) if stride == (2, 2) else (4, 8) if stride == (2, 1) else (4, 4)
    args, kw, expected = _int8_codes_case(c, n, splits, asym, stride, hw, seed=c + n + split)
    out = _with_split_k(monkeypatch, split, lambda: conv2d_w8a8(*args, **kw))
    assert torch.equal(out.double().cpu(), expected)
    one = _with_split_k(monkeypatch, 1, lambda: conv2d_w8a8(*args, **kw, act="silu"))
    many = _with_split_k(monkeypatch, split, lambda: conv2d_w8a8(*args, **kw, act="silu"))
    assert torch.equal(one, many)
    assert torch.allclose(many.double().cpu(), torch.nn.functional.silu(expected), rtol=1e-6, atol=1e-6)


def test_auto_engine_routes_each_conv_by_its_shape(monkeypatch):
    """The default ``QDIFF_CONV_ENGINE=auto``: 8192 output pixels into 16 channels take the direct kernel, a small
    input the column GEMM (conv_im2col.auto_engine; the small one run against the reference, the large one is slow in
    the interpreter: the direct kernel's own tests cover it)."""
    monkeypatch.delenv("QDIFF_CONV_ENGINE", raising=False)
    for shape, engine in (((2, 16, 64, 64), "direct"), ((2, 16, 6, 7), "im2col")):
        args, kw = _conv_call(randn(*shape, shift=0.2), (16, 16, 3, 3), "fp8_e4m3", "fp8_e4m3", False)
        assert _route(args[0], {"splits": None, **kw})[0] == engine
    assert sqnr_db(reference.qconv(*args, **kw), triton_lowering.qconv(*args, **kw)) > 45


def test_latency_guard_times_the_direct_kernel(monkeypatch):
    """qcompile.latency's ``direct conv`` timing runs qdiff::conv2d_fp8_prequant at the node's shape (here, once)."""
    import qcompile
    from qcompile.latency import time_node

    monkeypatch.setenv("QDIFF_CONV_ENGINE", "direct")
    model = torch.nn.Sequential(torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(32, 8, 3, padding=1)).eval()
    x = torch.randn(2, 16, 5, 6)
    plan = qcompile.calibrate(model, lambda m: m(x), qcompile.QuantConfig.preset("w8a8-fp8").replace(first_last="quantize"),
                              progress=False)
    outputs = []

    def run_once(fn):
        outputs.append(fn())
        return 1.0

    node = next(n for n in plan.quantized_nodes() if tuple(n.weight_shape) == (8, 32, 3, 3))
    timing = time_node(node, DEVICE, run_once)
    assert timing.route == "direct conv" and (timing.quantized_us, timing.float_us) == (1.0, 1.0)
    assert outputs[0].shape == (2, 5, 6, 8) and outputs[0].dtype == torch.bfloat16 and torch.isfinite(outputs[0].float()).all()


@pytest.mark.parametrize("engine", ["implicit", "direct"])  # (the im2col engine has no split-K)
@pytest.mark.parametrize(
    "c,n,splits,stride,split",
    [
        (64, 32, None, (1, 1), 2),
        (160, 96, None, (2, 2), 5),
        (64, 40, (0, 20, 64), (1, 1), 3),
        (160, 64, (0, 32, 100, 160), (2, 1), 4),
    ],
)
def test_split_k_fp8_conv_matches_reference(monkeypatch, c, n, splits, stride, split, engine):
    _use_engine(monkeypatch, engine, "fp8_e4m3")
    hw = (8, 8) if stride == (2, 2) else (8, 4) if stride == (2, 1) else (4, 4)
    x = randn(2, c, *hw, shift=0.3)
    if splits is None:
        args, kw = _conv_call(x, (n, c, 3, 3), "fp8_e4m3", "fp8_e4m3", False, stride=stride)
    else:
        x = spread_slices(x, splits, 1)
        args, kw = _split_conv_call(x, n, 3, "fp8_e4m3", splits, False, stride, (1, 1), smooth=True)
    ref = reference.qconv(*args, **kw)
    many = _with_split_k(monkeypatch, split, lambda: triton_lowering.qconv(*args, **kw))
    one = _with_split_k(monkeypatch, 1, lambda: triton_lowering.qconv(*args, **kw))
    assert many.shape == ref.shape and many.is_contiguous(memory_format=torch.channels_last)
    db = {"ref~many": sqnr_db(ref, many), "one~many": sqnr_db(one, many), "ref~one": sqnr_db(ref, one)}
    assert db["ref~many"] > 45, db
    assert db["one~many"] > FP8_SUM_ORDER_SQNR_DB, db  # the summation order (and, on a GPU, the fp8 accumulator) differs


def test_split_k_launches_the_reduce_only_when_split(monkeypatch):
    """SPLIT_K = 1 is today's single launch (no workspace); SPLIT_K > 1 adds the reduce kernel."""
    from qcompile.lowering.kernels import conv2d_w8a8

    args, kw, _ = _int8_codes_case(64, 32, None, True, (1, 1), (4, 4), seed=0)
    launched = []
    real = conv_kernels.direct

    def spy(kernel):
        fn = kernel
        while hasattr(fn, "fn"):  # Autotuner -> JITFunction -> the Python function
            fn = fn.fn
        launched.append(fn.__name__)
        return real(kernel)

    monkeypatch.setattr(conv_kernels, "direct", spy)
    monkeypatch.setenv(conv_kernels.SPLITK_ENV, "0")
    conv2d_w8a8(*args, **kw)
    assert launched == ["conv2d_kernel"]
    launched.clear()
    monkeypatch.setenv(conv_kernels.SPLITK_ENV, "1")
    conv2d_w8a8(*args, **kw)
    assert launched == ["conv2d_kernel", "conv_splitk_reduce_kernel"]

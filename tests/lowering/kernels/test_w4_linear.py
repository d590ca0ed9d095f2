"""Packed INT4 (and INT8) weight kernels: W4A16 / W8A16 weight-only and W4A8 (int8 or fp8 activations)."""

import pytest
import torch

from qcompile.lowering.kernels import w4a8_linear, weight_only_linear
from qcompile.lowering.reference import qlinear
from qcompile.lowering.weights import dequantize_weight, quantize_weight
from qcompile.metrics import sqnr_db

from .helpers import DEVICE, act_qparams, needs_kernels, randn

pytestmark = needs_kernels


def _qw(n, k, fmt, group):
    qw = quantize_weight(torch.randn(n, k), fmt, "linear", group, clip_search=False)
    return qw, qw.data.to(DEVICE), qw.scale.to(DEVICE)


@pytest.mark.parametrize(
    "k,group,fmt,dtype",
    [
        (128, 64, "int4", torch.float32),  # whole groups, no K masks
        (100, 64, "int4", torch.bfloat16),  # K zero-padded to 128 in storage
        (77, None, "int4", torch.float16),  # per-channel, odd K padded to even
        (96, 32, "int4", torch.float32),  # groups of 32
        (80, None, "int8", torch.bfloat16),  # W8A16
    ],
)
def test_weight_only_matches_reference(k, group, fmt, dtype):
    qw, w, ws = _qw(40, k, fmt, group)
    x = randn(3, 7, k, dtype=dtype)
    b = randn(40)
    out = weight_only_linear(x, w, ws, b, wfmt=fmt, group_size=group)
    ref = qlinear(x, w, ws, b, None, None, wfmt=fmt, group_size=group, weight_shape=qw.shape)
    assert out.dtype == dtype and out.shape == (3, 7, 40)
    assert sqnr_db(ref.float(), out.float()) > (60 if dtype == torch.float32 else 38)


@pytest.mark.parametrize("afmt,asym,k,group", [("int8", True, 100, 64), ("int8", False, 128, 32), ("fp8_e4m3", False, 77, None)])
def test_w4a8_matches_reference(afmt, asym, k, group):
    qw, w, ws = _qw(48, k, "int4", group)
    x = randn(2, 9, k, shift=0.4)
    smooth = (torch.rand(k) + 0.5).to(DEVICE)
    s, z = act_qparams(x * smooth, afmt, asym)
    corr = randn(48, scale=0.1)
    out = w4a8_linear(x, w, ws, None, s, z if asym else None, group_size=group, afmt=afmt, act_smooth=smooth, bias_corr=corr)
    ref = qlinear(x, w, ws, None, s, z, wfmt="int4", group_size=group, weight_shape=qw.shape, afmt=afmt, asym=asym,
                  bias_corr=corr, act_smooth=smooth)
    assert sqnr_db(ref, out) > 45


def test_storage_mismatch_is_reported():
    qw, w, ws = _qw(16, 128, "int4", 64)
    with pytest.raises(ValueError, match="does not fit"):
        weight_only_linear(randn(2, 192), w, ws, None, wfmt="int4", group_size=64)
    with pytest.raises(ValueError, match="weight scale must have shape"):
        weight_only_linear(randn(2, 128), w, ws[:, :1], None, wfmt="int4", group_size=64)
    from qcompile.lowering.kernels.w4_linear import dequantize_weight_only

    with pytest.raises(ValueError, match="does not fit"):  # the dequantize-then-cuBLAS route checks the same
        dequantize_weight_only(w, ws, 60, wfmt="int4", group_size=64, dtype=torch.float16)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")
@pytest.mark.parametrize(
    "m,k,group,fmt,dtype",
    [
        (1, 256, 64, "int4", torch.float32),  # several K tiles per split
        (5, 100, 64, "int4", torch.bfloat16),  # K padded in storage, masked K tail
        (16, 77, None, "int4", torch.float16),  # per-channel scales in the reduction's epilogue
        (3, 200, None, "int8", torch.bfloat16),  # W8A16
    ],
)
def test_small_m_split_k_path_matches_reference(m, k, group, fmt, dtype, monkeypatch):
    import torch.nn.functional as F

    from qcompile.lowering.kernels import w4_linear
    from qcompile.lowering.kernels.w4_linear import splitk_plan

    monkeypatch.setattr(w4_linear, "SPLITK_MAX_M", 16)  # off in production (see its comment); the kernel stays tested
    qw, w, ws = _qw(72, k, fmt, group)
    plan = splitk_plan(m, 72, k, group or 0, DEVICE, {"block_n": 32, "block_k": 32, "num_warps": 4, "num_stages": 1, "ctas_per_sm": 4})
    assert plan is not None and plan["split"] > 1
    x = randn(m, k, dtype=dtype)
    b = randn(72)
    out = weight_only_linear(x, w, ws, b, wfmt=fmt, group_size=group, act="silu")
    ref = F.silu(qlinear(x, w, ws, b, None, None, wfmt=fmt, group_size=group, weight_shape=qw.shape))
    assert out.dtype == dtype and out.shape == (m, 72)
    assert sqnr_db(ref.float(), out.float()) > (60 if dtype == torch.float32 else 38)


def test_split_k_plan_covers_the_gpu_and_only_small_m():
    from qcompile.lowering.kernels.w4_linear import SPLITK_MAX_M, splitk_plan

    cpu = torch.device("cpu")
    p = splitk_plan(1, 4608, 1152, 64, cpu, max_m=16)
    assert p["block_k"] == 64 and p["split"] == min(1152 // 64, -(-4 * 4 // (4608 // 64)))
    assert splitk_plan(17, 4608, 1152, 64, cpu, max_m=16) is None
    assert splitk_plan(1, 64, 4096, 0, cpu, max_m=16)["split"] > 1  # narrow N: many K splits
    assert SPLITK_MAX_M == 0 and splitk_plan(1, 4608, 1152, 64, cpu) is None  # off in production (measured: slower)


def test_medium_m_takes_small_tiles_that_fill_the_gpu():
    """M in (64, 1024] (DiT-XL/2 at 512px, batch 1: 1024 tokens) picks the medium table, whose smallest tiles give 144 CTAs at
    M = 256, N = 1152 (132 SMs); the large table's tiles give at most 36 there."""
    import triton

    from qcompile.lowering.kernels.w4_linear import TABLES, m_tier

    assert [m_tier(m) for m in (1, 64, 65, 256, 1024, 1025, 8192)] == ["small"] * 2 + ["medium"] * 3 + ["large"] * 2
    tiles = [triton.cdiv(256, c.kwargs["BLOCK_M"]) * triton.cdiv(1152, c.kwargs["BLOCK_N"]) for c in TABLES["weight_only", "medium"]]
    large = [triton.cdiv(256, c.kwargs["BLOCK_M"]) * triton.cdiv(1152, c.kwargs["BLOCK_N"]) for c in TABLES["weight_only", "large"]]
    assert max(tiles) == 144 and max(large) == 36


@pytest.mark.parametrize("m,k,group,dtype", [(70, 256, 64, torch.float32), (130, 100, 64, torch.bfloat16), (40, 77, None, torch.float16)])
def test_medium_m_split_k_tiles_the_rows(m, k, group, dtype, monkeypatch):
    """``QDIFF_W4_SPLITK_MEDIUM=1``: M up to the medium tier's 1024 takes the split-K path with row tiles (more than one
    here), each K split summed by the reduction; the same output as the reference."""
    from qcompile.lowering.kernels.w4_linear import MEDIUM_M, SPLITK_MEDIUM_ENV, splitk_plan

    monkeypatch.setenv(SPLITK_MEDIUM_ENV, "1")
    cfg = {"block_m": 16, "block_n": 32, "block_k": 32, "num_warps": 4, "num_stages": 1, "ctas_per_sm": 16}
    assert splitk_plan(MEDIUM_M + 1, 72, k, group or 0, DEVICE) is None
    assert splitk_plan(m, 72, k, group or 0, DEVICE)["block_m"] == 64  # (the production row tile)
    plan = splitk_plan(m, 72, k, group or 0, DEVICE, cfg)
    assert plan is not None and plan["split"] > 1 and -(-m // plan["block_m"]) > 1
    monkeypatch.setattr("qcompile.lowering.kernels.w4_linear.SPLITK_CONFIG", cfg)  # small tiles: several row tiles
    qw, w, ws = _qw(72, k, "int4", group)
    x = randn(m, k, dtype=dtype)
    out = weight_only_linear(x, w, ws, None, wfmt="int4", group_size=group)
    ref = qlinear(x, w, ws, None, None, None, wfmt="int4", group_size=group, weight_shape=qw.shape)
    assert out.dtype == dtype and out.shape == (m, 72)
    assert sqnr_db(ref.float(), out.float()) > (60 if dtype == torch.float32 else 38)


@pytest.mark.parametrize("group,dtype", [(64, torch.bfloat16), (None, torch.float16), (32, torch.float32)])
def test_int4_dequantization_is_the_references_bit_for_bit(group, dtype):
    """Identity activations read the kernel's dequantized weight tile back: it must equal the reference's dequantized
    weight exactly (every nibble code -8..7 occurs)."""
    k = 128
    qw, w, ws = _qw(48, k, "int4", group)
    w[0, :2] = torch.tensor([0x88, 0x78], dtype=torch.uint8)  # -8, which the symmetric quantizer never writes
    codes = torch.cat([w & 0xF, w >> 4]).unique()
    assert codes.numel() == 16
    out = weight_only_linear(torch.eye(k, dtype=dtype, device=DEVICE), w, ws, None, wfmt="int4", group_size=group)
    ref = dequantize_weight(w, ws, "int4", group, qw.shape, "linear", None).to(dtype).cpu()
    if DEVICE.type == "cpu" and dtype == torch.bfloat16:  # the interpreter's fp32 -> bf16 cast truncates (GPU: exact)
        torch.testing.assert_close(out.T.cpu(), ref, rtol=2**-7, atol=0)
    else:
        assert torch.equal(out.T.cpu(), ref)


def test_medium_m_splits_k_by_default_only_where_few_tiles_walk_a_long_k(monkeypatch):
    """At M = 256 on 132 SMs: the MLP's second GEMM (K 4608, N 1152: 72 output tiles) splits K, the wide-N GEMMs and
    the short-K projection do not; ``QDIFF_W4_SPLITK_MEDIUM=0`` turns the default off, ``=1`` splits every shape."""
    from qcompile.lowering.kernels import w4_linear
    from qcompile.lowering.kernels.w4_linear import SPLITK_MEDIUM_ENV, medium_splits_k, splitk_plan

    assert medium_splits_k(256, 1152, 4608 // 64, 132)
    assert not any(medium_splits_k(256, n, k // 64, 132) for n, k in ((4608, 1152), (3456, 1152), (1152, 1152)))
    assert not medium_splits_k(64, 1152, 72, 132) and not medium_splits_k(2048, 1152, 72, 132)  # small / large tiers
    monkeypatch.setattr(w4_linear, "_sm_count", lambda device: 132)
    monkeypatch.delenv(SPLITK_MEDIUM_ENV, raising=False)
    cpu = torch.device("cpu")
    assert splitk_plan(256, 1152, 4608, 64, cpu)["block_m"] == 64 and splitk_plan(256, 4608, 1152, 64, cpu) is None
    monkeypatch.setenv(SPLITK_MEDIUM_ENV, "0")
    assert splitk_plan(256, 1152, 4608, 64, cpu) is None
    monkeypatch.setenv(SPLITK_MEDIUM_ENV, "1")
    assert splitk_plan(256, 4608, 1152, 64, cpu) is not None


@pytest.fixture
def swapped_operands(monkeypatch):
    """The weight-only kernel's SWAP_AB variant as the interpreter's (or the GPU autotuner's only) config."""
    from qcompile.lowering.kernels import w4_linear

    cfg = w4_linear.wo_config(16, 32, 32, 1, 4, swap_ab=True, group_m=2)
    monkeypatch.setitem(w4_linear.INTERPRET_CONFIGS, "weight_only", cfg)
    monkeypatch.setitem(w4_linear.TABLES, ("weight_only", w4_linear.m_tier(70)), [cfg])
    w4_linear._kernel.cache_clear()
    yield
    w4_linear._kernel.cache_clear()


@pytest.mark.parametrize("k,group,fmt,dtype", [(128, 64, "int4", torch.float32), (100, 64, "int4", torch.bfloat16),
                                               (77, None, "int4", torch.float16), (80, None, "int8", torch.bfloat16)])
def test_swapped_operands_match_the_reference(k, group, fmt, dtype, swapped_operands):
    """SWAP_AB (out^T = W x^T, the weight tile as the first dot operand) gives the reference's output, edge tiles too."""
    qw, w, ws = _qw(40, k, fmt, group)
    x = randn(70, k, dtype=dtype)
    b = randn(40)
    out = weight_only_linear(x, w, ws, b, wfmt=fmt, group_size=group)
    ref = qlinear(x, w, ws, b, None, None, wfmt=fmt, group_size=group, weight_shape=qw.shape)
    assert out.shape == (70, 40) and sqnr_db(ref.float(), out.float()) > (60 if dtype == torch.float32 else 38)
    eye = weight_only_linear(torch.eye(k, dtype=torch.float32, device=DEVICE), w, ws, None, wfmt=fmt, group_size=group)
    deq = dequantize_weight(w, ws, fmt, group, qw.shape, "linear", None).float().cpu()
    assert torch.equal(eye.T.cpu(), deq)  # fp32: the dequantized weight read back exactly


@pytest.mark.parametrize("k,group,fmt,dtype", [(128, 64, "int4", torch.float32), (100, 32, "int4", torch.float16),
                                               (77, None, "int4", torch.bfloat16), (80, None, "int8", torch.float32)])
def test_dequantize_weight_only_is_the_references(k, group, fmt, dtype):
    """``qdiff::dequantize_weight_only`` writes the reference's dequantized weight (K edges and N edges masked)."""
    from qcompile.lowering.kernels.w4_linear import dequantize_weight_only

    qw, w, ws = _qw(70, k, fmt, group)
    bias = randn(70)
    out, no_bias = dequantize_weight_only(w, ws, k, wfmt=fmt, group_size=group, dtype=dtype)
    again, b_out = dequantize_weight_only(w, ws, k, wfmt=fmt, group_size=group, dtype=dtype, bias=bias)
    ref = dequantize_weight(w, ws, fmt, group, qw.shape, "linear", None).to(dtype).cpu()
    assert out.shape == (70, k) and out.dtype == dtype and no_bias is None and torch.equal(again, out)
    assert b_out.dtype == dtype and b_out.shape == (70,)
    if DEVICE.type == "cpu" and dtype == torch.bfloat16:  # the interpreter's fp32 -> bf16 cast truncates (GPU: exact)
        torch.testing.assert_close(out.cpu(), ref, rtol=2**-7, atol=0)
        torch.testing.assert_close(b_out, bias.to(dtype), rtol=2**-7, atol=0)
    else:
        assert torch.equal(out.cpu(), ref) and torch.equal(b_out, bias.to(dtype))


@pytest.mark.parametrize("act", ["none", "silu", "gelu_tanh"])
def test_dequant_mm_route_takes_large_m_unless_switched_off(act, monkeypatch):
    """M >= DEQUANT_MM_MIN_M dequantizes the weight once and multiplies with F.linear (the activation applied after),
    smaller M and float32 activations keep the fused kernel; ``QDIFF_W4_DEQUANT_MM=0`` keeps it for every M."""
    from qcompile.lowering.kernels import w4_linear
    from qcompile.lowering.kernels._common import TORCH_ACTIVATIONS
    from qcompile.lowering.kernels.w4_linear import DEQUANT_MM_ENV, dequant_mm_rows

    calls = []
    real = w4_linear._dequantize
    monkeypatch.setattr(w4_linear, "_dequantize", lambda *a, **kw: calls.append(a[4]) or real(*a, **kw))
    monkeypatch.setattr(w4_linear, "DEQUANT_MM_MIN_M", 32)
    monkeypatch.setenv(DEQUANT_MM_ENV, "0")
    assert not dequant_mm_rows(4096)
    monkeypatch.delenv(DEQUANT_MM_ENV)
    assert dequant_mm_rows(32) and not dequant_mm_rows(31)
    qw, w, ws = _qw(40, 128, "int4", 64)
    b = randn(40)
    for m, dtype, expect_route in ((40, torch.float16, True), (8, torch.float16, False), (40, torch.float32, False)):
        calls.clear()
        x = randn(m, 128, dtype=dtype)
        out = weight_only_linear(x, w, ws, b, wfmt="int4", group_size=64, act=act)
        ref = TORCH_ACTIVATIONS[act](qlinear(x, w, ws, b, None, None, wfmt="int4", group_size=64, weight_shape=qw.shape).float())
        assert (calls == [64]) == expect_route and out.dtype == dtype
        assert sqnr_db(ref, out.float()) > 38


@pytest.fixture
def gemv_calls(monkeypatch):
    """The groups of the GEMV launches (``_gemv`` spied on)."""
    from qcompile.lowering.kernels import w4_linear

    calls = []
    real = w4_linear._gemv
    monkeypatch.setattr(w4_linear, "_gemv", lambda *a, **kw: calls.append(a[6]) or real(*a, **kw))
    return calls


@pytest.mark.parametrize(
    "m,k,group,fmt,dtype,act",
    [
        (1, 128, 64, "int4", torch.float32, "none"),  # whole groups
        (3, 100, 64, "int4", torch.bfloat16, "silu"),  # K zero-padded to 128 in storage: masked tiles and scales
        (2, 77, None, "int4", torch.float16, "gelu_tanh"),  # per-channel scales in the epilogue, odd K
        (4, 96, 32, "int4", torch.float32, "none"),  # groups of 32
        (1, 80, None, "int8", torch.bfloat16, "none"),  # W8A16
        (2, 75, None, "int8", torch.float32, "silu"),  # W8A16, odd K
    ],
)
def test_gemv_matches_reference(m, k, group, fmt, dtype, act, gemv_calls):
    """M <= GEMV_MAX_M rows take the GEMV kernel (N edge tile masked); the reference's output, bias and activation too."""
    from qcompile.lowering.kernels._common import TORCH_ACTIVATIONS

    qw, w, ws = _qw(40, k, fmt, group)
    x = randn(m, k, dtype=dtype)
    b = randn(40)
    out = weight_only_linear(x, w, ws, b, wfmt=fmt, group_size=group, act=act)
    ref = TORCH_ACTIVATIONS[act](qlinear(x, w, ws, b, None, None, wfmt=fmt, group_size=group, weight_shape=qw.shape).float())
    assert gemv_calls == [group or 0] and out.dtype == dtype and out.shape == (m, 40)
    assert sqnr_db(ref, out.float()) > (60 if dtype == torch.float32 else 38)


@pytest.mark.parametrize("k,group,fmt", [(128, 64, "int4"), (100, 32, "int4"), (77, None, "int4"), (80, None, "int8")])
def test_gemv_reads_the_references_dequantized_weight(k, group, fmt, gemv_calls):
    """One-hot fp32 rows (first and last column, both sides of a group boundary) read columns of the GEMV's
    dequantized weight back: exactly the reference's."""
    qw, w, ws = _qw(40, k, fmt, group)
    cols = [0, 31, 32, k - 1]
    x = torch.zeros(len(cols), k, device=DEVICE)
    x[torch.arange(len(cols)), cols] = 1.0
    out = weight_only_linear(x, w, ws, None, wfmt=fmt, group_size=group)
    deq = dequantize_weight(w, ws, fmt, group, qw.shape, "linear", None).float().cpu()
    assert gemv_calls == [group or 0]
    assert torch.equal(out.cpu(), deq[:, cols].T)


def test_gemv_takes_few_rows_unless_switched_off(gemv_calls, monkeypatch):
    """Only 1 .. GEMV_MAX_M rows take the GEMV kernel; ``QDIFF_W4_GEMV=0`` keeps the tensor-core kernel for them."""
    from qcompile.lowering.kernels.w4_linear import GEMV_ENV, GEMV_MAX_M, gemv_rows

    assert gemv_rows(1) and gemv_rows(GEMV_MAX_M) and not gemv_rows(GEMV_MAX_M + 1) and not gemv_rows(0)
    qw, w, ws = _qw(40, 64, "int4", 64)
    weight_only_linear(randn(GEMV_MAX_M + 1, 64), w, ws, None, wfmt="int4", group_size=64)
    assert gemv_calls == []
    monkeypatch.setenv(GEMV_ENV, "0")
    assert not gemv_rows(1)
    out = weight_only_linear(randn(1, 64), w, ws, None, wfmt="int4", group_size=64)
    assert gemv_calls == [] and out.shape == (1, 40)

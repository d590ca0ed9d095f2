"""FP8 attention forward (``qdiff::fp8_attention``) against the reference ``qattention`` and float SDPA.

In the interpreter the key tiles are 32 wide (``INTERPRET_CONFIG``), so sequences of 37-70 keys cover the online-softmax
rescale and the masked tail tile; the fp8 dots are exact there and the probabilities take the fp32 e4m3-grid path. With
every key in one tile the kernel is the reference's arithmetic (up to fp32 summation order): a tight bound; across tiles
the online max quantizes P relative to a different max (``qattention``'s docstring), a looser one.
"""

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

from qcompile.lowering.formats import quantize_fp8
from qcompile.lowering.kernels.fp8_attention import (HEAD_ROW_BYTES, SOFTMAX_ENV, SOFTMAX_MODES, dot_widths, fp8_attention, head_parts,
                                                     keys_contiguous, keys_contiguous_codes, ones_row_width, qk_parts, softmax_mode,
                                                      qk_width, quantize_heads, tensor_strides)
from qcompile.lowering.reference import default_attention_softmax, qattention
from qcompile.metrics import sqnr_db

from .helpers import DEVICE, needs_kernels, randn

FP8 = torch.float8_e4m3fn
# one key tile: the same arithmetic (interpreter: exact fp8 dots; GPU: ex2.approx and fast fp8 accumulation)
ONE_TILE_DB = 90 if DEVICE is not None and DEVICE.type == "cpu" else 45


def _scales(*ts, shrink=1.0):
    """Max-abs static scales (0-dim fp32), divided by ``shrink`` (> 1: the largest values saturate at +-448)."""
    return [torch.tensor(float(t.float().abs().max()) / 448 / shrink, device=t.device) for t in ts]


def _qkv(b, h, sq, sk, d, dtype=torch.float32):
    return randn(b, h, sq, d, dtype=dtype), randn(b, h, sk, d, dtype=dtype), randn(b, h, sk, d, dtype=dtype, scale=2.0)


# --- head-dim split (pure Python) -----------------------------------------------------------------
def test_head_parts_split_non_power_of_two_head_dims():
    assert head_parts(72) == (64, 32, 16)  # DiT / PixArt: Q K^T 64 + 32, P V 64 + 16
    assert head_parts(64) == (64, 0, 0) and head_parts(128) == (128, 0, 0)
    assert head_parts(40) == (32, 32, 16) and head_parts(80) == (64, 32, 16) and head_parts(160) == (128, 32, 32)
    assert dot_widths(72) == (128, 80)  # Q K^T one dot, zero-padded to 128 in registers; P V 64 + 16
    assert dot_widths(160) == (160, 160)  # (no power of two up to 128: split in both dots)
    assert qk_parts(72) == (128, 0) and qk_parts(40) == (64, 0) and qk_parts(64) == (64, 0) and qk_parts(160) == (128, 32)
    for d in (16, 36, 168, 256):
        with pytest.raises(ValueError, match=f"got {d}"):
            head_parts(d)


# --- numerics in the interpreter (or on the GPU) --------------------------------------------------
@needs_kernels
@pytest.mark.parametrize("d", [72, 64])
def test_one_key_tile_is_the_reference_arithmetic(d):
    q, k, v = _qkv(1, 2, 21, 29, d)
    s = _scales(q, k, v)
    out = fp8_attention(q, k, v, *s)
    assert out.shape == q.shape and out.dtype == torch.float32
    assert sqnr_db(qattention(q, k, v, *s), out) > ONE_TILE_DB


@needs_kernels
@pytest.mark.parametrize("b,sq,sk,d", [(1, 37, 50, 72), (2, 20, 45, 64), (1, 33, 70, 40)])
def test_matches_reference_and_float_attention(b, sq, sk, d):
    """Several key tiles plus a masked tail, query rows past a tile edge; the kernel is no worse than the reference
    against float SDPA (fp8 q / k / v quantization dominates: ~26 dB for Gaussian data at max-abs scales)."""
    q, k, v = _qkv(b, 2, sq, sk, d)
    s = _scales(q, k, v)
    out = fp8_attention(q, k, v, *s)
    ref = qattention(q, k, v, *s)
    exact = F.scaled_dot_product_attention(q, k, v)
    assert sqnr_db(ref, out) > 30
    assert sqnr_db(exact, out) > 22
    assert sqnr_db(exact, out) > sqnr_db(exact, ref) - 1.0


@needs_kernels
@pytest.mark.parametrize("softmax", SOFTMAX_MODES)
@pytest.mark.parametrize("d", [72, 40])
def test_softmax_modes_are_their_reference_arithmetic(softmax, d, monkeypatch):
    """Each softmax mode (``$QDIFF_ATTN_SOFTMAX``) computes its reference's arithmetic (``qattention(softmax=...)``):
    with one key tile the same codes, over several tiles and a masked tail (-inf scores) as close as ex2 to its
    reference, and as close to float attention."""
    monkeypatch.setenv(SOFTMAX_ENV, softmax)
    q, k, v = _qkv(1, 2, 21, 29, d)
    s = _scales(q, k, v)
    assert sqnr_db(qattention(q, k, v, *s, softmax=softmax), fp8_attention(q, k, v, *s)) > ONE_TILE_DB
    q, k, v = _qkv(2, 2, 37, 83, d)
    s = _scales(q, k, v)
    out = fp8_attention(q, k, v, *s)
    assert sqnr_db(qattention(q, k, v, *s, softmax=softmax), out) > 30
    assert sqnr_db(F.scaled_dot_product_attention(q, k, v), out) > 22


def test_softmax_mode_is_checked_and_needs_a_padding_column(monkeypatch):
    """An unknown ``$QDIFF_ATTN_SOFTMAX`` names the variable and the modes; head dims whose V has no padding column in
    its second part (64, 80, 128, 160) run ex2 whatever the variable says (the row sums need that column); unset, the
    kernel runs ex2-lv where it can."""
    monkeypatch.setenv(SOFTMAX_ENV, "exp")
    with pytest.raises(ValueError, match=f"{SOFTMAX_ENV}='exp': expected one of ex2, ex2-lv, bits, half"):
        softmax_mode(72)
    monkeypatch.setenv(SOFTMAX_ENV, "bits")
    assert softmax_mode(72) == softmax_mode(40) == SOFTMAX_MODES.index("bits")
    assert softmax_mode(64) == softmax_mode(80) == softmax_mode(128) == softmax_mode(160) == 0
    monkeypatch.delenv(SOFTMAX_ENV)  # the default: ex2-lv where V has the padding column (as the reference's default)
    assert softmax_mode(72) == softmax_mode(40) == SOFTMAX_MODES.index("ex2-lv") and softmax_mode(64) == softmax_mode(80) == 0


@needs_kernels
def test_cross_attention_saturation_and_sm_scale():
    """Sq != Sk (fewer keys than one tile: the masked tail tile alone), q saturating at +-448 like the reference, an
    explicit sm_scale; and 120 keys against 19 queries at D = 80."""
    q, k, v = _qkv(2, 2, 40, 13, 72)
    s = _scales(q, k, v)
    s[0] = _scales(q, shrink=4.0)[0]
    out = fp8_attention(q, k, v, *s, sm_scale=0.3)
    assert sqnr_db(qattention(q, k, v, *s, sm_scale=0.3), out) > ONE_TILE_DB
    q, k, v = _qkv(1, 2, 19, 120, 80)
    s = _scales(q, k, v)
    assert sqnr_db(qattention(q, k, v, *s), fp8_attention(q, k, v, *s)) > 30


@needs_kernels
def test_bf16_heads_in_the_model_layout():
    """bf16 q / k / v as models produce them (``x.view(B, S, H, D).transpose(1, 2)``: strided heads); the output is
    (B, H, Sq, D) stored (B, Sq, H, D), so ``transpose(1, 2).reshape(B, Sq, H * D)`` is a view."""
    b, h, sq, sk, d = 1, 2, 37, 41, 72
    q, k, v = (randn(b, n, h, d, dtype=torch.bfloat16).transpose(1, 2) for n in (sq, sk, sk))
    s = _scales(q, k, v)
    out = fp8_attention(q, k, v, *s)
    assert out.dtype == torch.bfloat16 and out.shape == (b, h, sq, d) and out.transpose(1, 2).is_contiguous()
    ref = qattention(q, k, v, *s, out_dtype=torch.float32)
    assert sqnr_db(ref, out.float()) > 30  # (the interpreter's bf16 store truncates)
    assert sqnr_db(F.scaled_dot_product_attention(q.float(), k.float(), v.float()), out.float()) > 22


@needs_kernels
def test_prequantized_fp8_inputs():
    """float8_e4m3fn q / k / v (quantized by their producer with the static scales): the kernel reads the codes; the
    output defaults to bf16 and is the float-input kernel's result (same codes, same arithmetic; on the GPU the two calls
    autotune separately, and another key-tile width quantizes P at other running maxima: 38 dB apart on 2026-12-04)."""
    q, k, v = _qkv(1, 2, 37, 50, 72)
    s = _scales(q, k, v)
    q8, k8, v8 = (quantize_fp8(t, sc) for t, sc in zip((q, k, v), s))
    out = fp8_attention(q8, k8, v8, *s, out_dtype=torch.float32)
    assert sqnr_db(fp8_attention(q, k, v, *s), out) > (60 if DEVICE.type == "cpu" else 30)
    assert sqnr_db(qattention(q8, k8, v8, *s), out) > 30
    assert fp8_attention(q8, k8, v8, *s).dtype == torch.bfloat16


@needs_kernels
def test_fp8_output_is_the_float_output_quantized_with_the_next_scale():
    """``out_scale``: the kernel writes e4m3 codes of its output divided by the output projection's scale (what a
    separate quantize pass makes of the fp32 output, up to the one rounding of multiplying by 1 / scale), stored like
    the float output (the heads' merge stays a view); the reference does the same."""
    q, k, v = _qkv(1, 2, 37, 50, 72)
    s = _scales(q, k, v)
    o = fp8_attention(q, k, v, *s, out_dtype=torch.float32)
    os_ = torch.tensor(float(o.abs().max()) / 448 * 0.8, device=DEVICE)  # (the largest outputs saturate)
    o8 = fp8_attention(q, k, v, *s, out_scale=os_)
    assert o8.dtype == FP8 and o8.shape == o.shape and o8.stride() == o.stride()
    want = quantize_fp8(o, os_)
    assert (o8.float() == want.float()).float().mean() > 0.99 and sqnr_db(want.float(), o8.float()) > 40
    ref = qattention(q, k, v, *s, out_scale=os_)
    assert ref.dtype == FP8 and sqnr_db(ref.float(), o8.float()) > 25
    with FakeTensorMode():
        fake = torch.ops.qdiff.fp8_attention(torch.empty(1, 2, 8, 72), torch.empty(1, 2, 8, 72), torch.empty(1, 2, 8, 72),
                                             torch.empty(()), torch.empty(()), torch.empty(()), 0.1, torch.float32, torch.empty(()))
    assert fake.dtype == FP8


@needs_kernels
@pytest.mark.parametrize("sk,d", [(77, 72), (64, 40), (45, 128)])
def test_values_stored_by_keys_give_the_same_result(sk, d):
    """V stored (B, H, D, S) with its keys contiguous (``V_T``: the fp8 ``P @ V`` reads it without a transpose) gives
    exactly the row-major result, for fp8 inputs (``quantize_heads``' padded rows) and for float inputs."""
    q, k, v = _qkv(1, 2, 37, sk, d)
    s = _scales(q, k, v)
    q8, k8 = quantize_heads(q, s[0]), quantize_heads(k, s[1])
    v8, v8_t = quantize_heads(v, s[2]), quantize_heads(v, s[2], keys_contiguous=True)
    assert not keys_contiguous(v8) and keys_contiguous(v8_t) and torch.equal(v8.float(), v8_t.float())
    by_rows = fp8_attention(q8, k8, v8, *s, out_dtype=torch.float32)
    v_t = v.transpose(2, 3).contiguous().transpose(2, 3)
    pairs = [(fp8_attention(q8, k8, v8_t, *s, out_dtype=torch.float32), by_rows), (fp8_attention(q, k, v_t, *s), fp8_attention(q, k, v, *s))]
    for by_keys, rows in pairs:  # (on a GPU each layout autotunes on its own: the key tiles, hence P's codes, may differ)
        assert torch.equal(by_keys, rows) if DEVICE.type == "cpu" else sqnr_db(rows, by_keys) > 30
    assert sqnr_db(qattention(q, k, v, *s), by_rows) > 30


@needs_kernels
@pytest.mark.parametrize("d,width", [(40, 64), (72, 128)])
def test_queries_and_keys_padded_in_memory_or_in_registers_give_the_same_attention(d, width):
    """q / k padded with zero columns to a power-of-two head dim in memory (``quantize_heads(width=)``, the heads layout)
    and unpadded q / k, which the kernel pads in registers (``qk_parts``: columns past D load as 0), run the same one
    ``Q K^T`` dot; v keeps its head dim, and so does the output. ``sm_scale`` is the unpadded head dim's."""
    q, k, v = _qkv(1, 2, 37, 45, d)
    s = _scales(q, k, v)
    qp, kp = quantize_heads(q, s[0], width=width), quantize_heads(k, s[1], width=width)
    assert qp.shape[-1] == width and torch.all(qp[..., d:].float() == 0)
    v8 = quantize_heads(v, s[2], keys_contiguous=True)
    padded = fp8_attention(qp, kp, v8, *s, sm_scale=d ** -0.5, out_dtype=torch.float32)
    in_registers = fp8_attention(quantize_heads(q, s[0]), quantize_heads(k, s[1]), v8, *s, out_dtype=torch.float32)
    assert padded.shape == v.shape[:2] + (37, d)
    # (on a GPU each layout autotunes on its own: the key tiles, hence P's codes, may differ)
    assert torch.equal(in_registers, padded) if DEVICE.type == "cpu" else sqnr_db(padded, in_registers) > 30


@needs_kernels
@pytest.mark.parametrize("d", [72, 40])
def test_queries_and_keys_as_views_of_the_projection_output(d):
    """fp8 q / k / v as a fused q / k / v projection writes them: column sections of one (B, S, 3 * H * D) output,
    heads at D-element offsets (8-byte aligned for D = 72 / 40: ``tensor_strides`` gives the kernel ALIGN 8), V copied
    by keys as the lowering does. The kernel reads q / k in place and gives exactly what contiguous copies give."""
    B, H, S = 2, 3, 45
    y = randn(B, S, 3 * H * d)
    scale = torch.tensor(float(y.abs().max()) / 448, device=y.device)
    codes = quantize_fp8(y, scale)
    q, k, v = (codes[..., i * H * d:(i + 1) * H * d].view(B, S, H, d).transpose(1, 2) for i in range(3))
    assert tensor_strides(q, 2) == (8, S * 3 * H * d // 8, d // 8, 3 * H * d // 8) and tensor_strides(k, 2)[0] == 8
    v_t = v.transpose(2, 3).contiguous().transpose(2, 3)
    s = [scale] * 3
    strided = fp8_attention(q, k, v_t, *s, sm_scale=d ** -0.5, out_dtype=torch.float32)
    copies = fp8_attention(q.contiguous(), k.contiguous(), v_t, *s, sm_scale=d ** -0.5, out_dtype=torch.float32)
    assert torch.equal(strided, copies) if DEVICE.type == "cpu" else sqnr_db(copies, strided) > 30
    assert sqnr_db(qattention(q, k, v, *s, sm_scale=d ** -0.5, out_dtype=torch.float32), strided) > 30


@needs_kernels
def test_value_head_dim_may_differ_from_the_query_key_head_dim():
    """q / k of head dim 64 and v of 40 (as SDPA allows): the reference's arithmetic, output (B, H, Sq, 40)."""
    q, k, _ = _qkv(2, 2, 20, 29, 64)
    v = randn(2, 2, 29, 40, scale=2.0)
    s = _scales(q, k, v)
    out = fp8_attention(q, k, v, *s, sm_scale=0.1)
    assert out.shape == (2, 2, 20, 40) and out.transpose(1, 2).is_contiguous()
    assert sqnr_db(qattention(q, k, v, *s, sm_scale=0.1), out) > ONE_TILE_DB


def test_qk_width_pads_to_the_next_power_of_two_up_to_128():
    assert {d: qk_width(d) for d in (32, 40, 48, 64, 72, 80, 112, 128, 144, 160)} == \
        {32: 32, 40: 64, 48: 64, 64: 64, 72: 128, 80: 128, 112: 128, 128: 128, 144: 144, 160: 160}
    for d in (40, 72, 112):
        assert head_parts(qk_width(d))[1] == 0  # one Q K^T dot
    x = torch.randn(1, 2, 8, 40)
    with pytest.raises(ValueError, match="width pads q / k"):
        quantize_heads(x, torch.tensor(0.1), width=32)
    with pytest.raises(ValueError, match="keys_contiguous"):
        quantize_heads(x, torch.tensor(0.1), keys_contiguous=True, width=64)


def test_quantize_heads_gives_the_reference_codes_in_padded_rows():
    """The codes are ``formats.quantize_fp8``'s (so the reference's); rows are padded with zeros to 16 bytes (D = 72,
    77 keys), V's storage is (B, H, D, S); the result's shape and values are the heads'."""
    x = torch.randn(2, 77, 3, 72).transpose(1, 2)  # (B, H, S, D) as models lay heads out
    scale = torch.tensor(0.01)
    for by_keys in (False, True):
        y = quantize_heads(x, scale, keys_contiguous=by_keys)
        assert y.dtype == FP8 and y.shape == x.shape and torch.equal(y.float(), quantize_fp8(x, scale).float())
        row = y.stride(3) if by_keys else y.stride(2)
        assert keys_contiguous(y) == by_keys and row % HEAD_ROW_BYTES == 0 and row == (80 if by_keys else 80)
        storage = torch.as_strided(y, (2, 3, 72, 80) if by_keys else (2, 3, 77, 80), (y.stride(0), y.stride(1), row, 1))
        assert torch.all(storage.float()[..., 77 if by_keys else 72:] == 0)
    aligned = torch.randn(1, 2, 64, 64)
    assert quantize_heads(aligned, scale).stride() == aligned.stride()  # nothing to pad: the layout is kept
    assert quantize_heads(aligned, scale, keys_contiguous=True).stride() == (8192, 4096, 1, 64)


def test_ones_row_storage_for_the_row_sums():
    """``ones_row``: V stored by keys with the second head-dim part's columns in its shape: the codes, then column D the
    e4m3 code of 1.0, then zeros; from float heads and from fp8 codes alike. Head dims without a padding column have no
    ones row, and V already stored by keys cannot gain one."""
    assert ones_row_width(72) == 80 and ones_row_width(40) == 48
    assert ones_row_width(64) is ones_row_width(80) is ones_row_width(128) is ones_row_width(160) is None
    # the reference (which imports no kernel) picks ex2-lv by default exactly where the kernel has the column
    assert all((ones_row_width(d) is not None) == (default_attention_softmax(d) == "ex2-lv") for d in range(32, 161, 8))
    x = torch.randn(2, 77, 3, 72).transpose(1, 2)
    scale = torch.tensor(0.01)
    plain = quantize_heads(x, scale, keys_contiguous=True)
    for v in (quantize_heads(x, scale, keys_contiguous=True, ones_row=True), keys_contiguous_codes(quantize_fp8(x, scale), ones_row=True)):
        assert keys_contiguous(v) and v.shape == (2, 3, 77, 80) and v.stride(2) == 1 and v.stride(3) % HEAD_ROW_BYTES == 0
        assert torch.equal(v[..., :72].float(), plain.float())
        assert torch.all(v[..., 72].float() == 1.0) and torch.all(v[..., 73:].float() == 0)
    with pytest.raises(ValueError, match="head dim 64 has no padding row"):
        quantize_heads(torch.randn(1, 2, 8, 64), scale, keys_contiguous=True, ones_row=True)
    with pytest.raises(ValueError, match="ones_row is for V stored with keys_contiguous"):
        quantize_heads(x, scale, ones_row=True)
    with pytest.raises(ValueError, match="already stored by keys, without a ones row"):
        keys_contiguous_codes(plain, ones_row=True)


@needs_kernels
@pytest.mark.parametrize("softmax", SOFTMAX_MODES)
@pytest.mark.parametrize("d", [72, 40])
def test_ones_row_in_storage_gives_the_same_attention(softmax, d, monkeypatch):
    """``v_ones_dim``: the kernel reads the ones row from V instead of setting it in registers; every softmax mode gives
    the same result (ex2 does not read it), with D output columns. V without the row is refused, naming V."""
    monkeypatch.setenv(SOFTMAX_ENV, softmax)
    q, k, v = _qkv(2, 2, 37, 83, d)
    s = _scales(q, k, v)
    q8, k8 = quantize_fp8(q, s[0]), quantize_fp8(k, s[1])
    plain = fp8_attention(q8, k8, quantize_heads(v, s[2], keys_contiguous=True), *s)
    ones = fp8_attention(q8, k8, quantize_heads(v, s[2], keys_contiguous=True, ones_row=True), *s, v_ones_dim=d)
    assert ones.shape == plain.shape == (2, 2, 37, d)
    assert torch.equal(plain, ones) if DEVICE.type == "cpu" else sqnr_db(plain.float(), ones.float()) > 30  # (separate autotuning)
    with pytest.raises(ValueError, match=rf"v_ones_dim={d} needs float8_e4m3fn V stored by keys.*shape \(2, 2, 83, {d}\)"):
        fp8_attention(q8, k8, quantize_heads(v, s[2], keys_contiguous=True), *s, v_ones_dim=d)


@needs_kernels
def test_bad_arguments_name_the_problem():
    q, k, v = _qkv(1, 2, 8, 8, 64)
    s = _scales(q, k, v)
    with pytest.raises(ValueError, match=r"multiples of 8, got 36 \(q shape \(1, 2, 8, 36\)\)"):
        fp8_attention(*_qkv(1, 2, 8, 8, 36), *s)
    with pytest.raises(ValueError, match="got 16"):
        fp8_attention(*_qkv(1, 2, 8, 8, 16), *s)
    with pytest.raises(TypeError, match="share a dtype"):
        fp8_attention(q, k.half(), v, *s)
    with pytest.raises(ValueError, match="disagree"):
        fp8_attention(q, k, v[:, :, :5], *s)
    with pytest.raises(ValueError, match="contiguous in its head dim"):
        fp8_attention(q, k.transpose(2, 3).contiguous().transpose(2, 3), v, *s)
    with pytest.raises(ValueError, match=r"v must be contiguous in its head dim \(v: or in its keys\)"):
        fp8_attention(q, k, torch.cat([v, v], -1)[..., ::2], *s)  # neither the head dim nor the keys contiguous
    with pytest.raises(TypeError, match="k_scale must be a one-element"):
        torch.ops.qdiff.fp8_attention(q, k, v, s[0], s[1].double(), s[2], 0.125, torch.float32)
    with pytest.raises(ValueError, match="no keys"):
        fp8_attention(q, k[:, :, :0], v[:, :, :0], *s)
    with pytest.raises(TypeError, match="out_dtype"):
        fp8_attention(q, k, v, *s, out_dtype=torch.int32)


# --- tracing: the op under fake tensors -----------------------------------------------------------
def test_fake_implementation_gives_shape_dtype_and_layout():
    with FakeTensorMode():
        q, k, v = torch.empty(2, 16, 100, 72, dtype=torch.bfloat16), torch.empty(2, 16, 120, 72, dtype=torch.bfloat16), \
            torch.empty(2, 16, 120, 72, dtype=torch.bfloat16)
        s = torch.empty(())
        y = torch.ops.qdiff.fp8_attention(q, k, v, s, s, s, 0.1, torch.bfloat16)
        y8 = torch.ops.qdiff.fp8_attention(q.to(FP8), k.to(FP8), v.to(FP8), s, s, s, 0.1, torch.float16)
    assert (y.shape, y.dtype) == ((2, 16, 100, 72), torch.bfloat16) and y.transpose(1, 2).is_contiguous()
    assert (y8.shape, y8.dtype) == ((2, 16, 100, 72), torch.float16)


def test_traced_calls_reach_the_op():
    """Under make_fx's fake tensors (as torch.compile traces) the wrapper calls ``torch.ops.qdiff.fp8_attention``, and
    the heads' usual merge after attention is a view of its output."""
    def f(q, k, v, s):
        return fp8_attention(q, k, v, s, s, s).transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)

    args = (torch.randn(1, 2, 24, 72), torch.randn(1, 2, 40, 72), torch.randn(1, 2, 40, 72), torch.tensor(0.01))
    gm = make_fx(f, tracing_mode="fake")(*args)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert torch.ops.qdiff.fp8_attention.default in targets
    assert torch.ops.aten.clone.default not in targets  # the (B, Sq, H * D) reshape of the output is a view
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    assert tuple(out.meta["val"].shape) == (1, 24, 144)

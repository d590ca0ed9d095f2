"""``qdiff::add_norm_modulate_fp8`` (residual add + LayerNorm + adaLN modulation + fp8 quantization) against
``lowering/reference.py``: the residual exactly (one rounding of an fp32 sum either way), the fp8 codes equal but for
a few one-code steps from the statistics' summation order, and close to the bf16 eager model's own computation."""

import pytest
import torch
import torch.nn.functional as F

from qcompile.lowering import reference
from qcompile.lowering.kernels import add_norm_modulate_fp8
from qcompile.metrics import sqnr_db

from .helpers import DEVICE, needs_kernels, randn

pytestmark = needs_kernels
FP8 = torch.float8_e4m3fn


def _case(B, S, C, dtype, chunk_views=False):
    """h, y (B, S, C); gate / scale / shift as the adaLN chunk's views (B, 6C) when ``chunk_views``, else (B, C)."""
    torch.manual_seed(0)
    h, y = randn(B, S, C, dtype=dtype, scale=2.0), randn(B, S, C, dtype=dtype)
    if chunk_views:
        chunk = randn(B, 6 * C, dtype=dtype, scale=0.3).chunk(6, dim=1)
        gate, scale, shift = chunk[2], chunk[1], chunk[0]
    else:
        gate, scale, shift = (randn(B, C, dtype=dtype, scale=0.3) for _ in range(3))
    return h, y, gate, scale, shift, torch.tensor(4.0 / 448, device=DEVICE)


def _same_residual(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Equal; in the interpreter, whose fp32 -> bf16 store truncates, within one bf16 step; fp32 on a GPU within the
    rounding that a fused multiply-add skips (``h + gate * y`` as one FMA)."""
    if got.dtype == torch.float32:
        return torch.equal(got, want) if DEVICE.type == "cpu" else torch.allclose(got, want, rtol=1e-6, atol=1e-6)
    if DEVICE.type == "cuda":
        return torch.equal(got, want)
    return torch.allclose(got.float(), want.float(), rtol=2.0 ** -7, atol=0.0)


def _code_steps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in e4m3 codes (the byte order of e4m3 is monotone within each sign)."""
    def ordinal(t):
        u = t.view(torch.uint8).int()
        return torch.where(u >= 128, -(u - 128), u)
    return (ordinal(a) - ordinal(b)).abs()


@pytest.mark.parametrize("B,S,C,dtype,chunk_views", [(2, 5, 72, torch.bfloat16, True), (3, 4, 100, torch.float32, False),
                                                      (1, 7, 1152, torch.bfloat16, False)])
def test_matches_the_reference(B, S, C, dtype, chunk_views):
    args = _case(B, S, C, dtype, chunk_views)
    h_out, q = add_norm_modulate_fp8(*args, eps=1e-6)
    ref_h, _ = reference.add_norm_modulate_fp8(*args, eps=1e-6)
    assert h_out.dtype == dtype and q.dtype == FP8 and q.shape == (B, S, C)
    assert _same_residual(h_out, ref_h)
    # the codes: of the residual the kernel stored (the interpreter's rounding aside, the reference's)
    steps = _code_steps(q, reference.add_norm_modulate_fp8(h_out, None, None, *args[3:], eps=1e-6)[1])
    assert int(steps.max()) <= 1 and float((steps > 0).float().mean()) < 0.01


def test_without_gate_or_without_residual_add():
    h, y, _, scale, shift, a_scale = _case(2, 6, 64, torch.bfloat16)
    h_out, q = add_norm_modulate_fp8(h, y, None, scale, shift, a_scale, eps=1e-5)  # PixArt: h + cross-attention output
    ref_h, _ = reference.add_norm_modulate_fp8(h, y, None, scale, shift, a_scale, eps=1e-5)
    assert _same_residual(h_out, ref_h)
    assert int(_code_steps(q, reference.add_norm_modulate_fp8(h_out, None, None, scale, shift, a_scale, eps=1e-5)[1]).max()) <= 1
    h_out, q = add_norm_modulate_fp8(h, None, None, scale, shift, a_scale, eps=1e-5)  # the first block: no residual add
    assert h_out.numel() == 0
    assert int(_code_steps(q, reference.add_norm_modulate_fp8(h, None, None, scale, shift, a_scale, eps=1e-5)[1]).max()) <= 1


def test_close_to_the_bf16_model_computation():
    """What the eager block computes in bf16 (gate * y + h; LayerNorm; * (1 + scale) + shift), dequantized."""
    h, y, gate, scale, shift, a_scale = _case(2, 16, 256, torch.bfloat16)
    x = gate[:, None] * y + h
    m = F.layer_norm(x, (256,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
    h_out, q = add_norm_modulate_fp8(h, y, gate, scale, shift, a_scale, eps=1e-6)
    assert sqnr_db(x.float(), h_out.float()) > 45
    assert sqnr_db(m.float(), q.float() * a_scale) > 25  # e4m3 quantization error dominates


def test_saturates_instead_of_overflowing():
    h, y, gate, scale, shift, _ = _case(1, 4, 64, torch.float32)
    _, q = add_norm_modulate_fp8(h, y, gate, scale * 100, shift, torch.tensor(1e-3, device=DEVICE), eps=1e-6)
    assert torch.isfinite(q.float()).all() and float(q.float().abs().max()) == 448.0


def test_bad_arguments_name_the_problem():
    h, y, gate, scale, shift, a_scale = _case(2, 3, 32, torch.bfloat16)
    with pytest.raises(ValueError, match="gate must be"):
        add_norm_modulate_fp8(h, y, gate[:1], scale, shift, a_scale, eps=1e-6)
    with pytest.raises(ValueError, match="a gate needs the branch output"):
        add_norm_modulate_fp8(h, None, gate, scale, shift, a_scale, eps=1e-6)
    with pytest.raises(ValueError, match="h must be contiguous"):
        add_norm_modulate_fp8(h.transpose(0, 1), None, None, scale[:1].expand(3, 32), shift[:1].expand(3, 32), a_scale, eps=1e-6)
    with pytest.raises(ValueError, match="eps must be positive"):
        add_norm_modulate_fp8(h, y, gate, scale, shift, a_scale, eps=0.0)


def test_fake_implementation_and_traced_calls_reach_the_op():
    from torch.fx.experimental.proxy_tensor import make_fx

    h, y, gate, scale, shift, a_scale = _case(2, 3, 32, torch.bfloat16)
    gm = make_fx(lambda *a: add_norm_modulate_fp8(*a, eps=1e-6), tracing_mode="fake")(h, y, gate, scale, shift, a_scale)
    assert any(n.target is torch.ops.qdiff.add_norm_modulate_fp8.default for n in gm.graph.nodes)
    h_out, q = gm(h, y, gate, scale, shift, a_scale)
    assert torch.equal(h_out, add_norm_modulate_fp8(h, y, gate, scale, shift, a_scale, eps=1e-6)[0]) and q.dtype == FP8

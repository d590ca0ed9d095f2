import torch
from hypothesis import given, settings, strategies as st

from qcompile.lowering.formats import (
    FP8_E4M3_MAX, dequantize_int, fake_quantize, int_range, pack_int4, quantize_fp8, quantize_int, unpack_int4,
)


def test_int8_quantize_is_round_half_even_and_clamped():
    x = torch.tensor([-1000.0, -1.5, -0.5, 0.5, 1.5, 2.5, 126.6, 1000.0])
    q = quantize_int(x, torch.tensor(1.0), 0, *int_range("int8", True))
    assert q.dtype == torch.int8
    assert q.tolist() == [-127, -2, 0, 0, 2, 2, 127, 127]


def test_asymmetric_int8_uses_zero_point_and_whole_byte():
    x = torch.tensor([-1.0, 0.0, 10.0])
    q = quantize_int(x, torch.tensor(0.05), -108, *int_range("int8", False))
    assert q.tolist() == [-128, -108, 92]
    assert torch.equal(dequantize_int(q, torch.tensor(0.05), -108), torch.tensor([-1.0, 0.0, 10.0]))


def test_fp8_saturates_instead_of_overflowing():
    q = quantize_fp8(torch.tensor([1e9, -1e9, 3.0]), torch.tensor(1.0))
    assert q.dtype == torch.float8_e4m3fn
    assert q.float().tolist() == [FP8_E4M3_MAX, -FP8_E4M3_MAX, 3.0]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(-8, 7), min_size=1, max_size=64).map(lambda v: v if len(v) % 2 == 0 else v + [0]))
def test_int4_pack_roundtrip_exact(values):
    q = torch.tensor(values, dtype=torch.int8).reshape(1, -1)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape[-1] == q.shape[-1] // 2
    assert torch.equal(unpack_int4(packed), q)


def test_int4_packing_nibble_order():
    assert pack_int4(torch.tensor([[1, -1]], dtype=torch.int8)).tolist() == [[0xF1]]


def test_fake_quantize_error_bounded_by_half_step():
    x = torch.randn(10000)
    scale = torch.tensor(x.abs().max().item() / 127)
    err = (fake_quantize(x, "int8", scale) - x).abs().max()
    assert err <= scale / 2 + 1e-7


def test_int6_grid_is_symmetric_6_bit_in_int8_storage():
    assert int_range("int6", True) == (-32, 31)
    q = quantize_int(torch.tensor([-100.0, -31.6, 0.4, 30.5, 100.0]), torch.tensor(1.0), 0, *int_range("int6", True))
    assert q.dtype == torch.int8 and q.tolist() == [-32, -32, 0, 30, 31]

"""Number formats: the pure-PyTorch ground truth for quantize, dequantize and int4 packing.

Everything here is small and obviously right on purpose: the Triton kernels are tested against it.
Integer quantization is ``q = clamp(round(x / scale) + zero_point, qmin, qmax)`` (round half to
even, as ``torch.round``); FP8 e4m3 is ``(x / scale).clamp(-448, 448).to(float8_e4m3fn)``.
"""

from __future__ import annotations

import torch

FP8_E4M3_MAX = 448.0
FP8_DTYPE = torch.float8_e4m3fn

# (qmin, qmax) of the integer grids. Symmetric weights and activations use the symmetric
# part of the grid so that negation is exact; asymmetric activations use the whole byte.
INT_RANGES = {
    ("int8", True): (-127, 127),
    ("int8", False): (-128, 127),
    ("int4", True): (-8, 7),
    ("int6", True): (-32, 31),  # stored in int8
    ("int5", True): (-16, 15),  # stored in int8
}


def int_range(fmt: str, symmetric: bool) -> tuple[int, int]:
    """The (qmin, qmax) of an integer format."""
    try:
        return INT_RANGES[(fmt, symmetric)]
    except KeyError:
        raise ValueError(f"no integer grid for format {fmt!r} (symmetric={symmetric})") from None


def qmax_of(fmt: str) -> float:
    """Largest magnitude a symmetric grid of ``fmt`` represents (scale = clip / qmax)."""
    if fmt == "fp8_e4m3":
        return FP8_E4M3_MAX
    if fmt == "int8":
        return 127.0
    if fmt == "int4":
        return 7.0
    if fmt == "int6":
        return 31.0
    if fmt == "int5":
        return 15.0
    raise ValueError(f"unknown format {fmt!r}")


def quantize_int(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | int, qmin: int, qmax: int) -> torch.Tensor:
    """Integer quantization to int8 storage (int4 values also live in int8 until packed)."""
    q = torch.round(x.float() / scale) + zero_point
    return q.clamp(qmin, qmax).to(torch.int8)


def dequantize_int(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | int = 0) -> torch.Tensor:
    """Inverse of :func:`quantize_int`, in float32."""
    return (q.float() - zero_point) * scale


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """FP8 e4m3 quantization with saturation (no inf/NaN from large values)."""
    return (x.float() / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(FP8_DTYPE)


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`quantize_fp8`, in float32."""
    return q.float() * scale


def fake_quantize(x: torch.Tensor, fmt: str, scale: torch.Tensor, zero_point: torch.Tensor | int = 0, symmetric: bool = True) -> torch.Tensor:
    """quantize then dequantize, in float32: the error a format adds to ``x``."""
    if fmt == "fp8_e4m3":
        return dequantize_fp8(quantize_fp8(x, scale), scale)
    qmin, qmax = int_range(fmt, symmetric)
    return dequantize_int(quantize_int(x, scale, zero_point, qmin, qmax), scale, zero_point)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack int4 values (int8 tensor in [-8, 7], last dim even) two per byte into uint8.

    Element ``2i`` goes to the low nibble and ``2i+1`` to the high nibble of byte ``i``.
    """
    if q.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even last dimension, got shape {tuple(q.shape)}")
    u = (q.to(torch.int16) & 0xF).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: uint8 (..., n/2) -> int8 (..., n) in [-8, 7]."""
    lo = (p & 0xF).to(torch.int16)
    hi = (p >> 4).to(torch.int16)
    both = torch.stack((lo, hi), dim=-1).reshape(*p.shape[:-1], p.shape[-1] * 2)
    return torch.where(both >= 8, both - 16, both).to(torch.int8)

"""Shared helpers of the kernel tests: the device they run on and static activation quantizers."""

from __future__ import annotations

import pytest
import torch

from qcompile.lowering.kernels import kernels_usable_on

if torch.cuda.is_available() and kernels_usable_on(torch.device("cuda")):
    DEVICE = torch.device("cuda")
elif kernels_usable_on(torch.device("cpu")):
    DEVICE = torch.device("cpu")
else:
    DEVICE = None

needs_kernels = pytest.mark.skipif(
    DEVICE is None, reason="triton was imported without TRITON_INTERPRET=1 and there is no GPU: test_interpreter_subprocess runs these"
)


def act_qparams(x: torch.Tensor, fmt: str, asym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Min/max static quantizer of ``x``: (fp32 scale, int32 zero point) 0-dim tensors on x's device."""
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    if fmt == "fp8_e4m3":
        scale, zp = max(-lo, hi) / 448, 0
    elif not asym:
        scale, zp = max(-lo, hi) / 127, 0
    else:
        scale = (hi - lo) / 255
        zp = round(-128 - lo / scale)
    return torch.tensor(scale, device=x.device), torch.tensor(zp, dtype=torch.int32, device=x.device)


def randn(*shape, dtype=torch.float32, scale=1.0, shift=0.0) -> torch.Tensor:
    """Random test data on the kernel device (generated on CPU, so seeds are device independent)."""
    return (torch.randn(*shape) * scale + shift).to(device=DEVICE, dtype=dtype)

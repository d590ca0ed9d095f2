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

# Two fp8 kernels that sum the same fp8 products in another order: in the interpreter (fp32 sums) they agree to fp32
# rounding. On sm_90 Triton's fp8 ``tl.dot`` accumulates in wgmma's fast, reduced-precision mode (the NVIDIA backend's
# ``max_num_imprecise_acc`` default of 2**30 never promotes to fp32; cuBLAS ``_scaled_mm`` does), so two tilings of one
# fp8 conv or GEMM differ by the accumulator's rounding, not only by the summation order.
FP8_SUM_ORDER_SQNR_DB = 80.0 if DEVICE is None or DEVICE.type == "cpu" else 55.0

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


def slice_qparams(x: torch.Tensor, splits: tuple[int, ...], fmt: str, asym: bool, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Min/max static quantizers of each channel slice ``[splits[i], splits[i+1])`` of ``x`` along ``dim``: (scales, zero points)."""
    pairs = [act_qparams(x.narrow(dim, a, b - a), fmt, asym) for a, b in zip(splits, splits[1:])]
    return torch.stack([s for s, _ in pairs]), torch.stack([z for _, z in pairs])


def spread_slices(x: torch.Tensor, splits: tuple[int, ...], dim: int) -> torch.Tensor:
    """``x`` with each slice on its own range (x1, x8, x1/16, ... and shifted), as a concat of differently scaled parts."""
    parts = [x.narrow(dim, a, b - a) * (8.0 ** (i % 2) / 4.0 ** (i // 2)) + 0.5 * i for i, (a, b) in enumerate(zip(splits, splits[1:]))]
    return torch.cat(parts, dim=dim)


def compiled_with_switch(monkeypatch, case, plan, args, kwargs, env: str):
    """``case.model`` compiled with the Triton lowering (no Inductor) with the switch ``env`` set to 1 and to 0, each
    run at timestep 400: ``({"1": output, "0": output}, {"1": QuantizedGraph, "0": QuantizedGraph})``."""
    outs, graphs = {}, {}
    for on in ("1", "0"):
        monkeypatch.setenv(env, on)
        torch._dynamo.reset()
        with torch.no_grad():
            compiled = torch.compile(case.model, backend="qdiff", options={"plan": plan, "lowering": "triton", "inductor": False})
            outs[on] = case.output(compiled(*args, **{**kwargs, "timestep": torch.full((2,), 400, device=DEVICE)}))
        graphs[on] = plan.compiled[-1]
    return outs, graphs


def calibrated_tiny_dit_attn(case=None):
    """``case`` (default ``tests.tiny_models.tiny_dit_attn``) on the kernel device with its ``w8a8-fp8-attn`` plan
    (three timesteps): ``(case, args, kwargs, plan)``."""
    import qcompile
    from qcompile import QuantConfig
    from tests.tiny_models import tiny_dit_attn

    case = case or tiny_dit_attn()
    case.model.to(DEVICE)
    args = tuple(a.to(DEVICE) for a in case.args)
    kwargs = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in case.kwargs.items()}

    def run(m):
        for t in (900, 400, 50):
            m(*args, **{**kwargs, "timestep": torch.full((2,), t, device=DEVICE)})

    return case, args, kwargs, qcompile.calibrate(case.model, run, QuantConfig.preset("w8a8-fp8-attn"), progress=False)

"""Residual add + LayerNorm + adaLN modulation + fp8 quantization in one pass over the rows (DiT / PixArt blocks).

The transformer blocks of DiT and PixArt end each branch with ``h = h + gate[b] * y`` and start the next with
``LayerNorm(h) * (1 + scale[b]) + shift[b]`` (no affine LayerNorm weights), whose output the next fp8 GEMM reads
quantized with its static scale. Inductor generates this as a looped row reduction (a first loop for the statistics,
a second one reading the row again); on an H200 its two kernels per DiT-XL/2 block took 37-53 us at 8192 x 1152, about
3x the time of their bytes (docs/kernels.md, "step profile"). Here one program owns ``ROWS`` whole rows (``BLOCK_C``,
the next power of two of C, in registers), reads ``h`` and ``y`` once and writes the new residual (``h``'s dtype) and
the fp8 codes:

- ``x = h + gate[b] * y`` in fp32 (no ``y``: ``x = h``, nothing stored; no gate: ``x = h + y``), stored rounded to
  h's dtype, and the statistics taken from the stored value (the eager model normalizes the rounded sum);
- ``m = (x - mean) * rsqrt(var + eps) * (1 + scale[b]) + shift[b]`` (biased variance, as LayerNorm), in fp32;
- ``q = e4m3(m / a_scale)``, saturating at +-448, round to nearest even.

``b = row // seq``: gate / scale / shift are per (batch, channel), any row stride (views of the adaLN chunk).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ._common import FLOAT_DTYPES, INTERPRET, autotuned, check_launchable, check_scalar, check_tensor, direct, eager_call, quantize_fp8

FP8 = torch.float8_e4m3fn
MAX_C = 8192  # one row in registers (BLOCK_C up to 8192 fp32 per program)


@triton.jit
def _per_batch(ptr, b, cols, stride_b, mask):
    """A per-(batch, channel) vector's entries for these rows' batches, fp32."""
    return tl.load(ptr + b[:, None] * stride_b + cols[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def add_norm_modulate_fp8_kernel(
    h_ptr, y_ptr, g_ptr, sc_ptr, sh_ptr, as_ptr, hout_ptr, q_ptr,
    M, C, SEQ, stride_g, stride_sc, stride_sh,
    HAS_Y: tl.constexpr, HAS_GATE: tl.constexpr, EPS: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_C: tl.constexpr, ROWS: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_C)
    mask = (rows < M)[:, None] & (cols < C)[None, :]
    offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
    b = rows // SEQ
    x = tl.load(h_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_Y:
        y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_GATE:
            y = y * _per_batch(g_ptr, b, cols, stride_g, mask)
        x_out = (x + y).to(hout_ptr.dtype.element_ty)
        tl.store(hout_ptr + offs, x_out, mask=mask)
        x = x_out.to(tl.float32)
    mean = tl.sum(x, axis=1) / C
    d = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=1) / C + EPS)
    m = d * rstd[:, None] * (1.0 + _per_batch(sc_ptr, b, cols, stride_sc, mask)) + _per_batch(sh_ptr, b, cols, stride_sh, mask)
    inv = tl.math.div_rn(1.0, tl.load(as_ptr))
    tl.store(q_ptr + offs, quantize_fp8(m * inv, INTERPRET), mask=mask)


def _config(rows: int, warps: int) -> triton.Config:
    return triton.Config({"ROWS": rows}, num_warps=warps, num_stages=1)


# rows per program x warps; the row width is fixed by C (BLOCK_C)
CONFIGS = [_config(1, 4), _config(1, 8), _config(2, 4), _config(2, 8), _config(4, 8), _config(4, 16)]
_kernel = autotuned(add_norm_modulate_fp8_kernel, CONFIGS, ["C", "HAS_Y", "HAS_GATE"], interpret_config=_config(2, 4))


def _batch_vector(t: torch.Tensor | None, name: str, batch: int, c: int) -> None:
    if t is None:
        return
    check_tensor(t, name, FLOAT_DTYPES)
    if t.numel() != batch * c or t.shape[0] != batch or t.shape[-1] != c or t.stride(-1) != 1:
        raise ValueError(f"{name} must be (B, C) or (B, 1, C) = ({batch}, {c}) with unit channel stride, got {tuple(t.shape)} "
                         f"strides {t.stride()}")


def _check(h, y, gate, scale, shift, a_scale, eps) -> None:
    check_tensor(h, "h", FLOAT_DTYPES, dim=3)
    B, S, C = h.shape
    if not h.is_contiguous():
        raise ValueError("h must be contiguous (B, S, C)")
    if C > MAX_C:
        raise ValueError(f"rows of {C} channels exceed the kernel's {MAX_C}")
    if y is not None:
        check_tensor(y, "y", FLOAT_DTYPES, shape=tuple(h.shape))
        if not y.is_contiguous():
            raise ValueError("y must be contiguous (B, S, C)")
    elif gate is not None:
        raise ValueError("a gate needs the branch output y")
    for t, name in ((gate, "gate"), (scale, "scale"), (shift, "shift")):
        _batch_vector(t, name, B, C)
    if scale is None or shift is None:
        raise ValueError("scale and shift are required (the adaLN modulation)")
    check_scalar(a_scale, "activation scale", torch.float32)
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")
    check_launchable(h, *(t for t in (y, gate, scale, shift) if t is not None), a_scale)


def _launch(h, y, gate, scale, shift, a_scale, eps: float, wrap) -> tuple[torch.Tensor, torch.Tensor]:
    _check(h, y, gate, scale, shift, a_scale, eps)
    B, S, C = h.shape
    h_out = torch.empty_like(h) if y is not None else h.new_empty((0,))
    q = torch.empty(h.shape, device=h.device, dtype=FP8)
    M = B * S
    if M == 0:
        return h_out, q

    def grid(meta):
        return (triton.cdiv(M, meta["ROWS"]),)

    wrap(_kernel)[grid](
        h, y if y is not None else h, gate if gate is not None else scale, scale, shift, a_scale, h_out if y is not None else h, q,
        M, C, S, gate.stride(0) if gate is not None else 0, scale.stride(0), shift.stride(0),
        HAS_Y=y is not None, HAS_GATE=gate is not None, EPS=float(eps), INTERPRET=INTERPRET, BLOCK_C=triton.next_power_of_2(C),
    )
    return h_out, q


@triton_op("qdiff::add_norm_modulate_fp8", mutates_args=())
def add_norm_modulate_fp8_op(h: torch.Tensor, y: torch.Tensor | None, gate: torch.Tensor | None, scale: torch.Tensor,
                             shift: torch.Tensor, a_scale: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The new residual ``h + gate * y`` (empty without ``y``) and ``e4m3(modulate(LayerNorm(.)) / a_scale)``."""
    return _launch(h, y, gate, scale, shift, a_scale, eps, wrap_triton)


@add_norm_modulate_fp8_op.register_fake
def _(h, y, gate, scale, shift, a_scale, eps):
    return (torch.empty_like(h) if y is not None else h.new_empty((0,))), h.new_empty(h.shape, dtype=FP8)


def add_norm_modulate_fp8(h: torch.Tensor, y: torch.Tensor | None, gate: torch.Tensor | None, scale: torch.Tensor,
                          shift: torch.Tensor, a_scale: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``x = h + gate[b] * y`` (``gate`` None: ``h + y``; ``y`` None: ``x = h``, the first output empty) and the fp8 codes
    of ``LayerNorm(x) * (1 + scale[b]) + shift[b]`` with the static scale ``a_scale`` (module docstring). h, y:
    (B, S, C) contiguous; gate / scale / shift: (B, C) or (B, 1, C) with unit channel stride. Reference:
    :func:`qcompile.lowering.reference.add_norm_modulate_fp8`. Eager calls launch directly; traced ones call
    ``torch.ops.qdiff.add_norm_modulate_fp8``."""
    args = (h, y, gate, scale, shift, a_scale.float().reshape(()), float(eps))
    if eager_call(h):
        return _launch(*args, wrap=direct)
    return torch.ops.qdiff.add_norm_modulate_fp8(*args)

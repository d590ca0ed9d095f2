"""FP8 e4m3 attention forward (FlashAttention-style, non-causal): ``softmax(Q K^T * sm_scale) V`` with static scales.

Q, K and V (``(B, H, S, D)``, bf16 / fp16 / fp32, unit stride along D) are quantized to float8_e4m3fn tile by tile in
registers with static per-tensor scales (``x / scale``, saturating at +-448, round to nearest even; ``X_FP8``: the
inputs are already float8_e4m3fn, quantized by their producer with those scales). One program owns ``BLOCK_M`` query
rows of one (batch, head) and walks the keys ``BLOCK_N`` at a time with an online softmax in base 2:

- ``S = (q8 @ k8^T) * (q_scale * k_scale * sm_scale * log2 e)`` in fp32 (fp8 ``tl.dot``);
- ``P = exp2(S - m + log2 448) = 448 * exp2(S - m)`` with ``m`` the running row max, so P lies in [0, 448], the whole
  e4m3 range (its largest entry is exactly the largest code); P is quantized to e4m3 (round to nearest even) for the fp8
  ``P @ V`` dot. The row sum ``l`` adds the unquantized fp32 P (same factor 448), so the factor cancels in ``acc / l``;
- at the end ``O = acc * v_scale / l``, cast to the output dtype (q's, or ``out_dtype`` for fp8 inputs).

Softmax modes (``SOFTMAX``, :func:`softmax_mode`, ``$QDIFF_ATTN_SOFTMAX``): by default at D = 72 / 40 (``ex2-lv``) ``l``
sums the *quantized* P and comes out of ``P @ V``: V's second head-dim part has a padding column, which holds 1.0
(read from V where V carries that ones column, ``V_ONES`` / ``v_ones_dim`` / :func:`ones_row_width`, else set in
registers every key tile), so
no per-score add; ``bits`` / ``half`` build P's codes on the FMA pipe (slower: the kernel is bound by instruction
issue; docs/kernels.md "softmax modes").

Head dims that are not a power of two (DiT / PixArt: 72; SD 1.5: 40, 80, 160) are split: ``D0`` (the largest power of
two <= D) plus a masked second part, ``DQ1 = max(32, next_pow2(D - D0))`` wide in ``Q K^T`` (an fp8 dot needs K >= 32)
and ``DV1 = max(16, next_pow2(D - D0))`` wide in ``P @ V`` (its N >= 16); see :func:`head_parts` and docs/kernels.md
("fp8 attention") for the FLOP counts against padding D to the next power of two. Supported: ``32 <= D <= 160`` with
``D % 8 == 0``; power-of-two D runs one part. ``Q K^T`` is one dot where the next power of two is at most 128
(:func:`qk_parts`, :func:`qk_width`: D = 40 -> 64, 72 -> 128): q / k tiles load that wide, their columns past D masked
to zero, from any layout (e.g. views of the q / k / v projection's output at 72-element head offsets, 8-byte aligned).
Q / K may have another head dim than V (``Dk``, ``Dv``: q / k already zero-padded in memory, the heads layout).

V may be stored transposed, (B, H, D, S) with its keys contiguous (``V_T``, chosen from V's strides: a
``v_t.transpose(-1, -2)`` view): the fp8 ``P @ V`` dot then takes V from shared memory as loaded, where row-major V is
transposed byte by byte in shared memory. :func:`quantize_heads` writes fp8 heads that way (the Triton lowering's
attention call quantizes q / k / v with it before the kernel, docs/kernels.md "fp8 attention v2").

Keys past the sequence end are handled by one masked tail tile (``S = -inf`` there), so the main loop has no masks;
query rows past the end load wrapped (valid) rows and only the store is masked.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .. import formats, reference
from ._common import FLOAT_DTYPES, INTERPRET, autotuned, check_launchable, check_scalar, check_tensor, direct, eager_call, quantize_fp8

FP8 = torch.float8_e4m3fn
P_SCALE = 448.0  # P = exp2(S - m + log2 448) = 448 * exp2(S - m): the whole e4m3 range
LOG2E = tl.constexpr(1.4426950408889634)
LOG2_P_SCALE = tl.constexpr(math.log2(P_SCALE))
MIN_HEAD_DIM, MAX_HEAD_DIM = 32, 160  # (larger heads: registers; aot_check compiles D = 40 / 64 / 72 / 80 / 128 / 160 spill-free)


@triton.jit
def _quantize_tile(x, inv_scale, X_FP8: tl.constexpr, INTERPRET: tl.constexpr):
    """A loaded Q / K / V tile as e4m3: quantized with ``inv_scale`` (1 / static scale), or as loaded (``X_FP8``)."""
    if X_FP8:
        return x
    else:
        return quantize_fp8(x.to(tl.float32) * inv_scale, INTERPRET)


@triton.jit
def _quantize_probs(p, INTERPRET: tl.constexpr):
    """P in [0, 448] (fp32) -> e4m3, round to nearest even. On the GPU one ``cvt.rn.satfinite.e4m3x2.f32`` per pair
    (satfinite: the rare 448 * (1 + ulp) of ex2.approx saturates to 448); the interpreter rounds on the e4m3 grid first."""
    if INTERPRET:
        return quantize_fp8(p, INTERPRET)
    else:
        return p.to(tl.float8e4nv, fp_downcast_rounding="rtne")


# Softmax modes (``SOFTMAX``, :func:`softmax_mode`): how P's e4m3 codes and the row sum ``l`` are computed.
SOFTMAX_MODES = reference.ATTN_SOFTMAX_MODES  # ex2, ex2-lv, bits, half
EX2, EX2_LV, BITS, HALF = (tl.constexpr(i) for i in range(4))
# P's codes from its exponent without ex2 / cvt (:func:`_exp2_codes`): MAGIC rounds an fp32 to an integer held in its low
# mantissa bits; 8 * (2**f - 1 - f) for f = f0 + 1/2 as a quadratic in f0 in [-1/2, 1/2] (least squares, max error
# 0.033 of a code), plus 60 (= 8 * 7 exponent bias, + 8 * 1/2 of the half-integer shift)
EXP_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2**23
EXP_C2, EXP_C1, EXP_C0 = tl.constexpr(2.74125083), tl.constexpr(-0.06332679), tl.constexpr(59.31312284)
E4M3_ONE = tl.constexpr(0x38)  # the e4m3 code of 1.0


@triton.jit
def _exp2_codes(u):
    """e4m3 codes of ``2**(u + 1/2)`` (``u <= log2 448 - 1/2``) on the FMA and integer pipes, without ex2 or a
    conversion: with ``u = r + f0`` (``r`` an integer, ``|f0| <= 1/2``), the code is ``8 * (exponent + 7) + mantissa``
    = ``round(8 * (u + 1/2) + 56 + 8 * (2**f - 1 - f))`` with ``f = f0 + 1/2``: the last term a quadratic in ``f0``.
    It is the nearest code but for 1 % of values (one code off, where the quadratic's 0.033 error crosses a
    rounding boundary); values below 2**-6 (codes below 8) come out as e4m3 subnormals of the wrong exponent or 0
    (absolute error < 2**-6 against P's maximum 448)."""
    r = (u + EXP_MAGIC) - EXP_MAGIC  # round(u) (fp32 adds: the compiler does not reassociate them)
    f0 = u - r
    g = tl.maximum(u * 8.0 + ((EXP_C2 * f0 + EXP_C1) * f0 + EXP_C0), 0.0)
    code = (g + EXP_MAGIC).to(tl.int32, bitcast=True)  # round(g) in the low byte (0 <= g <= 126.5), kept by the cast
    return code.to(tl.int8).to(tl.float8e4nv, bitcast=True)


@triton.jit
def _with_ones_column(v, cols, DV: tl.constexpr):
    """The fp8 V tile ``v`` with head-dim column ``DV`` (a padding column of the second part) set to 1.0: ``P @ V`` then
    also gives the row sums of the quantized P in that output column (``SOFTMAX`` ex2-lv / bits / half)."""
    bits = v.to(tl.int8, bitcast=True)
    return tl.where((cols == DV)[None, :], E4M3_ONE, bits).to(tl.int8).to(tl.float8e4nv, bitcast=True)


@triton.jit
def _probs(s, qk_scale, m_new, SOFTMAX: tl.constexpr, MASKED: tl.constexpr, INTERPRET: tl.constexpr):
    """P's e4m3 codes for scores ``s`` (``448 * exp2(s * qk_scale - m_new)``) and their fp32 values (for the row sum;
    ``SOFTMAX`` ex2 only, else the row sum comes from V's ones column and the second result is unused)."""
    if SOFTMAX <= EX2_LV:  # one FMA and one ex2 per score, one cvt per pair
        p = tl.math.exp2(s * qk_scale - (m_new - LOG2_P_SCALE)[:, None])
        return _quantize_probs(p, INTERPRET), p
    else:
        u = s * qk_scale - (m_new - LOG2_P_SCALE + 0.5)[:, None]
        if MASKED:  # (-inf scores of the tail tile: no NaN in the rounding)
            u = tl.maximum(u, -64.0)
        if SOFTMAX == BITS:
            p8 = _exp2_codes(u)
        else:  # HALF: even key columns by ex2 + cvt, odd ones by _exp2_codes (the two pipes share the work)
            ue, uo = tl.split(tl.reshape(u, (u.shape[0], u.shape[1] // 2, 2)))
            pe = _quantize_probs(tl.math.exp2(ue + 0.5), INTERPRET)
            p8 = tl.reshape(tl.join(pe, _exp2_codes(uo)), (u.shape[0], u.shape[1]))
        return p8, s


@triton.jit
def _load_tile(base, rows, stride_r, cols, stride_c, n_rows, n_cols, MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr):
    """A (rows, cols) tile (of a head: rows are keys or queries, cols head dims), masked (to 0) where asked. One of
    the strides is the literal 1: Q / K and row-major V have contiguous head dims, transposed V (``V_T``) contiguous keys."""
    ptrs = base + rows[:, None] * stride_r + cols[None, :] * stride_c
    if MASK_ROWS and MASK_COLS:
        t = tl.load(ptrs, mask=(rows < n_rows)[:, None] & (cols < n_cols)[None, :], other=0.0)
    elif MASK_ROWS:
        t = tl.load(ptrs, mask=(rows < n_rows)[:, None], other=0.0)
    elif MASK_COLS:
        t = tl.load(ptrs, mask=(cols < n_cols)[None, :], other=0.0)
    else:
        t = tl.load(ptrs)
    return t


@triton.jit
def _attend_tile(acc0, acc1, l_i, m_i, q0, q1, k_base, v_base, start_n, SK, stride_ks, stride_vs, stride_vd, k_inv, v_inv, qk_scale,
                 DK: tl.constexpr, DK0: tl.constexpr, DK1: tl.constexpr, DV: tl.constexpr, DV0: tl.constexpr, DV1: tl.constexpr,
                 X_FP8: tl.constexpr, MASKED: tl.constexpr, SOFTMAX: tl.constexpr, V_ONES: tl.constexpr, INTERPRET: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    """One key tile ``[start_n, start_n + BLOCK_N)``: scores, online-softmax update, ``P @ V`` into the accumulators.
    ``MASKED``: the tail tile (keys past ``SK`` load as 0 and score -inf)."""
    rn = start_n + tl.arange(0, BLOCK_N)
    k0 = _quantize_tile(_load_tile(k_base, rn, stride_ks, tl.arange(0, DK0), 1, SK, DK, MASKED, DK0 > DK), k_inv, X_FP8, INTERPRET)
    s = tl.dot(q0, tl.trans(k0))
    if DK1 > 0:  # second head-dim part of Q K^T: columns [DK0, DK0 + DK1), those past DK load as 0
        dk1 = DK0 + tl.arange(0, DK1)
        k1 = _quantize_tile(_load_tile(k_base, rn, stride_ks, dk1, 1, SK, DK, MASKED, True), k_inv, X_FP8, INTERPRET)
        s = tl.dot(q1, tl.trans(k1), s)
    if MASKED:
        s = tl.where((rn < SK)[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)  # (a tail tile has at least one key: m_new is finite)
    p8, p = _probs(s, qk_scale, m_new, SOFTMAX, MASKED, INTERPRET)  # P = 448 * exp2(S - m)
    alpha = tl.math.exp2(m_i - m_new)
    if SOFTMAX == EX2:
        l_i = l_i * alpha + tl.sum(p, 1)
    v0 = _quantize_tile(_load_tile(v_base, rn, stride_vs, tl.arange(0, DV0), stride_vd, SK, DV, MASKED, False), v_inv, X_FP8, INTERPRET)
    acc0 = tl.dot(p8, v0, acc0 * alpha[:, None])
    if DV1 > 0:  # second head-dim part of P V: output columns [DV0, DV0 + DV1)
        dv1 = DV0 + tl.arange(0, DV1)
        # (V_ONES: V's storage holds the second part's rows, the ones row and zeros: no column mask)
        v1 = _quantize_tile(_load_tile(v_base, rn, stride_vs, dv1, stride_vd, SK, DV, MASKED, not V_ONES), v_inv, X_FP8, INTERPRET)
        if SOFTMAX == EX2:
            acc1 = tl.dot(p8, v1, acc1 * alpha[:, None])
        else:  # V's ones column: this tile's P @ V from zero, added in fp32 (the fp8 MMA's accumulator keeps ~14
            # bits: the growing row sum fed back as its C operand lost the tiles' small terms, 22 dB at 4096 keys)
            if not V_ONES:  # (set in registers: 30 more instructions a tile than read from storage, sm_90 SASS)
                v1 = _with_ones_column(v1, dv1, DV)
            acc1 = acc1 * alpha[:, None] + tl.dot(p8, v1)
    return acc0, acc1, l_i, m_new


@triton.jit
def fp8_attention_kernel(
    q_ptr, k_ptr, v_ptr, qs_ptr, ks_ptr, vs_ptr, out_ptr, os_ptr,
    sm_scale, H, SQ, SK,
    batch_q, head_q, row_q, batch_k, head_k, row_k, batch_v, head_v, row_v, batch_o, head_o, row_o,
    DK: tl.constexpr, DK0: tl.constexpr, DK1: tl.constexpr, DV: tl.constexpr, DV0: tl.constexpr, DV1: tl.constexpr,
    X_FP8: tl.constexpr, V_T: tl.constexpr, ALIGN_Q: tl.constexpr, ALIGN_K: tl.constexpr, ALIGN_V: tl.constexpr,
    ALIGN_O: tl.constexpr, OUT_FP8: tl.constexpr, SOFTMAX: tl.constexpr, V_ONES: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Q / K head dim DK, V / output head dim DV (usually equal). Parts: DK0 + DK1 and DV0 + DV1 (head_parts); DK0 > DK:
    # q / k zero-padded in registers to the power of two DK0 (their columns past DK load as 0), one Q K^T dot.
    # Strides (batch, head, row) of each tensor in units of its ALIGN_* elements (tensor_strides): row is the stride
    # between query / key / output rows, for V its non-unit one (between keys, or under V_T, V stored (B, H, D, S) with
    # its keys contiguous, between head dims). Multiplied back by the constexpr they tell the compiler each tensor's
    # alignment (vectorized loads / stores of the head-dim parts where Triton's own specialization, integers divisible
    # by 16, does not see it: contiguous D = 72 rows, or heads at 72-element offsets in a projection's output). (Not
    # tl.multiple_of: under Inductor a scalar may arrive as a constexpr, an integer equal to 1 always and every scalar in
    # torch 2.11's mutation analysis; likewise sm_scale as fp64, cast below.)
    tl.static_assert(SOFTMAX == EX2 or (DV1 > 0 and DV < DV0 + DV1), "SOFTMAX modes but ex2 need a padding column in V's second part")
    stride_qs = row_q * ALIGN_Q
    stride_ks = row_k * ALIGN_K
    if V_T:
        stride_vd = row_v * ALIGN_V
        stride_vs = 1
    else:
        stride_vs = row_v * ALIGN_V
        stride_vd = 1
    stride_os = row_o * ALIGN_O
    pid_m = tl.program_id(0)  # query tiles of one head run next to each other: its K / V stay in L2
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    q_base = q_ptr + (b * batch_q + h * head_q) * ALIGN_Q
    k_base = k_ptr + (b * batch_k + h * head_k) * ALIGN_K
    v_base = v_ptr + (b * batch_v + h * head_v) * ALIGN_V
    o_base = out_ptr + (b * batch_o + h * head_o) * ALIGN_O

    q_scale = tl.load(qs_ptr)
    k_scale = tl.load(ks_ptr)
    v_scale = tl.load(vs_ptr)
    q_inv = tl.math.div_rn(1.0, q_scale)  # IEEE (plain "/" is approximate on GPU)
    k_inv = tl.math.div_rn(1.0, k_scale)
    v_inv = tl.math.div_rn(1.0, v_scale)
    qk_scale = q_scale * k_scale * tl.cast(sm_scale, tl.float32) * LOG2E  # scores in base 2, fp32

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rm_l = rm % SQ  # rows past the end load valid (wrapped) rows; only the store is masked
    q0 = _quantize_tile(_load_tile(q_base, rm_l, stride_qs, tl.arange(0, DK0), 1, SQ, DK, False, DK0 > DK), q_inv, X_FP8, INTERPRET)
    if DK1 > 0:
        q1 = _quantize_tile(_load_tile(q_base, rm_l, stride_qs, DK0 + tl.arange(0, DK1), 1, SQ, DK, False, True), q_inv, X_FP8, INTERPRET)
    else:
        q1 = q0  # (unused)
    acc0 = tl.zeros((BLOCK_M, DV0), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_M, DV1 if DV1 > 0 else 16), dtype=tl.float32)  # (unused without a second part)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)

    full = (SK // BLOCK_N) * BLOCK_N
    for start_n in range(0, full, BLOCK_N):
        acc0, acc1, l_i, m_i = _attend_tile(acc0, acc1, l_i, m_i, q0, q1, k_base, v_base, start_n, SK, stride_ks, stride_vs, stride_vd,
                                            k_inv, v_inv, qk_scale, DK, DK0, DK1, DV, DV0, DV1, X_FP8, False, SOFTMAX, V_ONES, INTERPRET, BLOCK_N)
    if full < SK:
        acc0, acc1, l_i, m_i = _attend_tile(acc0, acc1, l_i, m_i, q0, q1, k_base, v_base, full, SK, stride_ks, stride_vs, stride_vd,
                                            k_inv, v_inv, qk_scale, DK, DK0, DK1, DV, DV0, DV1, X_FP8, True, SOFTMAX, V_ONES, INTERPRET, BLOCK_N)

    if SOFTMAX != EX2:  # the row sums of the quantized P, from V's ones column (P @ V rescaled them with acc)
        l_i = tl.sum(tl.where((DV0 + tl.arange(0, DV1) == DV)[None, :], acc1, 0.0), 1)
    o_scale = v_scale / l_i  # the factor 448 of P cancels between acc and l
    if OUT_FP8:  # quantized for the next fp8 GEMM (the output projection's static scale)
        o_scale = o_scale * tl.math.div_rn(1.0, tl.load(os_ptr))
    row_ok = (rm < SQ)[:, None]
    dv0 = tl.arange(0, DV0)
    tl.store(o_base + rm[:, None] * stride_os + dv0[None, :], _output(acc0 * o_scale[:, None], out_ptr, OUT_FP8, INTERPRET), mask=row_ok)
    if DV1 > 0:
        dv1 = DV0 + tl.arange(0, DV1)
        tl.store(o_base + rm[:, None] * stride_os + dv1[None, :], _output(acc1 * o_scale[:, None], out_ptr, OUT_FP8, INTERPRET),
                 mask=row_ok & (dv1 < DV)[None, :])


@triton.jit
def _output(o, out_ptr, OUT_FP8: tl.constexpr, INTERPRET: tl.constexpr):
    """An fp32 output tile in the output's type: e4m3 codes (``OUT_FP8``, already divided by the output scale) or float."""
    if OUT_FP8:
        return quantize_fp8(o, INTERPRET)
    else:
        return o.to(out_ptr.dtype.element_ty)


def head_parts(d: int) -> tuple[int, int, int]:
    """``(D0, DQ1, DV1)``: the head dim's power-of-two part and the widths of the masked second part in ``Q K^T`` /
    ``P V`` (0 when ``d`` is a power of two). Raises for unsupported ``d``."""
    if not (MIN_HEAD_DIM <= d <= MAX_HEAD_DIM) or d % 8:
        raise ValueError(f"fp8_attention supports head dims {MIN_HEAD_DIM}..{MAX_HEAD_DIM} that are multiples of 8, got {d}")
    d0 = 1 << (d.bit_length() - 1)
    rest = d - d0
    if rest == 0:
        return d0, 0, 0
    width = 1 << (rest - 1).bit_length()
    return d0, max(32, width), max(16, width)


def qk_parts(d: int) -> tuple[int, int]:
    """``(DK0, DK1)`` of ``Q K^T`` for q / k head dim ``d``: ``(qk_width(d), 0)`` where that pads (one dot, the columns
    past ``d`` loaded as zeros in registers: q / k need no padded copy in memory), else :func:`head_parts`'s."""
    width = qk_width(d)
    if width > d:
        head_parts(d)  # (validates d)
        return width, 0
    return head_parts(d)[:2]


def dot_widths(d: int) -> tuple[int, int]:
    """Head-dim widths the two dots compute (``Q K^T``, ``P V``) for head dim ``d``: their FLOPs per (query, key) pair
    are ``2 * width`` each, against ``2 * d`` useful."""
    d0, _, dv1 = head_parts(d)
    return sum(qk_parts(d)), d0 + dv1


def _cfg(bm: int, bn: int, stages: int, warps: int) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_stages=stages, num_warps=warps)


# Autotune table (BLOCK_M, BLOCK_N, num_stages, num_warps). BLOCK_N >= 32 (K of the fp8 P @ V dot). Picked by
# ``examples/attention_config_sweep.py --candidates`` (H200, 2026-12-03, docs/experiments/attention-configs): 64 query
# rows x 128 keys with 4 warps won DiT-XL/2's and PixArt-alpha's self-attention (95.8 / 323.2 us against 101.3 / 353.4 us
# for the best config of the table before); 128 x 32 with 8 warps PixArt's 120-key cross-attention (33.1 vs 36.9 us).
# 128 x 64 (3 stages, 8 warps) stays for long sequences with few heads; 64 x 64 for short query sequences (SD 1.5's
# 64-token mid block: one query tile per head). 128 x 128 x 2 and 128 x 64 x 2 (8 warps) lost at every swept shape and
# left the table (fewer configs: less compile time). 128 query rows need 8 warps: with 4 the fp32 scores, P and both
# accumulators exceed 255 registers and spill at D = 72 / 128 / 160. Every row compiles for sm_90 without spills at
# D = 40 / 64 / 72 / 80 / 128 / 160 (`python -m qcompile.lowering.kernels.aot_check attention`).
CONFIG_TABLE = [(64, 128, 2, 4), (128, 32, 3, 8), (128, 64, 3, 8), (64, 64, 3, 4)]
CONFIGS = [_cfg(*row) for row in CONFIG_TABLE]
INTERPRET_CONFIG = _cfg(16, 32, 1, 4)  # small tiles: tests on small shapes cover several key tiles and the masked tail

_KEY = ["SQ", "SK", "H", "DK", "DV", "X_FP8", "V_T", "OUT_FP8", "SOFTMAX", "V_ONES"]
_kernel = autotuned(fp8_attention_kernel, CONFIGS, _KEY, interpret_config=INTERPRET_CONFIG)


def _check_ones_row(v: torch.Tensor, dv: int) -> None:
    """``v_ones_dim = dv``: fp8 V stored by keys whose head dim is :func:`ones_row_width` ``(dv)``: ``dv`` value columns,
    the ones row, zeros (their values are the caller's promise: :func:`quantize_heads` / :func:`keys_contiguous_codes`
    with ``ones_row``). The rows are part of V's shape, so a compiler that copies V keeps them."""
    width = ones_row_width(dv) if MIN_HEAD_DIM <= dv <= MAX_HEAD_DIM and dv % 8 == 0 else None
    if v.dtype != FP8 or not keys_contiguous(v) or width is None or v.shape[3] != width:
        raise ValueError(f"v_ones_dim={dv} needs float8_e4m3fn V stored by keys with {dv} value columns and the ones row "
                         f"({width or 'no'} columns: quantize_heads / keys_contiguous_codes with ones_row), got {v.dtype} V shape "
                         f"{tuple(v.shape)} strides {v.stride()}")


def _check(q, k, v, q_scale, k_scale, v_scale, out_dtype, out_scale=None):
    x_fp8 = q.dtype == FP8
    dtypes = (FP8,) if x_fp8 else FLOAT_DTYPES
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(t, name, dtypes, dim=4)
        if t.dtype != q.dtype:
            raise TypeError(f"q, k and v must share a dtype, got q {q.dtype} and {name} {t.dtype}")
        if t.stride(-1) != 1 and not (name == "v" and keys_contiguous(t)):
            raise ValueError(f"{name} must be contiguous in its head dim{' (v: or in its keys)' if name == 'v' else ''}, got shape "
                             f"{tuple(t.shape)} strides {t.stride()}")
    B, H, _, DK = q.shape
    if k.shape[:2] != (B, H) or v.shape[:2] != (B, H) or k.shape[3] != DK or k.shape[2] != v.shape[2]:
        raise ValueError(f"q (B, H, Sq, Dk), k (B, H, Sk, Dk) and v (B, H, Sk, Dv) disagree: q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    for name, t in (("q", q), ("v", v)):
        try:
            head_parts(t.shape[3])
        except ValueError as e:
            raise ValueError(f"{e} ({name} shape {tuple(t.shape)})") from None
    if k.shape[2] == 0:
        raise ValueError(f"attention over no keys (k shape {tuple(k.shape)})")
    for name, s in (("q_scale", q_scale), ("k_scale", k_scale), ("v_scale", v_scale)):
        check_scalar(s, name, torch.float32)
    if out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be fp16/bf16/fp32, got {out_dtype}")
    if out_scale is not None:
        check_scalar(out_scale, "out_scale", torch.float32)
    check_launchable(q, k, v, q_scale, k_scale, v_scale, *([] if out_scale is None else [out_scale]))
    return x_fp8


def new_output(q: torch.Tensor, dv: int, out_dtype: torch.dtype) -> torch.Tensor:
    """The (B, H, Sq, Dv) output, stored (B, Sq, H, Dv): rows of H * Dv elements (16-divisible strides for the kernel's
    stores), and the usual ``out.transpose(1, 2).reshape(B, Sq, H * Dv)`` after attention is a view, no copy."""
    B, H, SQ, _ = q.shape
    return torch.empty((B, SQ, H, dv), device=q.device, dtype=out_dtype).transpose(1, 2)


def keys_contiguous(v: torch.Tensor) -> bool:
    """Whether (B, H, S, D) ``v`` is stored transposed, (B, H, D, S) with unit stride along the keys (the kernel's
    ``V_T``: fp8 ``P @ V`` reads it straight into shared memory). A single key or head dim counts as row-major."""
    return v.stride(2) == 1 and v.stride(3) != 1 and v.shape[2] > 1


def tensor_strides(t: torch.Tensor, rows_dim: int) -> tuple[int, int, int, int]:
    """``(align, batch, head, row)`` of a (B, H, S, D) kernel operand: ``align`` the largest power of two (<= 16)
    dividing its batch, head and row strides (``rows_dim``: the dim whose stride separates the rows the kernel walks,
    2, or 3 for V stored by keys), and those strides in units of ``align`` (the kernel's ``ALIGN_*`` and
    ``batch_* / head_* / row_*``: its load and store alignment hint)."""
    strides = (t.stride(0), t.stride(1), t.stride(rows_dim))
    align = 16
    for s in strides:
        align = math.gcd(align, s) if s else align
    return (align, *(s // align for s in strides))


QK_PAD_MAX = 128  # qk_width pads q / k head dims up to this power of two
HEAD_ROW_BYTES = 16  # quantize_heads pads the rows of its fp8 heads to a multiple of this: 16-byte loads (cp.async)


def ones_row_width(d: int) -> int | None:
    """The head dim of V with a ones row for value head dim ``d`` (``V_ONES``: the second part's ``D0 + DV1`` columns,
    column ``d`` the e4m3 code of 1.0 and the rest zeros), or None where the second part has no padding column (64, 80,
    128, 160): the kernel's row sums (``SOFTMAX`` ex2-lv / bits / half) then read it from V instead of setting it in
    registers every key tile."""
    d0, _, dv1 = head_parts(d)
    return d0 + dv1 if d < d0 + dv1 else None


def _with_ones_row(t: torch.Tensor, one: torch.Tensor) -> torch.Tensor:
    """(B, H, D, S) ``t`` with rows appended up to :func:`ones_row_width`: one row of ``one`` (the value that stores as
    1.0), then zeros."""
    B, H, d, S = t.shape
    width = ones_row_width(d)
    if width is None:
        raise ValueError(f"head dim {d} has no padding row in V's second part for the ones row (dims like 40 and 72 have one)")
    row = one.to(t.dtype).reshape(1, 1, 1, 1).expand(B, H, 1, S)
    return torch.cat([t, row, t.new_zeros(B, H, width - d - 1, S)], -2)


def quantize_heads(x: torch.Tensor, scale: torch.Tensor, keys_contiguous: bool = False, width: int | None = None,
                   ones_row: bool = False) -> torch.Tensor:
    """(B, H, S, D) float heads -> float8_e4m3fn codes with the static per-tensor ``scale`` (the arithmetic of
    :func:`..formats.quantize_fp8`, so the codes equal :func:`..reference.qattention`'s), as plain aten ops: under
    Inductor they fuse into one pass over the producer's output. The result is a (B, H, S, D) view whose storage rows
    are padded with zeros to a multiple of 16 bytes (D = 72 / 40 heads; Sk = 77 / 120 key rows), and with
    ``keys_contiguous`` stored (B, H, D, S): V as the kernel's ``P @ V`` reads it without a transpose (:func:`keys_contiguous`).
    ``width`` (q / k only): pad the head dim with zero columns to ``width`` and return (B, H, S, width): the same
    scores (the zeros add nothing to ``q k^T``), one ``Q K^T`` dot where ``width`` is a power of two (:func:`qk_width`).
    ``ones_row`` (V with ``keys_contiguous``): the result's head dim is :func:`ones_row_width` ``(D)`` wide: D value
    columns, the ones row (the code of 1.0), zeros; pass ``v_ones_dim=D`` to :func:`fp8_attention`.
    """
    if ones_row and not keys_contiguous:
        raise ValueError("quantize_heads: ones_row is for V stored with keys_contiguous")
    t = x.transpose(-1, -2) if keys_contiguous else x
    if ones_row:  # (the ones row holds the scale: it quantizes to 1.0)
        t = _with_ones_row(t, scale)
    n = t.shape[-1]
    if width is not None and width != n:  # zero columns that stay in the result
        if keys_contiguous or width < n:
            raise ValueError(f"quantize_heads: width pads q / k (row-major) to at least their head dim, got width {width} for "
                             f"shape {tuple(x.shape)}{' with keys_contiguous' if keys_contiguous else ''}")
        stored = kept = width
    else:  # zero columns only in the storage rows
        stored, kept = n + (-n % HEAD_ROW_BYTES), n
    if stored != n:  # a new, padded storage (F.pad writes it contiguous)
        t = torch.nn.functional.pad(t, (0, stored - n))
    elif keys_contiguous:
        t = t.contiguous()
    codes = formats.quantize_fp8(t, scale.float())
    if kept != stored:
        codes = codes[..., :kept]
    return codes.transpose(-1, -2) if keys_contiguous else codes


def keys_contiguous_codes(v: torch.Tensor, ones_row: bool = False) -> torch.Tensor:
    """fp8 (B, H, S, D) V codes in the order the kernel's ``P @ V`` reads them: a (B, H, S, D) view of (B, H, D, S)
    storage, keys contiguous, rows padded with zeros to a multiple of 16 bytes (:func:`keys_contiguous`). V already
    stored that way is returned as it is (``ones_row`` is then an error: that storage has no ones row); else one copy
    (e.g. of row-major V codes written by their projection's GEMM, ``passes.attention_heads.write_fp8_projections``),
    with ``ones_row`` the ones row after the head dim, in the result's shape (:func:`ones_row_width` ``(D)`` wide;
    ``v_ones_dim=D`` for :func:`fp8_attention`)."""
    if keys_contiguous(v):
        if ones_row:
            raise ValueError(f"keys_contiguous_codes: V {tuple(v.shape)} is already stored by keys, without a ones row")
        return v
    t = v.transpose(-1, -2)
    n = t.shape[-1]
    if ones_row:
        t = _with_ones_row(t.float(), torch.ones((), device=v.device))
    if n % HEAD_ROW_BYTES or ones_row:
        t = torch.nn.functional.pad(t.float(), (0, -n % HEAD_ROW_BYTES)).to(v.dtype)[..., :n]
    else:
        t = t.contiguous()
    return t.transpose(-1, -2)


def qk_width(d: int) -> int:
    """The width of the kernel's ``Q K^T`` dot for head dim ``d`` (:func:`qk_parts`; q / k zero-padded to it in
    registers, or in memory by :func:`quantize_heads` ``width=`` and the heads layout): the next power of two up to
    ``QK_PAD_MAX`` (D = 40 -> 64, 72 / 80 -> 128: one dot instead of the split's two), else ``d``. Measured on an H200
    (2026-12-02, ``examples/attention_bench.py``, docs/kernels.md): D = 72 padded to 128 is 1.11-1.16x faster than the
    split 64 + 32 at DiT / PixArt self-attention, though the dot computes 128 columns instead of 96. D = 160 stays
    split (a 256-wide Q tile would not fit the registers)."""
    pow2 = 1 << (d - 1).bit_length()
    return pow2 if pow2 <= QK_PAD_MAX else d


SOFTMAX_ENV = "QDIFF_ATTN_SOFTMAX"


def softmax_mode(dv: int) -> int:
    """The kernel's ``SOFTMAX`` for value head dim ``dv``: ``$QDIFF_ATTN_SOFTMAX`` (one of :data:`SOFTMAX_MODES`; default
    :func:`..reference.default_attention_softmax`, ex2-lv where it applies). ex2: ``P = exp2(...)`` by the MUFU unit,
    quantized by ``cvt``, ``l`` the sum of the fp32 P. ex2-lv: the same P, ``l`` the sum of the quantized P from
    ``P @ V`` (a column of ones in V's padding: no per-score add; 2.8-4.7 % faster at DiT / PixArt shapes). bits: P's
    codes built on the FMA pipe (:func:`_exp2_codes`), ``l`` from V; half: even key columns as ex2-lv, odd ones as bits
    (both slower: 1.3x / 1.2x, the kernel is bound by instruction issue, not by the MUFU unit; docs/kernels.md). Head
    dims without a padding column in V's second part (64, 80, 128, 160: D0 + DV1 == D) always run ex2."""
    name = os.environ.get(SOFTMAX_ENV) or reference.default_attention_softmax(dv)
    if name not in SOFTMAX_MODES:
        raise ValueError(f"{SOFTMAX_ENV}={name!r}: expected one of {', '.join(SOFTMAX_MODES)}")
    return SOFTMAX_MODES.index(name) if ones_row_width(dv) is not None else 0


def _fp8_attention(q, k, v, q_scale, k_scale, v_scale, sm_scale: float, out_dtype: torch.dtype, out_scale=None, v_ones_dim: int = 0,
                   wrap=wrap_triton) -> torch.Tensor:
    """Check, allocate the (B, H, Sq, D) output (float8_e4m3fn with ``out_scale``) and launch."""
    x_fp8 = _check(q, k, v, q_scale, k_scale, v_scale, out_dtype, out_scale)
    if v_ones_dim:
        _check_ones_row(v, v_ones_dim)
    B, H, SQ, DK = q.shape
    SK, DV = v.shape[2], v_ones_dim or v.shape[3]
    out = new_output(q, DV, FP8 if out_scale is not None else out_dtype)
    if out.numel() == 0:
        return out
    dk0, dk1 = qk_parts(DK)
    dv0, _, dv1 = head_parts(DV)
    v_t = keys_contiguous(v)
    (align_q, *qs), (align_k, *ks), (align_v, *vs), (align_o, *os_) = (
        tensor_strides(q, 2), tensor_strides(k, 2), tensor_strides(v, 3 if v_t else 2), tensor_strides(out, 2))

    def grid(meta):
        return (triton.cdiv(SQ, meta["BLOCK_M"]), B * H)

    wrap(_kernel)[grid](
        q, k, v, q_scale, k_scale, v_scale, out, out_scale if out_scale is not None else v_scale,
        sm_scale, H, SQ, SK, *qs, *ks, *vs, *os_,
        DK=DK, DK0=dk0, DK1=dk1, DV=DV, DV0=dv0, DV1=dv1, X_FP8=x_fp8, V_T=v_t, ALIGN_Q=align_q, ALIGN_K=align_k,
        ALIGN_V=align_v, ALIGN_O=align_o,
        OUT_FP8=out_scale is not None, SOFTMAX=softmax_mode(DV), V_ONES=v_ones_dim > 0, INTERPRET=INTERPRET,
    )
    return out


@triton_op("qdiff::fp8_attention", mutates_args=())
def fp8_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_scale: torch.Tensor, k_scale: torch.Tensor,
                     v_scale: torch.Tensor, sm_scale: float, out_dtype: torch.dtype, out_scale: torch.Tensor | None = None,
                     v_ones_dim: int = 0) -> torch.Tensor:
    """Non-causal attention of (B, H, S, Dk) q / k and (B, H, Sk, Dv) v (float, quantized in registers with the static
    scales, or float8_e4m3fn already quantized with them) through fp8 dots; (B, H, Sq, Dv) output of ``out_dtype``, or
    float8_e4m3fn quantized with ``out_scale`` (the next fp8 GEMM's static scale) when it is given. ``v_ones_dim``: V
    holds that many value columns and then the ones row (:func:`quantize_heads` ``ones_row``); the output has
    ``v_ones_dim`` columns."""
    return _fp8_attention(q, k, v, q_scale, k_scale, v_scale, sm_scale, out_dtype, out_scale, v_ones_dim)


@fp8_attention_op.register_fake
def _(q, k, v, q_scale, k_scale, v_scale, sm_scale, out_dtype, out_scale=None, v_ones_dim=0):
    return new_output(q, v_ones_dim or v.shape[3], FP8 if out_scale is not None else out_dtype)


def _scalar(s: torch.Tensor) -> torch.Tensor:
    return s if s.dtype == torch.float32 and s.dim() == 0 else s.float().reshape(())


def fp8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_scale: torch.Tensor, k_scale: torch.Tensor, v_scale: torch.Tensor,
                  sm_scale: float | None = None, out_dtype: torch.dtype | None = None, out_scale: torch.Tensor | None = None,
                  v_ones_dim: int = 0) -> torch.Tensor:
    """``softmax(q k^T * sm_scale) v`` (non-causal; ``sm_scale`` defaults to ``1 / sqrt(Dk)``) with q, k, v quantized to
    e4m3 with the static per-tensor scales (one-element tensors). q, k: (B, H, S, Dk), v: (B, H, Sk, Dv) (Dk != Dv: e.g.
    q / k padded with zero columns, :func:`quantize_heads`), fp16 / bf16 / fp32 (quantized in the kernel) or
    float8_e4m3fn (already quantized). Output (B, H, Sq, Dv) in ``out_dtype`` (default: q's dtype,
    bf16 for fp8 inputs); ``out_scale``: float8_e4m3fn output quantized with it (the output projection's static scale).
    ``v_ones_dim``: V (fp8, stored by keys) holds that many value columns and then the ones row (:func:`quantize_heads` /
    :func:`keys_contiguous_codes` with ``ones_row``): the kernel's row sums read it instead of setting it every key tile;
    the output has ``v_ones_dim`` columns.
    Eager calls launch directly (:func:`._common.eager_call`); traced ones call ``torch.ops.qdiff.fp8_attention``."""
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(q.shape[-1])
    if out_dtype is None:
        out_dtype = torch.bfloat16 if q.dtype == FP8 else q.dtype
    args = (q, k, v, _scalar(q_scale), _scalar(k_scale), _scalar(v_scale), float(sm_scale), out_dtype)
    if out_scale is not None or v_ones_dim:  # (without them the call keeps its exact argument list)
        args = (*args, None if out_scale is None else _scalar(out_scale))
    if v_ones_dim:
        args = (*args, v_ones_dim)
    if eager_call(q):
        return _fp8_attention(*args, wrap=direct)
    return torch.ops.qdiff.fp8_attention(*args)

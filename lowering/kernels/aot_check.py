"""Compile every kernel's autotune configs for sm_90 without a GPU and report smem, registers, spills, byte stores, MMA waits
and the main loop's SASS instruction count.

``python -m qcompile.lowering.kernels.aot_check [fp8|tma|int8|w4|conv|attention ...]`` (in a process without
``TRITON_INTERPRET``). The interpreter tests check the kernels' logic; this catches what only the
GPU compiler sees: unsupported conversions, shared memory over the 227 KB limit, register spills
(``STACK`` > 0) and loops that did not get software-pipelined (small ``smem``). Pointers and the
listed integer arguments are declared 16-divisible, as they are for real launches of aligned tensors.
Uses Triton's compiler API (``ASTSource``, ``GPUTarget``) and the bundled ``cuobjdump``.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ._common import INTERPRET

# the package re-exports functions named like their modules, so fetch the modules themselves
conv, fp8_attention, fp8_linear, fp8_tma, int8_linear, norm_quant, w4_linear = (
    importlib.import_module(f"{__package__}.{m}")
    for m in ("conv", "fp8_attention", "fp8_linear", "fp8_tma", "int8_linear", "norm_quant", "w4_linear"))

TARGET = GPUTarget("cuda", 90, 32)
GROUPS = ("fp8", "tma", "int8", "w4", "conv", "attention", "norm")  # the kernel families cases() knows
I32 = "i32"


class CompileReport(NamedTuple):
    """What one kernel / config compiles to for sm_90. ``byte_stores``: byte-wise shared-memory stores in the PTX
    (``st.shared.b8``: how Triton transposes an 8-bit tile in shared memory, e.g. fp8 V for ``P @ V`` when V's head dim
    is contiguous), ``mma_waits``: ``wgmma.wait_group`` instructions in the whole kernel (each waits for the tensor
    cores): costs a register count does not show."""

    smem: int  # bytes
    usage: str  # cuobjdump's "REG:n STACK:n"
    byte_stores: int
    mma_waits: int
    ptx: str
    loop_instructions: int  # SASS instructions in the main loop (loop_instructions): a thread's issue slots per iteration


def loop_instructions(sass: str) -> int:
    """SASS instructions of the kernel's main loop: the longest span closed by a backward branch (a thread's issue
    slots per loop iteration; attention: per key tile). 0 without a loop. Where a kernel is bound by instruction
    issue, its time follows this count (fp8 attention, docs/kernels.md "softmax modes")."""
    addrs, span = [], (0, 0)
    for line in sass.splitlines():
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?(\S+)(?:\s+0x([0-9a-f]+))?", line)
        if not m:
            continue
        addr = int(m.group(1), 16)
        addrs.append(addr)
        if m.group(2) == "BRA" and m.group(3) and int(m.group(3), 16) < addr and addr - int(m.group(3), 16) > span[1] - span[0]:
            span = (int(m.group(3), 16), addr)
    return sum(span[0] <= a <= span[1] for a in addrs) if span != (0, 0) else 0


def compile_one(kernel, signature: dict, constexprs: dict, cfg: triton.Config, aligned: list[str]) -> CompileReport:
    """Compile one kernel / config for sm_90 (:class:`CompileReport`)."""
    consts = {**constexprs, **cfg.kwargs}
    full = {n: "constexpr" if n in consts else signature[n] for n in kernel.arg_names}
    div16 = set(aligned) | {n for n, t in full.items() if t.startswith("*")}
    attrs = {(kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in div16 if full[n] != "constexpr"}
    compiled = triton.compile(ASTSource(kernel, full, consts, attrs), target=TARGET,
                              options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([cuobjdump, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    usage = next((line.strip() for line in out.splitlines() if "REG:" in line), "")
    ptx = compiled.asm["ptx"]
    lines = [line.lstrip() for line in ptx.splitlines()]
    return CompileReport(compiled.metadata.shared, " ".join(usage.split()[:2]),
                         sum(line.startswith(("st.shared.b8", "st.shared.u8", "st.shared.s8")) for line in lines),
                         sum(line.startswith("wgmma.wait_group") for line in lines), ptx, loop_instructions(sass))


def _linear_sig(**ptrs) -> dict:
    sig = {"M": I32, "N": I32, "K": I32, "stride_xm": I32, "stride_xk": I32, "stride_wn": I32, "stride_om": I32, "stride_on": I32,
           "B1": I32, "B2": I32, "B3": I32}
    return {**ptrs, **sig}


def inductor_variants(kernel, signature: dict, constexprs: dict) -> list[tuple[str, dict, dict]]:
    """``(label, signature, constexprs)`` of a case as Inductor compiles a user-defined kernel: Python floats as fp64
    (its type for a float scalar; integers equal to 1 as constexprs, which the cases already specialize where a real
    launch does), and as torch 2.11's mutation analysis traces it: every scalar a constexpr. A kernel that fails these
    fails under Inductor only (2026-12-02: ``tl.multiple_of`` on a scalar, and an fp64 ``sm_scale`` that changed a
    loop-carried type); the analysis failing also makes Inductor treat every tensor argument as mutated."""
    scalars = {n: t for n, t in signature.items() if n in kernel.arg_names and n not in constexprs and not t.startswith("*")}
    return [("float scalars fp64", {n: "fp64" if t == "fp32" and n in scalars else t for n, t in signature.items()}, constexprs),
            ("every scalar a constexpr", signature, {**constexprs, **{n: 0.5 if t.startswith("fp") else 3 for n, t in scalars.items()}})]


# DiT-XL/2's q / k / v projection written as fp8 heads (lowering/heads.py): 1024 tokens, q / k 2 x 16 heads of 72 padded to 128
DIT_HEADS = {"HEADS": True, "N_RM": 2304, "SEQ": 1024, "SEQ_PAD": 1024, "HEAD_D": 72, "HEAD_W": 128}


def cases(which: set[str]):
    """(name, kernel, signature, constexprs, configs, aligned int args) to compile."""
    unit = {"stride_xk": 1, "stride_on": 1, "INTERPRET": False}
    lin_aligned = ["M", "N", "K", "stride_xm", "stride_wn", "stride_om"]
    if "fp8" in which:
        sig = _linear_sig(x_ptr="*bf16", w_ptr="*fp8e4nv", ws_ptr="*fp32", bias_ptr="*fp32", as_ptr="*fp32", smooth_ptr="*fp32", out_ptr="*bf16",
                          os_ptr="*fp32")
        flags = dict(unit, X_FP8=False, HAS_BIAS=True, HAS_SMOOTH=False, ACT=0, OUT_FP8=False, OUT_COLS=False, EVEN_K=True, NS=1, **fp8_linear.NO_HEADS)
        yield "fp8", fp8_linear.fp8_linear_kernel, sig, flags, fp8_linear.LARGE_M_CONFIGS + fp8_linear.SMALL_M_CONFIGS, lin_aligned
        yield "fp8 split (2 slices)", fp8_linear.fp8_linear_kernel, sig, dict(flags, NS=2), fp8_linear.SPLIT_CONFIGS, lin_aligned + ["B1"]
        yield "fp8 prequant", fp8_linear.fp8_linear_kernel, dict(sig, x_ptr="*fp8e4nv"), dict(flags, X_FP8=True), fp8_linear.PREQUANT_CONFIGS, lin_aligned
        yield "fp8 prequant split (2 slices)", fp8_linear.fp8_linear_kernel, dict(sig, x_ptr="*fp8e4nv"), dict(flags, X_FP8=True, NS=2), \
            fp8_linear.SPLIT_CONFIGS, lin_aligned + ["B1"]
        for x_fp8 in (True, False):  # bounds on 64 but not 128 (the unmasked BLOCK_K = 64 table)
            yield f"fp8 split k64 (3 slices{', prequant' if x_fp8 else ''})", fp8_linear.fp8_linear_kernel, \
                dict(sig, x_ptr="*fp8e4nv" if x_fp8 else "*bf16"), dict(flags, X_FP8=x_fp8, NS=3), fp8_linear.SPLIT_K64_CONFIGS, lin_aligned + ["B1", "B2"]
        yield "fp8 prequant, fp8 out", fp8_linear.fp8_linear_kernel, dict(sig, x_ptr="*fp8e4nv", out_ptr="*fp8e4nv"), dict(flags, X_FP8=True, OUT_FP8=True, ACT=2), \
            fp8_linear.PREQUANT_CONFIGS[:1], lin_aligned
        yield "fp8 prequant, heads out (DiT q / k / v)", fp8_linear.fp8_linear_kernel, dict(sig, x_ptr="*fp8e4nv", out_ptr="*fp8e4nv"), \
            dict(flags, X_FP8=True, OUT_FP8=True, **DIT_HEADS), fp8_linear.PREQUANT_CONFIGS[:2], lin_aligned
        yield "fp8 prequant, fp8 out per column (DiT q / k / v)", fp8_linear.fp8_linear_kernel, dict(sig, x_ptr="*fp8e4nv", out_ptr="*fp8e4nv"), \
            dict(flags, X_FP8=True, OUT_FP8=True, OUT_COLS=True), fp8_linear.PREQUANT_CONFIGS[:2], lin_aligned
    if "tma" in which and fp8_tma.HAS_TMA:  # the production (fp8-input) table, with and without the fp8-output epilogue
        sig = {"x_ptr": "*fp8e4nv", "w_ptr": "*fp8e4nv", "ws_ptr": "*fp32", "bias_ptr": "*fp32", "as_ptr": "*fp32", "out_ptr": "*bf16",
               "os_ptr": "*fp32", "M": I32, "N": I32, "K": I32, "stride_xm": I32, "stride_om": I32}
        flags = dict(X_FP8=True, HAS_BIAS=True, ACT=0, OUT_FP8=False, OUT_COLS=False, INTERPRET=False, NUM_SMS=132, WARP_SPEC=False, **fp8_tma.NO_HEADS)
        aligned = ["M", "N", "K", "stride_xm", "stride_om"]
        yield "fp8 tma", fp8_tma.fp8_linear_tma_kernel, sig, flags, fp8_tma.PROD_CONFIGS, aligned
        yield "fp8 tma, fp8 out", fp8_tma.fp8_linear_tma_kernel, dict(sig, out_ptr="*fp8e4nv"), dict(flags, OUT_FP8=True, ACT=2), \
            fp8_tma.PROD_CONFIGS, aligned
        yield "fp8 tma, heads out (DiT q / k / v)", fp8_tma.fp8_linear_tma_kernel, dict(sig, out_ptr="*fp8e4nv"), \
            dict(flags, OUT_FP8=True, **DIT_HEADS), fp8_tma.HEADS_CONFIGS, aligned
        yield "fp8 tma, fp8 out per column (DiT q / k / v)", fp8_tma.fp8_linear_tma_kernel, dict(sig, out_ptr="*fp8e4nv"), \
            dict(flags, OUT_FP8=True, OUT_COLS=True), fp8_tma.PROD_CONFIGS, aligned
    if "int8" in which:
        sig = _linear_sig(x_ptr="*bf16", w_ptr="*i8", ws_ptr="*fp32", colsum_ptr="*i32", bias_ptr="*fp32", as_ptr="*fp32", zp_ptr="*i32",
                          smooth_ptr="*fp32", out_ptr="*bf16")
        flags = dict(unit, QMIN=-128, QMAX=127, ASYM=True, HAS_BIAS=True, HAS_SMOOTH=False, ACT=0, EVEN_K=True, NS=1)
        yield "int8", int8_linear.int8_linear_kernel, sig, flags, int8_linear.LARGE_M_CONFIGS + int8_linear.SMALL_M_CONFIGS, lin_aligned
        yield "int8 split (2 slices)", int8_linear.int8_linear_kernel, sig, dict(flags, NS=2), int8_linear.SPLIT_CONFIGS, lin_aligned + ["B1"]
    if "w4" in which:
        sig = dict(_linear_sig(x_ptr="*bf16", w_ptr="*u8", ws_ptr="*fp32", bias_ptr="*fp32", out_ptr="*bf16"), K_STORED=I32, stride_sn=I32)
        flags = dict(unit, W_INT4=True, GROUP=64, HAS_BIAS=False, ACT=0, EVEN_K=True, FP32_DOT=False)
        configs = [c for c in w4_linear.WEIGHT_ONLY_LARGE + w4_linear.WEIGHT_ONLY_MEDIUM + w4_linear.WEIGHT_ONLY_SMALL if w4_linear._fits(c, 64)]
        yield "w4a16", w4_linear.weight_only_kernel, sig, flags, configs, lin_aligned + ["K_STORED"]
        sig = {"x_ptr": "*bf16", "w_ptr": "*u8", "ws_ptr": "*fp32", "part_ptr": "*fp32",
               **{n: I32 for n in ("M", "N", "K", "K_STORED", "stride_xm", "stride_wn", "stride_sn")}}
        flags = dict(W_INT4=True, GROUP=64, EVEN_K=True, FP32_DOT=False, INTERPRET=False, BLOCK_K=64)
        split = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_stages=3, num_warps=w)
                 for bm, bn, w in ((w4_linear.SPLITK_GEMV_BLOCK_M, 64, 4), (w4_linear.SPLITK_MEDIUM_BLOCK_M, 64, 4), (64, 128, 4))]
        yield "w4a16 split-K", w4_linear.weight_only_splitk_kernel, sig, flags, split, ["M", "N", "K", "K_STORED", "stride_xm", "stride_wn"]
        sig = {"w_ptr": "*u8", "ws_ptr": "*fp32", "bias_ptr": "*fp32", "out_ptr": "*bf16", "bias_out_ptr": "*bf16",
               **{n: I32 for n in ("N", "K", "K_STORED", "stride_wn", "stride_sn", "stride_on")}}
        deq = [triton.Config({"BLOCK_N": w4_linear.DEQUANT_CONFIG["block_n"], "BLOCK_K": 64}, num_stages=1,
                             num_warps=w4_linear.DEQUANT_CONFIG["num_warps"])]
        for group in (64, 0):
            yield f"w4 dequantize (group {group})", w4_linear.dequantize_kernel, sig, \
                dict(W_INT4=True, GROUP=group, HAS_BIAS=group == 64, EVEN_K=True), deq, \
                ["K", "K_STORED", "stride_wn", "stride_on"]
        sig = {"x_ptr": "*bf16", "w_ptr": "*u8", "ws_ptr": "*fp32", "bias_ptr": "*fp32", "out_ptr": "*bf16",
               **{n: I32 for n in ("N", "K", "K_STORED", "W_ROW", "stride_xm", "stride_wn", "stride_sn", "stride_om")}}
        for group in (64, 0):
            yield f"w4a16 GEMV (group {group})", w4_linear.weight_only_gemv_kernel, sig, \
                dict(W_INT4=True, GROUP=group, HAS_BIAS=True, ACT=1), \
                [c for c in w4_linear.WEIGHT_ONLY_GEMV if w4_linear._fits(c, group)], ["N", "K", "K_STORED", "W_ROW", "stride_xm",
                                                                                      "stride_wn"]
        sig = dict(_linear_sig(x_ptr="*bf16", w_ptr="*u8", ws_ptr="*fp32", bias_ptr="*fp32", as_ptr="*fp32", zp_ptr="*i32", smooth_ptr="*fp32",
                               out_ptr="*bf16"), K_STORED=I32, stride_sn=I32)
        flags = dict(unit, A_FP8=False, QMIN=-128, QMAX=127, ASYM=True, GROUP=64, HAS_BIAS=False, HAS_SMOOTH=False, ACT=0, EVEN_K=True)
        configs = [c for c in w4_linear.W4A8_LARGE + w4_linear.W4A8_SMALL if w4_linear._fits(c, 64)]
        yield "w4a8 int8", w4_linear.w4a8_kernel, sig, flags, configs, lin_aligned + ["K_STORED"]
    if "conv" in which:
        sig = {"x_ptr": "*bf16", "w_ptr": "*fp8e4nv", "ws_ptr": "*fp32", "colsum_ptr": "*i32", "bias_ptr": "*fp32", "as_ptr": "*fp32",
               "zp_ptr": "*i32", "smooth_ptr": "*fp32", "out_ptr": "*bf16"}
        sig.update({n: I32 for n in ("B", "H", "W", "C", "OH", "OW", "N", "KW", "TAPS", "sxb", "sxc", "sxh", "sxw", "stride_wn", "stride_om",
                                     "stride_on", "SH", "SW", "PH", "PW", "DH", "DW", "B1", "B2", "B3")})
        flags = {"sxc": 1, "stride_on": 1, "INTERPRET": False, "A_FP8": True, "X_FP8": False, "W_COLUMNS": False, "QMIN": -127,
                 "QMAX": 127, "ASYM": False, "HAS_BIAS": True, "HAS_SMOOTH": False, "ACT": 0, "EVEN_C": True, "NS": 1, "SPLIT_K": 1}
        direct = dict(X_FP8=True, W_COLUMNS=True)  # qdiff::conv2d_fp8_prequant: fp8 NHWC input, column-order weight
        aligned = ["C", "N", "sxb", "sxh", "sxw", "stride_wn", "stride_om"]
        int8 = dict(A_FP8=False, ASYM=True, QMIN=-128)
        # split-K partitions (SPLIT_K > 1) write fp32 partials: no bias / activation there (the reduce kernel's)
        for sk in (1, 3):
            tag = "" if sk == 1 else f", split-K {sk}"
            out = {} if sk == 1 else {"out_ptr": "*fp32"}
            f = dict(flags, SPLIT_K=sk) if sk == 1 else dict(flags, SPLIT_K=sk, HAS_BIAS=False)
            yield f"conv fp8{tag}", conv.conv2d_kernel, dict(sig, **out), f, conv.LARGE_M_CONFIGS + conv.SMALL_M_CONFIGS, aligned
            yield f"conv int8{tag}", conv.conv2d_kernel, dict(sig, w_ptr="*i8", **out), dict(f, **int8), \
                conv.LARGE_M_CONFIGS + (conv.SMALL_M_CONFIGS if sk > 1 else []), aligned
            yield f"conv fp8 split (2 slices){tag}", conv.conv2d_kernel, dict(sig, **out), dict(f, NS=2), conv.SPLIT_FP8_CONFIGS, aligned + ["B1"]
            yield f"conv int8 split (2 slices){tag}", conv.conv2d_kernel, dict(sig, w_ptr="*i8", **out), dict(f, NS=2, **int8), \
                conv.SPLIT_INT8_CONFIGS, aligned + ["B1"]
            yield f"conv fp8 direct{tag}", conv.conv2d_kernel, dict(sig, x_ptr="*fp8e4nv", **out), dict(f, **direct), \
                conv.LARGE_M_CONFIGS + conv.SMALL_M_CONFIGS, aligned
            yield f"conv fp8 direct split (2 slices){tag}", conv.conv2d_kernel, dict(sig, x_ptr="*fp8e4nv", **out), \
                dict(f, NS=2, **direct), conv.SPLIT_FP8_CONFIGS, aligned + ["B1"]
        bm, bn = conv.REDUCE_BLOCK
        yield "conv split-K reduce (3)", conv.conv_splitk_reduce_kernel, \
            {"part_ptr": "*fp32", "bias_ptr": "*fp32", "out_ptr": "*bf16", "M": I32, "N": I32, "stride_om": I32, "stride_on": I32}, \
            {"stride_on": 1, "SPLIT_K": 3, "HAS_BIAS": True, "ACT": 1}, [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=4)], \
            ["N", "stride_om"]
    if "attention" in which:  # DiT / PixArt (72), power-of-two heads (64, 128), SD 1.5's (40, 80, 160); fp8 inputs at 72
        sig = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "qs_ptr": "*fp32", "ks_ptr": "*fp32", "vs_ptr": "*fp32", "out_ptr": "*bf16", "os_ptr": "*fp32",
               "sm_scale": "fp32"}
        sig.update({n: I32 for n in ("H", "SQ", "SK", "batch_q", "head_q", "row_q", "batch_k", "head_k", "row_k",
                                     "batch_v", "head_v", "row_v", "batch_o", "head_o", "row_o")})
        # (strides count in units of each tensor's ALIGN_* elements, fp8_attention.tensor_strides: no divisibility of their own)
        # (head dim of q / k, of v, fp8 inputs, V stored by keys, q / k alignment): heads as models lay them out, views of
        # a projection's output (q = to_q(x).view(B, S, H, D).transpose(1, 2): head offsets of D elements, so D = 72 / 40
        # is 8-aligned; q / k zero-padded to qk_width in registers), V^T as the lowering copies it (rows padded to 16
        # bytes), q / k padded to 128 in memory (the heads layout); the output (B, S, H, Dv) is gcd(Dv, 16)-aligned
        for dk, dv, x_fp8, v_t, align in ((72, 72, False, False, 8), (72, 72, True, False, 8), (72, 72, True, True, 8),
                                          (128, 72, True, True, 16), (64, 64, False, False, 16), (128, 128, False, False, 16),
                                          (40, 40, False, False, 8), (40, 40, True, True, 8), (80, 80, False, False, 16),
                                          (160, 160, False, False, 16)):
            dk0, dk1 = fp8_attention.qk_parts(dk)
            dv0, _, dv1 = fp8_attention.head_parts(dv)
            flags = dict(DK=dk, DK0=dk0, DK1=dk1, DV=dv, DV0=dv0, DV1=dv1, X_FP8=x_fp8, V_T=v_t, ALIGN_Q=align, ALIGN_K=align,
                         ALIGN_V=16 if v_t else align, ALIGN_O=math.gcd(dv, 16), OUT_FP8=False, SOFTMAX=0, V_ONES=False, INTERPRET=False)
            s = dict(sig, q_ptr="*fp8e4nv", k_ptr="*fp8e4nv", v_ptr="*fp8e4nv") if x_fp8 else sig
            dims = f"D={dv}" if dk == dv else f"D={dv} (q / k padded to {dk} in memory)"
            dims += f", Q K^T {dk0} wide" if dk0 > dk else ""
            yield f"attention {dims}{' fp8 in' if x_fp8 else ''}{', V^T' if v_t else ''}", fp8_attention.fp8_attention_kernel, s, flags, \
                fp8_attention.CONFIGS, []
            if (dk, dv, x_fp8, v_t) == (72, 72, True, True):  # DiT / PixArt as the lowering calls it: fp8 output for the
                # out-projection, V's storage with the ones row (read by the row sums of every mode but ex2)
                for mode in fp8_attention.SOFTMAX_MODES:
                    yield f"attention {dims} fp8 in, V^T with ones row, fp8 out, softmax {mode}", fp8_attention.fp8_attention_kernel, \
                        dict(s, out_ptr="*fp8e4nv"), dict(flags, OUT_FP8=True, V_ONES=True, SOFTMAX=fp8_attention.SOFTMAX_MODES.index(mode)), \
                        fp8_attention.CONFIGS, []
                yield f"attention {dims} fp8 in, V^T, fp8 out, softmax ex2-lv, ones column in registers", fp8_attention.fp8_attention_kernel, \
                    dict(s, out_ptr="*fp8e4nv"), dict(flags, OUT_FP8=True, SOFTMAX=fp8_attention.SOFTMAX_MODES.index("ex2-lv")), \
                    fp8_attention.CONFIGS, []
    if "norm" in which:  # DiT / PixArt block boundaries: rows of 1152 (BLOCK_C 2048), adaLN vectors as chunk views
        sig = {"h_ptr": "*bf16", "y_ptr": "*bf16", "g_ptr": "*bf16", "sc_ptr": "*bf16", "sh_ptr": "*bf16", "as_ptr": "*fp32",
               "hout_ptr": "*bf16", "q_ptr": "*fp8e4nv", "M": I32, "C": I32, "SEQ": I32, "stride_g": I32, "stride_sc": I32, "stride_sh": I32}
        flags = dict(HAS_Y=True, HAS_GATE=True, EPS=1e-6, INTERPRET=False, BLOCK_C=2048)
        aligned = ["M", "C", "SEQ", "stride_g", "stride_sc", "stride_sh"]
        yield "add + LayerNorm + modulate + fp8 (C = 1152)", norm_quant.add_norm_modulate_fp8_kernel, sig, flags, norm_quant.CONFIGS, aligned
        yield "LayerNorm + modulate + fp8, no residual add", norm_quant.add_norm_modulate_fp8_kernel, sig, \
            dict(flags, HAS_Y=False, HAS_GATE=False), norm_quant.CONFIGS, aligned


def main(argv: list[str] | None = None) -> int:
    """Compile the chosen kernel families' configs and print one table row each; 1 if any config failed to compile."""
    p = argparse.ArgumentParser(prog="python -m qcompile.lowering.kernels.aot_check",
                                description="Compile the kernels' autotune configs for sm_90 (no GPU needed); print smem and registers.")
    p.add_argument("groups", nargs="*", metavar="GROUP", help=f"kernel families to compile (default: all of {', '.join(GROUPS)})")
    p.add_argument("--ptx-dir", type=Path, help="also write each config's PTX there (to read a kernel's main loop)")
    p.add_argument("--inductor-args", action="store_true", help="instead: compile each case's first config with the argument "
                   "types Inductor gives a user-defined kernel (inductor_variants)")
    a = p.parse_args(argv)
    which = set(a.groups or GROUPS)
    if which - set(GROUPS):  # (argparse's choices reject the empty default of nargs="*" on Python < 3.12)
        p.error(f"unknown kernel group(s) {', '.join(sorted(which - set(GROUPS)))}: choose from {', '.join(GROUPS)}")
    if INTERPRET:
        print("aot_check compiles for the GPU: run it without TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    if a.inductor_args:
        return _check_inductor_args(which)
    failed = 0
    if a.ptx_dir:
        a.ptx_dir.mkdir(parents=True, exist_ok=True)
    print("| kernel | BLOCK_M x N x K | stages | warps | smem KB | registers / spill stack | smem byte stores (PTX) | wgmma waits (PTX) | "
          "main loop (SASS instructions) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, kernel, sig, flags, configs, aligned in cases(which):
        for cfg in configs:
            tile = "x".join(str(cfg.kwargs.get(k, "-")) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))  # (attention: M x N x -)
            try:
                r = compile_one(kernel, sig, flags, cfg, aligned)
                print(f"| {name} | {tile} | {cfg.num_stages} | {cfg.num_warps} | {r.smem / 1024:.0f} | {r.usage} | {r.byte_stores} | "
                      f"{r.mma_waits} | {r.loop_instructions} |", flush=True)
                if a.ptx_dir:
                    stem = "".join(c if c.isalnum() else "_" for c in f"{name} {tile} s{cfg.num_stages} w{cfg.num_warps}")
                    (a.ptx_dir / f"{stem}.ptx").write_text(r.ptx)
            except Exception as e:  # report every failing config, then exit non-zero
                failed += 1
                print(f"| {name} | {tile} | {cfg.num_stages} | {cfg.num_warps} | FAILED | {type(e).__name__}: {str(e)[:200]} | | | |", flush=True)
    return 1 if failed else 0


def _check_inductor_args(which: set[str]) -> int:
    failed = 0
    print("| kernel | argument types | compiles |")
    print("| --- | --- | --- |")
    for name, kernel, sig, flags, configs, aligned in cases(which):
        for label, s, c in inductor_variants(kernel, sig, flags):
            try:
                compile_one(kernel, s, c, configs[0], [n for n in aligned if n not in c])
                print(f"| {name} | {label} | ok |", flush=True)
            except Exception as e:  # report every failing case, then exit non-zero
                failed += 1
                print(f"| {name} | {label} | FAILED: {type(e).__name__}: {str(e).strip().splitlines()[-1][:200]} |", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""GEMM microbenchmark of the qdiff Triton kernels against cuBLAS (CUDA only).

``python -m qcompile.gemm_bench --out gemm.json`` measures, per shape (M, K, N), with
``triton.testing.do_bench`` (median ms): bf16 ``F.linear``; ``torch._scaled_mm`` fp8 with tensorwise
scales on pre-quantized inputs (default and fast accumulation); an eager static quantize + ``_scaled_mm``; our fp8 kernel from a
bf16 input (prologue quantization included) and from an fp8 input; ``torch._int_mm``; our int8
kernel (asymmetric, from bf16); and our W4A16 kernel at M in {1, 16, 8192} against bf16 at the same M.
Each kernel's output is checked against the reference lowering (SQNR, dB). Prints markdown tables
and writes all numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch
import torch.nn.functional as F

SHAPES = [(8192, 1152, 4608), (8192, 4608, 1152), (8192, 1152, 1152), (2048, 640, 5120), (8192, 1152, 3456), (8, 1152, 6912)]
W4_MS = (1, 16, 8192)


def _sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.double(), out.double()
    noise = (ref - out).pow(2).sum().item()
    return math.inf if noise == 0 else 10 * math.log10(ref.pow(2).sum().item() / noise)


def _bench(fn, warmup: int, rep: int) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def _try_bench(fn, warmup: int, rep: int, errors: dict, name: str) -> float | None:
    """``_bench`` of a cuBLAS baseline that may reject a shape; the reason is kept in ``errors``."""
    try:
        return _bench(fn, warmup, rep)
    except RuntimeError as e:  # e.g. cuBLASLt shape constraints of _scaled_mm / _int_mm
        errors[name] = str(e).splitlines()[0]
        return None


def _tflops(m: int, k: int, n: int, ms: float | None) -> float | None:
    return None if ms is None else 2 * m * k * n / (ms * 1e-3) / 1e12


def _quant(w: torch.Tensor, fmt: str, group: int | None):
    from .lowering.weights import quantize_weight

    qw = quantize_weight(w.float().cpu(), fmt, "linear", group, clip_search=False)
    qw.data, qw.scale = qw.data.to(w.device), qw.scale.to(w.device)
    return qw


def bench_shape(m: int, k: int, n: int, warmup: int, rep: int, device: str = "cuda") -> dict:
    """All W8A8 measurements for one shape."""
    from .lowering import reference
    from .lowering.kernels import fp8_linear, fp8_linear_prequant, int8_linear, weight_colsum

    g = torch.Generator(device=device).manual_seed(m * 31 + k * 7 + n)
    x = torch.randn(m, k, device=device, generator=g).to(torch.bfloat16)
    w = (torch.randn(n, k, device=device, generator=g) * k**-0.5).to(torch.bfloat16)
    row: dict = {"M": m, "K": k, "N": n, "errors": {}}
    row["bf16_ms"] = _bench(lambda: F.linear(x, w), warmup, rep)

    # fp8
    qw = _quant(w, "fp8_e4m3", None)
    s = (x.float().abs().amax() / 448).reshape(())
    one = torch.ones((), device=device)
    zero = torch.zeros((), dtype=torch.int32, device=device)
    xq = (x.float() / s).clamp(-448, 448).to(torch.float8_e4m3fn)
    ws_t = qw.scale.reshape(-1)
    wt = qw.data.t()  # (K, N) column-major, as cuBLAS wants
    row["scaled_mm_ms"] = _try_bench(lambda: torch._scaled_mm(xq, wt, s, one, out_dtype=torch.bfloat16), warmup, rep, row["errors"], "scaled_mm")
    row["scaled_mm_fast_ms"] = _try_bench(  # fast accumulation, as Triton's fp8 dot does by default
        lambda: torch._scaled_mm(xq, wt, s, one, out_dtype=torch.bfloat16, use_fast_accum=True), warmup, rep, row["errors"], "scaled_mm_fast"
    )
    row["quant_scaled_mm_ms"] = _try_bench(
        lambda: torch._scaled_mm((x.float() / s).clamp(-448, 448).to(torch.float8_e4m3fn), wt, s, one, out_dtype=torch.bfloat16),
        warmup, rep, row["errors"], "quant_scaled_mm",
    )
    row["fp8_ms"] = _bench(lambda: fp8_linear(x, qw.data, ws_t, None, s), warmup, rep)
    row["fp8_prequant_ms"] = _bench(lambda: fp8_linear_prequant(xq, qw.data, ws_t, None, s, torch.bfloat16), warmup, rep)
    kw = dict(wfmt="fp8_e4m3", group_size=None, weight_shape=qw.shape, afmt="fp8_e4m3")
    ref = reference.qlinear(x.float(), qw.data, qw.scale, None, s, zero, **kw)
    row["fp8_sqnr_db"] = _sqnr(ref, fp8_linear(x, qw.data, ws_t, None, s))

    # int8
    qi = _quant(w, "int8", None)
    lo, hi = x.float().min().item(), x.float().max().item()
    si = torch.tensor((hi - lo) / 255, device=device)
    zi = torch.tensor(round(-128 - lo / si.item()), dtype=torch.int32, device=device)
    colsum = weight_colsum(qi.data)
    wsi = qi.scale.reshape(-1)
    xi = torch.randint(-128, 127, (m, k), dtype=torch.int8, device=device)
    row["int_mm_ms"] = _try_bench(lambda: torch._int_mm(xi, qi.data.t()), warmup, rep, row["errors"], "int_mm")  # needs M > 16
    row["int8_ms"] = _bench(lambda: int8_linear(x, qi.data, wsi, None, si, zi, colsum=colsum), warmup, rep)
    kw = dict(wfmt="int8", group_size=None, weight_shape=qi.shape, afmt="int8", asym=True)
    ref = reference.qlinear(x.float(), qi.data, qi.scale, None, si, zi, **kw)
    row["int8_sqnr_db"] = _sqnr(ref, int8_linear(x, qi.data, wsi, None, si, zi, colsum=colsum))
    for key in [k_ for k_ in row if k_.endswith("_ms")]:
        row[key.replace("_ms", "_tflops")] = _tflops(m, k, n, row[key])
    return row


def bench_w4(k: int, n: int, warmup: int, rep: int, device: str = "cuda", ms: tuple[int, ...] = W4_MS) -> list[dict]:
    """W4A16 (groups of 64) against bf16 at the M values of :data:`W4_MS`."""
    from .lowering import reference
    from .lowering.kernels import weight_only_linear

    g = torch.Generator(device=device).manual_seed(k * 13 + n)
    w = (torch.randn(n, k, device=device, generator=g) * k**-0.5).to(torch.bfloat16)
    qw = _quant(w, "int4", 64)
    rows = []
    for m in ms:
        x = torch.randn(m, k, device=device, generator=g).to(torch.bfloat16)
        bf16 = _bench(lambda: F.linear(x, w), warmup, rep)
        w4 = _bench(lambda: weight_only_linear(x, qw.data, qw.scale, None, wfmt="int4", group_size=64), warmup, rep)
        ref = reference.qlinear(x.float(), qw.data, qw.scale, None, None, None, wfmt="int4", group_size=64, weight_shape=qw.shape)
        out = weight_only_linear(x, qw.data, qw.scale, None, wfmt="int4", group_size=64)
        rows.append({
            "M": m, "K": k, "N": n, "bf16_ms": bf16, "w4a16_ms": w4, "speedup_vs_bf16": bf16 / w4,
            "weight_bytes_ratio": (qw.data.numel() + qw.scale.numel() * 4) / (w.numel() * 2), "w4a16_sqnr_db": _sqnr(ref, out),
        })
    return rows


def _fmt(v, digits=0):
    return "n/a" if v is None else f"{v:.{digits}f}"


def _ratio(a: float | None, b: float) -> str:
    return "n/a" if a is None else f"{a / b:.2f}"


def markdown(rows: list[dict], w4_rows: list[dict], device: str) -> str:
    lines = [
        f"W8A8 GEMMs on {device} (TFLOP/s, median of do_bench; ours include quantizing the bf16 input in the prologue)",
        "",
        "| M x K x N | bf16 | _scaled_mm fp8 | _scaled_mm fast-accum | eager quant + _scaled_mm | ours fp8 | ours / _scaled_mm | ours / bf16 | ours fp8 from fp8 | fp8 SQNR dB "
        "| _int_mm | ours int8 | ours int8 / bf16 | int8 SQNR dB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['M']} x {r['K']} x {r['N']} | {_fmt(r['bf16_tflops'])} | {_fmt(r['scaled_mm_tflops'])} | {_fmt(r['scaled_mm_fast_tflops'])} "
            f"| {_fmt(r['quant_scaled_mm_tflops'])} "
            f"| {_fmt(r['fp8_tflops'])} | {_ratio(r['scaled_mm_ms'], r['fp8_ms'])} | {r['bf16_ms'] / r['fp8_ms']:.2f} "
            f"| {_fmt(r['fp8_prequant_tflops'])} | {_fmt(r['fp8_sqnr_db'], 1)} | {_fmt(r['int_mm_tflops'])} | {_fmt(r['int8_tflops'])} "
            f"| {r['bf16_ms'] / r['int8_ms']:.2f} | {_fmt(r['int8_sqnr_db'], 1)} |"
        )
    lines += [
        "",
        "W4A16 (int4, groups of 64) against bf16 at the same M (microseconds)",
        "",
        "| M x K x N | bf16 us | w4a16 us | speedup | weight bytes / bf16 | SQNR dB |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in w4_rows:
        lines.append(
            f"| {r['M']} x {r['K']} x {r['N']} | {r['bf16_ms'] * 1e3:.1f} | {r['w4a16_ms'] * 1e3:.1f} | {r['speedup_vs_bf16']:.2f} "
            f"| {r['weight_bytes_ratio']:.3f} | {r['w4a16_sqnr_db']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m qcompile.gemm_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON file for the numbers")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warmup (ms)")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetitions (ms)")
    p.add_argument("--shapes", default=None, help="comma-separated MxKxN list (default: the DiT / SD shapes)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gemm_bench needs a CUDA GPU", file=sys.stderr)
        return 2
    shapes = SHAPES if args.shapes is None else [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    import triton

    device = torch.cuda.get_device_name()
    t0 = time.time()
    rows = []
    for m, k, n in shapes:
        rows.append(bench_shape(m, k, n, args.warmup, args.rep))
        print(f"  {m}x{k}x{n} done ({time.time() - t0:.0f} s)", file=sys.stderr)
    w4_rows = []
    for k, n in dict.fromkeys((k, n) for _, k, n in shapes):
        w4_rows += bench_w4(k, n, args.warmup, args.rep)
        print(f"  w4a16 {k}x{n} done ({time.time() - t0:.0f} s)", file=sys.stderr)
    table = markdown(rows, w4_rows, device)
    print(table)
    result = {
        "device": device, "torch": torch.__version__, "triton": triton.__version__, "seconds": time.time() - t0,
        "w8a8": rows, "w4a16": w4_rows, "markdown": table,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

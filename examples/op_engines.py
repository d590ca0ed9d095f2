"""Which engine should run a W8A8-FP8 op? Per conv / linear shape of a bench model, against bf16 (CUDA only).

    python examples/op_engines.py --model sd15-unet-512 --ops conv linear --out op_engines.json

Lists the model's 2-D convs (not 1x1) and linears with a forward on the GPU (input shapes, how often each shape
occurs), then times per unique shape (median, us; ``--timing cudagraph``, the default, replays each call in a CUDA
graph, so launch overhead is not counted, as in a compiled ``mode="reduce-overhead"`` step; ``plain`` is
``triton.testing.do_bench``, which counts it for short kernels).

Convs:

* ``cudnn_bf16``: ``F.conv2d`` in bf16, channels-last (what bf16 Inductor calls);
* ``implicit``: our implicit-GEMM kernel (``qdiff::conv2d_w8a8``, activation quantized in its prologue), the kernel
  launch alone (weight already tap-major, input channels-last);
* ``im2col``: im2col + static fp8 quantization of the input into the ``(M, C*KH*KW)`` fp8 matrix of
  ``lowering/conv_im2col.py`` (tap-major columns, the weight reordered to match), one Inductor-compiled kernel (in a
  model, fused into the producer: ``QDIFF_IM2COL_WRITER=inductor``);
* ``gather``: the default column writer, ``qdiff::im2col`` copying the once-quantized fp8 NHWC activation into the
  same matrix (checked byte-equal to ``im2col``'s); the producer's quantization itself is not timed;
* ``direct``: ``QDIFF_CONV_ENGINE=direct``'s ``qdiff::conv2d_fp8_prequant``, the implicit GEMM reading that
  once-quantized fp8 NHWC activation directly (no columns; weight in the same column order); compare it with
  ``gather`` + ``gemm_triton``;
* ``gemm_triton``: our fp8 GEMM (``qdiff::fp8_linear_prequant``, the TMA route where it applies) on that matrix;
* ``gemm_cublas``: ``torch._scaled_mm`` on it (row-wise scales: per-tensor activation x per-channel weight).

Linears (``M`` = rows of the flattened input):

* ``cublas_bf16``: ``F.linear`` in bf16;
* ``fp8_prologue``: our fp8 GEMM from the bf16 input (quantized in the kernel's prologue);
* ``fp8_prequant``: our fp8 GEMM on an fp8 input (quantized by its producer: the TMA route for large shapes);
* ``scaled_mm``: ``torch._scaled_mm`` (cuBLAS) on the same fp8 input, row-wise scales (the GEMM-level yardstick).

Each engine's output is checked against the dequantized reference (SQNR, dB). Prints tables with the totals over the
model's ops (shape time x count) and writes the numbers as JSON, after every row (a run stopped by a time limit keeps
the rows it measured). Conv rows name the engine ``QDIFF_CONV_ENGINE=auto`` picks for the shape in brackets. (The 2026-12-01 conv table in docs/kernels.md was
taken with ``plain`` timing, by this script's earlier version ``examples/conv_engines.py``, with tap-major columns.)
"""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter

import torch
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn


def op_shapes(model_name: str) -> tuple[Counter, Counter]:
    """``Counter``s over one forward of the model: ``(B, C, H, W, N, KH, KW, stride, padding)`` of its non-1x1 Conv2d
    calls, and ``(M, K, N)`` of its Linear calls."""
    from qcompile.bench import MODELS

    spec = MODELS[model_name]
    dev = torch.device("cuda")
    with torch.device(dev):
        model = spec.build()
    model = model.to(dev, torch.bfloat16).eval()  # (from_pretrained models load on the CPU whatever the default device)
    convs: Counter = Counter()
    linears: Counter = Counter()

    def conv_hook(mod, args):
        x = args[0]
        kh, kw = mod.kernel_size
        if (kh, kw) != (1, 1) and mod.groups == 1:
            convs[(*x.shape, mod.out_channels, kh, kw, mod.stride[0], mod.padding[0])] += 1

    def linear_hook(mod, args):
        x = args[0]
        linears[(x.numel() // x.shape[-1], mod.in_features, mod.out_features)] += 1

    handles = [m.register_forward_pre_hook(conv_hook) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    handles += [m.register_forward_pre_hook(linear_hook) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        model(**spec.inputs(dev, torch.bfloat16, 500))
    for h in handles:
        h.remove()
    del model
    torch.cuda.empty_cache()
    return convs, linears


def _sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.double(), out.double()
    noise = (ref - out).pow(2).sum().item()
    return math.inf if noise == 0 else round(10 * math.log10(ref.pow(2).sum().item() / noise), 2)


def _timer(timing: str, warmup: int, rep: int):
    """``t(fn)``: the median time of ``fn`` in us (in CUDA graphs with ``cudagraph``)."""
    from triton.testing import do_bench, do_bench_cudagraph

    if timing == "cudagraph":
        return lambda fn: do_bench_cudagraph(fn, rep=rep, return_mode="median") * 1e3
    return lambda fn: do_bench(fn, warmup=warmup, rep=rep, return_mode="median") * 1e3


def _fp8_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel fp8 codes ``(N, K)`` and scales ``(N, 1)`` of a float weight (any shape, N first)."""
    n = w.shape[0]
    scale = (w.reshape(n, -1).abs().amax(dim=1) / 448.0).reshape(n, 1)
    return (w.reshape(n, -1) / scale).clamp(-448, 448).to(FP8), scale


def measure_conv(shape: tuple, t, dev: torch.device = torch.device("cuda")) -> dict:
    from qcompile.lowering.conv_im2col import columns_weight, im2col
    from qcompile.lowering.kernels.conv import conv2d_fp8_prequant, conv2d_w8a8_args, conv_out_size
    from qcompile.lowering.kernels.fp8_linear import fp8_linear_prequant, quantize_input_fp8
    from qcompile.lowering.kernels.im2col import gather_columns
    from qcompile.lowering.kernels.im2col import reference as im2col_reference

    B, C, H, W, N, kh, kw, st, pad = shape
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(B, C, H, W, device=dev, generator=g, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    wf = torch.randn(N, C, kh, kw, device=dev, generator=g) * 0.05
    bias = torch.randn(N, device=dev, generator=g) * 0.1
    a_scale = (x.float().abs().amax() / 448.0).reshape(())
    wq, w_scale = _fp8_weight(wf)  # (N, C*KH*KW): the plan's channel-major layout
    xq_ref = (x.float() / a_scale).clamp(-448, 448).to(FP8).float() * a_scale
    ref = F.conv2d(xq_ref, (wq.float() * w_scale).reshape(N, C, kh, kw), bias, stride=st, padding=pad)
    OH, OW = conv_out_size(H, kh, st, pad, 1), conv_out_size(W, kw, st, pad, 1)
    M = B * OH * OW
    res: dict = {"shape": list(shape), "M": M, "K": kh * kw * C, "N": N, "gflop": round(2 * M * kh * kw * C * N / 1e9, 2)}
    nchw = lambda y: y.view(B, OH, OW, N).permute(0, 3, 1, 2)  # noqa: E731

    w_bf = wf.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    b_bf = bias.to(torch.bfloat16)
    res["cudnn_bf16"] = t(lambda: F.conv2d(x, w_bf, b_bf, stride=st, padding=pad))

    args = conv2d_w8a8_args(x, wq, w_scale, bias, a_scale, None, weight_shape=(N, C, kh, kw), stride=(st, st), padding=(pad, pad),
                            dilation=(1, 1))
    op = torch.ops.qdiff.conv2d_w8a8
    res["implicit_sqnr"] = _sqnr(ref, nchw(op(*args)))
    res["implicit"] = t(lambda: op(*args))

    torch._dynamo.reset()  # one compile per shape (its ints are specialized): stay under the recompile limit
    columns = torch.compile(lambda x: quantize_input_fp8(im2col(x, (kh, kw), (st, st), (pad, pad), (1, 1)), a_scale), dynamic=False,
                            fullgraph=True)
    cols = columns(x)
    res["im2col"] = t(lambda: columns(x))
    # the default column writer: the producer quantizes once (fp8 NHWC), qdiff::im2col copies the columns
    xq_nhwc = quantize_input_fp8(x.permute(0, 2, 3, 1), a_scale).contiguous()
    kernel_cols = gather_columns(xq_nhwc, (kh, kw), (st, st), (pad, pad), (1, 1))
    if not torch.equal(kernel_cols.view(torch.uint8), im2col_reference(xq_nhwc, (kh, kw), (st, st), (pad, pad), (1, 1)).view(torch.uint8)):
        raise AssertionError(f"qdiff::im2col columns differ from the aten columns of the same fp8 activation at {shape}")
    # eager vs Inductor-compiled quantization may round a few values differently (x / s vs x * (1 / s)): count them
    res["gather_codes_differing"] = int((kernel_cols.view(torch.uint8) != cols.view(torch.uint8)).sum())
    res["gather"] = t(lambda: gather_columns(xq_nhwc, (kh, kw), (st, st), (pad, pad), (1, 1)))
    wc = columns_weight(wq, (N, C, kh, kw))  # the column order, as converted graphs store it
    direct = lambda: conv2d_fp8_prequant(xq_nhwc, wc, w_scale.reshape(N), bias, a_scale, torch.bfloat16, kernel=(kh, kw),  # noqa: E731
                                         stride=(st, st), padding=(pad, pad), dilation=(1, 1))
    res["direct_sqnr"] = _sqnr(ref, direct().permute(0, 3, 1, 2))
    res["direct"] = t(direct)
    res["gemm_triton_sqnr"] = _sqnr(ref, nchw(fp8_linear_prequant(cols, wc, w_scale, bias, a_scale, torch.bfloat16)))
    res["gemm_triton"] = t(lambda: fp8_linear_prequant(cols, wc, w_scale, bias, a_scale, torch.bfloat16))
    sa = a_scale.float().expand(M, 1).contiguous()
    sb = w_scale.float().reshape(1, N).contiguous()
    try:
        mm = lambda: torch._scaled_mm(cols, wc.t(), scale_a=sa, scale_b=sb, bias=b_bf, out_dtype=torch.bfloat16)  # noqa: E731
        res["gemm_cublas_sqnr"] = _sqnr(ref, nchw(mm()))
        res["gemm_cublas"] = t(mm)
    except RuntimeError as e:  # cuBLAS rejects some shapes / scale layouts: keep the reason
        res["gemm_cublas_error"] = str(e).splitlines()[0][:200]
    return res


def measure_linear(shape: tuple, t, dev: torch.device = torch.device("cuda")) -> dict:
    from qcompile.lowering.kernels.fp8_linear import fp8_linear, fp8_linear_prequant, quantize_input_fp8

    M, K, N = shape
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(M, K, device=dev, generator=g, dtype=torch.bfloat16)
    wf = torch.randn(N, K, device=dev, generator=g) * K**-0.5
    bias = torch.randn(N, device=dev, generator=g) * 0.1
    a_scale = (x.float().abs().amax() / 448.0).reshape(())
    wq, w_scale = _fp8_weight(wf)
    xq = quantize_input_fp8(x, a_scale)
    ref = F.linear(xq.float() * a_scale, wq.float() * w_scale, bias)
    res: dict = {"shape": list(shape), "gflop": round(2 * M * K * N / 1e9, 3)}
    w_bf, b_bf = wf.to(torch.bfloat16), bias.to(torch.bfloat16)
    res["cublas_bf16"] = t(lambda: F.linear(x, w_bf, b_bf))
    res["fp8_prologue_sqnr"] = _sqnr(ref, fp8_linear(x, wq, w_scale, bias, a_scale))
    res["fp8_prologue"] = t(lambda: fp8_linear(x, wq, w_scale, bias, a_scale))
    res["fp8_prequant_sqnr"] = _sqnr(ref, fp8_linear_prequant(xq, wq, w_scale, bias, a_scale, torch.bfloat16))
    res["fp8_prequant"] = t(lambda: fp8_linear_prequant(xq, wq, w_scale, bias, a_scale, torch.bfloat16))
    sa = a_scale.float().expand(M, 1).contiguous()
    sb = w_scale.float().reshape(1, N).contiguous()
    try:
        mm = lambda: torch._scaled_mm(xq, wq.t(), scale_a=sa, scale_b=sb, bias=b_bf, out_dtype=torch.bfloat16)  # noqa: E731
        res["scaled_mm_sqnr"] = _sqnr(ref, mm())
        res["scaled_mm"] = t(mm)
    except RuntimeError as e:  # cuBLAS rejects some shapes / scale layouts: keep the reason
        res["scaled_mm_error"] = str(e).splitlines()[0][:200]
    return res


CONV_ENGINES = ("cudnn_bf16", "implicit", "im2col", "gather", "direct", "gemm_triton", "gemm_cublas")
LINEAR_ENGINES = ("cublas_bf16", "fp8_prologue", "fp8_prequant", "scaled_mm")


def _table(title: str, shapes: Counter, measure, engines: tuple[str, ...], label, t, on_row) -> tuple[list[dict], dict]:
    """Measure every shape (largest first), print a markdown table as it goes and pass the rows so far to ``on_row``
    after each (a run stopped by a time limit keeps what it measured); the rows and per-engine totals."""
    print(f"\n{title}\n\n| shape | count | GFLOP | " + " | ".join(f"{e} us" for e in engines) + " | SQNR dB |")
    print("|" + " --- |" * (len(engines) + 4))
    rows = []
    for shape, count in sorted(shapes.items(), key=lambda kv: -math.prod(kv[0])):
        r = {**measure(shape, t), "count": count}
        rows.append(r)
        cells = " | ".join(f"{r[e]:.1f}" if e in r else "-" for e in engines)
        sqnr = " / ".join(str(v) for k, v in r.items() if k.endswith("_sqnr"))
        print(f"| {label(shape)} | {count} | {r['gflop']} | {cells} | {sqnr} |", flush=True)
        on_row(rows)
    totals = {e: round(sum(r[e] * r["count"] for r in rows if e in r), 1) for e in engines}
    print("totals (us per model step):", json.dumps(totals))
    return rows, totals


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="sd15-unet-512")
    p.add_argument("--ops", nargs="+", choices=("conv", "linear"), default=["conv", "linear"])
    p.add_argument("--timing", choices=("cudagraph", "plain"), default="cudagraph")
    p.add_argument("--out", default="op_engines.json")
    a = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("op_engines.py times CUDA kernels: no CUDA device here")
    t = _timer(a.timing, warmup=25, rep=100)
    convs, linears = op_shapes(a.model)
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "model": a.model, "timing": a.timing}

    def write() -> None:
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)

    def save(key: str):
        def on_row(rows: list[dict]) -> None:
            out[key] = rows
            write()
        return on_row

    if "conv" in a.ops:
        out["conv_rows"], out["conv_totals_us"] = _table(
            f"{a.model}: 2-D convs (not 1x1); the engine QDIFF_CONV_ENGINE=auto picks in brackets", convs, measure_conv, CONV_ENGINES,
            _conv_label, t, save("conv_rows"))
    if "linear" in a.ops:
        out["linear_rows"], out["linear_totals_us"] = _table(
            f"{a.model}: linears (M x K x N)", linears, measure_linear, LINEAR_ENGINES, lambda s: "x".join(map(str, s)), t,
            save("linear_rows"))
    write()  # with the totals


def _conv_label(shape: tuple) -> str:
    """``(B, C, H, W) -> N, KHxKW, s<stride> [auto engine]``."""
    from qcompile.lowering.conv_im2col import auto_engine

    B, C, H, W, N, kh, kw, st, pad = shape
    engine = auto_engine((B, C, H, W), (N, C, kh, kw), (st, st), (pad, pad), (1, 1))
    return f"{shape[:4]} -> {N}, {kh}x{kw}, s{st} [{engine}]"


if __name__ == "__main__":
    main()

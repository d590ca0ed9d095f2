"""Which engine should run a W8A8-FP8 3x3 conv? Per conv shape of a bench model (CUDA only).

    python examples/conv_engines.py --model sd15-unet-512 --out conv_engines.json

Lists the model's 2-D convs with a forward on the GPU (input shapes, stride, padding, how often each shape occurs),
then times per unique shape with ``triton.testing.do_bench`` (median, us):

* ``cudnn_bf16``: ``F.conv2d`` in bf16, channels-last (what bf16 Inductor calls);
* ``implicit``: our implicit-GEMM kernel (``qdiff::conv2d_w8a8``, activation quantized in its prologue), the kernel
  launch alone (weight already tap-major, input channels-last);
* ``im2col``: static fp8 quantization + im2col of the input into an ``(M, KH*KW*C)`` fp8 matrix, one
  Inductor-compiled kernel (what the producer would fuse);
* ``gemm_triton``: our fp8 GEMM (``qdiff::fp8_linear_prequant``, the TMA route where it applies) on that matrix;
* ``gemm_cublas``: ``torch._scaled_mm`` on it (row-wise scales: per-tensor activation x per-channel weight).

Each engine's output is checked against the dequantized reference (SQNR, dB). Prints a table with the totals over the
model's convs (shape time x count) and writes the numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter

import torch
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn


def conv_shapes(model_name: str) -> Counter:
    """``Counter`` of ``(B, C, H, W, N, KH, KW, stride, padding)`` over the model's non-1x1 Conv2d calls (one forward)."""
    from qcompile.bench import MODELS

    spec = MODELS[model_name]
    dev = torch.device("cuda")
    with torch.device(dev):
        model = spec.build().to(torch.bfloat16).eval()
    seen: Counter = Counter()

    def hook(mod, args):
        x = args[0]
        kh, kw = mod.kernel_size
        if (kh, kw) != (1, 1) and mod.groups == 1:
            seen[(*x.shape, mod.out_channels, kh, kw, mod.stride[0], mod.padding[0])] += 1

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        model(**spec.inputs(dev, torch.bfloat16, 500))
    for h in handles:
        h.remove()
    del model
    torch.cuda.empty_cache()
    return seen


def _sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.double(), out.double()
    noise = (ref - out).pow(2).sum().item()
    return math.inf if noise == 0 else round(10 * math.log10(ref.pow(2).sum().item() / noise), 2)


def _im2col_fp8(x: torch.Tensor, a_scale: torch.Tensor, kh: int, kw: int, stride: int, padding: int) -> torch.Tensor:
    """``(B*OH*OW, KH*KW*C)`` fp8 patches of ``x`` (B, C, H, W), tap-major columns, quantized with ``a_scale``."""
    xp = F.pad(x.permute(0, 2, 3, 1), (0, 0, padding, padding, padding, padding))  # (B, H+2p, W+2p, C)
    cols = xp.unfold(1, kh, stride).unfold(2, kw, stride)  # (B, OH, OW, C, KH, KW)
    cols = cols.permute(0, 1, 2, 4, 5, 3)  # (B, OH, OW, KH, KW, C)
    q = (cols.float() / a_scale).clamp(-448.0, 448.0).to(FP8)
    return q.reshape(-1, kh * kw * x.shape[1])


def measure(shape: tuple, warmup: int, rep: int) -> dict:
    from triton.testing import do_bench

    from qcompile.lowering.kernels.conv import conv2d_w8a8_args, conv_out_size, tap_major
    from qcompile.lowering.kernels.fp8_linear import fp8_linear_prequant

    B, C, H, W, N, kh, kw, st, pad = shape
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(B, C, H, W, device=dev, generator=g, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    wf = torch.randn(N, C, kh, kw, device=dev, generator=g) * 0.05
    bias = torch.randn(N, device=dev, generator=g) * 0.1
    a_scale = (x.float().abs().amax() / 448.0).reshape(())
    w_scale = (wf.abs().amax(dim=(1, 2, 3)) / 448.0).reshape(N, 1)
    wq = (wf / w_scale.reshape(N, 1, 1, 1)).clamp(-448, 448).to(FP8)
    xq_ref = (x.float() / a_scale).clamp(-448, 448).to(FP8).float() * a_scale
    ref = F.conv2d(xq_ref, wq.float() * w_scale.reshape(N, 1, 1, 1), bias, stride=st, padding=pad)
    OH, OW = conv_out_size(H, kh, st, pad, 1), conv_out_size(W, kw, st, pad, 1)
    M = B * OH * OW
    res: dict = {"shape": list(shape), "M": M, "K": kh * kw * C, "N": N, "gflop": round(2 * M * kh * kw * C * N / 1e9, 2)}

    w_bf = wf.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    b_bf = bias.to(torch.bfloat16)
    res["cudnn_bf16"] = do_bench(lambda: F.conv2d(x, w_bf, b_bf, stride=st, padding=pad), warmup=warmup, rep=rep, return_mode="median") * 1e3

    args = conv2d_w8a8_args(x, wq.reshape(N, -1), w_scale, bias, a_scale, None, weight_shape=(N, C, kh, kw), stride=(st, st),
                            padding=(pad, pad), dilation=(1, 1))
    op = torch.ops.qdiff.conv2d_w8a8
    out = op(*args).view(B, OH, OW, N).permute(0, 3, 1, 2)
    res["implicit_sqnr"] = _sqnr(ref, out)
    res["implicit"] = do_bench(lambda: op(*args), warmup=warmup, rep=rep, return_mode="median") * 1e3

    torch._dynamo.reset()  # one compile per shape (its ints are specialized): stay under the recompile limit
    im2col = torch.compile(_im2col_fp8, dynamic=False, fullgraph=True)
    cols = im2col(x, a_scale, kh, kw, st, pad)
    res["im2col"] = do_bench(lambda: im2col(x, a_scale, kh, kw, st, pad), warmup=warmup, rep=rep, return_mode="median") * 1e3
    wt = tap_major(wq.reshape(N, -1), (N, C, kh, kw))
    y = fp8_linear_prequant(cols, wt, w_scale, bias, a_scale, torch.bfloat16)
    res["gemm_triton_sqnr"] = _sqnr(ref, y.view(B, OH, OW, N).permute(0, 3, 1, 2))
    res["gemm_triton"] = do_bench(lambda: fp8_linear_prequant(cols, wt, w_scale, bias, a_scale, torch.bfloat16), warmup=warmup, rep=rep,
                                  return_mode="median") * 1e3
    sa = a_scale.float().expand(M, 1).contiguous()
    sb = w_scale.float().reshape(1, N).contiguous()
    b16 = bias.to(torch.bfloat16)
    try:
        mm = lambda: torch._scaled_mm(cols, wt.t(), scale_a=sa, scale_b=sb, bias=b16, out_dtype=torch.bfloat16)  # noqa: E731
        y = mm()
        res["gemm_cublas_sqnr"] = _sqnr(ref, y.view(B, OH, OW, N).permute(0, 3, 1, 2))
        res["gemm_cublas"] = do_bench(mm, warmup=warmup, rep=rep, return_mode="median") * 1e3
    except RuntimeError as e:  # cuBLAS rejects some shapes / scale layouts: keep the reason
        res["gemm_cublas_error"] = str(e).splitlines()[0][:200]
    return res


ENGINES = ("cudnn_bf16", "implicit", "im2col", "gemm_triton", "gemm_cublas")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="sd15-unet-512")
    p.add_argument("--out", default="conv_engines.json")
    p.add_argument("--warmup", type=int, default=25)
    p.add_argument("--rep", type=int, default=100)
    a = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("conv_engines.py times CUDA kernels: no CUDA device here")
    shapes = conv_shapes(a.model)
    rows = []
    print("| B C H W -> N, k, s | count | GFLOP | " + " | ".join(f"{e} us" for e in ENGINES) + " | SQNR implicit / triton / cublas |")
    print("|" + " --- |" * (len(ENGINES) + 4))
    for shape, count in sorted(shapes.items(), key=lambda kv: -kv[0][1] * kv[0][4]):
        r = measure(shape, a.warmup, a.rep)
        r["count"] = count
        rows.append(r)
        cells = " | ".join(f"{r[e]:.1f}" if e in r else "-" for e in ENGINES)
        print(f"| {shape[:4]} -> {shape[4]}, {shape[5]}, {shape[7]} | {count} | {r['gflop']} | {cells} | "
              f"{r['implicit_sqnr']} / {r['gemm_triton_sqnr']} / {r.get('gemm_cublas_sqnr', '-')} |", flush=True)
    totals = {e: round(sum(r[e] * r["count"] for r in rows if e in r), 1) for e in ENGINES}
    best = sum(min(r["implicit"], r["im2col"] + r["gemm_triton"], r["im2col"] + r.get("gemm_cublas", math.inf), r["cudnn_bf16"]) * r["count"]
               for r in rows)
    print("totals (us per model step):", json.dumps(totals), "best of engines per shape:", round(best, 1))
    with open(a.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "model": a.model, "rows": rows, "totals_us": totals},
                  f, indent=1)


if __name__ == "__main__":
    main()

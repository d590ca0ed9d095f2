"""bf16 SDPA against qdiff's fp8 attention kernel at DiT-XL/2, PixArt-alpha and SD 1.5 attention shapes (CUDA).

    python examples/attention_bench.py --out attention_bench.json

Per shape: ``F.scaled_dot_product_attention`` on bf16 (whatever backend torch picks: cuDNN / flash on Hopper) and
``qdiff::fp8_attention`` with bf16 inputs (quantized in the kernel) and with float8_e4m3fn inputs (quantized by their
producer, not timed), each the median of CUDA-graph replays (``qcompile.latency.cuda_graph_timer``; the fp8 kernel
autotunes before the graph is captured). Heads are laid out as models produce them (``x.view(B, S, H, D).transpose(1,
2)``); static scales are the inputs' max-abs / 448. SQNR (dB) of each fp8 output against the bf16 SDPA output and
against the pure-PyTorch reference ``qattention`` (the same quantized arithmetic: checks the kernel on the GPU).
Random Gaussian inputs (scores ~ N(0, 1) after the 1 / sqrt(D) scale): the timing does not depend on the data.
Prints a markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys

import torch
import torch.nn.functional as F

# (model, B, H, Sq, Sk, D): DiT-XL/2 512 px batch 8; PixArt-alpha 1024 px batch 2 (self, and cross-attention over 120
# T5 tokens); SD 1.5 512 px batch 2 (CFG): self-attention at 64 / 32 / 16 / 8 latent sides, cross over 77 CLIP tokens
SHAPES = [
    ("DiT-XL/2", 8, 16, 1024, 1024, 72),
    ("PixArt-alpha", 2, 16, 4096, 4096, 72),
    ("PixArt-alpha cross", 2, 16, 4096, 120, 72),
    ("SD 1.5", 2, 8, 4096, 4096, 40),
    ("SD 1.5", 2, 8, 1024, 1024, 80),
    ("SD 1.5", 2, 8, 256, 256, 160),
    ("SD 1.5", 2, 8, 64, 64, 160),
    ("SD 1.5 cross", 2, 8, 4096, 77, 40),
]


def _heads(b: int, h: int, s: int, d: int, dev: torch.device) -> torch.Tensor:
    return torch.randn(b, s, h, d, device=dev, dtype=torch.bfloat16).transpose(1, 2)


def bench_shape(model: str, b: int, h: int, sq: int, sk: int, d: int, dev: torch.device) -> dict:
    """Times (us) and SQNRs (dB) of one attention shape."""
    from qcompile.latency import cuda_graph_timer
    from qcompile.lowering.formats import quantize_fp8
    from qcompile.lowering.kernels.fp8_attention import fp8_attention
    from qcompile.lowering.reference import qattention
    from qcompile.metrics import sqnr_db

    q, k, v = _heads(b, h, sq, d, dev), _heads(b, h, sk, d, dev), _heads(b, h, sk, d, dev)
    s = [(t.float().abs().amax() / 448).reshape(()) for t in (q, k, v)]
    q8, k8, v8 = (quantize_fp8(t, sc) for t, sc in zip((q, k, v), s))
    ref_bf16 = F.scaled_dot_product_attention(q, k, v).float()
    ref_q = qattention(q, k, v, *s).float()
    out = fp8_attention(q, k, v, *s)
    out8 = fp8_attention(q8, k8, v8, *s)
    t_sdpa = cuda_graph_timer(lambda: F.scaled_dot_product_attention(q, k, v))
    t_fp8 = cuda_graph_timer(lambda: fp8_attention(q, k, v, *s))
    t_fp8_in = cuda_graph_timer(lambda: fp8_attention(q8, k8, v8, *s))
    flops = 4 * b * h * sq * sk * d  # Q K^T and P V, useful head dims
    return {
        "model": model, "shape": [b, h, sq, sk, d],
        "sdpa_bf16_us": round(t_sdpa, 1), "fp8_us": round(t_fp8, 1), "fp8_from_fp8_us": round(t_fp8_in, 1),
        "speedup": round(t_sdpa / t_fp8, 2), "speedup_from_fp8": round(t_sdpa / t_fp8_in, 2),
        "sdpa_tflops": round(flops / t_sdpa / 1e6, 1), "fp8_tflops": round(flops / t_fp8 / 1e6, 1),
        "fp8_from_fp8_tflops": round(flops / t_fp8_in / 1e6, 1),
        "sqnr_vs_bf16_db": round(sqnr_db(ref_bf16, out.float()), 1), "sqnr_fp8_in_vs_bf16_db": round(sqnr_db(ref_bf16, out8.float()), 1),
        "sqnr_vs_reference_db": round(sqnr_db(ref_q, out.float()), 1),
    }


def table(rows: list[dict]) -> str:
    lines = ["| model | B, H, Sq, Sk, D | SDPA bf16 us | fp8 us (bf16 in) | fp8 us (fp8 in) | speedup (bf16 in / fp8 in) | "
             "TFLOP/s SDPA / fp8 / fp8 in | SQNR vs bf16 dB (bf16 in / fp8 in) | SQNR vs qattention dB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['model']} | {', '.join(map(str, r['shape']))} | {r['sdpa_bf16_us']} | {r['fp8_us']} | {r['fp8_from_fp8_us']} | "
                     f"{r['speedup']} / {r['speedup_from_fp8']} | {r['sdpa_tflops']} / {r['fp8_tflops']} / {r['fp8_from_fp8_tflops']} | "
                     f"{r['sqnr_vs_bf16_db']} / {r['sqnr_fp8_in_vs_bf16_db']} | {r['sqnr_vs_reference_db']} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="attention_bench.json", help="JSON file to write")
    p.add_argument("--models", default="", help="comma-separated substrings of model names to run (default: all)")
    a = p.parse_args()
    if not torch.cuda.is_available():
        print("attention_bench needs a CUDA device (the fp8 kernel and CUDA-graph timing); none found", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    torch.manual_seed(0)
    wanted = [w.strip().lower() for w in a.models.split(",") if w.strip()]
    rows = []
    for shape in SHAPES:
        if wanted and not any(w in shape[0].lower() for w in wanted):
            continue
        rows.append(bench_shape(*shape, dev))
        print(json.dumps(rows[-1]), flush=True)
    import triton

    meta = {"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name(dev), "torch": torch.__version__,
            "triton": triton.__version__, "command": " ".join(["python", *sys.argv])}
    with open(a.out, "w") as f:
        json.dump({**meta, "rows": rows}, f, indent=1)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

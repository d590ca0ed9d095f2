"""bf16 SDPA against qdiff's fp8 attention kernel at DiT-XL/2, PixArt-alpha and SD 1.5 attention shapes (CUDA).

    python examples/attention_bench.py --out attention_bench.json [--models dit,pixart]

Per shape: ``F.scaled_dot_product_attention`` on bf16 (whatever backend torch picks: cuDNN / flash on Hopper) and
``qdiff::fp8_attention`` with bf16 inputs (quantized in the kernel), with float8_e4m3fn inputs in the heads' layout
(quantized by their producer, not timed), with float8_e4m3fn inputs as ``quantize_heads`` stores them (rows padded to
16 bytes, V with its keys contiguous: the kernel's ``V_T`` path, not timed), the same with q / k padded in memory by
zero columns to the next power of two up to 128 (``qk_width``: 72 -> 128, 40 -> 64; the lowering's layout until
2026-12-03, the kernel now pads them in registers), fp8 q / k as views of their projection's output with V^T (what the
lowering passes the kernel for fp8 projections, :func:`projection_codes`), and the Triton lowering's attention call
compiled by Inductor (``triton_lowering.qattention``: the quantize pass Inductor generates plus the kernel: what a
quantized model runs). Each time is the median of CUDA-graph replays (``qcompile.latency.cuda_graph_timer``; the fp8
kernel autotunes before the graph is captured). Heads are laid out as models produce them (``x.view(B, S, H,
D).transpose(1, 2)``); static scales are the inputs' max-abs / 448. SQNR (dB) of fp8 outputs against the bf16 SDPA
output and against the pure-PyTorch reference ``qattention`` (the same quantized arithmetic: checks the kernel on the
GPU). Random Gaussian inputs (scores ~ N(0, 1) after the 1 / sqrt(D) scale): the timing does not depend on the data.
Prints a markdown table and writes JSON (after every shape). A column that raises records its error in the row
(``NAME_error``; "failed" in the table), the other columns still run, and the script exits 1 at the end.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

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


def selected_shapes(models: str) -> list[tuple]:
    """The :data:`SHAPES` whose model name contains one of the comma-separated ``models`` (case-insensitive; all for "")."""
    wanted = [w.strip().lower() for w in models.split(",") if w.strip()]
    return [s for s in SHAPES if not wanted or any(w in s[0].lower() for w in wanted)]


def run_meta(dev: torch.device) -> dict:
    """Date, device, versions and command of a run, for its JSON."""
    import triton

    return {"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name(dev), "torch": torch.__version__,
            "triton": triton.__version__, "command": " ".join(["python", *sys.argv])}


def measure_shapes(models: str, measure, out: str, dev: torch.device, progress) -> list[dict]:
    """``measure(*shape)`` (on ``dev``) for each of :func:`selected_shapes`; the rows, with :func:`run_meta`, are written to ``out``
    as JSON after every shape (a run cut by a time limit keeps what it measured) and ``progress(row)`` is printed."""
    meta = run_meta(dev)
    rows = []
    for shape in selected_shapes(models):
        rows.append(measure(*shape))
        print(progress(rows[-1]), flush=True)
        Path(out).write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
    return rows


def _heads(b: int, h: int, s: int, d: int, dev: torch.device) -> torch.Tensor:
    return torch.randn(b, s, h, d, device=dev, dtype=torch.bfloat16).transpose(1, 2)


def projection_codes(heads: list[torch.Tensor], scales: list[torch.Tensor]) -> list[torch.Tensor]:
    """fp8 codes of (B, H, S, D) ``heads`` as a fused projection writes them (``QDIFF_ATTN_FP8_QKV``): the column sections
    of one (B, S, n * H * D) output (n = len(heads), one scale each), viewed as heads at D-element offsets, as the
    lowering hands q / k to the kernel."""
    from qcompile.lowering.formats import quantize_fp8

    B, H, S, D = heads[0].shape
    rows = torch.cat([quantize_fp8(t.transpose(1, 2).reshape(B, S, H * D), sc) for t, sc in zip(heads, scales)], -1)
    return [rows[..., i * H * D:(i + 1) * H * D].view(B, S, H, D).transpose(1, 2) for i in range(len(heads))]


def bench_shape(model: str, b: int, h: int, sq: int, sk: int, d: int, dev: torch.device) -> dict:
    """Times (us) and SQNRs (dB) of one attention shape."""
    from qcompile.latency import cuda_graph_timer
    from qcompile.lowering import triton_lowering
    from qcompile.lowering.formats import quantize_fp8
    from qcompile.lowering.kernels.fp8_attention import fp8_attention, qk_width, quantize_heads
    from qcompile.lowering.reference import qattention
    from qcompile.metrics import sqnr_db

    q, k, v = _heads(b, h, sq, d, dev), _heads(b, h, sk, d, dev), _heads(b, h, sk, d, dev)
    s = [(t.float().abs().amax() / 448).reshape(()) for t in (q, k, v)]
    q8, k8, v8 = (quantize_fp8(t, sc) for t, sc in zip((q, k, v), s))
    q8p, k8p, v8t = quantize_heads(q, s[0]), quantize_heads(k, s[1]), quantize_heads(v, s[2], keys_contiguous=True)
    width = qk_width(d)  # (q / k padded in memory, as the lowering did until 2026-12-03; now the kernel pads them in registers)
    qk_pow2 = [quantize_heads(t, sc, width=width) for t, sc in ((q, s[0]), (k, s[1]))] if width != d else None
    # q / k as views of their projection's fp8 output (self-attention: one q / k / v projection), V copied by keys: the lowering's call
    q_proj, k_proj = projection_codes([q, k, v], s)[:2] if sq == sk else (projection_codes([q], s[:1])[0], projection_codes([k, v], s[1:])[0])
    torch._dynamo.reset()
    lowering = torch.compile(lambda q, k, v: triton_lowering.qattention(q, k, v, *s), fullgraph=True)
    ref_bf16 = F.scaled_dot_product_attention(q, k, v).float()
    ref_q = qattention(q, k, v, *s).float()
    calls = {"fp8": lambda: fp8_attention(q, k, v, *s), "fp8_from_fp8": lambda: fp8_attention(q8, k8, v8, *s),
             "fp8_vt": lambda: fp8_attention(q8p, k8p, v8t, *s), "lowering_compiled": lambda: lowering(q, k, v)}
    if qk_pow2 is not None:
        calls["fp8_vt_qk_pow2"] = lambda: fp8_attention(*qk_pow2, v8t, *s, sm_scale=d ** -0.5)
    calls["fp8_proj_vt"] = lambda: fp8_attention(q_proj, k_proj, v8t, *s)
    row: dict = {"model": model, "shape": [b, h, sq, sk, d]}
    outs, times = {}, {"sdpa_bf16_us": cuda_graph_timer(lambda: F.scaled_dot_product_attention(q, k, v))}
    for name, call in calls.items():  # a column that fails says why in its row and the others still run (one GPU call)
        try:
            outs[name] = call()
            times[f"{name}_us"] = cuda_graph_timer(call)
        except Exception as e:  # noqa: BLE001 (recorded in the row and printed, not swallowed)
            row[f"{name}_error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
            print(f"{model} {row['shape']} {name}: {row[name + '_error']}", file=sys.stderr, flush=True)
    flops = 4 * b * h * sq * sk * d  # Q K^T and P V, useful head dims
    row.update({key: round(t, 1) for key, t in times.items()})
    for key, t in times.items():
        if key != "sdpa_bf16_us":
            row["speedup_" + key.removesuffix("_us")] = round(times["sdpa_bf16_us"] / t, 2)
        row[key.removesuffix("_us") + "_tflops"] = round(flops / t / 1e6, 1)  # (useful FLOPs: the head dim, not the dot widths)
    row.update({f"sqnr_{name}_vs_bf16_db": round(sqnr_db(ref_bf16, out.float()), 1) for name, out in outs.items()})
    row.update({f"sqnr_{name}_vs_reference_db": round(sqnr_db(ref_q, out.float()), 1) for name, out in outs.items()})
    return row


COLUMNS = [("fp8", "bf16 in"), ("fp8_from_fp8", "fp8 in"), ("fp8_vt", "fp8 in, V^T"), ("fp8_vt_qk_pow2", "fp8 in, V^T, q / k pow2"),
           ("fp8_proj_vt", "fp8 q / k projection views, V^T"), ("lowering_compiled", "lowering, compiled")]


def table(rows: list[dict]) -> str:
    head = " | ".join(f"fp8 {label} us (x SDPA)" for _, label in COLUMNS)

    def cell(r: dict, key: str) -> str:
        if key + "_us" in r:
            return f"{r[key + '_us']} ({r['speedup_' + key]})"
        return "failed" if key + "_error" in r else "-"

    def value(r: dict, key: str) -> str:
        return str(r.get(key, "-"))

    lines = [f"| model | B, H, Sq, Sk, D | SDPA bf16 us | {head} | TFLOP/s SDPA / lowering | SQNR vs bf16 dB (lowering) | "
             "SQNR vs qattention dB (bf16 in / lowering) |", "| --- | --- | --- |" + " --- |" * (len(COLUMNS) + 3)]
    for r in rows:
        cells = " | ".join(cell(r, key) for key, _ in COLUMNS)
        lines.append(f"| {r['model']} | {', '.join(map(str, r['shape']))} | {r['sdpa_bf16_us']} | {cells} | "
                     f"{r['sdpa_bf16_tflops']} / {value(r, 'lowering_compiled_tflops')} | {value(r, 'sqnr_lowering_compiled_vs_bf16_db')} | "
                     f"{value(r, 'sqnr_fp8_vs_reference_db')} / {value(r, 'sqnr_lowering_compiled_vs_reference_db')} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="attention_bench.json", help="JSON file to write")
    p.add_argument("--models", default="", help="comma-separated substrings of model names to run (default: all)")
    a = p.parse_args()
    if not torch.cuda.is_available():
        print("attention_bench needs a CUDA device (the fp8 kernel and CUDA-graph timing); none found", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    dev = torch.device("cuda")
    rows = measure_shapes(a.models, lambda *shape: bench_shape(*shape, dev), a.out, dev, json.dumps)
    print(table(rows))
    return 1 if any(key.endswith("_error") for r in rows for key in r) else 0


if __name__ == "__main__":
    sys.exit(main())

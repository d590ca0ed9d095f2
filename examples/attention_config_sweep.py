"""Each fp8 attention config, timed on its own at model shapes, as the Triton lowering feeds the kernel (CUDA).

    python examples/attention_config_sweep.py --out attention_configs.json [--models DiT,PixArt] [--candidates]
        [--softmax ex2,bits,half]

The lowering calls ``qdiff::fp8_attention`` with fp8 q / k as views of their projection's output (the kernel pads
their head dim in registers) and V stored by keys (``keys_contiguous_codes``; with the ones row of the row sums where
the head dim has room, ``v_ones_dim``), and with fp8 output for the output projection (``out_scale``). The production kernel autotunes
over ``fp8_attention.CONFIG_TABLE``. This script times each config of that table alone (and, with ``--candidates``,
the configs of ``CANDIDATES``, compiled spill-free for sm_90 by ``aot_check``), plus the autotuned kernel. That shows
which config wins at each shape and whether a config outside the table would be faster. Each time is the median of
CUDA-graph replays (``qcompile.latency.cuda_graph_timer``). Each output is checked against the pure-PyTorch
``qattention`` (SQNR, dB), so a config that computes wrong values shows. Shapes are those of
``examples/attention_bench.py``. ``--softmax`` times every config (and the autotuned kernel) under each of the kernel's
softmax modes (``fp8_attention.SOFTMAX_MODES``, set through ``$QDIFF_ATTN_SOFTMAX``; columns named ``CONFIG MODE``).
The script prints a markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention_bench import _heads, measure_shapes, projection_codes  # noqa: E402  (the same shapes, layouts and run record)

# (BLOCK_M, BLOCK_N, num_stages, num_warps) outside CONFIG_TABLE, no spills at D = 72 padded to 128 (aot_check, triton 3.6);
# the first two were in the table until the sweep of 2026-12-03 (docs/experiments/attention-configs)
CANDIDATES = [(128, 128, 2, 8), (128, 64, 2, 8), (128, 128, 3, 8), (128, 64, 4, 8), (64, 64, 4, 4), (256, 64, 2, 16)]


def sweep_shape(model: str, b: int, h: int, sq: int, sk: int, d: int, configs: list[tuple[int, ...]], dev: torch.device,
                modes: list[str] | None = None) -> dict:
    """Times (us) and SQNR against the reference of each config, and of the autotuned kernel, at one shape; with
    ``modes``, under each softmax mode (``$QDIFF_ATTN_SOFTMAX``, restored afterwards)."""
    from qcompile.latency import cuda_graph_timer
    from qcompile.lowering import reference
    from qcompile.lowering.kernels._common import autotuned
    from qcompile.metrics import sqnr_db

    fa = importlib.import_module("qcompile.lowering.kernels.fp8_attention")
    q, k, v = _heads(b, h, sq, d, dev), _heads(b, h, sk, d, dev), _heads(b, h, sk, d, dev)
    s = [(t.float().abs().amax() / 448).reshape(()) for t in (q, k, v)]
    q8, k8 = projection_codes([q, k, v], s)[:2] if sq == sk else (projection_codes([q], s[:1])[0], projection_codes([k, v], s[1:])[0])
    ones = fa.ones_row_width(d) is not None  # (V's copy holds the row sums' ones row where the head dim has room, as the lowering's)
    v8 = fa.quantize_heads(v, s[2], keys_contiguous=True, ones_row=ones)
    out_scale = (reference.qattention(q, k, v, *s, sm_scale=d ** -0.5, out_dtype=torch.bfloat16).float().abs().amax() / 448).reshape(())
    ref = reference.qattention(q, k, v, *s, sm_scale=d ** -0.5, out_dtype=torch.bfloat16, out_scale=out_scale).float() * out_scale

    def call():
        return fa.fp8_attention(q8, k8, v8, *s, sm_scale=d ** -0.5, out_dtype=torch.bfloat16, out_scale=out_scale, v_ones_dim=d if ones else 0)

    row: dict = {"model": model, "shape": [b, h, sq, sk, d], "configs": {}}
    production, env = fa._kernel, os.environ.get(fa.SOFTMAX_ENV)
    try:
        for mode, cfg in [(m, c) for m in (modes or [None]) for c in [None, *configs]]:  # cfg None: the autotuner over CONFIG_TABLE
            name = ("autotuned" if cfg is None else "x".join(map(str, cfg))) + ("" if mode is None else f" {mode}")
            if mode is not None:
                os.environ[fa.SOFTMAX_ENV] = mode
            fa._kernel = production if cfg is None else autotuned(fa.fp8_attention_kernel, [fa._cfg(*cfg)], fa._KEY)
            try:
                out = call().float() * out_scale
                row["configs"][name] = {"us": round(cuda_graph_timer(call), 1), "sqnr_vs_reference_db": round(sqnr_db(ref, out), 1)}
            except Exception as e:  # noqa: BLE001 (recorded in the row and printed, not swallowed)
                row["configs"][name] = {"error": f"{type(e).__name__}: {str(e).strip()[:200]}"}
                print(f"{model} {row['shape']} {name}: {row['configs'][name]['error']}", file=sys.stderr, flush=True)
    finally:
        fa._kernel = production
        if env is None:
            os.environ.pop(fa.SOFTMAX_ENV, None)
        else:
            os.environ[fa.SOFTMAX_ENV] = env
    timed = {n: c["us"] for n, c in row["configs"].items() if "us" in c and not n.startswith("autotuned")}
    row["best"] = min(timed, key=timed.get) if timed else None
    return row


def table(rows: list[dict]) -> str:
    names = list(dict.fromkeys(n for r in rows for n in r["configs"]))
    lines = ["| model | B, H, Sq, Sk, D | " + " | ".join(f"{n} us (dB)" for n in names) + " | best |",
             "| --- | --- |" + " --- |" * (len(names) + 1)]
    for r in rows:
        cells = []
        for n in names:
            c = r["configs"].get(n, {})
            cells.append(f"{c['us']} ({c['sqnr_vs_reference_db']})" if "us" in c else ("failed" if "error" in c else "-"))
        lines.append(f"| {r['model']} | {', '.join(map(str, r['shape']))} | " + " | ".join(cells) + f" | {r['best']} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="attention_configs.json", help="JSON file to write")
    p.add_argument("--models", default="DiT,PixArt", help="comma-separated substrings of model names, case-insensitive (default: DiT,PixArt)")
    p.add_argument("--candidates", action="store_true", help="also time the configs outside the table (CANDIDATES)")
    p.add_argument("--softmax", default="", help="comma-separated softmax modes to time each config under (default: the environment's)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("attention_config_sweep: needs a CUDA GPU", file=sys.stderr)
        return 2
    fa = importlib.import_module("qcompile.lowering.kernels.fp8_attention")
    configs = [tuple(c) for c in fa.CONFIG_TABLE] + (CANDIDATES if args.candidates else [])
    modes = [m.strip() for m in args.softmax.split(",") if m.strip()] or None
    bad = [m for m in modes or [] if m not in fa.SOFTMAX_MODES]
    if bad:
        p.error(f"--softmax: unknown mode(s) {', '.join(bad)}; expected {', '.join(fa.SOFTMAX_MODES)}")
    dev = torch.device("cuda")
    rows = measure_shapes(args.models, lambda *shape: sweep_shape(*shape, configs, dev, modes), args.out, dev,
                          lambda row: f"{row['model']} done: best {row['best']}")
    print(table(rows))
    return 1 if any("error" in c for r in rows for c in r["configs"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())

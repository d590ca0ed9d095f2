"""Residual add + LayerNorm + modulation + fp8 quantization: our kernel against what Inductor generates. GPU, ~1 min:

    PYTHONPATH=/tmp/site python examples/norm_bench.py [--out norm_bench.json] [--code-dir DIR]

At DiT-XL/2 (batch 8 x 1024 tokens) and PixArt-alpha 1024 px (2 x 4096) rows of 1152 channels, times (CUDA graphs
through ``triton.testing.do_bench_cudagraph``) three ways of computing the block boundary our fp8 graphs run
between two GEMMs:

- ``inductor``: the bf16 block code (``gate * y + h``, ``layer_norm``, ``* (1 + scale) + shift``) followed by the
  static fp8 quantization (``/ scale``, clamp, cast) compiled by ``torch.compile`` (default mode), as in our graphs;
- ``inductor-cd``: the same with Inductor's coordinate-descent tuning;
- ``qdiff``: ``qdiff::add_norm_modulate_fp8`` (lowering/kernels/norm_quant.py), autotuned.

Prints us per call, the bytes each must move (h and y read, the new h and the fp8 codes written) as GB/s, and the
SQNR of each fp8 output against the fp32 reference (lowering/reference.py). ``--code-dir``: Inductor's generated code
for each shape (the kernels it picked), to read why it is slower or faster.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
import triton.testing

from qcompile.lowering import reference
from qcompile.lowering.kernels import add_norm_modulate_fp8
from qcompile.metrics import sqnr_db

SHAPES = {"dit-xl-2-512": (8, 1024, 1152), "pixart-alpha-1024": (2, 4096, 1152)}
EPS = 1e-6


def block_boundary(h, y, gate, scale, shift, a_scale):
    """The models' bf16 code between two GEMMs, with our graphs' static fp8 quantization after it."""
    x = gate[:, None] * y + h
    m = F.layer_norm(x, (x.shape[-1],), eps=EPS) * (1 + scale[:, None]) + shift[:, None]
    return x, (m.float() / a_scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)


def inputs(B: int, S: int, C: int):
    g = torch.Generator().manual_seed(0)
    h, y = (torch.randn(B, S, C, generator=g) * s for s in (2.0, 1.0))
    chunk = (torch.randn(B, 6 * C, generator=g) * 0.3).cuda().bfloat16().chunk(6, dim=1)  # views of the adaLN chunk
    return h.cuda().bfloat16(), y.cuda().bfloat16(), chunk[2], chunk[1], chunk[0], torch.tensor(6.0 / 448, device="cuda")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--code-dir", help="write Inductor's generated code per shape here")
    args = p.parse_args()
    from torch._inductor.utils import run_and_get_code

    results = []
    for model, (B, S, C) in SHAPES.items():
        a = inputs(B, S, C)
        _, want = reference.add_norm_modulate_fp8(*a, eps=EPS)
        moved = B * S * C * (2 + 2 + 2 + 1)  # bytes: h, y read; h written (bf16); codes written (fp8)
        torch._dynamo.reset()
        default = torch.compile(block_boundary)
        _, code = run_and_get_code(default, *a)
        if args.code_dir:
            Path(args.code_dir).mkdir(parents=True, exist_ok=True)
            Path(args.code_dir, f"{model}.py").write_text("\n\n".join(code))
        tuned = torch.compile(block_boundary, options={"coordinate_descent_tuning": True})
        ways = {"inductor": default, "inductor-cd": tuned, "qdiff": lambda *t: add_norm_modulate_fp8(*t, eps=EPS)}
        row = {"model": model, "shape": [B, S, C], "bytes": moved}
        for name, fn in ways.items():
            _, q = fn(*a)
            us = triton.testing.do_bench_cudagraph(lambda: fn(*a), rep=200) * 1e3
            row[name] = {"us": round(us, 2), "GB/s": round(moved / us / 1e3, 1), "sqnr_db": round(sqnr_db(want.float(), q.float()), 2)}
        results.append(row)
        print(json.dumps(row), flush=True)
    print(f"torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

"""Where a bench model's weight bytes go under a group-wise int4 preset: linear / conv weights against the rest (CPU).

    python examples/weight_bytes.py dit-xl-2-512 [--group-size 64]

Builds the ``qdiff bench`` model (random init) and splits its parameters into the weights of ``nn.Linear`` /
``nn.Conv2d`` modules (what the quantizer covers) and the rest (norms, biases, embedding tables, ...; kept in bf16),
and prints each part's bytes in bf16 and at int4 with one fp32 scale per ``group_size`` weights (the storage of the
``w4a16`` / ``w4a8`` presets, before their 8-bit first / last layers), as fractions of the bf16 model. The largest
parameters outside the quantized weights are listed: those are what int4 storage cannot shrink.
"""

from __future__ import annotations

import argparse

import torch

from qcompile import bench


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", choices=list(bench.MODELS))
    p.add_argument("--group-size", type=int, default=64)
    args = p.parse_args()
    model = bench.MODELS[args.model].build()
    covered = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    params = dict(model.named_parameters())
    weights = sum(p.numel() for n, p in params.items() if n in covered)
    rest = {n: p.numel() for n, p in params.items() if n not in covered}
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    bf16 = 2 * sum(p.numel() for p in params.values()) + buffers
    int4_weights = weights * (0.5 + 4 / args.group_size)
    scales = weights * 4 / args.group_size
    print(f"{args.model}: {sum(p.numel() for p in params.values()) / 1e6:.1f} M parameters, {weights / 1e6:.1f} M in linear / conv "
          f"weights, {sum(rest.values()) / 1e6:.1f} M elsewhere; bf16 model {bf16 / 2**30:.3f} GiB (buffers {buffers / 2**20:.1f} MiB)")
    print(f"  int4 weights, group {args.group_size}: {int4_weights / 2**30:.3f} GiB ({int4_weights / bf16:.3f}x), of which fp32 "
          f"scales {scales / 2**30:.3f} GiB ({scales / bf16:.3f}x)")
    print(f"  the rest in bf16: {2 * sum(rest.values()) / 2**30:.3f} GiB ({2 * sum(rest.values()) / bf16:.3f}x)")
    total = int4_weights + 2 * sum(rest.values()) + buffers
    print(f"  total {total / 2**30:.3f} GiB = {total / bf16:.3f}x of bf16 (with fp16 scales: {(total - scales / 2) / bf16:.3f}x)")
    for name, n in sorted(rest.items(), key=lambda kv: -kv[1])[:5]:
        print(f"  largest outside: {name} ({n / 1e6:.2f} M)")


if __name__ == "__main__":
    main()

"""A/B of sibling fusion at the kernel level (CUDA): three fp8 GEMMs M x K x N vs one M x K x 3N (q / k / v).

    python examples/sibling_gemm_ab.py --m 8192 --k 1152 --n 1152 --members 3

Times the production fp8 path (input already fp8, as ``passes.act_quant`` places it after a LayerNorm) with
``triton.testing.do_bench`` inside CUDA graphs, and checks that the fused output's columns equal the separate outputs.
"""

from __future__ import annotations

import argparse
import json

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--m", type=int, default=8192)
    p.add_argument("--k", type=int, default=1152)
    p.add_argument("--n", type=int, default=1152)
    p.add_argument("--members", type=int, default=3)
    a = p.parse_args()
    from triton.testing import do_bench_cudagraph

    from qcompile.lowering.kernels.fp8_linear import fp8_linear_prequant

    dev, fp8 = torch.device("cuda"), torch.float8_e4m3fn
    torch.manual_seed(0)
    x = (torch.randn(a.m, a.k, device=dev) * 4).clamp(-448, 448).to(fp8)
    ws = [(torch.randn(a.n, a.k, device=dev) * 4).clamp(-448, 448).to(fp8) for _ in range(a.members)]
    ss = [torch.rand(a.n, 1, device=dev) * 1e-3 + 1e-4 for _ in range(a.members)]
    bs = [torch.randn(a.n, device=dev) for _ in range(a.members)]
    s = torch.tensor(0.01, device=dev)
    w, sc, b = torch.cat(ws), torch.cat(ss), torch.cat(bs)
    separate = lambda: [fp8_linear_prequant(x, wi, si, bi, s, torch.bfloat16) for wi, si, bi in zip(ws, ss, bs)]  # noqa: E731
    fused = lambda: fp8_linear_prequant(x, w, sc, b, s, torch.bfloat16).split(a.n, dim=-1)  # noqa: E731
    same = all(torch.equal(u, v) for u, v in zip(separate(), fused()))
    t_sep, t_fused = do_bench_cudagraph(separate), do_bench_cudagraph(fused)
    flops = 2 * a.m * a.k * a.n * a.members
    print(json.dumps({"device": torch.cuda.get_device_name(), "shape": [a.m, a.k, a.n, a.members], "separate_us": round(t_sep * 1e3, 1),
                      "fused_us": round(t_fused * 1e3, 1), "fused_tflops": round(flops / t_fused / 1e9, 1), "bit_identical": same}))


if __name__ == "__main__":
    main()

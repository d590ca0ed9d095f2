"""Probe of the TMA configs that returned non-finite output in the H200 sweep (triton 3.6): bf16 input quantized after
the TMA load, 128x256x128, 3 stages, 8 warps, without FLATTEN (plain and warp-specialized). GPU, < 1 min:

    PYTHONPATH=/tmp/site python examples/fp8_tma_wrong_config.py

For the suspect config and neighbours (FLATTEN on, 2 stages, 128x128 / 128x256x64 tiles, and the same configs on fp8
input) it prints the fraction of output elements left NaN (the output is pre-filled with NaN: unwritten or
non-finite), the relative error of the finite ones against the reference, and the compiled kernels' shared memory,
registers and spills. On triton 3.9 (AOT, sm_90) the suspect config compiles to 176 KB of shared memory and no
spills, so the sweep's failure is not an over-subscribed resource caught at launch.
"""

import torch

from qcompile.lowering import reference
from qcompile.lowering.kernels import fp8_tma
from qcompile.lowering.kernels.fp8_linear import quantize_input_fp8
from qcompile.lowering.weights import quantize_weight

CONFIGS = [  # (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps, FLATTEN, WARP_SPEC); the first and fifth were wrong in the sweep
    (128, 256, 128, 3, 8, False, False), (128, 256, 128, 3, 8, True, False), (128, 256, 128, 2, 8, False, False),
    (128, 128, 128, 3, 8, False, False), (128, 256, 128, 3, 8, False, True), (128, 256, 64, 3, 8, False, False),
]


def main() -> None:
    fp8_tma.ensure_allocator()
    M, K, N = 8192, 1152, 1152
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, K, generator=g).cuda().to(torch.bfloat16)
    qw = quantize_weight(torch.randn(N, K, generator=g) * K**-0.5, "fp8_e4m3", "linear", clip_search=False)
    w, ws = qw.data.cuda().view(torch.float8_e4m3fn), qw.scale.cuda().reshape(-1).contiguous()
    s = (x.float().abs().amax() / 448).reshape(())
    zero = torch.zeros((), dtype=torch.int32, device="cuda")
    ref = reference.qlinear(x.float(), qw.data.cuda(), qw.scale.cuda(), None, s, zero, wfmt="fp8_e4m3", group_size=None,
                            weight_shape=qw.shape, afmt="fp8_e4m3")
    for xin, name in ((x, "bf16"), (quantize_input_fp8(x, s), "fp8")):
        for bm, bn, bk, st, wp, fl, wsp in CONFIGS:
            out = torch.full((M, N), float("nan"), device="cuda", dtype=torch.bfloat16)
            err = None
            try:
                fp8_tma.launch(xin, w, ws, None, s, out, 0, block_m=bm, block_n=bn, block_k=bk, group_m=8, num_warps=wp,
                               num_stages=st, flatten=fl, warp_spec=wsp)
                torch.cuda.synchronize()
            except Exception as e:  # noqa: BLE001 - a probe: report and go on
                err = f"{type(e).__name__}: {str(e)[:200]}"
            fin = torch.isfinite(out)
            rel = ((out.float() - ref)[fin].norm() / ref[fin].norm()).item() if fin.any() else float("nan")
            print(f"{name} input {bm}x{bn}x{bk} s{st} w{wp} flatten={fl} warp_spec={wsp}: non-finite fraction "
                  f"{1 - fin.float().mean().item():.4f}, rel err of the finite {rel:.2e}, error {err}", flush=True)
    for cache in fp8_tma.fp8_linear_tma_kernel.device_caches.values():
        for key, k in cache[0].items():
            print("compiled:", "shared", getattr(k.metadata, "shared", "?"), "regs", getattr(k, "n_regs", "?"), "spills",
                  getattr(k, "n_spills", "?"), str(key)[:200])


if __name__ == "__main__":
    main()

"""Which GEMM configs write fp8 attention heads correctly on this GPU (lowering/heads.py, ``store_heads``). GPU, ~1 min:

    PYTHONPATH=/tmp/site python examples/heads_store_check.py [--out heads_check.json]

The exact case of ``tests/lowering/kernels/test_fp8_linear_heads.py`` (integer codes, power-of-two scales: every step
exact, so the buffer must equal the reference byte for byte) on each config of the tiled kernel's tables and of the
persistent TMA kernel (with and without FLATTEN). Each autotuned kernel is given one config at a time, so the launch is
the production one (the TMA heads launch's autotuner, ``fp8_tma._prod_heads``, is given every production config). Prints, per run, the wrong bytes in the q / k region and in the V region and the first
wrong V position (batch, V column, key); the output is pre-filled with 0x7f (fp8 NaN) so unwritten bytes count.
"""

from __future__ import annotations

import argparse
import importlib
import json

import torch
import triton

from qcompile.lowering.heads import FP8, HeadsLayout, exact_case, reference_heads
from qcompile.lowering.kernels import fp8_tma
from qcompile.lowering.kernels._common import direct

fp8_linear = importlib.import_module("qcompile.lowering.kernels.fp8_linear")  # (the package exports a function of that name)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # (cpu: Triton's interpreter, TRITON_INTERPRET=1, a check of the script)


def wrong_bytes(got: torch.Tensor, want: torch.Tensor, lay: HeadsLayout) -> dict:
    """Wrong bytes of the q / k region and of the V region (key padding excluded), and the first wrong V entry."""
    bad = got.view(torch.uint8) != want.view(torch.uint8)
    vt = bad[lay.vt_offset:].view(lay.batch, lay.n_vt, lay.seq_pad)[:, :, : lay.seq]
    first = vt.nonzero()[:1].tolist()
    return {"qk_wrong": int(bad[: lay.vt_offset].sum()), "v_wrong": int(vt.sum()), "first_v_wrong": first[0] if first else None}


def run(kernel, cfg: triton.Config, lay: HeadsLayout, case, x_fp8: bool, launch) -> dict:
    """One launch of ``kernel`` (an autotuner) restricted to ``cfg``; wrong bytes against the reference."""
    x8, w8, ws, bias, a_scale, out_scale, y = case
    kernel.configs, saved = [cfg], kernel.configs
    kernel.cache.clear()
    try:
        got = launch(x8, w8, ws, bias, a_scale, out_scale, lay, x_fp8)
        if DEVICE == "cuda":
            torch.cuda.synchronize()
    finally:
        kernel.configs = saved
        kernel.cache.clear()
    return wrong_bytes(got, reference_heads(y, out_scale, lay), lay)


def _poisoned(lay: HeadsLayout) -> torch.Tensor:
    """The heads buffer pre-filled with 0x7f (fp8 NaN): bytes the kernel does not write count as wrong."""
    return torch.full((lay.numel,), 0x7F, dtype=torch.uint8, device=DEVICE).view(FP8)


def launch_tiled(x8, w8, ws, bias, a_scale, out_scale, lay, x_fp8):
    x = x8.to(FP8) if x_fp8 else (x8 * a_scale).to(torch.bfloat16)
    return fp8_linear.launch_tiled(x, w8.to(FP8), ws, bias, a_scale, None, 0, x_fp8, out_scale, _poisoned(lay), direct, heads=lay)


def launch_tma(x8, w8, ws, bias, a_scale, out_scale, lay, x_fp8):
    return fp8_tma.launch_autotuned(x8.to(FP8), w8.to(FP8), ws, bias, a_scale, _poisoned(lay), 0, out_scale, direct,
                                    {"HEADS": True, **lay.kernel_args()})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args()
    results = []
    small = HeadsLayout(batch=2, seq=20, n_rm=2 * 72, n_vt=72, head_dim=72, head_width=128)  # tiled: 40 x 64 x 216
    big = HeadsLayout(batch=2, seq=1024, n_rm=2 * 4 * 72, n_vt=4 * 72, head_dim=72, head_width=128)  # TMA: 2048 x 512 x 864
    runs = []
    for name, table in (("small", fp8_linear.SMALL_M_CONFIGS), ("large_prequant", fp8_linear.PREQUANT_CONFIGS[:2])):
        lay = small if name == "small" else big
        for cfg in table:
            runs += [("tiled " + name, fp8_linear._KERNELS[name], cfg, lay, True, launch_tiled)]
    for cfg in fp8_tma.PROD_CONFIGS:
        for flatten in (True, False):
            c = triton.Config({**cfg.kwargs, "FLATTEN": flatten}, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
            runs += [("tma", fp8_tma._prod_heads, c, big, True, launch_tma)]
    cases = {lay: exact_case(lay.rows, 64 if lay is small else 512, lay.columns, device=DEVICE) for lay in (small, big)}
    if DEVICE == "cuda":
        fp8_tma.ensure_allocator()
    for kind, kernel, cfg, lay, x_fp8, launch in runs:
        try:
            r = run(kernel, cfg, lay, cases[lay], x_fp8, launch)
        except Exception as e:  # noqa: BLE001 (a config that fails to compile or launch is reported, not fatal)
            r = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
        row = {"kernel": kind, "config": {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}, "M": lay.rows, **r}
        results.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()

"""Where one denoising step spends its GPU time: kernel time per category, per bench variant (GPU).

    PYTHONPATH=/tmp/site python examples/profile_step.py dit-xl-2-512 bf16-inductor qdiff-w8a8-fp8 --out prof.json

Each variant is prepared exactly as ``qdiff bench`` prepares its row (same model, inputs, calibration, compile
options), run until warm, then ``torch.profiler`` records ``--steps`` steps. Kernel names are sorted into
categories (qdiff GEMM / conv kernels, cuBLAS GEMMs, cuDNN convolutions, attention, Inductor-generated Triton,
other) and summed per step; ``busy`` is the summed kernel time, ``wall`` the step's host-measured time, so
``wall - busy`` is time the GPU sat idle (launch / host overhead, or overlap when negative). Prints one table
per variant plus the top kernels, and writes everything as JSON (``--plot``: a stacked bar chart; ``--replot``
redraws it from earlier JSON files without a GPU).

Several profiles can run side by side (one GPU): give them one ``QDIFF_BENCH_ROWS`` folder and start each with
``setsid`` (its own process group), and each profiled window then runs alone, the others paused, as ``qdiff bench``
times its rows; graphs' first calls hold the host too (autotuning). ``busy_median_ms`` sums each kernel's median
duration times its calls, which a stray overlap does not move.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import time
from collections import defaultdict

import torch

from qcompile import bench

CATEGORIES = (  # first match wins; the names are those of the kernels as the profiler reports them
    ("qdiff kernels", re.compile(r"fp8_linear|int8_linear|conv2d_kernel|weight_only|w4a8|w4_linear|splitk|im2col_kernel|fp8_attention")),
    # Inductor's names list the fused aten ops ("..._convolution_..." when a conv's epilogue is fused): before cuDNN's
    ("Inductor Triton", re.compile(r"^triton_(poi|red|per|tem)_")),
    ("attention", re.compile(r"flash|fmha|attention|sdpa|softmax", re.I)),
    ("cuBLAS / CUTLASS GEMM", re.compile(r"gemm|nvjet|cutlass|sm90_xmma|cublas", re.I)),
    ("cuDNN conv", re.compile(r"conv|fprop|implicit_convolve|dgrad|winograd", re.I)),
)


def category(name: str) -> str:
    """The category of one kernel name (``other`` when nothing matches)."""
    for label, pattern in CATEGORIES:
        if pattern.search(name):
            return label
    return "other"


def profile_variant(model_name: str, variant: str, steps: int, code_out: str | None = None) -> dict:
    """Prepare one bench row's callable, warm it up and profile ``steps`` steps; ``code_out``: write the
    Inductor output code of the first (compiling) call there."""
    spec = bench.MODELS[model_name]
    dev = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    with torch.device(dev):
        model = spec.build()
    model = model.to(dev, torch.bfloat16).eval()
    row = bench.Row(model_name, variant)
    rows_dir = os.environ.get(bench.ROWS_ENV)
    with torch.no_grad():
        runnable = bench._prepare_variant(variant, model, spec, dev, torch.bfloat16, row, rows_dir)
        inputs = spec.inputs(dev, torch.bfloat16, 500)
        if code_out:
            from torch._inductor.utils import run_and_get_code

            _, codes = run_and_get_code(runnable, **inputs)
            with open(code_out, "w") as f:
                f.write("\n\n# ---- next graph ----\n\n".join(codes))
        for _ in range(3):
            runnable(**inputs)
        torch.cuda.synchronize()
        with bench._alone_on_host(rows_dir):  # (no-op without QDIFF_BENCH_ROWS)
            t0 = time.perf_counter()
            for _ in range(steps):
                runnable(**inputs)
            torch.cuda.synchronize()
            wall_ms = (time.perf_counter() - t0) * 1e3 / steps
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(steps):
                    runnable(**inputs)
                torch.cuda.synchronize()
    durations: dict[str, list[float]] = defaultdict(list)  # ms of each launch
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            durations[ev.name].append(ev.device_time / 1e3)
    per_kernel = {name: [sum(ds) / steps, len(ds)] for name, ds in durations.items()}  # ms per step, launches
    per_cat: dict[str, float] = defaultdict(float)
    for name, (ms, _) in per_kernel.items():
        per_cat[category(name)] += ms
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:40]
    return {
        "model": model_name,
        "variant": variant,
        "wall_ms": wall_ms,
        "busy_ms": sum(per_cat.values()),
        "busy_median_ms": sum(statistics.median(ds) * len(ds) for ds in durations.values()) / steps,
        "categories_ms": dict(sorted(per_cat.items(), key=lambda kv: -kv[1])),
        "kernels_per_step": sum(c for _, c in per_kernel.values()) / steps,
        "top_kernels": [{"name": n[:140], "ms": ms, "median_us": statistics.median(durations[n]) * 1e3, "calls_per_step": c / steps, "category": category(n)} for n, (ms, c) in top],
        "quantized_ops": row.quantized_ops,
    }


def plot(results: list[dict], path: str) -> None:
    """One horizontal bar per profiled variant, stacked by kernel category (ms per step), wall time marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['model']}\n{r['variant']}" + (f" ({r['note']})" if r.get("note") else "") for r in results]
    cats = [c for c, _ in CATEGORIES] + ["other"]
    fig, ax = plt.subplots(figsize=(11, 1.2 + 0.7 * len(results)))
    left = [0.0] * len(results)
    for cat in cats:
        widths = [r["categories_ms"].get(cat, 0.0) for r in results]
        ax.barh(labels, widths, left=left, label=cat)
        left = [a + b for a, b in zip(left, widths)]
    ax.scatter([r["wall_ms"] for r in results], labels, marker="|", s=400, color="black", label="wall (host-timed step)", zorder=3)
    ax.invert_yaxis()
    ax.set_xlabel("ms per step (GPU kernel time by category)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), markerscale=0.4)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    """Profile each variant of one model and print the tables."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", choices=sorted(bench.MODELS))
    p.add_argument("variants", nargs="*", help=f"one or more of {', '.join(bench.VARIANTS)}")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--out", default=None)
    p.add_argument("--code-dir", default=None, help="write each variant's Inductor output code here")
    p.add_argument("--plot", default=None, help="write a stacked bar chart of the categories (PNG)")
    p.add_argument("--replot", nargs="+", default=None, metavar="JSON", help="only plot earlier --out files (no GPU)")
    args = p.parse_args()
    if args.replot:
        plot([r for f in args.replot for r in json.load(open(f))], args.plot or "profile.png")
        return
    if not args.model or not args.variants:
        p.error("give a model and at least one variant (or --replot JSON...)")
    unknown = [v for v in args.variants if v not in bench.VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; choose from {', '.join(bench.VARIANTS)}")
    if not torch.cuda.is_available():
        raise SystemExit("profile_step.py needs a CUDA GPU")
    results = []
    with bench._registered(os.environ.get(bench.ROWS_ENV)):
        _profile_all(args, results)
    if args.plot:
        plot(results, args.plot)


def _profile_all(args: argparse.Namespace, results: list[dict]) -> None:
    for variant in args.variants:
        torch._dynamo.reset()
        code = f"{args.code_dir}/{args.model}.{variant}.py" if args.code_dir else None
        if code:
            os.makedirs(args.code_dir, exist_ok=True)
        r = profile_variant(args.model, variant, args.steps, code)
        results.append(r)
        print(f"\n## {args.model} {variant}: wall {r['wall_ms']:.2f} ms/step, kernels busy {r['busy_ms']:.2f} ms "
              f"(medians x calls: {r['busy_median_ms']:.2f} ms), "
              f"{r['kernels_per_step']:.0f} kernels/step, quantized {r['quantized_ops']}")
        for cat, ms in r["categories_ms"].items():
            print(f"  {cat:24s} {ms:8.3f} ms")
        for k in r["top_kernels"][:12]:
            print(f"    {k['ms']:7.3f} ms  x{k['calls_per_step']:5.1f}  [{k['category']}] {k['name'][:100]}")
        if args.out:  # (after each variant: a later one may run out of time)
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()

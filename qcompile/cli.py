"""The ``qdiff`` command line: ``demo`` (the main job), ``eval`` (quality report), ``inspect`` (a plan)."""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch

from . import __version__


def _shared_cases() -> dict:
    """The evaluation cases built on the trained models in ../shared (empty when it is absent)."""
    from .evaluate import EvalCase
    from .zoo import ddim_sample, flow_sample, load_mnist_unet, load_mnist_vit, shared_dir

    if shared_dir() is None:
        return {}

    def labels(n):
        return torch.arange(n) % 10

    def flow(m, noise):
        return flow_sample(m, noise, labels(noise.shape[0]), num_steps=50)

    return {
        "mnist_unet": EvalCase("mnist_unet", load_mnist_unet, lambda m, n: ddim_sample(m, n, num_steps=50), (1, 28, 28), classifier="mnist"),
        "mnist_vit": EvalCase("mnist_vit", load_mnist_vit, flow, (1, 28, 28), classifier="mnist", labels=labels),
    }


def _eval_cases() -> dict:
    """Every model ``qdiff eval`` knows: the bundled CIFAR-10 models, and the ../shared ones when present."""
    from .evaluate import EvalCase
    from .zoo.bundled import bundled_dir, ddim_sampler, dit_sampler, load_cifar10_dit, load_unet

    cases = {
        "cifar10_ddpm": EvalCase(
            "cifar10_ddpm", lambda: load_unet(bundled_dir("cifar10_ddpm")), ddim_sampler(bundled_dir("cifar10_ddpm")), (3, 32, 32), (-1.0, 1.0),
            classifier="cifar10",
        ),
        # dit_sampler's labels cycle through the classes 0..9
        "cifar10_dit": EvalCase("cifar10_dit", load_cifar10_dit, dit_sampler(), (3, 32, 32), (-1.0, 1.0), classifier="cifar10", labels=lambda n: torch.arange(n) % 10),
    }
    cases.update(_shared_cases())
    return cases


def _no_shared() -> int:
    print(
        "qdiff: the trained models in ../shared were not found; set QDIFF_SHARED to the folder that holds "
        "models/mnist_unet_ddpm (see README.md)",
        file=sys.stderr,
    )
    return 2


def _fd_summary(r) -> str:
    if r.fd_real is None:
        return ""
    cc = "" if r.class_consistency is None else f"  class cons. {r.class_consistency:.3f}"
    return f"  FD real {r.fd_real:.2f} (FP32 {r.fp32_fd_real:.2f})  FD vs FP32 {r.fd_fp32:.2f}{cc}"


def _save_partial(results: list, out: Path) -> None:
    """Rows so far as ``quality.partial.json`` (a run cut short keeps them; ``--report-from`` reads it)."""
    from dataclasses import asdict
    import json

    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.partial.json").write_text(json.dumps([asdict(r) for r in results], indent=1) + "\n")


def cmd_eval(args: argparse.Namespace) -> int:
    """Quality of every variant on the chosen models; writes quality.md / quality.json / plots."""
    from .evaluate import describe_run, evaluate_case, experiments, load_results, variants, write_report

    command = "qdiff " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    notes = Path(args.notes).read_text() if args.notes else ""
    if args.report_from:  # assemble one report from the quality.json of earlier runs (e.g. one per model)
        missing = [p for p in args.report_from if not Path(p).is_file()]
        if missing:
            print(f"qdiff eval: --report-from: no such file(s) {missing}", file=sys.stderr)
            return 2
        path = write_report(load_results([Path(p) for p in args.report_from]), Path(args.out), args.report_command or command, notes, args.report_run)
        print(f"wrote {path}")
        return 0
    if args.device.startswith("cuda"):  # FP32 means FP32: no TF32 matmuls or convs in the reference
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    cases = _eval_cases()
    unknown = set(args.models) - set(cases)
    if unknown:
        hint = "" if "mnist_unet" in cases else " (the mnist models need ../shared: set QDIFF_SHARED)"
        print(f"qdiff eval: unknown model(s) {sorted(unknown)}; choose from {sorted(cases)}{hint}", file=sys.stderr)
        return 2
    configs = variants()
    if args.configs:
        known = {**configs, **experiments()}
        missing = [c for c in args.configs if c not in known]
        if missing:
            print(f"qdiff eval: unknown config(s) {missing}; choose from {sorted(known)}", file=sys.stderr)
            return 2
        configs = {k: known[k] for k in args.configs}
    results = []
    for name in args.models:
        print(f"qdiff eval: {name} ({len(configs)} variants, {args.seeds} seeds)", flush=True)
        for r in evaluate_case(cases[name], configs, args.seeds, args.calib_samples, progress=not args.quiet, device=args.device, lowering=args.lowering,
                                plans_dir=Path(args.plans) if args.plans else None):
            print(f"  {r.config:18s} SQNR mean {r.sqnr_mean_db:6.2f} dB  worst {r.sqnr_worst_db:6.2f} dB (step {r.worst_step})  "
                  f"PSNR {r.psnr_db:6.2f} dB  SSIM {r.ssim:.4f}" + _fd_summary(r), flush=True)
            results.append(r)
            _save_partial(results, Path(args.out))
    path = write_report(results, Path(args.out), command, notes, describe_run(args.device, args.lowering))
    print(f"wrote {path}")
    return 0


def _unet_folder_case(name: str, folder: Path, steps: int):
    """An eval case for a diffusers UNet2DModel pipeline folder (``save_pretrained`` output)."""
    from .evaluate import EvalCase
    from .zoo.bundled import ddim_sampler, load_unet

    model = load_unet(folder)
    size = model.config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    return EvalCase(name, lambda: model, ddim_sampler(folder, steps), (model.config.in_channels, *size), (-1.0, 1.0))


def cmd_demo(args: argparse.Namespace) -> int:
    """Calibrate, quantize and sample a model; write a grid, a layer table and a report."""
    from .demo import run_demo
    from .zoo.bundled import bundled_dir

    if args.model == "mnist":
        cases = _shared_cases()
        if not cases:
            return _no_shared()
        case = cases["mnist_unet"]
    elif args.model == "cifar10_ddpm":
        case = _unet_folder_case("cifar10_ddpm (bundled)", bundled_dir("cifar10_ddpm"), args.steps)
    else:
        from .pipeline_demo import PipelineFolderError, is_unet2d_folder, load_pipeline_case, run_pipeline_demo

        folder = Path(args.model)
        if not is_unet2d_folder(folder):  # DiT / SD / PixArt / ... pipelines run through the pipeline itself
            try:
                pipeline_case = load_pipeline_case(folder, args.steps)
            except PipelineFolderError as e:
                print(f"qdiff demo: {e}", file=sys.stderr)
                return 2
            return run_pipeline_demo(pipeline_case, args.preset, Path(args.out), args.samples, args.calib_samples)
        case = _unet_folder_case(folder.name, folder, args.steps)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("qdiff demo: --device cuda: no CUDA device here", file=sys.stderr)
        return 2
    return run_demo(case, args.preset, Path(args.out), args.samples, args.calib_samples, device)


def cmd_inspect(args: argparse.Namespace) -> int:
    """Print a plan file's table (formats, scales, reasons) after validating it."""
    from .inspect import inspect
    from .plan import QuantPlan

    print(inspect(QuantPlan.load(args.plan)))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Run ``qdiff bench`` (see :mod:`qcompile.bench`)."""
    from .bench import cmd_bench as run

    return run(args)


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    from .bench import add_arguments

    add_arguments(p)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qdiff", description="Post-training quantization compiler for diffusion models.")
    p.add_argument("--version", action="version", version=f"qdiff {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="quantize the default model end to end and write a report folder")
    demo.add_argument("--model", default="cifar10_ddpm", help="cifar10_ddpm (bundled, default), mnist (../shared) or a local diffusers pipeline folder (UNet, DiT, SD, PixArt, ...)")
    demo.add_argument("--steps", type=int, default=50, help="sampling steps (DDIM for UNet2DModel folders, else the pipeline's scheduler; default: 50)")
    demo.add_argument("--preset", default="w8a8-int8", help="quantization preset (default: w8a8-int8)")
    demo.add_argument("--out", default="qdiff-demo", help="output folder (default: ./qdiff-demo)")
    demo.add_argument("--samples", type=int, default=16, help="images to generate (default: 16)")
    demo.add_argument("--calib-samples", type=int, default=16, help="calibration trajectories (default: 16)")
    demo.add_argument("--device", default="auto", help="auto (default: cuda when available, else cpu), cpu or cuda; UNet models")
    demo.set_defaults(func=cmd_demo)

    ev = sub.add_parser("eval", help="per-step SQNR, PSNR, SSIM and a classifier-feature Fréchet distance of every variant against FP32")
    ev.add_argument("--models", nargs="+", default=["mnist_unet", "mnist_vit"])
    ev.add_argument("--configs", nargs="*", help="variants to run (default: the presets, bf16 and naive baselines; also w8a8-int8-smooth, w8-int8-weight-only, w8a8-int8-nosplit, w4a8-nosplit, w4a8-float-tables, w4a16-float-tables, timestep groups w8a8-int8-k{2,5,10}[-seg], w8a8-int8-kauto, w8a8-int8-k10-seg-{outlier,firstlast,outlier-firstlast,outlier-floor25,outlier6-floor25}, w6a8, mixed-4.5a8, mixed-4.5a8-fisher; rate-distortion ablations w5a8, w4g32a8, w4a8-k10, w6a8-k10, mixed-4.5a8-nobf16[-k10[-shared]], mixed-4.5a8-nobf16-fisher, *-gptq / *-learned / *-joint: w4a8-, w6a8-, mixed-4.5a8-, mixed-4.5a8-nobf16[-k10]-)")
    ev.add_argument("--seeds", type=int, default=64, help="evaluation samples, one seed each (default: 64)")
    ev.add_argument("--calib-samples", type=int, default=32, help="calibration trajectories (default: 32)")
    ev.add_argument("--out", default="docs", help="folder for quality.md, quality.json and img/ (default: docs)")
    ev.add_argument("--notes", help="markdown file appended to quality.md")
    ev.add_argument("--plans", help="folder to save every calibrated plan in (<model>_<config>.qplan)")
    ev.add_argument("--quiet", action="store_true", help="no progress bars")
    ev.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]: where models, calibration and sampling run")
    ev.add_argument("--lowering", default="reference", choices=["reference", "triton"], help="quantized ops as the pure-PyTorch reference (default) or the Triton kernels (CUDA)")
    ev.add_argument("--report-from", nargs="+", metavar="JSON", help="write the report from these quality.json files instead of evaluating")
    ev.add_argument("--report-command", help="with --report-from: the command to cite in the report (default: this one)")
    ev.add_argument("--report-run", help="with --report-from: the device / versions line to cite")
    ev.set_defaults(func=cmd_eval)

    bench = sub.add_parser("bench", help="step latency, compile time and memory of bf16, torchao and qdiff variants (GPU)")
    add_bench_arguments(bench)
    bench.set_defaults(func=cmd_bench)

    ins = sub.add_parser("inspect", help="validate a plan file and print its per-op table")
    ins.add_argument("plan")
    ins.set_defaults(func=cmd_inspect)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    code = args.func(args)
    if args.command != "inspect":
        print(f"qdiff {args.command}: done in {time.perf_counter() - t0:.1f} s")
    return code


if __name__ == "__main__":
    sys.exit(main())

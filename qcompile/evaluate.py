"""Quality evaluation: quantized denoisers against the FP32 model, along the FP32 trajectory.

For each (model, variant): the per-step denoiser SQNR where both models see the *same* FP32
trajectory state (mean and worst step), and the final samples of each model's own trajectory
from the same noise compared by PSNR and SSIM. Cases with a ``classifier`` also get a Fréchet distance
in our own classifier's features (vs real images and vs FP32 samples) and, with ``labels``, class
consistency (``qcompile/fdist.py``). Writes JSON, a markdown table and per-step plots.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import json
import math
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .calibrate import calibrate
from .config import AllocationSpec, FirstLastPolicy, Format, QuantConfig, Rounding, WeightSpec
from .fdist import fd_fields, fd_reference, fd_report_lines
from .dispatch import compile as compile_plan
from .metrics import output_tensor, psnr_db, sqnr_db, ssim
from .plan import QuantPlan

Sampler = Callable[[Any, torch.Tensor], torch.Tensor]  # (denoiser, noise) -> final sample
OUTLIER_SPLIT_DB = 1.0  # the experiments' outlier split: taken where it gains more than 1 dB at the op's input


@dataclass
class EvalCase:
    """A model to evaluate: how to build it and how to sample with it."""

    name: str
    build: Callable[[], torch.nn.Module]
    sample: Sampler
    shape: tuple[int, ...]  # one sample's shape (C, H, W)
    data_range: tuple[float, float] = (0.0, 1.0)  # clip final samples to this for PSNR / SSIM
    classifier: str | None = None  # bundled feature classifier for FD / class consistency (qcompile/fdist.py)
    labels: Callable[[int], torch.Tensor] | None = None  # conditioning classes of n samples (class-conditional)


@dataclass
class EvalResult:
    """One row of the quality table."""

    model: str
    config: str
    sqnr_mean_db: float
    sqnr_worst_db: float
    worst_step: int
    psnr_db: float
    ssim: float
    calibration_s: float
    per_step_db: list[float] = field(default_factory=list)
    fd_real: float | None = None  # Fréchet distance (own classifier's features) to held-out real images
    fd_fp32: float | None = None  # ... to the FP32 model's samples from the same noise
    class_consistency: float | None = None  # fraction classified as their conditioning class
    fd_classifier: str | None = None
    fd_samples: int | None = None
    fp32_fd_real: float | None = None  # floor: FP32 samples vs real
    real_fd_real: float | None = None  # floor: fd_samples held-out real images vs the same reference
    fp32_class_consistency: float | None = None


class StepSQNR:
    """A denoiser that follows the FP32 trajectory and records each step's SQNR of ``test``'s output."""

    def __init__(self, reference: Any, test: Callable[..., torch.Tensor]):
        self.reference, self.test, self.sqnr = reference, test, []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        ref = self.reference(*args, **kwargs)
        self.sqnr.append(sqnr_db(output_tensor(ref), output_tensor(self.test(*args, **kwargs))))
        return ref

    def __getattr__(self, name: str) -> Any:
        return getattr(self.reference, name)


class _Bf16:
    """The model in bfloat16: floating inputs cast down, the output cast back to float32."""

    def __init__(self, model: torch.nn.Module):
        self.model = copy.deepcopy(model).to(torch.bfloat16)

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        down = lambda a: a.to(torch.bfloat16) if isinstance(a, torch.Tensor) and a.is_floating_point() else a  # noqa: E731
        out = self.model(*map(down, args), **{k: down(v) for k, v in kwargs.items()})
        return output_tensor(out).float()


def variants() -> dict[str, QuantConfig | None]:
    """The configurations compared: bf16 (None), the naive baselines and the presets."""
    w8, w4 = QuantConfig.preset("w8a8-int8"), QuantConfig.preset("w4a8")
    return {
        "bf16": None,
        "naive-w8a8-int8": w8.naive(),
        "w8a8-int8": w8,
        "w8a8-fp8": QuantConfig.preset("w8a8-fp8"),
        "w8a8-fp8-attn": QuantConfig.preset("w8a8-fp8-attn"),
        "naive-w4a8": w4.naive(),
        "w4a8": w4,
        "w4a16": QuantConfig.preset("w4a16"),
    }


def experiments() -> dict[str, QuantConfig | None]:
    """Extra variants for ablations, selectable by name with ``qdiff eval --configs``."""
    w8, w4 = QuantConfig.preset("w8a8-int8"), QuantConfig.preset("w4a8")
    fisher = AllocationSpec(estimator="fisher")
    out = {"w8a8-int8-smooth": w8.replace(smooth_alpha=0.5, name="w8a8-int8-smooth"), "w8-int8-weight-only": w8.replace(act=None, name="w8-int8-weight-only")}
    for preset in ("w8a8-int8", "w4a8"):  # split-shortcut ablation: the presets split by default
        out[f"{preset}-nosplit"] = QuantConfig.preset(preset).replace(split_shortcuts=False, name=f"{preset}-nosplit")
    for preset in ("w4a8", "w4a16"):  # embedding-table ablation: the w4 presets store tables int8 since 2026-12-03
        out[f"{preset}-float-tables"] = QuantConfig.preset(preset).replace(embedding_tables=None, name=f"{preset}-float-tables")
    for k in (2, 5, 10):  # timestep groups: uniform in step index, and segmented with the same count
        out[f"w8a8-int8-k{k}"] = w8.replace(timestep_groups=k, name=f"w8a8-int8-k{k}")
        out[f"w8a8-int8-k{k}-seg"] = w8.replace(timestep_groups=k, group_boundaries="segment", name=f"w8a8-int8-k{k}-seg")
    out["w8a8-int8-kauto"] = w8.replace(timestep_groups="auto", name="w8a8-int8-kauto")
    seg = out["w8a8-int8-k10-seg"]  # the W8A8 target (issue 4): outlier split, first/last kept, activation floor
    for suffix, changes in {
        "outlier": dict(outlier_split_db=OUTLIER_SPLIT_DB),
        "firstlast": dict(first_last=FirstLastPolicy.SKIP),
        "outlier-firstlast": dict(outlier_split_db=OUTLIER_SPLIT_DB, first_last=FirstLastPolicy.SKIP),
        "outlier-floor25": dict(outlier_split_db=OUTLIER_SPLIT_DB, group_act_floor_db=25.0),
        "outlier6-floor25": dict(outlier_split_db=6.0, group_act_floor_db=25.0),  # split only the heavier tails
    }.items():
        out[f"w8a8-int8-k10-seg-{suffix}"] = seg.replace(**changes, name=f"w8a8-int8-k10-seg-{suffix}")
    out["w6a8"] = w4.replace(weight=WeightSpec(Format.INT6), name="w6a8")  # first/last at 8 bits as in w4a8
    out["mixed-4.5a8"] = w4.replace(weight_bit_budget=4.5, name="mixed-4.5a8")  # rate-distortion bit allocation
    out["mixed-4.5a8-fisher"] = w4.replace(weight_bit_budget=4.5, allocation=fisher, name="mixed-4.5a8-fisher")
    out.update(_rd_variants(w4))
    return out


def _rd_variants(w4: QuantConfig) -> dict[str, QuantConfig]:
    """Bit-allocation ablations: no bf16 candidate (the budget must be met by quantizing every op), INT5 and
    int4 with groups of 32 as finer steps, 10 timestep groups with one allocation per group or one shared."""
    nobf16 = ("int4", "int4g32", "int5", "int6", "int8", "fp8_e4m3")
    out = {
        "w4a8-k10": w4.replace(timestep_groups=10, name="w4a8-k10"),
        "w6a8-k10": w4.replace(weight=WeightSpec(Format.INT6), timestep_groups=10, name="w6a8-k10"),
        "w5a8": w4.replace(weight=WeightSpec(Format.INT5), name="w5a8"),
        "w4g32a8": w4.replace(weight=WeightSpec(Format.INT4, group_size=32), name="w4g32a8"),
    }
    for name, k, per_group in (("mixed-4.5a8-nobf16", 1, False), ("mixed-4.5a8-nobf16-k10", 10, True), ("mixed-4.5a8-nobf16-k10-shared", 10, False)):
        spec = AllocationSpec(candidates=nobf16, per_group=per_group, calls_per_group=4 if k == 1 else 2)  # 20 kept calls with 10 groups
        out[name] = w4.replace(weight_bit_budget=4.5, timestep_groups=k, allocation=spec, name=name)
    for rounding in (Rounding.GPTQ, Rounding.LEARNED, Rounding.JOINT):  # error-compensating / learned rounding of linear weights
        r, weight = rounding.value, dataclasses.replace(w4.weight, rounding=rounding)
        out[f"w4a8-{r}"] = w4.replace(weight=weight, name=f"w4a8-{r}")
        out[f"w6a8-{r}"] = w4.replace(weight=WeightSpec(Format.INT6, rounding=rounding), name=f"w6a8-{r}")
        out[f"mixed-4.5a8-{r}"] = w4.replace(weight_bit_budget=4.5, weight=weight, name=f"mixed-4.5a8-{r}")
        for name in ("mixed-4.5a8-nobf16", "mixed-4.5a8-nobf16-k10"):
            out[f"{name}-{r}"] = out[name].replace(weight=weight, name=f"{name}-{r}")
    longer = dataclasses.replace(out["mixed-4.5a8-nobf16-k10-joint"].weight, joint_iters=4000)  # the joint step's budget doubled
    out["mixed-4.5a8-nobf16-k10-joint4k"] = out["mixed-4.5a8-nobf16-k10"].replace(weight=longer, name="mixed-4.5a8-nobf16-k10-joint4k")
    out["mixed-4.5a8-nobf16-fisher"] = w4.replace(
        weight_bit_budget=4.5, allocation=AllocationSpec(candidates=nobf16, estimator="fisher"), name="mixed-4.5a8-nobf16-fisher"
    )
    return out


@contextlib.contextmanager
def mha_fastpath_off():
    """Run ``nn.TransformerEncoderLayer`` / ``nn.MultiheadAttention`` without their fused eval fast path.

    On torch 2.11, once the batch size changes Dynamo graph-breaks around the fast path, so those
    layers run eagerly in full precision and a quantized ViT measures as if unquantized. Without the
    fast path the layers trace as ordinary linear + attention ops on every torch version, so the
    evaluation quantizes the same graph on 2.11 (GPU) and 2.13 (CPU).
    """
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


def evaluate_case(
    case: EvalCase,
    configs: dict[str, QuantConfig | QuantPlan | None],
    seeds: int,
    calib_samples: int,
    progress: bool = True,
    device: str | torch.device = "cpu",
    lowering: str = "reference",
    plans_dir: Path | None = None,
) -> list[EvalResult]:
    """Evaluate every config on one model: calibrate on its own seeds, test on ``seeds`` others.

    A :class:`QuantPlan` in ``configs`` is used as it is (calibrated elsewhere; calibration time 0).
    ``device`` runs everything there (noise is drawn on the CPU, so seeds mean the same images on
    every device; the caller decides TF32, see ``qdiff eval``); ``lowering`` is the backend's
    ``options["lowering"]`` (``reference``, or ``triton`` for the kernels on CUDA). With ``plans_dir``
    each calibrated plan is saved there as ``<model>_<config>.qplan`` (for ``qdiff inspect`` / bit heatmaps).
    """
    with mha_fastpath_off():
        return _evaluate_case(case, configs, seeds, calib_samples, progress, torch.device(device), lowering, plans_dir)


def _evaluate_case(case: EvalCase, configs: dict, seeds: int, calib_samples: int, progress: bool, device: torch.device, lowering: str,
                   plans_dir: Path | None) -> list[EvalResult]:
    model = case.build().eval().to(device)
    noise = torch.randn(seeds, *case.shape, generator=torch.Generator().manual_seed(0)).to(device)
    calib_noise = torch.randn(calib_samples, *case.shape, generator=torch.Generator().manual_seed(10_000)).to(device)
    lo, hi = case.data_range
    with torch.no_grad():
        reference = case.sample(model, noise).clamp(lo, hi)
    scale = lambda x: (x - lo) / (hi - lo)  # noqa: E731
    dist = fd_reference(case.classifier, scale(reference), case.labels(seeds) if case.labels else None) if case.classifier else None
    results = []
    for name, cfg in configs.items():
        torch._dynamo.reset()  # an evaluation harness: each variant compiles the same model afresh
        t0 = time.perf_counter()
        if cfg is None:
            test: Callable[..., torch.Tensor] = _Bf16(model)
        else:
            plan = cfg if isinstance(cfg, QuantPlan) else calibrate(model, lambda m: case.sample(m, calib_noise), cfg, progress=progress)
            if plans_dir is not None and not isinstance(cfg, QuantPlan):
                Path(plans_dir).mkdir(parents=True, exist_ok=True)
                plan.save(Path(plans_dir) / f"{case.name}_{name}.qplan")
            test = compile_plan(model, plan, inductor=False, lowering=lowering)  # one compiled model serving every timestep group
        calib_s = time.perf_counter() - t0
        with torch.no_grad():
            pair = StepSQNR(model, test)
            case.sample(pair, noise)
            final = case.sample(test, noise).clamp(lo, hi)
        per_step = pair.sqnr
        worst = min(range(len(per_step)), key=per_step.__getitem__)
        results.append(
            EvalResult(
                case.name, name, statistics.mean(per_step), per_step[worst], worst,
                psnr_db(scale(reference), scale(final)), ssim(scale(reference), scale(final)), calib_s, per_step,
                **fd_fields(dist, scale(final)),
            )
        )
    return results


def _fmt(v: float) -> str:
    return "inf" if math.isinf(v) else f"{v:.2f}"


def _opt(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def load_results(paths: list[Path]) -> list[EvalResult]:
    """Rows of earlier ``quality.json`` files (to assemble one report from several runs).

    Rows keep the order in which (model, config) first appears; a pair measured again in a later
    file replaces the earlier row.
    """
    rows: dict[tuple[str, str], EvalResult] = {}
    for path in paths:
        for row in json.loads(Path(path).read_text()):
            r = EvalResult(**row)
            rows[(r.model, r.config)] = r  # a re-measured pair keeps its first position, takes the new values
    return list(rows.values())


def describe_run(device: str | torch.device = "cpu", lowering: str = "reference") -> str:
    """Where the numbers come from: device, versions and lowering, for the report header."""
    device = torch.device(device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.machine()} CPU"
    return f"{where}, torch {torch.__version__}, {lowering} lowering"


def write_report(results: list[EvalResult], out_dir: Path, command: str, notes: str = "", run: str | None = None) -> Path:
    """Write ``quality.json``, ``quality.md`` and one per-step SQNR plot per model into ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "img").mkdir(exist_ok=True)
    date = datetime.date.today().isoformat()
    rows = [{k: v for k, v in asdict(r).items()} for r in results]
    (out_dir / "quality.json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = [
        "# Quality",
        "",
        f"Generated by `{command}` on {date} ({run or describe_run()}).",
        "",
        "Per-step SQNR: at every sampling step the FP32 model and the variant see the same FP32 trajectory state;",
        "mean and worst step over the trajectory. PSNR / SSIM: final samples of each model's own trajectory from the",
        "same noise, against the FP32 samples (values clipped to the data range).",
        "",
    ]
    main = set(variants())
    tables = [("", [r for r in results if r.config in main]), ("ablation", [r for r in results if r.config not in main])]
    for kind, rows_ in tables:
        if not rows_:
            continue
        if kind:
            lines += ["", "Ablation variants (`qcompile.evaluate.experiments()`):", ""]
        lines += [
            "| model | config | SQNR mean (dB) | SQNR worst (dB) | worst step | PSNR (dB) | SSIM | FD vs real | FD vs FP32 | class cons. | calibration (s) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        lines += [
            f"| {r.model} | {r.config} | {_fmt(r.sqnr_mean_db)} | {_fmt(r.sqnr_worst_db)} | {r.worst_step} | "
            f"{_fmt(r.psnr_db)} | {r.ssim:.4f} | {_opt(r.fd_real)} | {_opt(r.fd_fp32)} | {_opt(r.class_consistency, 3)} | {r.calibration_s:.1f} |"
            for r in rows_
        ]
    lines += fd_report_lines(results)
    for model in dict.fromkeys(r.model for r in results):
        for kind, rows_ in tables:
            mine = [r for r in rows_ if r.model == model]
            if not mine:
                continue
            name = f"quality_{model}{'_' + kind if kind else ''}.png"
            fig, ax = plt.subplots(figsize=(7, 3.5))
            for r in mine:
                ax.plot(r.per_step_db, label=r.config)
            ax.set_xlabel("sampling step")
            ax.set_ylabel("denoiser SQNR vs FP32 (dB)")
            ax.set_title(f"{model}: per-step SQNR along the FP32 trajectory{' (' + kind + 's)' if kind else ''}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, ncol=2)
            fig.tight_layout()
            fig.savefig(out_dir / "img" / name, dpi=110)
            plt.close(fig)
            lines += ["", f"![{model} per-step SQNR{' (' + kind + 's)' if kind else ''}](img/{name})"]
    if notes:
        lines += ["", notes.strip()]
    path = out_dir / "quality.md"
    path.write_text("\n".join(lines) + "\n")
    return path

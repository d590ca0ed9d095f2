"""``qdiff demo --model DIR`` on a local diffusers pipeline folder (``save_pretrained`` output).

The pipeline is loaded with ``DiffusionPipeline.from_pretrained(DIR, local_files_only=True)``; its
denoiser is the ``unet`` or ``transformer`` component. How it is conditioned is read from the
pipeline's ``__call__``: ``prompt`` (a few fixed prompts: SD, PixArt, ...), ``class_labels`` (a
few classes: DiT) or ``batch_size`` (unconditional). Calibration runs the full-precision pipeline
with the denoiser observed; the quantized run goes through ``@qcompile.quantize`` with the saved
plan; both sample from the same generator seed with the pipeline's default guidance.
"""

from __future__ import annotations

import inspect as pyinspect
import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .calibrate import calibrate
from .config import QuantConfig
from .decorator import quantize, swapped_attribute
from .demo import write_report
from .errors import QdiffError
from .inspect import inspect

DENOISERS = ("unet", "transformer")
PROMPTS = (
    "a photograph of an astronaut riding a horse",
    "a red sports car parked by the sea at sunset",
    "a bowl of fruit on a wooden table, oil painting",
    "a small cabin in a snowy forest at night",
)
CALIB_SEED, SAMPLE_SEED = 1234, 0
# Keyword arguments some pipelines take that need optional packages (captions cleaning) or know
# only the full-size resolutions (aspect-ratio binning): turned off where the pipeline has them.
_OFF_WHERE_ACCEPTED = {"clean_caption": False, "use_resolution_binning": False}


class PipelineFolderError(QdiffError):
    """A folder ``qdiff demo --model`` cannot run: the message names the folder and what it holds."""


def _components(folder: Path) -> dict[str, Any]:
    """The components listed in ``model_index.json`` (name -> [library, class]) or raise."""
    index = folder / "model_index.json"
    if not index.is_file():
        found = (", ".join(sorted(p.name for p in folder.iterdir())) or "nothing") if folder.is_dir() else "no such folder"
        raise PipelineFolderError(
            f"'{folder}' is no diffusers pipeline folder (save_pretrained output): no model_index.json; found: {found}"
        )
    meta = json.loads(index.read_text())
    return {k: v for k, v in meta.items() if not k.startswith("_") and isinstance(v, list)}


def is_unet2d_folder(folder: Path) -> bool:
    """A plain ``UNet2DModel`` folder or a pipeline whose ``unet`` is one (the DDIM-sampler demo path)."""
    for config in (folder / "unet" / "config.json", folder / "config.json"):
        if config.is_file():
            return json.loads(config.read_text()).get("_class_name") == "UNet2DModel"
    return False


@dataclass
class PipelineCase:
    """A loaded pipeline, its denoiser component and how to condition it."""

    name: str
    pipe: Any
    denoiser: str
    conditioning: str  # "prompt", "class_labels" or "batch_size"
    steps: int
    num_classes: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def model(self) -> torch.nn.Module:
        return getattr(self.pipe, self.denoiser)

    def inputs(self, n: int, offset: int = 0) -> dict[str, Any]:
        """The conditioning of ``n`` samples; ``offset`` shifts prompts / classes (calibration uses other ones)."""
        if self.conditioning == "prompt":
            return {"prompt": [PROMPTS[(offset + i) % len(PROMPTS)] for i in range(n)]}
        if self.conditioning == "class_labels":
            shown = min(self.num_classes, 10)  # a few classes, spread over the label range
            return {"class_labels": [((offset + i) % shown) * (self.num_classes // shown) for i in range(n)]}
        return {"batch_size": n}

    def generate(self, pipe_fn: Any, n: int, seed: int, offset: int = 0) -> torch.Tensor:
        """(n, C, H, W) images in [0, 1] from ``pipe_fn(pipe, **kwargs)`` (the pipeline or a decorated function)."""
        device = next(self.model.parameters()).device
        kwargs = dict(self.inputs(n, offset), num_inference_steps=self.steps, output_type="np", **self.extra)
        kwargs["generator"] = torch.Generator(device).manual_seed(seed)
        images = pipe_fn(self.pipe, **kwargs)
        return torch.from_numpy(np.asarray(images, dtype=np.float32)).permute(0, 3, 1, 2).clamp(0, 1)


def _call_pipe(pipe: Any, **kwargs: Any) -> Any:
    return pipe(**kwargs).images


def load_pipeline_case(folder: str | Path, steps: int) -> PipelineCase:
    """Load a pipeline folder locally (no hub) and find its denoiser and conditioning, or raise."""
    folder = Path(folder)
    components = _components(folder)
    listed = ", ".join(f"{k} ({v[1]})" for k, v in components.items()) or "none"
    names = [d for d in DENOISERS if d in components and components[d][1] is not None]
    if not names:
        raise PipelineFolderError(
            f"'{folder}' has no denoiser component named {' or '.join(DENOISERS)}; components: {listed}"
        )
    from diffusers import DiffusionPipeline

    try:
        pipe = DiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, ImportError, TypeError, AttributeError) as e:
        raise PipelineFolderError(f"could not load the pipeline in '{folder}' (components: {listed}): {e}") from e
    denoiser = names[0]
    if not isinstance(getattr(pipe, denoiser, None), torch.nn.Module):
        raise PipelineFolderError(f"'{folder}': the {type(pipe).__name__} component '{denoiser}' is no nn.Module; components: {listed}")
    params = pyinspect.signature(pipe.__call__).parameters
    conditioning = next((c for c in ("prompt", "class_labels", "batch_size") if c in params), None)
    if conditioning is None:
        raise PipelineFolderError(
            f"'{folder}': {type(pipe).__name__}.__call__ takes none of prompt / class_labels / batch_size, so the "
            f"demo cannot condition it; components: {listed}"
        )
    model = getattr(pipe, denoiser)
    num_classes = 0
    if conditioning == "class_labels":
        num_classes = int(getattr(model.config, "num_embeds_ada_norm", None) or getattr(model.config, "num_class_embeds", None) or 0)
        if num_classes < 1:
            raise PipelineFolderError(f"'{folder}': cannot tell how many classes the {type(model).__name__} '{denoiser}' has")
    pipe = pipe.to("cuda" if torch.cuda.is_available() else "cpu")
    if any(p.dtype != torch.float32 for p in getattr(pipe, denoiser).parameters()):
        pipe = pipe.to(torch.float32)  # the reference is FP32
    pipe.set_progress_bar_config(disable=True)
    model.eval()
    extra = {k: v for k, v in _OFF_WHERE_ACCEPTED.items() if k in params}
    return PipelineCase(folder.name, pipe, denoiser, conditioning, steps, num_classes, extra)


def run_pipeline_demo(case: PipelineCase, preset: str, out: Path, samples: int, calib_samples: int) -> int:
    """The main job on a diffusers pipeline: calibrate, quantize with the decorator, compare, report."""
    out.mkdir(parents=True, exist_ok=True)
    cfg = QuantConfig.preset(preset)
    model = case.model
    kind = f"{type(case.pipe).__name__} ({case.denoiser}: {type(model).__name__}, conditioned on {case.conditioning})"
    print(f"qdiff demo: {case.name}: {kind}, preset {preset}: calibrating on {calib_samples} samples x {case.steps} steps")

    def run(stand_in: Any) -> None:
        with swapped_attribute(case.pipe, case.denoiser, stand_in):
            case.generate(_call_pipe, calib_samples, CALIB_SEED, offset=1)

    t0 = time.perf_counter()
    plan = calibrate(model, run, cfg)
    calib_s = time.perf_counter() - t0
    plan_path = plan.save(out / "plan.qplan")
    generate = quantize(cfg, plan_path=plan_path, denoiser=case.denoiser)(_call_pipe)  # loads the plan just saved
    with torch.no_grad():
        t0 = time.perf_counter()
        fp = case.generate(_call_pipe, samples, SAMPLE_SEED)
        fp_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        q = case.generate(generate, samples, SAMPLE_SEED)
        q_s = time.perf_counter() - t0  # includes loading the plan and compiling
        t0 = time.perf_counter()
        case.generate(generate, samples, SAMPLE_SEED)
        q2_s = time.perf_counter() - t0
    qmodel = generate.qdiff.compiled[model]
    graphs = generate.qdiff.graphs(model)
    timings = [
        f"calibration | {calib_s:.1f} s ({len(plan.calls)} denoiser calls)",
        f"sampling {samples} images, FP32 | {fp_s:.2f} s",
        f"sampling, quantized (first run, with compile) | {q_s:.2f} s",
        f"sampling, quantized (second run) | {q2_s:.2f} s",
        f"graphs compiled by the qdiff backend | {graphs}",
    ]
    device = "cuda" if next(model.parameters()).is_cuda else f"{platform.machine()} CPU"
    title = f"{case.name}, {preset}: {kind}"
    write_report(out, title, generate.qdiff.plans[model], inspect(qmodel), fp, q, timings, device, preset)
    return 0

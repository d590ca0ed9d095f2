"""Where the 4-bit weight error of the MNIST ViT comes from, and what each rounding does about it.

    PYTHONPATH=. python examples/rounding_diagnosis.py [calibration trajectories, default 8]

Part 1, per linear (layer level): ``tr(dW C dW^T) / tr(W C W^T)`` in dB, C the input covariance over the
calibration trajectory (the error left after bias correction), for int4 g64 / g32 and int5 / int6 per channel
with nearest rounding (clip search as in calibration), and int4 g64 with GPTQ and learned rounding on the same
scales. Part 2, per node (model level): the output NMSE in dB along 8 other trajectories (every 5th step) with only
that linear's weight quantized (int4 g64, weight-only, bias-corrected), and all 16 together.
"""

import math
import sys

import torch
from tqdm.auto import tqdm

from qcompile.calibrate import CalibrationSession, ObservedDenoiser
from qcompile.cli import _shared_cases
from qcompile.config import Format, QuantConfig, Rounding, WeightSpec
from qcompile.evaluate import mha_fastpath_off
from qcompile.lowering.weights import bias_correction, quantize_weight

torch.manual_seed(0)
case = _shared_cases()["mnist_vit"]
model = case.build().eval()
n_cal = int(sys.argv[1]) if len(sys.argv) > 1 else 8
cfg = QuantConfig.preset("w4a16").replace(weight=WeightSpec(Format.INT4, group_size=64, rounding=Rounding.GPTQ))
db = lambda v: 10 * math.log10(max(v, 1e-30))  # noqa: E731
with mha_fastpath_off(), torch.no_grad():
    s = CalibrationSession(cfg, model)
    case.sample(ObservedDenoiser(model, s, tqdm(disable=True)), torch.randn(n_cal, *case.shape, generator=torch.Generator().manual_seed(10_000)))
    layers = {}
    for key in s.sites:
        if s.stats_key(key) not in s.grams:
            continue
        gram, n = s.grams[s.stats_key(key)]
        st = [v for (k, _), v in s.stats.items() if k == s.stats_key(key)]
        mean = sum(x.count * x.channel_mean().double() for x in st) / sum(x.count for x in st)
        var = sum(x.count * x.channel_variance().double() for x in st) / sum(x.count for x in st)
        layers[key] = (s.weights[key].detach().float(), gram / n, mean, var)
    variants = {"int4 g64": ("int4", 64, None), "int4 g32": ("int4", 32, None), "int5": ("int5", None, None), "int6": ("int6", None, None),
                "int4 g64 gptq": ("int4", 64, "gptq"), "int4 g64 learned": ("int4", 64, "learned")}
    quantized = {}
    print("| linear | " + " | ".join(variants) + " |\n|---|" + "---|" * len(variants))
    for key, (w, h, mean, var) in layers.items():
        cov = h - torch.outer(mean, mean)
        row = []
        for name, (fmt, gs, rounding) in variants.items():
            qw = quantize_weight(w, fmt, "linear", gs, True, var, hessian=None if rounding is None else (h if rounding == "gptq" else cov), rounding=rounding or "gptq")
            quantized[(key, name)] = (qw.dequantize(), bias_correction(w, qw, mean))
            dw = qw.dequantize().double() - w.double()
            row.append(f"{db(float((dw @ cov * dw).sum() / (w.double() @ cov * w.double()).sum())):.2f}")
        print(f"| {key} | " + " | ".join(row) + " |")
    # part 2: model level, one node at a time (weight and bias replaced in place; eager model)
    calls = []

    class Rec:
        def __init__(self):
            self.i = 0

        def __call__(self, *a):
            if self.i % 5 == 2:
                calls.append(tuple(x.clone() for x in a))
            self.i += 1
            return model(*a)

    case.sample(Rec(), torch.randn(8, *case.shape, generator=torch.Generator().manual_seed(5)))
    refs = [model(*c) for c in calls]
    params = dict(model.named_parameters())

    def distortion():
        return sum(float((model(*c) - r).pow(2).sum() / r.pow(2).sum()) for c, r in zip(calls, refs)) / len(calls)

    def swap(key, name):
        site = s.sites[key]
        wq, corr = quantized[(key, name)]
        bias = params[site.weight_name.replace("weight", "bias")]
        saved = (params[site.weight_name].clone(), bias.clone())
        params[site.weight_name].copy_(wq)
        bias.add_(corr)
        return saved

    def restore(key, saved):
        params[s.sites[key].weight_name].copy_(saved[0])
        params[s.sites[key].weight_name.replace("weight", "bias")].copy_(saved[1])

    names = ("int4 g64", "int4 g64 gptq", "int4 g64 learned", "int5")
    print("\n| node (only it quantized, weight-only) | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
    for key in layers:
        row = []
        for name in names:
            saved = swap(key, name)
            row.append(f"{db(distortion()):.2f}")
            restore(key, saved)
        print(f"| {key} | " + " | ".join(row) + " |")
    row = []
    for name in names:
        saved = {key: swap(key, name) for key in layers}
        row.append(f"{db(distortion()):.2f}")
        for key, sv in saved.items():
            restore(key, sv)
    print("| all 16 linears | " + " | ".join(row) + " |")

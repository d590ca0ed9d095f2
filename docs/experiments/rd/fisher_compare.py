"""First-order (fisher) estimate vs measured D_n(b) on one qcompile tree: `PYTHONPATH=<tree> python fisher_compare.py <model> <label>`."""
import sys, time, math, torch, json
from qcompile import AllocationSpec, QuantConfig
from qcompile.cli import _eval_cases
from qcompile.rdreport import pearson, spearman
from qcompile.sensitivity import calibrate_with_allocator
name = sys.argv[1]
case = _eval_cases()[name]; model = case.build().eval()
noise = torch.randn(8, *case.shape, generator=torch.Generator().manual_seed(10_000))
cfg = QuantConfig.preset("w4a8").replace(weight_bit_budget=4.5, allocation=AllocationSpec(candidates=("int4","int6","int8","fp8_e4m3"), calls_per_group=4))
plan, al = calibrate_with_allocator(model, lambda m: case.sample(m, noise), cfg, progress=False)
t0 = time.perf_counter(); b0 = al.model.backwards; f0 = al.model.forwards
fisher = al.fisher(); dt = time.perf_counter() - t0
pairs = [(al.tables[k][c][0], fisher[k][c][0]) for k in fisher for c in fisher[k]]
lp = lambda ps: pearson(*([math.log10(max(v, 1e-30)) for v in col] for col in zip(*ps)))
print(json.dumps({"tree": sys.argv[2], "model": name, "entries": len(pairs), "spearman": spearman(*zip(*pairs)), "pearson": pearson(*zip(*pairs)), "pearson_log": lp(pairs),
  "fisher_s": dt, "backwards": al.model.backwards - b0, "extra_forwards": al.model.forwards - f0, "measured_forwards": plan.allocation.forward_passes, "measured_s": plan.allocation.wall_s,
  "unexposed": list(getattr(al, "unexposed", []))}))

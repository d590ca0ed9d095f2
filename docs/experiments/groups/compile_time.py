"""Total compile time vs the number of timestep groups K, with Inductor on CPU.

    python docs/experiments/groups/compile_time.py            # K = 1 2 5 10, each in a fresh process

Each K runs in its own process with an empty Inductor cache directory (cold start), warms up a
GroupDispatch over a sampling loop that visits every group, and reports: wall time of the warm-up
(= compile time, the forwards are ~ms) in wall and CPU seconds (this process and the C++ compiler runs,
compiled in-process: TORCHINDUCTOR_COMPILE_THREADS=1), the first visit of group 0 vs the other groups, graphs compiled, Inductor FX-graph-cache and AOTAutograd
cache hits/misses, and that every group's Inductor output matches that group's eager reference
graph (and not another group's: the quantizer buffers must be bound per group, not baked in).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

K_VALUES = (1, 2, 5, 10)


def _cpu() -> float:
    """CPU seconds of this process and its finished children (the C++ compiler runs): robust to a busy machine."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def one(k: int) -> dict:
    import torch

    import qcompile
    from qcompile import QuantConfig
    from qcompile.metrics import sqnr_db
    from tests.toy_models import ConvTransformerToy

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = ConvTransformerToy().eval()
    x = torch.randn(2, 1, 16, 16)
    steps = torch.linspace(1, 0, 20)

    def loop(m):
        return [m(x, t.expand(2)) for t in steps]

    plan = qcompile.calibrate(model, loop, QuantConfig.preset("w8a8-int8").replace(timestep_groups=k), progress=False)
    with torch.no_grad():
        refs = []
        for t in steps:  # eager reference lowering of each step's group, compiled alone
            torch._dynamo.reset()
            g = plan.groups.group_of(float(t))
            refs.append((g, torch.compile(model, backend="qdiff", options={"plan": plan, "group": g, "inductor": False})(x, t.expand(2))))
        torch._dynamo.reset()
        plan.compiled.clear()
        from torch._dynamo.utils import counters

        counters.clear()
        qmodel = qcompile.compile(model, plan, inductor=True)
        outs, first_visit = [], {}
        wall0, cpu0 = time.perf_counter(), _cpu()
        for t in steps:  # the warm-up pass; the first call of each group compiles its graph
            g = plan.groups.group_of(float(t))
            w, c = time.perf_counter(), _cpu()
            outs.append(qmodel(x, t.expand(2)))
            if g not in first_visit:
                first_visit[g] = (time.perf_counter() - w, _cpu() - c)
        warm, warm_cpu = time.perf_counter() - wall0, _cpu() - cpu0
        t0 = time.perf_counter()
        with torch.compiler.set_stance("fail_on_recompile"):
            loop(qmodel)
        steady = time.perf_counter() - t0
    own = [sqnr_db(r, o) for (g, r), o in zip(refs, outs)]
    other = [sqnr_db(refs[j][1], o) for (g, r), o in zip(refs, outs) for j in range(len(refs)) if refs[j][0] != g]
    ind = counters["inductor"]
    aot = counters["aot_autograd"]
    return {
        "K": k,
        "groups": plan.groups.count,
        "graphs_compiled": len(plan.compiled),
        "warmup_wall_s": round(warm, 2),
        "warmup_cpu_s": round(warm_cpu, 2),
        "first_group_cpu_s": round(first_visit[0][1], 2),
        "other_groups_cpu_s_each": round(sum(c for g, (_, c) in first_visit.items() if g) / max(1, k - 1), 2) if k > 1 else None,
        "steady_loop_s": round(steady, 3),
        "fxgraph_cache_hit": ind.get("fxgraph_cache_hit", 0),
        "fxgraph_cache_miss": ind.get("fxgraph_cache_miss", 0),
        "aotautograd_cache_hit": aot.get("autograd_cache_hit", 0),
        "aotautograd_cache_miss": aot.get("autograd_cache_miss", 0),
        "min_sqnr_vs_own_group_db": round(min(own), 1),
        "max_sqnr_vs_other_groups_db": round(max(other), 1) if other else None,
    }


def main() -> None:
    if len(sys.argv) > 1:
        print(json.dumps(one(int(sys.argv[1]))))
        return
    rows = []
    for k in K_VALUES:
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "TORCHINDUCTOR_COMPILE_THREADS": "1"}
            out = subprocess.run([sys.executable, __file__, str(k)], env=env, capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    sys.path.insert(0, os.getcwd())
    main()

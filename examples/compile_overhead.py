"""Seconds the qdiff backend spends in each of its phases on the first call of a DiT (CPU).

    PYTHONPATH=. python examples/compile_overhead.py 28 w8a8-fp8 reference 1   # layers, preset, lowering, inductor (0/1)
    TRITON_INTERPRET=1 PYTHONPATH=. python examples/compile_overhead.py 28 w8a8-fp8 triton 0   # + fuse_epilogues / place_act_quant
    (QDIFF_NORM_QUANT=1 / QDIFF_ATTN_HEADS=1 in the environment: + their passes)
    PYTHONPATH=. python examples/compile_overhead.py 28 float - 1   # baseline: plain torch.compile (Inductor), first call
    WIDE=1 ...   # the real DiT-XL/2 width (1152, 16 heads) at 8x8 latents: weight-sized work (digest, convert) at scale

The DiT has the block structure of ``qdiff bench``'s DiT-XL/2 (adaLN-zero, patch 2, 1000 classes); without WIDE its
width is 32 (2 heads of 16) so that calibration and Inductor stay quick on a CPU while the graph has the real node
count. Each phase is timed by wrapping its function (a phase called inside another is counted in both);
``compile_fx`` is AOT tracing + Inductor (the qdiff post-grad pass, ``__call__``, runs inside it); ``other_s``
is the rest (the copy of the prepared graph, the lowering's import, release). Prints one
JSON line and exits once the backend returns (the compiled graph is not run).
"""
import json
import os
import sys
import time
import warnings

import torch
import torch._inductor.compile_fx
from diffusers import DiTTransformer2DModel

import qcompile
import qcompile.backend as backend
import qcompile.graph as graph
from qcompile import QuantConfig
from qcompile.plan import QuantPlan

layers, preset, lowering, inductor = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4] == "1"
wide = os.environ.get("WIDE") == "1"
size = 8 if wide else 16
torch.manual_seed(0)
width = {} if wide else {"num_attention_heads": 2, "attention_head_dim": 16}
model = DiTTransformer2DModel(num_layers=layers, in_channels=4, out_channels=8, sample_size=size, patch_size=2,
                              num_embeds_ada_norm=1000, norm_type="ada_norm_zero", **width).eval()


def inputs(t: int) -> dict:
    g = torch.Generator().manual_seed(t)
    return {"hidden_states": torch.randn(2, 4, size, size, generator=g), "timestep": torch.full((2,), t),
            "class_labels": torch.randint(0, 1000, (2,), generator=g)}


def run(m) -> None:
    with torch.no_grad():
        for t in (999,) if wide else (999, 500, 1):
            m(**inputs(t))


if preset == "float":
    t0 = time.perf_counter()
    with torch.no_grad():
        torch.compile(model)(**inputs(999))
    print(json.dumps({"layers": layers, "wide": wide, "preset": "float", "inductor_first_call_s": round(time.perf_counter() - t0, 3)}))
    sys.exit(0)
t0 = time.perf_counter()
plan = qcompile.calibrate(model, run, QuantConfig.preset(preset), progress=False)
calibrate_s = time.perf_counter() - t0

seconds: dict[str, float] = {}


def timed(owner, name: str) -> None:
    fn = getattr(owner, name)
    active = []  # compile_fx calls itself: count the outermost call only

    def wrapper(*args, **kwargs):
        if active:
            return fn(*args, **kwargs)
        active.append(1)
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start
            active.pop()

    setattr(owner, name, wrapper)


OURS = ("prepare", "annotate", "plan_annotations", "plan_ops", "convert", "fuse_siblings", "fuse_epilogues", "place_act_quant",
        "fuse_attention_heads", "fuse_norm_quant", "check_released_unread", "plan_release", "_warn_float_ops")
for name in OURS:
    timed(backend, name)
timed(graph, "decompose_fused_attention")
timed(graph, "find_sites")
timed(QuantPlan, "check_sites")
timed(QuantPlan, "digest")
timed(backend.QdiffKernelPass, "__call__")
timed(torch._inductor.compile_fx, "compile_fx")


def compile_and_report(gm, example_inputs):
    nodes = len(gm.graph.nodes)
    start = time.perf_counter()
    record = backend.qdiff_backend(gm, example_inputs, {"plan": plan, "inductor": inductor, "lowering": lowering})
    total = time.perf_counter() - start
    outer = OURS + ("check_sites", "digest", "compile_fx")  # not nested in one another
    print(json.dumps({
        "layers": layers, "wide": wide, "preset": preset, "lowering": record.lowering, "inductor": inductor,
        "graph_nodes": nodes, "converted_nodes": len(record.converted.graph.nodes),
        "norm_quant": record.norm_quant, "attention_heads": record.attention_heads, "calibrate_s": round(calibrate_s, 2),
        "backend_total_s": round(total, 3), **{k: round(v, 4) for k, v in sorted(seconds.items())},
        "other_s": round(total - sum(seconds.get(k, 0.0) for k in outer), 3),  # prepared-graph copy, lowering import, release
    }))
    sys.stdout.flush()
    os._exit(0)


warnings.simplefilter("ignore")
torch._dynamo.reset()
with torch.no_grad():
    torch.compile(model, backend=compile_and_report)(**inputs(999))

"""Investigate how Dynamo captures the tiny denoisers of ``tests/tiny_models.py``.

Not a test (underscore prefix: pytest does not collect it).  Run from the repo root:

    python tests/_investigate_tiny.py            # all models
    python tests/_investigate_tiny.py dit sd3    # some models
    python tests/_investigate_tiny.py --examples 5 --graph   # more examples, print FX code
    python tests/_investigate_tiny.py --threads 2            # default is 1 thread

For each model, under ``torch.no_grad()``:
  1. fullgraph capture with a recording backend; ``torch._dynamo.explain`` graph/break counts;
  2. distinct linear/conv/matmul/attention targets in the captured graph(s); whether every
     linear/conv weight argument is a placeholder whose ``meta["grapharg"].source.name`` names a
     module parameter (``L['self']._modules[...]._parameters['weight']``);
  3. how the timestep enters (placeholder shape/dtype; Python int/float specialization);
  4. eager forward time and first-trace time;
  5. ``backend="eager"`` behaviour when the batch size changes 2 -> 4 -> 8.
"""

from __future__ import annotations

import argparse
import logging
import operator
import os
import re
import sys
import time
import warnings
from collections import Counter, defaultdict

import torch
import torch._dynamo as dynamo
import torch.fx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny_models import ALL_FACTORIES, TinyCase  # noqa: E402

warnings.filterwarnings("ignore")
logging.getLogger("diffusers").setLevel(logging.ERROR)

aten = torch.ops.aten
F = torch.nn.functional

LINEAR = {F.linear, torch._C._nn.linear, aten.linear.default}
CONV = {
    F.conv1d, F.conv2d, F.conv3d, torch.conv2d, torch.conv1d, torch.conv3d,
    F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
    torch.conv_transpose2d, aten.convolution.default,
}  # fmt: skip
MATMUL = {torch.matmul, torch.bmm, torch.baddbmm, torch.mm, torch.addmm}
MATMUL_METHODS = {"matmul", "bmm", "baddbmm", "mm", "__matmul__"}
MATMUL.add(operator.matmul)
SDPA = {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}


def tname(target) -> str:
    if isinstance(target, str):
        return f"method:{target}"
    mod = getattr(target, "__module__", None) or ""
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or str(target)
    return f"{mod}.{name}" if mod else str(name)


def classify(node: torch.fx.Node) -> str | None:
    t = node.target
    if node.op == "call_function":
        if t in LINEAR:
            return "linear"
        if t in CONV:
            return "conv"
        if t in MATMUL:
            return "matmul"
        if t in SDPA:
            return "sdpa"
        if t is torch.einsum:
            return "einsum"
        n = tname(t).lower()
        if "attention" in n or "attn" in n or "flash" in n:
            return "attn-other"
    elif node.op == "call_method":
        if t in MATMUL_METHODS:
            return "matmul"
    elif node.op == "call_module":
        return "call_module"
    return None


INFO: dict = {}  # node -> Recorder info of the graphs being analysed


def src_name(node: torch.fx.Node) -> str | None:
    if node in INFO:
        return INFO[node]["source"]
    ga = node.meta.get("grapharg")
    if ga is None or getattr(ga, "source", None) is None:
        return None
    name = ga.source.name  # a cached_property in torch 2.13 (was a method in older versions)
    return name() if callable(name) else name


# torch 2.13 spells the first hop through the instance dict:
#   L['self'].__dict__['_modules']['time_embedding']._modules['linear_1']._parameters['weight']
PARAM_RE = re.compile(
    r"^L\['self'\](?:\.__dict__\['_modules'\]\['[^']+'\]|\._modules\['[^']+'\])*"
    r"(?:\.__dict__\['_parameters'\]|\._parameters)\['(weight|bias)'\]$"
)


def source_to_fqn(name: str) -> str:
    """L['self'].__dict__['_modules']['a']._modules['0']._parameters['weight'] -> a.0.weight"""
    keys = re.findall(r"\['([^']+)'\]", name)
    return ".".join(k for k in keys[1:] if k not in ("_modules", "_parameters", "_buffers"))


def ex_val(node):
    return node.meta.get("example_value", node.meta.get("val"))


def describe_val(v) -> str:
    if isinstance(v, torch.Tensor):
        return f"Tensor{tuple(v.shape)} {v.dtype}"
    return f"{type(v).__name__}({v})"


class Recorder:
    """Capture backend: records each graph and, *while the backend runs*, each placeholder's
    Dynamo source name and which model parameter (by identity) its example input is.

    NB: Dynamo deletes ``node.meta["grapharg"]`` in ``OutputGraph.cleanup()`` right after the
    backend returns, so it must be read inside the backend.  What survives afterwards:
    ``node._dynamo_source`` (a Source object) and ``gm.meta["dynamo_flat_name_to_original_fqn"]``.
    """

    def __init__(self, model: torch.nn.Module | None = None):
        self.graphs: list[torch.fx.GraphModule] = []
        self.info: dict[torch.fx.Node, dict] = {}
        self.by_id = {id(p): n for n, p in model.named_parameters()} if model is not None else {}
        self.by_id.update(
            {id(b): n for n, b in model.named_buffers()} if model is not None else {}
        )

    def __call__(self, gm, example_inputs):
        phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
        for node, ex in zip(phs, example_inputs):
            ga = node.meta.get("grapharg")
            src = ga.source if ga is not None else None
            name = None if src is None else (src.name() if callable(src.name) else src.name)
            self.info[node] = dict(
                source=name,
                source_type=type(src).__name__,
                example=ex,
                fqn=self.by_id.get(id(ex)),
            )
        self.graphs.append(gm)
        return gm.forward


def analyse_graphs(graphs, n_examples: int, model: torch.nn.Module):
    params = dict(model.named_parameters())
    targets = defaultdict(Counter)  # kind -> Counter(target name)
    weight_ok = weight_bad = 0
    bad_examples, good_examples = [], []
    other_ops = Counter()
    getattrs = []
    fqn_mismatch = 0
    weight_uses = Counter()
    for gm in graphs:
        for node in gm.graph.nodes:
            if node.op == "get_attr":
                getattrs.append(str(node.target))
            k = classify(node)
            if k is None:
                if node.op in ("call_function", "call_method"):
                    other_ops[tname(node.target)] += 1
                continue
            targets[k][tname(node.target)] += 1
            if k in ("linear", "conv"):
                w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
                b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
                wname = src_name(w) if isinstance(w, torch.fx.Node) and w.op == "placeholder" else None
                if isinstance(w, torch.fx.Node):
                    weight_uses[(id(gm), w.name)] += 1
                if wname and PARAM_RE.match(wname):
                    weight_ok += 1
                    fqn = source_to_fqn(wname)
                    by_identity = INFO.get(w, {}).get("fqn")
                    if fqn not in params or (by_identity is not None and by_identity != fqn):
                        fqn_mismatch += 1
                    if len(good_examples) < n_examples:
                        bname = src_name(b) if isinstance(b, torch.fx.Node) else repr(b)
                        good_examples.append(
                            f"{node.name}: {tname(node.target)}  w={wname}  ->  fqn {fqn}  "
                            f"{describe_val(ex_val(w))}; bias={bname}; "
                            f"module_stack[-1]={list(node.meta.get('nn_module_stack', {}).values())[-1:]}"
                        )
                else:
                    weight_bad += 1
                    if len(bad_examples) < n_examples:
                        wdesc = (
                            f"{w.op}:{w.target} src={src_name(w)}"
                            if isinstance(w, torch.fx.Node)
                            else repr(w)
                        )
                        bad_examples.append(f"{node.name}: {tname(node.target)} weight={wdesc}")
    return dict(
        targets=targets,
        weight_ok=weight_ok,
        weight_bad=weight_bad,
        good_examples=good_examples,
        bad_examples=bad_examples,
        other_ops=other_ops,
        getattrs=getattrs,
        fqn_mismatch=fqn_mismatch,
        shared_weights={k[1]: v for k, v in weight_uses.items() if v > 1},
    )


def placeholders_summary(gm):
    out = []
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        name = src_name(node) or "?"
        if _is_param_src(name) or _is_buffer_src(name):
            continue
        out.append(f"{node.name} <- {name}: {describe_val(ex_val(node))}")
    return out


def _is_param_src(name: str) -> bool:
    return re.search(r"_parameters\W", name) is not None


def _is_buffer_src(name: str) -> bool:
    return re.search(r"_buffers\W", name) is not None


def count_params_placeholders(gm):
    n_par = n_buf = n_other = 0
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            name = src_name(node) or ""
            if _is_param_src(name):
                n_par += 1
            elif _is_buffer_src(name):
                n_buf += 1
            else:
                n_other += 1
    return n_par, n_buf, n_other


def time_eager(case: TinyCase, reps: int = 20) -> float:
    """Best-of-``reps`` wall time (the min is robust to other processes sharing the CPU)."""
    with torch.no_grad():
        case.run()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            case.run()
            ts.append(time.perf_counter() - t0)
    return min(ts)


def with_timestep(case: TinyCase, value):
    args, kwargs = list(case.args), dict(case.kwargs)
    if case.timestep_arg in kwargs:
        kwargs[case.timestep_arg] = value
    else:
        args[1] = value
    return tuple(args), kwargs


def einsum_equations(graphs):
    eqs = Counter()
    for gm in graphs:
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target is torch.einsum:
                eqs[str(node.args[0])] += 1
    return dict(eqs)


def capture(model, args, kwargs, **compile_kw):
    dynamo.reset()
    rec = Recorder(model)
    compiled = torch.compile(model, backend=rec, **compile_kw)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = compiled(*args, **kwargs)
    return rec, out, time.perf_counter() - t0


def investigate(name: str, n_examples: int, print_graph: bool):
    print("=" * 100)
    case = ALL_FACTORIES[name]()
    model = case.model
    n_params = sum(p.numel() for p in model.parameters())
    print(f"## {name}: {type(model).__name__}, {n_params} params, "
          f"{len(list(model.parameters()))} parameter tensors, "
          f"timestep arg '{case.timestep_arg}' = {describe_val(case.timestep)}")
    eager_t = time_eager(case)
    print(f"eager forward (best of 20, {torch.get_num_threads()} threads): {eager_t * 1e3:.1f} ms")

    # 1. fullgraph capture -----------------------------------------------------------------
    try:
        rec, out, trace_t = capture(model, case.args, case.kwargs, fullgraph=True)
        with torch.no_grad():
            ref = case.run()
        print(f"fullgraph=True: OK, {len(rec.graphs)} graph(s); first call (trace+run) "
              f"{trace_t:.2f} s; max|compiled-eager| = "
              f"{(case.output(out) - ref).abs().max().item():.2e}")
    except Exception as e:  # noqa: BLE001
        print(f"fullgraph=True: FAILED: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
        rec, out, trace_t = capture(model, case.args, case.kwargs)
        print(f"fullgraph=False: {len(rec.graphs)} graph(s), first call {trace_t:.2f} s")
    _, _, warm_t = capture(model, case.args, case.kwargs)  # again, after dynamo.reset()
    print(f"re-trace after dynamo.reset() (no one-time Dynamo start-up): {warm_t:.2f} s")
    INFO.clear()
    INFO.update(rec.info)

    dynamo.reset()
    with torch.no_grad():
        ex = dynamo.explain(model)(*case.args, **case.kwargs)
    print(f"explain: graph_count={ex.graph_count} graph_break_count={ex.graph_break_count} "
          f"op_count={ex.op_count}")
    for br in ex.break_reasons[:10]:
        print(f"   break: {br.reason[:300]}")
        for fs in br.user_stack[-2:]:
            print(f"      at {fs.filename}:{fs.lineno} {fs.name}")

    # 2. graph contents --------------------------------------------------------------------
    for gi, gm in enumerate(rec.graphs):
        n_par, n_buf, n_other = count_params_placeholders(gm)
        n_ident = sum(1 for n in gm.graph.nodes if n.op == "placeholder" and INFO.get(n, {}).get("fqn"))
        survives = sum(1 for n in gm.graph.nodes if n.op == "placeholder" and hasattr(n, "_dynamo_source"))
        print(f"graph {gi}: {len(gm.graph.nodes)} nodes; placeholders: {n_par} params, {n_buf} buffers, "
              f"{n_other} user inputs; {n_ident} example_inputs are (by identity) model "
              f"params/buffers; after the backend returned: grapharg left in meta: "
              f"{sum(1 for n in gm.graph.nodes if 'grapharg' in n.meta)}, node._dynamo_source: {survives}")
        for line in placeholders_summary(gm):
            print(f"   user input {line}")
        if print_graph:
            print(gm.code)
    a = analyse_graphs(rec.graphs, n_examples, model)
    for kind in ("linear", "conv", "matmul", "einsum", "sdpa", "attn-other", "call_module"):
        if a["targets"].get(kind):
            print(f"   {kind:11s}: {dict(a['targets'][kind])}")
    eqs = einsum_equations(rec.graphs)
    if eqs:
        print(f"   einsum equations: {eqs}")
    print(f"   linear/conv weight = param placeholder: {a['weight_ok']}   "
          f"NOT param placeholder: {a['weight_bad']}   (fqn mismatches source-vs-identity: "
          f"{a['fqn_mismatch']})")
    for e in a["good_examples"]:
        print(f"      ok : {e}")
    for e in a["bad_examples"]:
        print(f"      BAD: {e}")
    if a["shared_weights"]:
        print(f"   weight placeholders used by >1 linear/conv call: {a['shared_weights']}")
    if a["getattrs"]:
        print(f"   get_attr nodes: {a['getattrs'][:10]}")
    print(f"   other call targets: {dict(a['other_ops'].most_common(40))}")

    # 3. timestep: tensor vs Python int / float ---------------------------------------------
    ts_nodes = [
        (n, INFO[n]) for n in INFO
        if INFO[n]["example"] is case.timestep
    ]
    for n, inf in ts_nodes:
        users = [f"{u.op}:{tname(u.target)}" for u in n.users]
        print(f"timestep tensor enters as placeholder {n.name} <- {inf['source']}: "
              f"{describe_val(ex_val(n))}; first users: {users[:4]}")
    for kind, vals in (("int", [10, 20, 30]), ("float", [10.0, 20.0, 30.0])):
        dynamo.reset()
        recs = Recorder(model)
        c = torch.compile(model, backend=recs)
        try:
            with torch.no_grad():
                for v in vals:
                    args, kwargs = with_timestep(case, v)
                    c(*args, **kwargs)
            per_graph = []
            for gm in recs.graphs:
                nonparam = [
                    f"{recs.info[n]['source']}={describe_val(ex_val(n))}"
                    for n in gm.graph.nodes
                    if n.op == "placeholder" and recs.info[n]["fqn"] is None
                    and not isinstance(recs.info[n]["example"], torch.Tensor)
                    or (n.op == "placeholder" and recs.info[n]["fqn"] is None
                        and isinstance(recs.info[n]["example"], torch.Tensor)
                        and recs.info[n]["example"].dim() == 0)
                ]
                per_graph.append(nonparam or ["(none: value baked into the graph)"])
            print(f"timestep as Python {kind} {vals}: {len(recs.graphs)} graph(s) compiled; "
                  f"scalar inputs per graph: {per_graph}")
        except Exception as e:  # noqa: BLE001
            try:
                with torch.no_grad():
                    model(*with_timestep(case, vals[0])[0], **with_timestep(case, vals[0])[1])
                eager_msg = "eager works"
            except Exception:  # noqa: BLE001
                eager_msg = "eager fails the same way: the model needs a 1-d tensor"
            print(f"timestep as Python {kind}: FAILED {type(e).__name__}: "
                  f"{str(e).splitlines()[0][:200]} ({eager_msg})")
    dynamo.reset()
    recs = Recorder(model)
    c = torch.compile(model, backend=recs)
    with torch.no_grad():
        for s in range(3):
            args, kwargs = case.make_inputs(2, s + 10)
            c(*args, **kwargs)
    print(f"timestep as tensor, 3 calls with different values: {len(recs.graphs)} graph(s)")

    # 5. batch size change with backend="eager" --------------------------------------------
    for dyn in (None, False, True, "mark_dynamic"):
        dynamo.reset()
        cnt = dynamo.testing.CompileCounterWithBackend("eager")
        c = torch.compile(model, backend=cnt, dynamic=None if dyn == "mark_dynamic" else dyn)
        recorded = []
        try:
            with torch.no_grad():
                for b in (2, 4, 8):
                    cb = case.with_batch(b)
                    if dyn == "mark_dynamic":  # batch dim of every batch-leading input tensor
                        for v in list(cb.args) + list(cb.kwargs.values()):
                            if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == b:
                                dynamo.mark_dynamic(v, 0)
                    o = cb.output(c(*cb.args, **cb.kwargs))
                    ok = torch.allclose(o, cb.run(), atol=1e-5)
                    recorded.append((b, cnt.frame_count, ok))
            syms = []
            for gm in cnt.graphs:
                s = set()
                for node in gm.graph.nodes:
                    v = ex_val(node)
                    if node.op == "placeholder" and isinstance(v, torch.SymInt):
                        s.add(f"SymInt {v}")
                    if node.op == "placeholder" and isinstance(v, torch.Tensor):
                        for dim in v.shape:
                            if isinstance(dim, torch.SymInt) and dim.node.expr.free_symbols:
                                s.add(str(dim))
                syms.append(sorted(s))
            print(f"backend='eager', dynamic={dyn}: batches 2,4,8 -> frame_count after each "
                  f"{[r[1] for r in recorded]}, graphs={len(cnt.graphs)}, "
                  f"matches eager={all(r[2] for r in recorded)}, symbolic dims per graph={syms}")
        except Exception as e:  # noqa: BLE001
            print(f"backend='eager', dynamic={dyn}: FAILED after {recorded}: "
                  f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
    dynamo.reset()
    return dict(name=name, eager_ms=eager_t * 1e3, trace_s=trace_t, warm_s=warm_t)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="*", default=list(ALL_FACTORIES))
    ap.add_argument("--examples", type=int, default=3)
    ap.add_argument("--graph", action="store_true", help="print the captured FX code")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1: with 2 threads and any other load on "
                         "a 2-core box, OpenMP spin-waits make forwards 100-1000x slower)")
    ns = ap.parse_args()
    torch.set_num_threads(ns.threads)
    print(f"torch {torch.__version__}")
    import diffusers

    print(f"diffusers {diffusers.__version__}")
    rows = [investigate(m, ns.examples, ns.graph) for m in ns.models]
    print("=" * 100)
    for r in rows:
        print(f"{r['name']:18s} eager {r['eager_ms']:6.1f} ms   first trace+run {r['trace_s']:5.2f} s"
              f"   re-trace {r['warm_s']:5.2f} s")


if __name__ == "__main__":
    main()

"""The ``qdiff`` torch.compile backend: ``torch.compile(m, backend="qdiff", options={"plan": plan})``.

For each graph Dynamo hands over (one per graph break and recompile) it prepares the graph,
checks it against the plan, annotates it from the plan's decisions, converts the quantized ops
and runs the result eagerly or through Inductor (``compile_fx`` with ``config_patches``).
"""

from __future__ import annotations

import copy
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from .attention import attention_float, attention_ops, attention_sites
from .debug import log_graph
from .errors import ConfigError, MissingPlanError
from .graph import prepare
from .passes.annotate import Annotation, annotate
from .inductor_pass import QdiffKernelPass
from .passes.convert import Lowering, QuantizedOp, convert
from .passes.convert_attention import convert_attention
from .passes.tables import convert_tables
from .kernel_analysis import memoized_kernel_analysis
from .passes.act_quant import place_act_quant
from .passes.attention_heads import enabled_from_env as heads_enabled, fp8_qkv_from_env, fuse_attention_heads, write_fp8_projections
from .passes.fuse_epilogue import fuse_epilogues
from .passes.fuse_siblings import enabled_from_env as siblings_enabled, fuse_siblings
from .passes.norm_quant import enabled_from_env as norm_quant_enabled, fuse_norm_quant
from .passes.sites import META_KEY, parameter_tensors
from .plan import NodePlan, QuantPlan
from .release import ReleasePlan, check_released_unread, dropping_inputs, plan_release, release, warn_kept, without_inputs
from .switches import env_switch

_OPTIONS = {"plan", "inductor", "group", "mode", "lowering", "release_float_weights"}
LOWERINGS = ("auto", "reference", "triton")

HOW_TO_CALIBRATE = (
    "the qdiff backend needs a calibrated plan: "
    "plan = qcompile.calibrate(model, lambda m: sample(m, noise), qcompile.QuantConfig.preset('w8a8-int8')); "
    "then torch.compile(model, backend='qdiff', options={'plan': plan}) "
    "(or options={'plan': 'model.qplan'} for a saved plan)"
)


@dataclass
class BackendOptions:
    """Validated ``options`` of the qdiff backend."""

    plan: QuantPlan
    inductor: bool | None = None  # None: Inductor when the inputs are on CUDA, else eager
    group: int = 0
    mode: str | None = None  # Inductor mode ("reduce-overhead", "max-autotune"): torch.compile takes mode or options, not both
    lowering: str = "auto"  # auto: Triton kernels for CUDA inputs, the pure-PyTorch reference otherwise
    guarded: bool = False  # group taken from qcompile.dispatch.ACTIVE and guarded on (GroupDispatch)
    # free the storage of float weights no compiled graph of the plan reads (qcompile/release.py): the eager module
    # can no longer run afterwards
    release_float_weights: bool = False

    @classmethod
    def parse(cls, options: dict[str, Any] | None) -> "BackendOptions":
        options = dict(options or {})
        unknown = set(options) - _OPTIONS
        if unknown:
            raise ConfigError(f"unknown qdiff backend option(s) {sorted(unknown)}; known: {sorted(_OPTIONS)}")
        plan = options.get("plan")
        if plan is None:
            raise MissingPlanError(HOW_TO_CALIBRATE)
        if isinstance(plan, (str, os.PathLike)):
            plan = QuantPlan.load(plan)
        if not isinstance(plan, QuantPlan):
            raise ConfigError(f"options['plan'] must be a QuantPlan or a path to a plan file, got {type(plan).__name__}")
        group = int(options.get("group", 0))
        guarded = plan.groups.count > 1 and "group" not in options
        if guarded:
            from .dispatch import active_group

            group = active_group()
            if group is None:
                raise ConfigError(
                    f"the plan has {plan.groups.count} timestep groups: compile it with qcompile.compile(model, plan), "
                    "which dispatches each call to its group's graph by Dynamo guards (or pass "
                    "options={'plan': plan, 'group': k} to compile one group's graph)"
                )
        if not 0 <= group < plan.groups.count:
            raise ConfigError(f"group {group} out of range: the plan has {plan.groups.count} timestep group(s)")
        lowering = options.get("lowering", "auto")
        if lowering not in LOWERINGS:
            raise ConfigError(f"options['lowering'] must be one of {', '.join(LOWERINGS)}, got {lowering!r}")
        release = options.get("release_float_weights", False)
        if not isinstance(release, bool):
            raise ConfigError(f"options['release_float_weights'] must be True or False, got {release!r}")
        return cls(plan, options.get("inductor"), group, options.get("mode"), lowering, guarded, release)


@dataclass
class QuantizedGraph:
    """One compiled graph: the prepared float graph, its converted form and what runs."""

    prepared: fx.GraphModule  # float graph with sites and annotations in node.meta
    converted: fx.GraphModule
    runner: Callable[..., Any]  # called like Dynamo calls a backend's result: runner(*args)
    lowering: str = "reference"  # which lowering the converted graph calls
    fused_activations: int = 0  # activations folded into a quantized linear's epilogue
    kernel_pass: Any = None  # the Inductor post-grad pass (its .kernels: qdiff kernels in the compiled graph)
    calls: int = 0  # how often Dynamo ran this graph (the decorator checks that no denoiser call bypassed the plan)
    released: dict[str, int] = field(default_factory=dict)  # float weights this compile released: name -> bytes freed
    fused_siblings: int = 0  # fused calls made of quantized linears reading the same input (passes.fuse_siblings)
    act_quant: dict[str, int] = field(default_factory=dict)  # where fp8 GEMM inputs are quantized (passes.act_quant counts)
    attention_heads: int = 0  # q / k / v projections writing fp8 attention heads (passes.attention_heads)
    fp8_projections: int = 0  # q / k / v projections writing plain fp8 output (passes.attention_heads.write_fp8_projections)
    norm_quant: int = 0  # block boundaries computed by one add + LayerNorm + modulate + quantize call (passes.norm_quant)
    # wall seconds of this compile's phases: "passes" (prepare, convert and the lowering's graph passes) and
    # "inductor" (compile_fx; absent without Inductor). Dynamo's tracing and the first run come on top.
    compile_s: dict[str, float] = field(default_factory=dict)

    def __call__(self, *args: Any) -> Any:
        self.calls += 1
        return self.runner(*args)


def plan_ops(plan: QuantPlan, group: int) -> dict[str, QuantizedOp]:
    """The quantized ops of one timestep group of a plan (nodes kept in full precision in that group excluded)."""
    return {n.key: node_op(n, group) for n in plan.quantized_nodes() if n.weight_for(group) is not None}


def node_op(n: NodePlan, group: int) -> QuantizedOp:
    """The quantized op of one (quantized) node in one timestep group, with that group's weight."""
    act = n.acts[group]
    weight = n.weight_for(group)
    if weight is None:
        raise ValueError(f"node '{n.key}' is kept in full precision in timestep group {group}")
    corr = None if n.bias_correction is None else n.bias_correction[group]
    if act is None:
        return QuantizedOp(weight, bias_correction=corr)
    smooth = None if n.smooth is None else 1.0 / n.smooth
    return QuantizedOp(weight, act.fmt, act.symmetric, *act.slice_params(), corr, smooth, act.outlier_scales())


def plan_annotations(plan: QuantPlan, group: int) -> dict[str, Annotation]:
    """The plan's decisions as annotations (what the quantizer would write)."""
    out = {}
    for n in plan.nodes.values():
        spec = n.weight_spec(group)
        act = n.acts[group] if spec is not None else None
        acts = {} if act is None else {0: act}
        reason = f"kept in full precision in timestep group {group} by bit allocation" if n.quantized and spec is None else n.reason
        out[n.key] = Annotation(n.key, spec, acts, reason, {} if n.split is None or spec is None else {0: n.split})
    return out


def _device_of(example_inputs: Sequence[Any]) -> torch.device:
    for x in example_inputs:
        if isinstance(x, torch.Tensor):
            return x.device
    return torch.device("cpu")


def _warn_float_ops(plan: QuantPlan, keys: list[str], unsupported: dict[str, str], fallback: dict[str, str] | None = None) -> None:
    """One warning per compile listing the ops kept in full precision and the quantized ops the lowering has no
    kernel for (they run the reference lowering); each op reported once per plan."""
    reasons = {n.key: n.reason for n in plan.float_nodes()}
    reasons.update(unsupported)
    new = [k for k in keys if k in reasons and k not in plan.warned]
    slow = [k for k in keys if k in (fallback or {}) and f"fallback:{k}" not in plan.warned]
    parts = []
    if new:
        plan.warned.update(new)
        parts.append(f"{len(new)} op(s) stay in full precision:\n" + "\n".join(f"  {k}: {reasons[k]}" for k in new))
    if slow:
        plan.warned.update(f"fallback:{k}" for k in slow)
        parts.append(f"{len(slow)} quantized op(s) run the reference lowering:\n" + "\n".join(f"  {k}: {fallback[k]}" for k in slow))
    if parts:
        warnings.warn("qdiff: " + "\n".join(parts), stacklevel=2)


def planned_weights_read_in_float(gm: fx.GraphModule, example_inputs: Sequence[Any], plan: QuantPlan) -> dict[str, str]:
    """Plan ops whose weight this graph reads other than through their quantizable call (node key -> why).

    E.g. an attention op Dynamo recorded as one call that the decomposition did not rewrite: the op was calibrated as
    a site, but here its weight feeds an opaque call, so that use runs in full precision, whatever the plan says."""
    by_weight: dict[str, list[str]] = {}
    for n in plan.quantized_nodes():
        by_weight.setdefault(n.weight_name, []).append(n.key)
    found = {}
    nodes = {n.name: n for n in gm.graph.nodes}
    for name, (qname, _) in parameter_tensors(gm, example_inputs).items():
        if qname not in by_weight:
            continue
        node = nodes[name]
        other = sorted({str(getattr(u.target, "__name__", u.target)) for u in node.users
                        if getattr(u.meta.get(META_KEY), "weight_name", None) != qname})
        if other:
            for key in by_weight[qname]:
                found[key] = (f"planned, but this graph reads its weight '{qname}' through {', '.join(other)} "
                              "(not a quantizable call): that use runs in full precision")
    return found


def choose_lowering(name: str, device: torch.device) -> tuple[str, Lowering]:
    """The lowering an option names (``auto``: Triton kernels on CUDA, else the reference)."""
    if name == "reference" or (name == "auto" and device.type != "cuda"):
        return "reference", Lowering()
    from .lowering import triton_lowering
    from .lowering.kernels._common import kernels_usable_on
    from .lowering.kernels.norm_quant import add_norm_modulate_fp8

    if not kernels_usable_on(device):
        if name == "triton":
            raise ConfigError(f"options['lowering']='triton' needs CUDA inputs (or TRITON_INTERPRET=1 on CPU); the graph's inputs are on {device}")
        return "reference", Lowering()
    return "triton", Lowering(linear=triton_lowering.qlinear, conv=triton_lowering.qconv, linear_fused=triton_lowering.qlinear_fused,
                              aux=triton_lowering.aux_buffers, fallback=triton_lowering.fallback_reason,
                              stored_weight=triton_lowering.stored_weight, attention=triton_lowering.qattention,
                              linear_heads=triton_lowering.qlinear_heads, heads_unsupported=triton_lowering.heads_unsupported,
                              norm_quant=add_norm_modulate_fp8)


def build_quantized_graph(
    gm: fx.GraphModule, example_inputs: Sequence[Any], plan: QuantPlan, group: int, lowering: Lowering = Lowering()
) -> tuple[fx.GraphModule, fx.GraphModule]:
    """(prepared float graph, converted graph) for one captured graph and one timestep group."""
    gm, sites = prepare(gm, example_inputs)
    plan.check_sites([s.signature for s in sites if not s.unsupported])
    annotate(gm, plan_annotations(plan, group))
    prepared = copy.deepcopy(gm)
    ops = plan_ops(plan, group)
    fallback = {} if lowering.fallback is None else {k: r for k, q in ops.items() if (r := lowering.fallback(q)) is not None}
    unsupported = {s.key: f"unsupported: {s.unsupported}" for s in sites if s.unsupported}
    opaque = planned_weights_read_in_float(gm, example_inputs, plan)
    attn = attention_sites(gm)
    attn_float = attention_float(plan, attn)  # (plans without attention: none; attention then stays float unmentioned)
    _warn_float_ops(plan, [s.key for s in sites] + sorted(opaque) + [s.key for s in attn], {**unsupported, **opaque, **attn_float}, fallback)
    if not plan.quantized_nodes():
        warnings.warn(f"qdiff: the plan for {plan.model_class} quantizes nothing; compiling the full-precision graph", stacklevel=2)
    params = parameter_tensors(gm, example_inputs)
    constants = {name: value for name, (_, value) in params.items()}
    converted = convert(gm, ops, _device_of(example_inputs), lowering, constants)
    converted = convert_attention(converted, attention_ops(plan, group), _device_of(example_inputs), lowering.attention)
    converted, float_tables = convert_tables(converted, params, plan.tables, _device_of(example_inputs))
    if plan.config.embedding_tables is not None and float_tables and "tables" not in plan.warned:
        plan.warned.add("tables")
        warnings.warn("qdiff: embedding tables kept in float (not in the plan, or unsupported):\n"
                      + "\n".join(f"  {t}" for t in float_tables), stacklevel=2)
    log_graph("convert", converted)
    return prepared, converted


MULTI_KERNEL_ENV = "QDIFF_MULTI_KERNEL"


def multi_kernel_from_env(default: bool) -> bool:
    """``QDIFF_MULTI_KERNEL`` (``1`` / ``0``; unset: ``default``): compile with Inductor's multi-kernel reductions
    (``triton.multi_kernel``): row reductions up to 16x wider than Inductor's default bound (1024) also get a persistent
    kernel (one read of the row), and the faster of the two is picked by timing at the first call. Our graphs' LayerNorm
    + modulate + quantize kernels over DiT / PixArt's 1152-wide rows are looped reductions by default: 37-59 us each on
    an H200, ~3x their bytes' time (examples/profile_step.py, docs/benchmarks.md). Measured with CUDA graphs on an H200
    (2026-12-02): DiT-XL/2 W8A8-FP8 + fp8 attention 15.22 ms with it, 15.26 ms without; bf16 Inductor 18.49 vs 18.70 ms:
    no gain worth its compile time, so off by default (the bench's ``-multikernel`` / ``-single-kernel`` rows)."""
    return env_switch(MULTI_KERNEL_ENV, default)


COORDINATE_DESCENT_ENV = "QDIFF_COORDINATE_DESCENT"


def inductor_patches_from_env() -> dict[str, object]:
    """Inductor config patches the environment's switches ask for (default none), for the qdiff backend and the
    bench's bf16 Inductor rows alike: ``QDIFF_MULTI_KERNEL=1`` (:func:`multi_kernel_from_env`) and
    ``QDIFF_COORDINATE_DESCENT=1``: Inductor tunes each generated kernel's block sizes and warps by timing
    (``coordinate_descent_tuning``; its default takes one heuristic config for row reductions such as our graphs'
    LayerNorm + modulate + quantize kernels), at the cost of compile time."""
    patches: dict[str, object] = {}
    if multi_kernel_from_env(False):
        patches["triton.multi_kernel"] = 1
    if env_switch(COORDINATE_DESCENT_ENV, False):
        patches["coordinate_descent_tuning"] = True
    return patches


def qdiff_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], options: dict[str, Any] | None = None, mode: str | None = None) -> QuantizedGraph:
    """The Dynamo backend registered as ``"qdiff"``.

    ``options``: ``plan`` (required), ``inductor``, ``group``, ``mode``, ``lowering`` (see :class:`BackendOptions`) and
    ``release_float_weights`` (default False): once a graph is compiled, free the storage of the float weights that no
    graph of the plan reads any more (ops quantized in every timestep group; biases, norms and full-precision ops keep
    theirs). Peak memory then holds the quantized weights only, but the eager module can no longer run: its released
    parameters keep their shape and dtype but have no data (an eager op reading one raises or crashes the process; so
    would ``state_dict``, ``.to()`` or calibrating it again). Only the compiled module may be called afterwards; a later
    graph that would read a released weight fails with an error naming it.
    """
    opts = BackendOptions.parse(options)
    if opts.guarded:
        from .dispatch import guard_on_active_group

        guard_on_active_group()
    device = _device_of(example_inputs)
    started = time.perf_counter()
    lowering_name, lowering = choose_lowering(opts.lowering, device)
    prepared, converted = build_quantized_graph(gm, example_inputs, opts.plan, opts.group, lowering)
    fused = siblings = heads = fp8_projections = norm_quant = 0
    placed: dict[str, int] = {}
    if lowering.linear_fused is not None:
        if siblings_enabled():
            converted, siblings = fuse_siblings(converted, lowering.linear)
            log_graph("fuse_siblings", converted)
        converted, fused = fuse_epilogues(converted, lowering.linear, lowering.linear_fused)
        log_graph("fuse_epilogues", converted)
        converted, counts = place_act_quant(converted, lowering.linear, lowering.linear_fused, extra_fns=(lowering.conv,),
                                            attention_fns=(lowering.attention,))
        placed = dict(counts)
        log_graph("place_act_quant", converted)
        if lowering.linear_heads is not None and heads_enabled():
            converted, heads = fuse_attention_heads(converted, lowering.linear, lowering.attention, lowering.linear_heads,
                                                    lowering.heads_unsupported)
            log_graph("fuse_attention_heads", converted)
        if lowering.linear_heads is not None and fp8_qkv_from_env():  # (after the heads pass: what it left)
            converted, fp8_projections = write_fp8_projections(converted, lowering.linear, lowering.attention)
            log_graph("write_fp8_projections", converted)
        if lowering.norm_quant is not None and norm_quant_enabled():
            converted, norm_quant = fuse_norm_quant(converted, (lowering.linear, lowering.linear_fused), lowering.norm_quant)
            log_graph("fuse_norm_quant", converted)
    released = check_released_unread(converted, example_inputs)  # inputs released by an earlier compile: never read
    freeing = plan_release(converted, example_inputs, opts.plan) if opts.release_float_weights else ReleasePlan()
    drop = released | set(freeing.release)
    use_inductor = opts.inductor if opts.inductor is not None else device.type == "cuda"
    compile_s = {"passes": time.perf_counter() - started}
    runner: Callable[..., Any] = converted.forward
    kernel_pass = None
    if use_inductor:
        from torch._inductor import list_mode_options
        from torch._inductor.compile_fx import compile_fx

        mode = opts.mode or mode
        patches = dict(list_mode_options(mode)) if mode else {}
        kernel_pass = QdiffKernelPass(opts.plan.digest(), lowering_name)
        patches["post_grad_custom_post_pass"] = kernel_pass
        patches.update(inductor_patches_from_env())
        # Dynamo's map from lifted parameters to guard sources does not know our quantized
        # buffers; without it AOTAutograd treats every parameter and buffer as a static input.
        if hasattr(converted, "_param_name_to_source"):
            del converted._param_name_to_source
        # released (or about to be released) weights never reach AOTAutograd / Inductor / CUDA graphs
        graph, inputs = without_inputs(converted, example_inputs, drop) if drop else (converted, list(example_inputs))
        started = time.perf_counter()
        with memoized_kernel_analysis():  # (PyTorch analyses each kernel launch's writes once per phase, uncached)
            runner = compile_fx(graph, inputs, config_patches=patches)
        compile_s["inductor"] = time.perf_counter() - started
        if drop:
            runner = dropping_inputs(runner, drop, len(example_inputs))
    freed = release({name: example_inputs[i] for i, name in freeing.release.items()})
    warn_kept(opts.plan, freeing.kept)
    record = QuantizedGraph(prepared, converted, runner, lowering_name, fused, kernel_pass, released=freed, fused_siblings=siblings,
                            act_quant=placed, attention_heads=heads, fp8_projections=fp8_projections,
                            norm_quant=norm_quant, compile_s=compile_s)
    opts.plan.compiled.append(record)
    return record

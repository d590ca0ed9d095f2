"""Shared pieces of the Triton kernels: interpreter detection, autotune helpers, device helpers
(quantize prologues, epilogue activations, tile order) and the host-side argument checks.

Interpreter mode (``TRITON_INTERPRET=1``) is decided by Triton once, when it is first imported:
its own library functions (``tl.sum``, ``tl.interleave``, ...) are decorated then, so the variable
must be set before anything imports ``triton``. :data:`INTERPRET` records whether this process
runs kernels in the interpreter; :func:`check_launchable` names the problem when a kernel is asked
to run on CPU tensors in a process that cannot.
"""

from __future__ import annotations

import functools
import inspect

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice
from triton.runtime.interpreter import InterpretedFunction


@triton.jit
def _probe():
    pass


INTERPRET: bool = isinstance(_probe, InterpretedFunction)
# Triton's own jit library functions must be interpreted too, or interpreted kernels cannot call them.
_STDLIB_INTERPRETED: bool = isinstance(tl.standard.cdiv, InterpretedFunction)

FP8_MAX = 448.0
ACTIVATIONS = {"none": 0, "silu": 1, "gelu_tanh": 2}
# the same activations in PyTorch (what the kernels' epilogues compute, for references and unfused routes)
TORCH_ACTIVATIONS = {
    "none": lambda y: y,
    "silu": torch.nn.functional.silu,
    "gelu_tanh": lambda y: torch.nn.functional.gelu(y, approximate="tanh"),
}

# triton.autotune's on-disk cache of the chosen config per key (Triton >= 3.2); Inductor replaces
# the autotuner with its own (also cached) when the kernel is compiled into a graph.
_AUTOTUNE_KW = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}


def autotuned(kernel, configs: list[triton.Config], key: list[str], interpret_config: triton.Config | None = None):
    """``triton.autotune`` over ``configs`` keyed by ``key``; in the interpreter only ``interpret_config``."""
    if INTERPRET:
        configs = [interpret_config or INTERPRET_CONFIG]
    return triton.autotune(configs=configs, key=key, **_AUTOTUNE_KW)(kernel)


def config(bm: int, bn: int, bk: int, stages: int, warps: int, group_m: int = 8) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m}, num_stages=stages, num_warps=warps)


def configs_from(table: list[tuple[int, ...]]) -> list[triton.Config]:
    """Configs from a table of ``(BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps[, GROUP_M])`` rows."""
    return [config(*row) for row in table]


# Small tiles so that tests on small shapes cover several tiles and every edge mask.
INTERPRET_CONFIG = config(16, 32, 32, 1, 4, 2)


def activation_code(act: str) -> int:
    try:
        return ACTIVATIONS[act]
    except KeyError:
        raise ValueError(f"unknown epilogue activation {act!r}; choose one of {', '.join(ACTIVATIONS)}") from None


# ---------------------------------------------------------------------------------------------
# device helpers


@triton.jit
def tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program, GROUP_M row tiles at a time (L2 reuse of weight tiles)."""
    return grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)


@triton.jit
def grouped_tile(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of linear tile index ``pid``, GROUP_M row tiles at a time (L2 reuse of weight tiles)."""
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows
    pid_n = (pid % per_group) // rows
    return pid_m, pid_n


@triton.jit
def rint(v, INTERPRET: tl.constexpr):
    """Round half to even (``torch.round``); |v| < 2**22 in the interpreter's path."""
    if INTERPRET:
        return (v + 12582912.0) - 12582912.0
    else:
        return libdevice.rint(v)


@triton.jit
def quantize_fp8(v, INTERPRET: tl.constexpr):
    """fp32 ``v`` (already divided by the scale) -> float8e4nv, saturating at +-448, round to nearest even.

    The interpreter's float -> fp8 cast does not carry mantissa overflow into the exponent, so
    there ``v`` is first rounded onto the e4m3 grid in fp32 (then the cast is exact).
    """
    v = tl.clamp(v, -448.0, 448.0)
    if INTERPRET:
        bits = v.to(tl.int32, bitcast=True)
        e = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)  # e4m3: 3 mantissa bits, min normal 2**-6
        ulp = ((e + 124) << 23).to(tl.float32, bitcast=True)  # 2 ** (e - 3)
        v = rint(v / ulp, INTERPRET) * ulp
    return v.to(tl.float8e4nv, fp_downcast_rounding="rtne")


@triton.jit
def quantize_int8(v, zp, QMIN: tl.constexpr, QMAX: tl.constexpr, INTERPRET: tl.constexpr):
    """fp32 ``v`` (already divided by the scale) -> int8 ``clamp(round(v) + zp, QMIN, QMAX)``.

    Clamping before rounding to the integer bounds ``QMIN - zp, QMAX - zp`` gives the same result.
    """
    v = tl.clamp(v, QMIN - zp, QMAX - zp)
    return (rint(v, INTERPRET) + zp).to(tl.int8)


@triton.jit
def apply_activation(y, ACT: tl.constexpr):
    """Epilogue activation on fp32: 0 none, 1 SiLU, 2 GELU (tanh approximation)."""
    if ACT == 1:
        y = y * tl.sigmoid(y)
    elif ACT == 2:
        inner = 0.7978845608028654 * (y + 0.044715 * y * y * y)
        y = y * tl.sigmoid(2.0 * inner)  # 0.5 * (1 + tanh(u)) == sigmoid(2u)
    return y


@triton.jit
def store_output(acc, rm, rn, M, N, out_ptr, stride_om, stride_on, ws_ptr, bias_ptr, a_scale,
                 HAS_BIAS: tl.constexpr, PER_CHANNEL_SCALE: tl.constexpr, ACT: tl.constexpr):
    """acc (fp32) * a_scale * w_scale[n] (if per-channel) + bias[n], activation, cast, store."""
    y = epilogue(acc, rn, N, ws_ptr, bias_ptr, a_scale, HAS_BIAS, PER_CHANNEL_SCALE, ACT)
    store_tile(y, rm, rn, M, N, out_ptr, stride_om, stride_on)


@triton.jit
def store_tile(y, rm, rn, M, N, out_ptr, stride_om, stride_on):
    """Cast ``y`` to the output's element type and store the in-bounds part."""
    ptrs = out_ptr + rm[:, None] * stride_om + rn[None, :] * stride_on
    tl.store(ptrs, y.to(out_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn < N)[None, :])


def out_columns(out_scale: torch.Tensor | None, heads: bool) -> bool:
    """The GEMM kernels' ``OUT_COLS``: a plain fp8 output (not heads) quantized with one static scale per column."""
    return out_scale is not None and not heads and out_scale.numel() > 1


@triton.jit
def quantize_output(y, rn, N, os_ptr, OUT_COLS: tl.constexpr, INTERPRET: tl.constexpr):
    """fp32 output ``y`` as e4m3 codes of the consumer's static scale: ``os_ptr[0]``, or ``os_ptr[n]`` per column
    (``OUT_COLS``: a projection whose column sections feed different quantized inputs, e.g. attention's q / k / v)."""
    if OUT_COLS:
        inv = tl.math.div_rn(1.0, tl.load(os_ptr + rn, mask=rn < N, other=1.0))[None, :]
    else:
        inv = tl.math.div_rn(1.0, tl.load(os_ptr))
    return quantize_fp8(y * inv, INTERPRET)


@triton.jit
def store_heads(y, rm, rn, M, N, out_ptr, os_ptr, N_RM: tl.constexpr, SEQ: tl.constexpr, SEQ_PAD: tl.constexpr,
                HEAD_D: tl.constexpr, HEAD_W: tl.constexpr, INTERPRET: tl.constexpr):
    """Store a GEMM tile as fp8 attention heads (:mod:`..heads`, the layout): ``y`` (fp32, M = B * SEQ rows) is quantized
    per column with the static scales ``os_ptr[n]``; columns ``[0, N_RM)`` (q / k heads of HEAD_D) go to rows of
    ``N_RM / HEAD_D`` heads of HEAD_W bytes, zero-padded from HEAD_D (columns ``d < HEAD_W - HEAD_D`` also write the zero
    at ``d + HEAD_D``), columns ``[N_RM, N)`` (V) to ``(B, N - N_RM, SEQ_PAD)`` after them, keys contiguous."""
    n_ok = rn < N
    y8 = quantize_fp8(y * tl.math.div_rn(1.0, tl.load(os_ptr + rn, mask=n_ok, other=1.0))[None, :], INTERPRET)
    row_ok = (rm < M)[:, None]
    rm64 = rm.to(tl.int64)
    row_len: tl.constexpr = (N_RM // HEAD_D) * HEAD_W
    if N_RM > 0:
        h = rn // HEAD_D
        d = rn - h * HEAD_D
        offs = rm64[:, None] * row_len + (h * HEAD_W + d)[None, :]
        is_rm = row_ok & (rn < N_RM)[None, :]
        tl.store(out_ptr + offs, y8, mask=is_rm)
        if HEAD_W > HEAD_D:
            tl.store(out_ptr + offs + HEAD_D, tl.zeros_like(y8), mask=is_rm & (d < HEAD_W - HEAD_D)[None, :])
    b = rm64 // SEQ
    v_rows = (rm64 * 0 + M) * row_len + b * ((N - N_RM) * SEQ_PAD) + (rm64 - b * SEQ)  # (the V region starts after M rows)
    # stored transposed, (columns, rows) with the rows (keys) last: the tile's (rows, columns) order lost every odd
    # column's stores of some row groups on an H200 (triton 3.6; the interpreter was right), this order does not
    v_ok = (n_ok & (rn >= N_RM))[:, None] & (rm < M)[None, :]
    tl.store(out_ptr + ((rn - N_RM) * SEQ_PAD)[:, None] + v_rows[None, :], tl.trans(y8), mask=v_ok)


@triton.jit
def epilogue(acc, rn, N, ws_ptr, bias_ptr, a_scale, HAS_BIAS: tl.constexpr, PER_CHANNEL_SCALE: tl.constexpr, ACT: tl.constexpr):
    """fp32 ``acc * a_scale * w_scale[n] (if per-channel) + bias[n]``, then the activation."""
    mask_n = rn < N
    if PER_CHANNEL_SCALE:
        ws = tl.load(ws_ptr + rn, mask=mask_n, other=0.0)
        acc = acc * (a_scale * ws)[None, :]
    else:
        acc = acc * a_scale
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + rn, mask=mask_n, other=0.0)[None, :]
    return apply_activation(acc, ACT)


@triton.jit
def slice_bound(I: tl.constexpr, NS: tl.constexpr, K, B1, B2, B3):
    """Start of slice ``I`` of a split K axis (``I == NS``: its end ``K``): 0, B1, B2, B3 (interior bounds), K."""
    if I == 0:
        b = K * 0
    elif I == NS:
        b = K
    elif I == 1:
        b = B1
    elif I == 2:
        b = B2
    else:
        b = B3
    return b


@triton.jit
def slice_quantizer(as_ptr, zp_ptr, s, ASYM: tl.constexpr):
    """Slice ``s``'s activation quantizer (an unsplit op has one, ``s = 0``): (scale, 1 / scale (IEEE: plain "/" is
    approximate on GPU), zero point, zero point as fp32; 0 without ``ASYM``)."""
    scale = tl.load(as_ptr + s)
    inv = tl.math.div_rn(1.0, scale)
    if ASYM:
        zp = tl.load(zp_ptr + s)
        zp_f = zp.to(tl.float32)
    else:
        zp = 0
        zp_f = 0.0
    return scale, inv, zp, zp_f


# ---------------------------------------------------------------------------------------------
# launching: traced calls go through the triton_op (Inductor inlines the kernel), eager calls launch directly


def eager_call(x: torch.Tensor) -> bool:
    """Whether a wrapper call runs eagerly on a plain tensor: not under ``torch.compile`` / export tracing (Dynamo,
    or AOTAutograd's fake / functional tensors) and with no dispatch or function mode active.

    Eager calls skip the ``torch.library`` dispatch of the ``triton_op`` (a Python boundary of tens of microseconds)
    and launch through :func:`direct`; traced calls must reach the op, so that Inductor sees the kernels (its
    functionalization decomposes a ``triton_op`` into ``wrap_triton`` launches it compiles with its own launcher)."""
    return (
        not torch.compiler.is_compiling()
        and type(x) is torch.Tensor
        and torch._C._len_torch_dispatch_stack() == 0
        and not torch._C._is_torch_function_mode_enabled()
    )


class DirectLauncher:
    """Eager launches of a Triton kernel on its tensors' device, without the autotuner's per-call bookkeeping.

    Triton launches on the *current* CUDA device's stream, so a call whose tensors live on another GPU (``cuda:1``
    while the current device is 0) switches device for the launch. For a ``triton.autotune`` kernel the first
    launch of an autotune key runs the autotuner (which benchmarks, or reads its disk cache); its choice is kept
    per key, and later launches call the JIT function with it directly. The key is the values of the
    autotuner's key arguments plus the dtypes of the tensor arguments, as Triton's own."""

    def __init__(self, kernel):
        self.autotuner = kernel if all(hasattr(kernel, a) for a in ("keys", "arg_names", "configs", "fn")) else None
        self.kernel = kernel
        if self.autotuner is not None:
            names = list(kernel.arg_names)
            self._key_pos = [(names.index(k), k) for k in kernel.keys]
        self._resolved: dict[tuple, dict] = {}

    def __getitem__(self, grid):
        return functools.partial(self.run, grid)

    def run(self, grid, *args, **kwargs):
        dev = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
        if dev is not None and dev.type == "cuda" and dev.index is not None and dev.index != torch.cuda.current_device():
            with torch.cuda.device(dev):
                return self._launch(grid, args, kwargs)
        return self._launch(grid, args, kwargs)

    def _launch(self, grid, args, kwargs):
        if self.autotuner is None:
            return self.kernel[grid](*args, **kwargs)
        n = len(args)
        key = [args[i] if i < n else kwargs[k] for i, k in self._key_pos]
        key += [a.dtype for a in args if isinstance(a, torch.Tensor)]
        key = tuple(key)
        opts = self._resolved.get(key)
        if opts is None:
            out = self.autotuner[grid](*args, **kwargs)
            self._resolved[key] = self.autotuner.best_config.all_kwargs()
            return out
        return self.autotuner.fn.run(*args, grid=grid, warmup=False, **kwargs, **opts)


@functools.lru_cache(maxsize=None)
def direct(kernel):
    """``kernel`` launched eagerly through a :class:`DirectLauncher` (the eager counterpart of
    ``torch.library.wrap_triton``, same ``[grid](*args, **kwargs)`` call)."""
    return DirectLauncher(kernel)


# ---------------------------------------------------------------------------------------------
# host helpers


def check_launchable(*tensors: torch.Tensor) -> None:
    """Raise if the kernels cannot run on these tensors' device in this process."""
    dev = tensors[0].device
    for t in tensors:
        if t is not None and t.device != dev:
            raise ValueError(f"all kernel arguments must be on one device, got {dev} and {t.device}")
    if dev.type == "cuda":
        if INTERPRET:
            raise RuntimeError("Triton runs in interpreter mode (TRITON_INTERPRET=1): qdiff kernels cannot run on CUDA tensors")
        return
    if dev.type != "cpu":
        raise ValueError(f"qdiff Triton kernels run on CUDA (or CPU in Triton's interpreter), not on {dev}")
    if not (INTERPRET and _STDLIB_INTERPRETED):
        raise RuntimeError(
            "qdiff Triton kernels on CPU tensors need Triton's interpreter: set TRITON_INTERPRET=1 before "
            "anything imports triton (it was imported without it)"
        )


def kernels_usable_on(device: torch.device) -> bool:
    """Whether the kernels can run on ``device`` in this process (CUDA, or CPU in the interpreter)."""
    if device.type == "cuda":
        return not INTERPRET
    return device.type == "cpu" and INTERPRET and _STDLIB_INTERPRETED


def check_tensor(t: torch.Tensor, name: str, dtypes: tuple[torch.dtype, ...], dim: int | None = None, shape: tuple | None = None) -> None:
    """Clear errors for a kernel argument of the wrong dtype / rank / shape."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must be one of {[str(d) for d in dtypes]}, got {t.dtype}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must have {dim} dims, got shape {tuple(t.shape)}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def check_scalar(t: torch.Tensor, name: str, dtype: torch.dtype) -> None:
    if not isinstance(t, torch.Tensor) or t.numel() != 1 or t.dtype != dtype:
        got = f"{t.dtype} tensor of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise TypeError(f"{name} must be a one-element {dtype} tensor (a buffer, not a Python number), got {got}")


def as_float(t: torch.Tensor) -> torch.Tensor:
    """``t.float()`` without the dispatch when it already is fp32 (wrappers run per GEMM call)."""
    return t if t.dtype == torch.float32 else t.float()


def flat(t: torch.Tensor) -> torch.Tensor:
    """``t.reshape(-1)`` without the dispatch when it already is 1-D."""
    return t if t.dim() == 1 else t.reshape(-1)


def rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a 2-D (rows, features) tensor with unit stride in its last dim (a view where possible)."""
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 or x2.shape[-1] == 1 else x2.contiguous()


def row_major(t: torch.Tensor, name: str) -> torch.Tensor:
    """``t`` with unit stride in its last dim (weights must already be contiguous)."""
    if t.stride(-1) != 1 and t.shape[-1] != 1:  # a size-1 dim's stride is never used (torch may leave any value there)
        raise ValueError(f"{name} must be contiguous in its last dimension, got strides {t.stride()}")
    return t


# Split ops (split-shortcut quantization): the kernels take up to this many input-channel slices, their interior
# bounds as scalar arguments B1..B3 (Triton specializes them on divisibility by 16, so aligned slices keep
# vectorized loads); ops with more slices run the reference.
MAX_SLICES = 4


def split_args(splits, size: int, name: str = "input features") -> tuple[int, int, int, int]:
    """``(NS, B1, B2, B3)`` kernel arguments of input-channel split points ``[0, c1, ..., size]`` (None: unsplit).

    Checks that the points start at 0, increase strictly and end at ``size``, and that there are at most
    :data:`MAX_SLICES` slices."""
    if splits is None:
        return 1, 0, 0, 0
    pts = [int(p) for p in splits]
    if len(pts) < 3 or pts[0] != 0 or pts[-1] != size or any(b <= a for a, b in zip(pts, pts[1:])):
        raise ValueError(f"split points {tuple(pts)} must increase strictly from 0 to {size} {name} with at least two slices")
    if len(pts) - 1 > MAX_SLICES:
        raise ValueError(f"{len(pts) - 1} slices (split points {tuple(pts)}): the kernels take at most {MAX_SLICES}")
    inner = pts[1:-1] + [0] * (MAX_SLICES - len(pts) + 1)
    return len(pts) - 1, inner[0], inner[1], inner[2]


def check_split_params(w_scale: torch.Tensor, a_scale: torch.Tensor, a_zp: torch.Tensor | None, n: int, ns: int) -> None:
    """Per-slice scales of a split op: weight scale (N, NS) contiguous fp32, activation scale / zero point NS entries."""
    check_tensor(w_scale, "weight scale", (torch.float32,))
    if tuple(w_scale.shape) != (n, ns) or not w_scale.is_contiguous():
        raise ValueError(f"a split op's weight scale must be contiguous (N, slices) = ({n}, {ns}), got shape {tuple(w_scale.shape)}")
    for name, t, dtype in (("activation scale", a_scale, torch.float32), ("activation zero point", a_zp, torch.int32)):
        if t is not None and (not isinstance(t, torch.Tensor) or t.dtype != dtype or t.numel() != ns):
            got = f"{t.dtype} of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise TypeError(f"{name} of a split op must be a {dtype} tensor with one entry per slice ({ns}), got {got}")


def check_int8_quant_params(w_scale: torch.Tensor, a_scale: torch.Tensor, a_zp: torch.Tensor | None, n: int, ns: int | None) -> None:
    """Scales of an int8-style op: per-slice ones for a split op (``ns`` slices), else a (N,) fp32 weight scale, a
    scalar fp32 activation scale and (asymmetric) a scalar int32 zero point."""
    if ns is not None:
        check_split_params(w_scale, a_scale, a_zp, n, ns)
        return
    check_tensor(w_scale, "weight scale", (torch.float32,), shape=(n,))
    check_scalar(a_scale, "activation scale", torch.float32)
    if a_zp is not None:
        check_scalar(a_zp, "activation zero point", torch.int32)


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def fused_bias(bias: torch.Tensor | None, bias_corr: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """``bias + bias_corr`` in fp32 (either may be None), checked to have ``n`` entries."""
    out = None
    for name, b in (("bias", bias), ("bias_corr", bias_corr)):
        if b is None:
            continue
        if b.numel() != n:
            raise ValueError(f"{name} must have {n} entries (one per output feature), got shape {tuple(b.shape)}")
        if b.dim() != 1 or b.dtype != torch.float32:  # (no-op calls skipped: each costs a dispatch per GEMM call)
            b = b.reshape(n).float()
        out = b if out is None else out + b
    return out

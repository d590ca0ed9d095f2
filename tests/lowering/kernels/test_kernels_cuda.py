"""The kernels on a GPU at DiT / UNet shapes (skipped without CUDA).

Every run draws fresh random inputs (the seed is printed, so a failure can be replayed with
``QDIFF_TEST_SEED``), poisons the CUDA caching allocator with NaN before each kernel call (so an
output element the kernel fails to write shows up as NaN) and bounds the relative error
``||y - y_ref|| / ||y_ref||`` per format against the reference lowering run in fp32 on the same GPU.
"""

import os

from functools import partial

import pytest
import torch
import torch.nn.functional as F

from qcompile.lowering import conv_im2col, reference, triton_lowering
from qcompile.lowering.weights import quantize_weight

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# bound on ||kernel - reference|| / ||reference|| (bf16 inputs and outputs, reference in fp32)
REL_TO_REFERENCE = {"fp8": 1e-2, "int8": 1e-2, "w4a16": 1e-2, "w4a8": 1e-2, "w8a16": 1e-2}
# loose sanity bound against the unquantized op (catches scale mix-ups shared with the reference)
REL_TO_FLOAT = {"fp8": 0.1, "int8": 0.05, "w4a16": 0.2, "w4a8": 0.2, "w8a16": 0.05}
FORMATS = {  # name: (weight format, activation format, asymmetric, group size)
    "fp8": ("fp8_e4m3", "fp8_e4m3", False, None),
    "int8": ("int8", "int8", True, None),
    "w4a16": ("int4", None, False, 64),
    "w4a8": ("int4", "int8", True, 64),
    "w8a16": ("int8", None, False, None),
}
DIT_SHAPES = [(8192, 1152, 4608), (8192, 4608, 1152), (8, 1152, 6912)]


@pytest.fixture
def gen():
    seed = int(os.environ.get("QDIFF_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    print(f"QDIFF_TEST_SEED={seed}")
    return torch.Generator(device="cuda").manual_seed(seed)


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def poison(nbytes: int) -> None:
    """Fill ``nbytes`` of the caching allocator's free memory with NaN (later ``torch.empty`` reuse it)."""
    blocks = [torch.full((nbytes // 4 + 1024,), float("nan"), device="cuda") for _ in range(2)]
    del blocks


def quant(w: torch.Tensor, fmt: str, kind: str, group):
    """quantize_weight (on CPU) with data and scales moved to the GPU."""
    qw = quantize_weight(w.cpu(), fmt, kind, group, clip_search=False)
    qw.data, qw.scale = qw.data.cuda(), qw.scale.cuda()
    return qw


def rel_err(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.double(), out.double()
    return ((out - ref).norm() / ref.norm()).item()


def _qparams(x, afmt, asym):
    lo, hi = min(x.min().item(), 0.0), max(x.max().item(), 0.0)
    if afmt == "fp8_e4m3" or not asym:
        scale, zp = max(-lo, hi) / (448 if afmt == "fp8_e4m3" else 127), 0
    else:
        scale = (hi - lo) / 255
        zp = round(-128 - lo / scale)
    return torch.tensor(scale, device="cuda"), torch.tensor(zp, dtype=torch.int32, device="cuda")


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("m,k,n", DIT_SHAPES)
def test_linear_kernels_at_dit_shapes(fmt, m, k, n, gen):
    wfmt, afmt, asym, group = FORMATS[fmt]
    w = torch.randn(n, k, device="cuda", generator=gen) * k**-0.5
    x = (torch.randn(m, k, device="cuda", generator=gen) + 0.3).to(torch.bfloat16)
    b = torch.randn(n, device="cuda", generator=gen) * 0.1
    qw = quant(w, wfmt, "linear", group)
    s, z = _qparams(x.float(), afmt or "int8", asym)
    kw = dict(wfmt=wfmt, group_size=group, weight_shape=qw.shape, afmt=afmt, asym=asym)
    assert triton_lowering.linear_route(x, **{k_: kw[k_] for k_ in ("wfmt", "afmt", "group_size")}) is not None
    poison(m * n * 2)
    out = triton_lowering.qlinear(x, qw.data, qw.scale, b, s, z, **kw)
    torch.cuda.synchronize()
    assert out.dtype == torch.bfloat16 and out.shape == (m, n)
    assert torch.isfinite(out).all(), "kernel left output elements unwritten (NaN poison) or overflowed"
    ref = reference.qlinear(x.float(), qw.data, qw.scale, b, s, z, **kw)
    e_ref, e_float = rel_err(ref, out), rel_err(F.linear(x.float(), w, b), out)
    print(f"{fmt} {m}x{k}x{n}: rel err vs reference {e_ref:.2e}, vs float {e_float:.2e}")
    assert e_ref < REL_TO_REFERENCE[fmt]
    assert e_float < REL_TO_FLOAT[fmt]


@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_fused_epilogue_activation(act, gen):
    m, k, n = 4096, 1152, 4608
    w = torch.randn(n, k, device="cuda", generator=gen) * k**-0.5
    x = torch.randn(m, k, device="cuda", generator=gen).to(torch.bfloat16)
    qw = quant(w, "fp8_e4m3", "linear", None)
    s, z = _qparams(x.float(), "fp8_e4m3", False)
    kw = dict(wfmt="fp8_e4m3", group_size=None, weight_shape=qw.shape, afmt="fp8_e4m3")
    poison(m * n * 2)
    out = triton_lowering.qlinear_fused(x, qw.data, qw.scale, None, s, z, **kw, act=act)
    fn = F.silu if act == "silu" else (lambda y: F.gelu(y, approximate="tanh"))
    assert torch.isfinite(out).all()
    assert rel_err(fn(reference.qlinear(x.float(), qw.data, qw.scale, None, s, z, **kw)), out) < 1e-2


@pytest.mark.parametrize("fmt", ["fp8", "int8"])
@pytest.mark.parametrize("shape,stride,padding", [((2, 320, 64, 64), 1, 1), ((2, 640, 32, 32), 2, 1), ((2, 320, 64, 64), 1, 0)])
def test_conv_kernels_at_unet_shapes(fmt, shape, stride, padding, gen):
    wfmt, afmt, asym, _ = FORMATS[fmt]
    c = shape[1]
    ksize = 3 if padding else 1
    w = torch.randn(c, c, ksize, ksize, device="cuda", generator=gen) * (c * ksize * ksize) ** -0.5
    x = torch.randn(*shape, device="cuda", generator=gen).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    qw = quant(w, wfmt, "conv", None)
    s, z = _qparams(x.float(), afmt, asym)
    kw = dict(wfmt=wfmt, group_size=None, weight_shape=qw.shape, kind="conv", stride=(stride, stride), padding=(padding, padding),
              dilation=(1, 1), groups=1, afmt=afmt, asym=asym)
    poison(x.numel() * 4)
    out = triton_lowering.qconv(x, qw.data, qw.scale, None, s, z, **kw)
    assert torch.isfinite(out).all()
    ref = reference.qconv(x.float(), qw.data, qw.scale, None, s, z, **kw)
    e = rel_err(ref, out)
    print(f"conv {fmt} {shape} stride {stride} pad {padding}: rel err vs reference {e:.2e}")
    assert e < REL_TO_REFERENCE[fmt]


class _QLinearModule(torch.nn.Module):
    def __init__(self, fmt: str, k: int, n: int):
        super().__init__()
        wfmt, afmt, asym, group = FORMATS[fmt]
        qw = quant(torch.randn(n, k) * k**-0.5, wfmt, "linear", group)
        self.register_buffer("w", qw.data)
        self.register_buffer("ws", qw.scale)
        self.register_buffer("s", torch.tensor(0.02, device="cuda"))
        self.register_buffer("z", torch.tensor(3, dtype=torch.int32, device="cuda"))
        self.kw = dict(wfmt=wfmt, group_size=group, weight_shape=qw.shape, afmt=afmt, asym=asym)

    def forward(self, x):
        y = triton_lowering.qlinear(x * 2.0, self.w, self.ws, None, self.s, self.z, **self.kw)
        return F.gelu(y) + 1.0


@pytest.mark.parametrize("fmt", ["fp8", "int8", "w4a16"])
@pytest.mark.parametrize("mode", ["default", "reduce-overhead", "max-autotune-no-cudagraphs"])
def test_triton_ops_compile_through_inductor(fmt, mode, gen):
    mod = _QLinearModule(fmt, 1152, 1152)
    x = torch.randn(512, 1152, device="cuda", generator=gen).to(torch.bfloat16)
    torch._dynamo.reset()
    compiled = torch.compile(mod, fullgraph=True, mode=mode)
    with torch.no_grad():
        eager = mod(x)
        outs = [compiled(x).clone() for _ in range(3)]
    assert torch.equal(outs[1], outs[2])
    assert rel_err(eager, outs[2]) < 1e-2


def _fp8_prequant_case(m, k, n, gen):
    from qcompile.lowering.kernels.fp8_linear import quantize_input_fp8

    w = torch.randn(n, k, device="cuda", generator=gen) * k**-0.5
    x = torch.randn(m, k, device="cuda", generator=gen).to(torch.bfloat16)
    b = torch.randn(n, device="cuda", generator=gen) * 0.1
    qw = quant(w, "fp8_e4m3", "linear", None)
    s, z = _qparams(x.float(), "fp8_e4m3", False)
    ref = reference.qlinear(x.float(), qw.data, qw.scale, b, s, z, wfmt="fp8_e4m3", group_size=None, weight_shape=qw.shape,
                            afmt="fp8_e4m3")
    return quantize_input_fp8(x, s), qw, b, s, ref


def _tma_expected() -> bool:
    from qcompile.lowering.kernels import fp8_tma

    return fp8_tma.HAS_TMA and torch.cuda.get_device_capability() >= (9, 0)


@pytest.mark.parametrize("m,k,n", [(8192, 1152, 3456), (8192, 4608, 1152), (2048, 640, 5120), (1024, 512, 528), (240, 1152, 1152)])
@pytest.mark.parametrize("out_fp8", [False, True, "per column"])
def test_fp8_prequant_route_matches_reference(m, k, n, out_fp8, gen):
    """fp8 inputs of large GEMMs take the persistent TMA kernel (Hopper, Triton >= 3.4), others the tiled kernel;
    both against the reference, with the fp8-output epilogue too (one scale, or one per column: a q / k / v projection
    writing fp8 for attention). (1024 x 512 x 528: a partial last N tile.)"""
    from qcompile.lowering.kernels import fp8_linear_prequant, fp8_tma
    from qcompile.lowering.kernels.fp8_linear import quantize_input_fp8

    xq, qw, b, s, ref = _fp8_prequant_case(m, k, n, gen)
    w = qw.data.view(torch.float8_e4m3fn)
    assert fp8_tma.use_tma(xq, w) == (_tma_expected() and m >= fp8_tma.TMA_MIN_M)
    if out_fp8 == "per column":  # (a spread of scales: each column's own range)
        s_out = (ref.abs().amax(0) / 448).clamp_min(1e-6)
    else:
        s_out = (ref.abs().amax() / 448).reshape(()) if out_fp8 else None
    poison(m * n * 2)
    out = fp8_linear_prequant(xq, w, qw.scale, b, s, torch.bfloat16, out_scale=s_out)
    torch.cuda.synchronize()
    if out_fp8:
        assert out.dtype == torch.float8_e4m3fn
        want = quantize_input_fp8(ref, s_out).float()
        got = out.float()
        # a different accumulation order (and Hopper's fp8 wgmma accumulation) moves the pre-rounding value by a small
        # amount relative to the output's range: codes flip near rounding ties (3 % at K = 4608 on an H200), to the
        # neighbouring e4m3 value for large codes and by a few steps for codes near zero (2026-12-01 runs: 0.0098 vs
        # 0.043 and -0.125 vs 0.029 in units of s_out, ~3e-4 of the range). The same kernel's bf16-output epilogue
        # measures that accumulation error here: allow it, plus one relative e4m3 step (1/8), and bound the error norm
        acc_err = (fp8_linear_prequant(xq, w, qw.scale, b, s, torch.bfloat16).float() - ref).abs().amax(0) / s_out  # per column
        equal = (got == want).float().mean().item()
        near = (got - want).abs() <= 0.125 * torch.maximum(got.abs(), want.abs()) + acc_err + 1e-6
        assert rel_err(want, got) < 0.02, f"fp8 output codes: relative error {rel_err(want, got):.4f}"
        far = (~near).nonzero()[:3].tolist()
        report = (f"{equal:.4f} equal, {torch.isnan(got).float().mean().item():.4f} NaN (unwritten or overflow), "
                  f"{(~near).float().mean().item():.2e} beyond one step + the bf16 epilogue's error {acc_err.max().item():.3f}; e.g. (got, want, ref / s_out) "
                  f"{[(got[i, j].item(), want[i, j].item(), (ref[i, j] / s_out.reshape(-1)[j % s_out.numel()]).item()) for i, j in far]}")
        assert equal > 0.95 and bool(near.all()), report
    else:
        assert torch.isfinite(out).all(), "kernel left output elements unwritten (NaN poison)"
        assert rel_err(ref, out) < REL_TO_REFERENCE["fp8"]


def test_fp8_tma_op_is_inlined_by_inductor(gen):
    """Compiled, the prequant op is decomposed into its Triton launch: Inductor's output code launches our kernel
    (TMA at this size on Hopper) with its own launcher, and no ``torch.ops.qdiff`` call (a Python op) remains."""
    from torch._inductor.utils import run_and_get_code

    from qcompile.lowering.kernels import fp8_linear_prequant

    xq, qw, b, s, ref = _fp8_prequant_case(2048, 1152, 1152, gen)
    w, ws = qw.data.view(torch.float8_e4m3fn), qw.scale.reshape(-1)

    def f(xq):
        return F.gelu(fp8_linear_prequant(xq, w, ws, b, s, torch.bfloat16)) + 1.0

    torch._dynamo.reset()
    with torch.no_grad():
        out, codes = run_and_get_code(torch.compile(f, fullgraph=True), xq)
    code = "\n".join(codes)
    assert "torch.ops.qdiff" not in code
    assert ("fp8_linear_tma_kernel" if _tma_expected() else "fp8_linear_kernel") in code
    assert rel_err(F.gelu(ref) + 1.0, out) < REL_TO_REFERENCE["fp8"]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("fmt", ["fp8", "int8", "w4a16"])
def test_eager_kernels_launch_on_their_tensors_gpu(fmt, gen):
    """Tensors on cuda:1 while the current device is cuda:0 (Triton launches on the current device's stream)."""
    wfmt, afmt, asym, group = FORMATS[fmt]
    w = torch.randn(256, 512, device="cuda", generator=gen) * 512**-0.5
    x = torch.randn(64, 512, device="cuda", generator=gen).to(torch.bfloat16)
    qw = quant(w, wfmt, "linear", group)
    s, z = _qparams(x.float(), afmt or "int8", asym)
    kw = dict(wfmt=wfmt, group_size=group, weight_shape=qw.shape, afmt=afmt, asym=asym)
    on0 = triton_lowering.qlinear(x, qw.data, qw.scale, None, s, z, **kw)
    assert torch.cuda.current_device() == 0
    to1 = lambda t: t.to("cuda:1")  # noqa: E731
    on1 = triton_lowering.qlinear(to1(x), to1(qw.data), to1(qw.scale), None, to1(s), to1(z), **kw)
    assert on1.device == torch.device("cuda:1") and torch.equal(on1.cpu(), on0.cpu())


# -- split ops (split-shortcut quantization) at SD 1.5 up-block shapes ----------------------------------------------
def _split_case(x, w, wfmt, afmt, asym, splits, kind):
    """Quantize ``w`` per slice and each input slice with its own min/max quantizer (channels: dim 1 for convs)."""
    qw = quantize_weight(w.cpu(), wfmt, kind, None, clip_search=False, splits=splits)
    qw.data, qw.scale = qw.data.cuda(), qw.scale.cuda()
    dim = 1 if kind == "conv" else -1
    pairs = [_qparams(x.narrow(dim, a, b - a).float(), afmt, asym) for a, b in zip(splits, splits[1:])]
    return qw, torch.stack([s for s, _ in pairs]), torch.stack([z for _, z in pairs])


def _spread(x, splits, dim):
    """Slices on different ranges (as a skip cat of a wide-range hidden state and a narrow skip), bf16."""
    parts = [x.narrow(dim, a, b - a) * (4.0 if i % 2 == 0 else 0.25) + 0.3 * i for i, (a, b) in enumerate(zip(splits, splits[1:]))]
    return torch.cat(parts, dim=dim).to(torch.bfloat16)


SPLIT_CONV_SHAPES = [  # (input shape, split points, output channels, kernel size): SD 1.5 up blocks after the skip cat
    ((2, 2560, 16, 16), (0, 1280, 2560), 1280, 3),
    ((2, 1920, 32, 32), (0, 1280, 1920), 640, 3),
    ((2, 960, 64, 64), (0, 640, 960), 320, 3),
    ((2, 2560, 16, 16), (0, 1280, 2560), 1280, 1),  # the resnet's 1x1 conv_shortcut (GEMM route)
    ((2, 720, 32, 32), (0, 200, 520, 720), 320, 3),  # three slices, bounds inside channel blocks
]


@pytest.mark.parametrize("fmt", ["fp8", "int8"])
@pytest.mark.parametrize("shape,splits,n,ksize", SPLIT_CONV_SHAPES)
def test_split_conv_kernels_at_sd_shapes(fmt, shape, splits, n, ksize, gen):
    wfmt, afmt, asym, _ = FORMATS[fmt]
    c = shape[1]
    w = torch.randn(n, c, ksize, ksize, device="cuda", generator=gen) * (c * ksize * ksize) ** -0.5
    x = _spread(torch.randn(*shape, device="cuda", generator=gen), splits, 1).contiguous(memory_format=torch.channels_last)
    qw, s, z = _split_case(x, w, wfmt, afmt, asym, splits, "conv")
    pad = ksize // 2
    kw = dict(wfmt=wfmt, group_size=None, weight_shape=qw.shape, kind="conv", stride=(1, 1), padding=(pad, pad), dilation=(1, 1),
              groups=1, afmt=afmt, asym=asym, splits=splits)
    route = triton_lowering.conv_route(x, **{k: kw[k] for k in ("wfmt", "afmt", "group_size", "weight_shape", "kind", "stride", "padding",
                                                                "dilation", "groups", "splits")})
    fp8_engine = conv_im2col.conv_engine(x.shape, (n, c, ksize, ksize), (1, 1), (pad, pad), (1, 1))  # auto: per shape (direct at 960 -> 320, 64x64)
    assert route is not None and route[0] == ("gemm" if ksize == 1 else fp8_engine if fmt == "fp8" else "implicit")
    poison(x.numel() * 4)
    out = triton_lowering.qconv(x, qw.data, qw.scale, None, s, z, **kw)
    torch.cuda.synchronize()
    assert torch.isfinite(out).all(), "kernel left output elements unwritten (NaN poison) or overflowed"
    ref = reference.qconv(x.float(), qw.data, qw.scale, None, s, z, **kw)
    e_ref, e_float = rel_err(ref, out), rel_err(F.conv2d(x.float(), w, None, 1, pad), out)
    print(f"split conv {fmt} {shape} {splits} -> {n} k{ksize}: rel err vs reference {e_ref:.2e}, vs float {e_float:.2e}")
    assert e_ref < REL_TO_REFERENCE[fmt]
    assert e_float < REL_TO_FLOAT[fmt]


@pytest.mark.parametrize("fmt", ["fp8", "int8"])
@pytest.mark.parametrize("m,splits,n", [(4096, (0, 1280, 2560), 1280), (4096, (0, 1000, 1700, 2240), 640), (8, (0, 640, 1920), 1280)])
def test_split_linear_kernels(fmt, m, splits, n, gen):
    wfmt, afmt, asym, _ = FORMATS[fmt]
    k = splits[-1]
    w = torch.randn(n, k, device="cuda", generator=gen) * k**-0.5
    x = _spread(torch.randn(m, k, device="cuda", generator=gen), splits, -1)
    qw, s, z = _split_case(x, w, wfmt, afmt, asym, splits, "linear")
    kw = dict(wfmt=wfmt, group_size=None, weight_shape=qw.shape, afmt=afmt, asym=asym, splits=splits)
    assert triton_lowering.linear_route(x, wfmt=wfmt, afmt=afmt, group_size=None, splits=splits) == fmt
    poison(m * n * 2)
    out = triton_lowering.qlinear(x, qw.data, qw.scale, None, s, z, **kw)
    torch.cuda.synchronize()
    assert torch.isfinite(out).all()
    e_ref = rel_err(reference.qlinear(x.float(), qw.data, qw.scale, None, s, z, **kw), out)
    print(f"split linear {fmt} {m}x{splits}x{n}: rel err vs reference {e_ref:.2e}")
    assert e_ref < REL_TO_REFERENCE[fmt]
    assert rel_err(F.linear(x.float(), w), out) < REL_TO_FLOAT[fmt]


@pytest.mark.parametrize("fmt,engine", [("fp8", "im2col"), ("fp8", "implicit"), ("int8", "implicit")])
def test_split_conv_at_the_sd_up_block_matches_the_reference_and_prints_its_cost(fmt, engine, gen, monkeypatch):
    """The SD up block's most expensive conv (2560 -> 1280, 3x3, 16x16, batch 2), split (slice bounds on tile edges) on
    each engine: the result matches the reference, and the split kernel's, the unsplit kernel's and the reference's
    times are printed (timings are not asserted here: they belong to benchmark scripts, and a shared GPU moves them;
    2026-12-04, the suite on 12 workers measured the split kernel at 2x the unsplit one). The im2col engine (eager: the
    columns in a separate pass) splits in the fp8 linear kernel's prologue path while its unsplit op reads pre-quantized
    columns."""
    from triton.testing import do_bench

    monkeypatch.setenv("QDIFF_CONV_ENGINE", engine)
    wfmt, afmt, asym, _ = FORMATS[fmt]
    shape, splits, n = (2, 2560, 16, 16), (0, 1280, 2560), 1280
    w = torch.randn(n, 2560, 3, 3, device="cuda", generator=gen) * (2560 * 9) ** -0.5
    x = _spread(torch.randn(*shape, device="cuda", generator=gen), splits, 1).contiguous(memory_format=torch.channels_last)
    qw, s, z = _split_case(x, w, wfmt, afmt, asym, splits, "conv")
    kw = dict(wfmt=wfmt, group_size=None, weight_shape=qw.shape, kind="conv", stride=(1, 1), padding=(1, 1), dilation=(1, 1),
              groups=1, afmt=afmt, asym=asym)
    unsplit_scale = qw.scale.amax(dim=1).contiguous()  # (timing only: the unsplit op on the same data)

    def op(scale, a_scale, zp, splits=None):  # the im2col engine compiled, as in a model (columns written by one fused kernel)
        f = lambda x: triton_lowering.qconv(x, qw.data, scale, None, a_scale, zp, **kw, splits=splits)  # noqa: E731
        return torch.compile(f, dynamic=False) if engine == "im2col" else f

    torch._dynamo.reset()
    split_op = op(qw.scale, s, z, splits)
    poison(x.numel() * 4)
    out = split_op(x)
    assert torch.isfinite(out).all(), "the split conv left output elements unwritten (NaN poison)"
    ref = reference.qconv(x.float(), qw.data, qw.scale, None, s, z, **kw, splits=splits)
    assert rel_err(ref, out) < REL_TO_REFERENCE[fmt]
    t_split = do_bench(partial(split_op, x))
    t_unsplit = do_bench(partial(op(unsplit_scale, s[:1].reshape(()), z[:1].reshape(())), x))
    t_ref = do_bench(lambda: reference.qconv(x, qw.data, qw.scale, None, s, z, **kw, splits=splits))
    print(f"split conv {fmt} ({engine}): split kernel {t_split * 1e3:.1f} us, unsplit kernel {t_unsplit * 1e3:.1f} us, reference {t_ref * 1e3:.1f} us")


def _compiled_silu_conv(x, qw, bias, s, z, kw):
    """``silu(qconv(silu(x)))`` compiled with Inductor: (output, Inductor's code, the reference lowering's output)."""
    from torch._inductor.utils import run_and_get_code

    def f(x):
        return F.silu(triton_lowering.qconv(F.silu(x), qw.data, qw.scale, bias, s, z, **kw))

    torch._dynamo.reset()
    with torch.no_grad():
        out, codes = run_and_get_code(torch.compile(f, fullgraph=True), x)
    return out, "\n".join(codes), F.silu(reference.qconv(F.silu(x).float(), qw.data, qw.scale, bias, s, z, **kw))


@pytest.mark.parametrize("engine,kernel", [("im2col", "fp8_linear_kernel"), ("implicit", "conv2d_kernel")])
def test_split_conv_op_is_inlined_by_inductor(engine, kernel, gen, monkeypatch):
    """Compiled, a split conv's op is decomposed into its Triton launch (the kernel QdiffKernelPass counts): the fp8
    linear kernel's split path on im2col columns (the default engine) or the implicit-GEMM kernel."""
    monkeypatch.setenv("QDIFF_CONV_ENGINE", engine)
    shape, splits, n = (2, 1920, 32, 32), (0, 1280, 1920), 640
    w = torch.randn(n, 1920, 3, 3, device="cuda", generator=gen) * (1920 * 9) ** -0.5
    x = _spread(torch.randn(*shape, device="cuda", generator=gen), splits, 1).contiguous(memory_format=torch.channels_last)
    qw, s, z = _split_case(x, w, "fp8_e4m3", "fp8_e4m3", False, splits, "conv")
    kw = dict(wfmt="fp8_e4m3", group_size=None, weight_shape=qw.shape, kind="conv", stride=(1, 1), padding=(1, 1), dilation=(1, 1),
              groups=1, afmt="fp8_e4m3", splits=splits)

    out, code, ref = _compiled_silu_conv(x, qw, None, s, z, kw)
    if engine == "im2col":  # the columns are quantized from SiLU's fp32 value in the fused producer, as in
        # test_fp8_conv_im2col_quantizes_in_the_producer (against bf16-rounded SiLU: 1.03e-2 on an H200, 2026-12-01)
        ref = F.silu(reference.qconv(F.silu(x.float()), qw.data, qw.scale, None, s, z, **kw))
    assert "torch.ops.qdiff" not in code and kernel in code
    assert rel_err(ref, out) < REL_TO_REFERENCE["fp8"]


@pytest.mark.parametrize("writer", ["kernel", "inductor"])
@pytest.mark.parametrize("shape,n,stride", [((2, 320, 64, 64), 320, 1), ((2, 1280, 16, 16), 1280, 2), ((2, 640, 32, 32), 1280, 1)])
def test_fp8_conv_im2col_quantizes_in_the_producer(shape, n, stride, writer, gen, monkeypatch):
    """The im2col fp8 conv engine (auto's choice at these shapes), compiled: Inductor fuses SiLU and the fp8 quantization into the producer kernel;
    ``qdiff::im2col`` copies its bytes into the columns (``QDIFF_IM2COL_WRITER=inductor``: Inductor writes the columns
    in that same fused kernel); our fp8 GEMM (TMA or tiled) reads them. No implicit-GEMM kernel, no Python op."""
    import re

    monkeypatch.setenv("QDIFF_IM2COL_WRITER", writer)
    monkeypatch.setenv("QDIFF_CONV_ENGINE", "im2col")
    c = shape[1]
    w = torch.randn(n, c, 3, 3, device="cuda", generator=gen) * (c * 9) ** -0.5
    x = torch.randn(*shape, device="cuda", generator=gen).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    qw = quant(w, "fp8_e4m3", "conv", None)
    s, z = _qparams(F.silu(x.float()), "fp8_e4m3", False)
    bias = torch.randn(n, device="cuda", generator=gen) * 0.1
    kw = dict(wfmt="fp8_e4m3", group_size=None, weight_shape=qw.shape, kind="conv", stride=(stride, stride), padding=(1, 1),
              dilation=(1, 1), groups=1, afmt="fp8_e4m3")
    out, code, _ = _compiled_silu_conv(x, qw, bias, s, z, kw)
    # Inductor quantizes SiLU's fp32 result (no bf16 rounding in between): so does this reference. Against SiLU rounded
    # to bf16 first, ~1/32 of the codes differ by one step (the bf16 step is 1/32 of an e4m3 step): 1.2-1.6e-2 on an H200
    ref = F.silu(reference.qconv(F.silu(x.float()), qw.data, qw.scale, bias, s, z, **kw))
    generated = sorted(set(re.findall(r"def (triton_\w+)\(", code)))
    print(f"im2col conv {shape} -> {n} stride {stride} ({writer}): Inductor kernels {generated}; rel err {rel_err(ref, out):.2e}")
    assert "torch.ops.qdiff" not in code and "conv2d_kernel" not in code
    assert "fp8_linear_tma_kernel" in code or "fp8_linear_kernel" in code
    assert ("im2col_kernel" in code) == (writer == "kernel")
    assert len(generated) <= 3, f"expected the pre-GEMM fusion (SiLU + quantize [+ im2col]) and the final SiLU, got {generated}"
    assert rel_err(ref, out) < REL_TO_REFERENCE["fp8"]


# -- split-K for small output grids (the UNet's 16x16 and 8x8 convs) -----------------------------------------------
SPLITK_CONV_SHAPES = [  # (input shape, split points or None, output channels, stride): SD 1.5 512 px, batch 2
    ((2, 1280, 16, 16), None, 1280, 1),  # down block 2 / up block 1 conv2: M = 512, 40 tiles
    ((2, 640, 16, 16), None, 1280, 1),  # down block 2's first conv1
    ((2, 1280, 16, 16), None, 1280, 2),  # down block 2's downsampler: M = 128
    ((2, 1280, 8, 8), None, 1280, 1),  # down block 3 / mid block: M = 128
    ((2, 2560, 16, 16), (0, 1280, 2560), 1280, 1),  # up block 1 conv1 after the skip cat (the CUDA test's 269 us conv)
    ((2, 1920, 16, 16), (0, 1280, 1920), 1280, 1),  # up block 1's last conv1
    ((2, 2560, 8, 8), (0, 1280, 2560), 1280, 1),  # up block 0 conv1
    ((2, 640, 32, 32), None, 640, 1),  # 80 tiles: the rule keeps SPLIT_K = 1 (control)
]


@pytest.mark.parametrize("fmt", ["fp8", "int8"])
@pytest.mark.parametrize("shape,splits,n,stride", SPLITK_CONV_SHAPES)
def test_conv_split_k_at_sd_shapes(fmt, shape, splits, n, stride, gen, monkeypatch):
    """Split-K on (``QDIFF_CONV_SPLITK=1``: the rule's SPLIT_K) vs off (the default): both match the reference, every element is
    written (NaN poison), and the op's kernel times are printed (do_bench of the eager launches on prepared arguments)."""
    from triton.testing import do_bench

    from qcompile.lowering.kernels import conv as conv_kernels
    from qcompile.lowering.kernels._common import direct

    wfmt, afmt, asym, _ = FORMATS[fmt]
    c = shape[1]
    w = torch.randn(n, c, 3, 3, device="cuda", generator=gen) * (c * 9) ** -0.5
    x = torch.randn(*shape, device="cuda", generator=gen)
    x = (x.to(torch.bfloat16) if splits is None else _spread(x, splits, 1)).contiguous(memory_format=torch.channels_last)
    if splits is None:
        qw = quant(w, wfmt, "conv", None)
        s, z = _qparams(x.float(), afmt, asym)
    else:
        qw, s, z = _split_case(x, w, wfmt, afmt, asym, splits, "conv")
    kw = dict(wfmt=wfmt, group_size=None, weight_shape=qw.shape, kind="conv", stride=(stride, stride), padding=(1, 1), dilation=(1, 1),
              groups=1, afmt=afmt, asym=asym, splits=splits)
    bias = torch.randn(n, device="cuda", generator=gen) * 0.1
    oh = (shape[2] - 1) // stride + 1
    m = shape[0] * oh * oh
    monkeypatch.setenv("QDIFF_CONV_ENGINE", "implicit")  # (by default fp8 convs take im2col + GEMM or the direct kernel)
    monkeypatch.setenv(conv_kernels.SPLITK_ENV, "1")  # the rule's choice (split-K is off by default)
    split = conv_kernels.conv_split_k(m, n, c, 9, 1 if splits is None else len(splits) - 1, x.device)

    def run():
        return triton_lowering.qconv(x, qw.data, qw.scale, bias, s, z, **kw)

    # the kernel launches alone (weight reordered tap-major and column sums computed once, as the compiled graph's buffers)
    args = conv_kernels.conv2d_w8a8_args(x, qw.data.view(torch.float8_e4m3fn) if fmt == "fp8" else qw.data, qw.scale, bias, s,
                                         z if asym else None, weight_shape=tuple(qw.shape), stride=(stride, stride), padding=(1, 1),
                                         dilation=(1, 1), splits=splits)

    def launch():
        return conv_kernels._conv2d_w8a8(*args, wrap=direct)

    monkeypatch.setenv(conv_kernels.SPLITK_ENV, "0")
    off = run()
    t_off = do_bench(launch)
    monkeypatch.setenv(conv_kernels.SPLITK_ENV, "1")
    poison(4 * max(m * n * split, x.numel()))
    on = run()
    torch.cuda.synchronize()
    t_on = do_bench(launch)
    assert torch.isfinite(on).all(), "split-K left output elements unwritten (NaN poison)"
    ref = reference.qconv(x.float(), qw.data, qw.scale, bias, s, z, **kw)
    e_on, e_off = rel_err(ref, on), rel_err(ref, off)
    flop = 2 * m * n * c * 9
    print(f"conv split-K {fmt} {shape} {splits} -> {n} stride {stride}: SPLIT_K {split}, {t_on * 1e3:.1f} us "
          f"({flop / t_on * 1e-9:.0f} TFLOP/s) vs SPLIT_K 1 {t_off * 1e3:.1f} us ({flop / t_off * 1e-9:.0f} TFLOP/s); "
          f"rel err vs reference {e_on:.2e} (off {e_off:.2e})")
    assert e_on < REL_TO_REFERENCE[fmt] and e_off < REL_TO_REFERENCE[fmt]
    assert (split > 1) == (shape[2] <= 16)  # the rule splits the 16x16 and 8x8 convs only


def test_split_k_conv_is_inlined_by_inductor(gen, monkeypatch):
    """Compiled, a split-K conv is two Triton launches in Inductor's code (the conv kernel and the reduce)."""
    monkeypatch.setenv("QDIFF_CONV_SPLITK", "1")  # (off by default)
    monkeypatch.setenv("QDIFF_CONV_ENGINE", "implicit")  # (by default fp8 convs take im2col + GEMM or the direct kernel)

    shape, n = (2, 1280, 8, 8), 1280
    w = torch.randn(n, 1280, 3, 3, device="cuda", generator=gen) * (1280 * 9) ** -0.5
    x = torch.randn(*shape, device="cuda", generator=gen).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    qw = quant(w, "fp8_e4m3", "conv", None)
    s, z = _qparams(x.float(), "fp8_e4m3", False)
    bias = torch.randn(n, device="cuda", generator=gen) * 0.1
    kw = dict(wfmt="fp8_e4m3", group_size=None, weight_shape=qw.shape, kind="conv", stride=(1, 1), padding=(1, 1), dilation=(1, 1),
              groups=1, afmt="fp8_e4m3")

    out, code, ref = _compiled_silu_conv(x, qw, bias, s, z, kw)
    assert "torch.ops.qdiff" not in code and "conv2d_kernel" in code and "conv_splitk_reduce_kernel" in code
    assert rel_err(ref, out) < REL_TO_REFERENCE["fp8"]


@pytest.mark.parametrize("v_ones", ["0", "1"])
@pytest.mark.parametrize("b,h,sq,sk,d", [(2, 16, 1024, 1024, 72), (2, 8, 4096, 77, 40), (2, 8, 256, 256, 160)])
def test_fp8_attention_lowering_compiles_with_quantized_heads(b, h, sq, sk, d, v_ones, gen, monkeypatch):
    """The Triton lowering's attention under Inductor at DiT / SD 1.5 shapes: q / k / v quantized by Inductor-generated
    code (``quantize_heads``: V stored with its keys contiguous, padded rows; with ``QDIFF_ATTN_V_ONES=1`` and the ones
    row where D has room), the attention kernel inlined (no ``torch.ops.qdiff`` call left), the result the eager
    lowering's and close to the reference's."""
    from torch._inductor.utils import run_and_get_code

    monkeypatch.setenv(triton_lowering.V_ONES_ENV, v_ones)

    def heads(s):  # (B, S, H * D) projections viewed as heads, as diffusers' attention processors do
        return torch.randn(b, s, h * d, device="cuda", generator=gen, dtype=torch.bfloat16).view(b, s, h, d).transpose(1, 2)

    q, k, v = heads(sq), heads(sk), heads(sk)
    scales = [(t.float().abs().amax() / 448).reshape(()) for t in (q, k, v)]

    def f(q, k, v):
        return triton_lowering.qattention(q, k, v, *scales).transpose(1, 2).reshape(b, sq, h * d)

    eager = f(q, k, v)
    torch._dynamo.reset()
    poison(eager.numel() * 4)
    with torch.no_grad():
        out, codes = run_and_get_code(torch.compile(f, fullgraph=True), q, k, v)
    code = "\n".join(codes)
    assert "torch.ops.qdiff" not in code and "fp8_attention_kernel" in code
    assert torch.isfinite(out).all(), "kernel left output elements unwritten (NaN poison)"
    ref = reference.qattention(q.float(), k.float(), v.float(), *scales).transpose(1, 2).reshape(b, sq, h * d)
    # online vs final-max P quantization: ~32 dB apart at these shapes (docs/kernels.md); fp8 q / k / v alone are ~25 dB.
    # The eager and the compiled call autotune separately, and another key-tile width moves the running max at which P
    # is quantized: 1.27e-2 (38 dB) apart at SD 1.5's cross-attention shape on a busy GPU (2026-12-04), so 3e-2 (30 dB)
    assert rel_err(eager, out) < 3e-2 and rel_err(ref, out) < 5e-2


@pytest.mark.parametrize("softmax", ["ex2", "ex2-lv", "bits", "half"])
def test_fp8_attention_softmax_modes_at_4096_keys(softmax, gen, monkeypatch):
    """Each softmax mode at PixArt-alpha's self-attention length (4096 keys) against its reference arithmetic: the row
    sums from V's ones column must not lose the tiles' small terms in the fp8 MMA's accumulator (fed back as the
    C operand across 64 key tiles they measured 22 dB against 28 dB for ex2, 2026-12-04)."""
    from qcompile.lowering.kernels.fp8_attention import SOFTMAX_ENV, fp8_attention

    monkeypatch.setenv(SOFTMAX_ENV, softmax)
    q, k, v = (torch.randn(1, 4, 4096, 72, device="cuda", generator=gen, dtype=torch.bfloat16) for _ in range(3))
    scales = [(t.float().abs().amax() / 448).reshape(()) for t in (q, k, v)]
    poison(q.numel() * 4)
    out = fp8_attention(q, k, v, *scales).float()
    assert torch.isfinite(out).all(), "kernel left output elements unwritten (NaN poison)"
    ref = reference.qattention(q.float(), k.float(), v.float(), *scales, softmax=softmax)
    assert rel_err(ref, out) < 5e-2  # (online vs final-max quantization of P: ~3.5e-2 for ex2 at this length)

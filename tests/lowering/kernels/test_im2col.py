"""``qdiff::im2col``: the gather kernel's columns equal the aten reference byte for byte (any kernel, stride, padding,
dilation, split slices, input strides), bad arguments are refused by name, and traced calls reach the op."""

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from qcompile.lowering import conv_im2col
from qcompile.lowering.kernels import im2col as kernel_module

from .helpers import DEVICE, needs_kernels

pytestmark = needs_kernels
FP8 = torch.float8_e4m3fn

CASES = [  # (C, kernel, stride, padding, dilation, splits)
    (32, (3, 3), (1, 1), (1, 1), (1, 1), None),
    (32, (3, 3), (2, 2), (1, 1), (1, 1), (0, 16, 32)),
    (48, (1, 3), (1, 2), (0, 1), (1, 1), (0, 16, 32, 48)),
    (16, (3, 3), (1, 1), (2, 2), (2, 2), None),
    (40, (2, 2), (2, 2), (0, 0), (1, 1), (0, 8, 40)),  # a slice narrower than the channel tile, one wider
]


def _fp8(*shape) -> torch.Tensor:
    g = torch.Generator().manual_seed(sum(shape))
    return (torch.randn(*shape, generator=g) * 60).clamp(-448, 448).to(FP8).to(DEVICE)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


@pytest.mark.parametrize("c,kernel,stride,padding,dilation,splits", CASES)
def test_columns_equal_the_reference(c, kernel, stride, padding, dilation, splits):
    x = _fp8(2, 9, 11, c)
    out = kernel_module.gather_columns(x, kernel, stride, padding, dilation, splits)
    ref = kernel_module.reference(x, kernel, stride, padding, dilation, splits)
    assert out.dtype == FP8 and out.shape == ref.shape
    assert out.shape == conv_im2col.column_shape((2, c, 9, 11), (8, c, *kernel), stride, padding, dilation)
    assert torch.equal(_bytes(out), _bytes(ref))


def test_channel_strided_input_and_two_byte_dtype():
    """Strides are arguments: an NCHW-stored activation viewed as (B, H, W, C) gives the same columns; bf16 too."""
    x = _fp8(2, 32, 7, 6).permute(0, 2, 3, 1)  # channels strided by H * W
    assert not x.is_contiguous()
    args = ((3, 3), (1, 1), (1, 1), (1, 1), (0, 8, 32))
    assert torch.equal(_bytes(kernel_module.gather_columns(x, *args)), _bytes(kernel_module.reference(x.contiguous(), *args)))
    xb = torch.randn(2, 5, 6, 16).to(device=DEVICE, dtype=torch.bfloat16)
    assert torch.equal(kernel_module.gather_columns(xb, *args[:4]), kernel_module.reference(xb, *args[:4]))


def test_padding_reads_zero_bytes():
    """Out-of-image taps are zero (the fp8 code 0), in-image ones are the input's bytes."""
    x = torch.full((1, 2, 2, 16), 1.0, device=DEVICE).to(FP8)
    cols = kernel_module.gather_columns(x, (3, 3), (1, 1), (1, 1), (1, 1))
    assert cols.shape == (4, 144)
    inside = cols.float().reshape(4, 9, 16)
    # pixel (0, 0) sees taps (1, 1), (1, 2), (2, 1), (2, 2) inside the image: 4, 5, 7, 8
    assert inside[0, [4, 5, 7, 8]].eq(1).all() and inside[0, [0, 1, 2, 3, 6]].eq(0).all()


@pytest.mark.parametrize(
    "x,kw,match",
    [
        (torch.zeros(2, 4, 4, 16), {}, "1- or 2-byte"),
        (torch.zeros(4, 4, 16, dtype=torch.uint8), {}, "4-D"),
        (torch.zeros(1, 4, 4, 16, dtype=torch.uint8), {"splits": (0, 8)}, "rise from 0 to C = 16"),
        (torch.zeros(1, 4, 4, 16, dtype=torch.uint8), {"stride": (0, 1)}, "stride"),
    ],
)
def test_bad_arguments_are_named(x, kw, match):
    args = {"kernel": (3, 3), "stride": (1, 1), "padding": (1, 1), "dilation": (1, 1), "splits": None, **kw}
    with pytest.raises((TypeError, ValueError), match=match):
        kernel_module.gather_columns(x.to(DEVICE), **args)


def test_traced_calls_reach_the_op():
    """Under make_fx's fake tensors (as torch.compile traces) the wrapper calls ``torch.ops.qdiff.im2col``, whose fake
    implementation gives the column shape."""
    x = _fp8(2, 8, 8, 32)

    def f(t):
        return kernel_module.gather_columns(t, (3, 3), (2, 2), (1, 1), (1, 1), (0, 16, 32))

    gm = make_fx(f, tracing_mode="fake")(x)
    nodes = [n for n in gm.graph.nodes if n.target == torch.ops.qdiff.im2col.default]
    assert len(nodes) == 1 and tuple(nodes[0].meta["val"].shape) == (2 * 4 * 4, 32 * 9)
    assert torch.equal(_bytes(gm(x)), _bytes(f(x)))

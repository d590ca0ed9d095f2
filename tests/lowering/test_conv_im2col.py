"""The im2col conv's column order: columns times the reordered weight is the convolution (any kernel, stride,
padding, dilation, split slices), and the weight reorder is exactly invertible."""

import pytest
import torch
import torch.nn.functional as F

from qcompile.lowering import conv_im2col

CASES = [  # (C, N, kernel, stride, padding, dilation, splits)
    (32, 24, (3, 3), (1, 1), (1, 1), (1, 1), None),
    (32, 24, (3, 3), (2, 2), (1, 1), (1, 1), (0, 16, 32)),
    (48, 8, (1, 3), (1, 2), (0, 1), (1, 1), (0, 16, 32, 48)),
    (16, 8, (3, 3), (1, 1), (2, 2), (2, 2), None),
    (32, 16, (2, 2), (2, 2), (0, 0), (1, 1), (0, 8, 32)),
]


@pytest.mark.parametrize("c,n,kernel,stride,padding,dilation,splits", CASES)
def test_columns_times_reordered_weight_is_the_convolution(c, n, kernel, stride, padding, dilation, splits):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, c, 9, 11, generator=g, dtype=torch.float64)
    w = torch.randn(n, c, *kernel, generator=g, dtype=torch.float64)
    shape = tuple(w.shape)
    cols = conv_im2col.im2col(x, kernel, stride, padding, dilation, splits)
    wc = conv_im2col.columns_weight(w.reshape(n, -1), shape, splits)
    ref = F.conv2d(x, w, stride=stride, padding=padding, dilation=dilation)
    b, _, oh, ow = ref.shape
    assert cols.shape == conv_im2col.column_shape(x.shape, shape, stride, padding, dilation)
    out = (cols @ wc.t()).view(b, oh, ow, n).permute(0, 3, 1, 2)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    if splits is not None:  # slice s occupies the K range [p_s * KH * KW, p_s+1 * KH * KW) of both
        taps = kernel[0] * kernel[1]
        for a, b_ in zip(splits[:-1], splits[1:]):
            part = F.conv2d(x[:, a:b_], w[:, a:b_], stride=stride, padding=padding, dilation=dilation)
            got = (cols[:, a * taps : b_ * taps] @ wc[:, a * taps : b_ * taps].t()).view(b, oh, ow, n).permute(0, 3, 1, 2)
            torch.testing.assert_close(got, part, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("splits", [None, (0, 16, 48), (0, 8, 40, 48)])
def test_weight_reorder_round_trips_exactly(splits):
    shape = (12, 48, 3, 3)
    data = torch.randint(0, 256, (12, 48 * 9), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    cols = conv_im2col.columns_weight(data, shape, splits)
    assert cols.is_contiguous() and cols.dtype == torch.uint8
    assert not torch.equal(cols, data)
    assert torch.equal(conv_im2col.plan_weight(cols, shape, splits), data)


# auto_engine against the 2026-12-02 H200 table it was drawn from (examples/op_engines.py, docs/kernels.md v9):
# (input B, C, H, W), N, stride -> the faster of direct and gather + GEMM there (us: direct vs gather + GEMM)
MEASURED = [
    ((64, 128, 32, 32), 128, 1, "direct"),  # 27.0 vs 61.0 (bundled UNet)
    ((64, 192, 32, 32), 64, 1, "direct"),  # 27.3 vs 100.2
    ((64, 64, 32, 32), 64, 2, "direct"),  # 7.0 vs 9.4
    ((64, 128, 16, 16), 128, 2, "im2col"),  # 9.1 vs 7.6: 4096 pixels
    ((64, 256, 16, 16), 128, 1, "direct"),  # 15.1 vs 22.0
    ((2, 960, 64, 64), 320, 1, "direct"),  # 71.7 vs 86.5 (SD 1.5)
    ((2, 640, 64, 64), 320, 1, "direct"),  # 49.0 vs 57.7
    ((2, 1280, 32, 32), 1280, 1, "im2col"),  # 91.6 vs 69.4
    ((2, 640, 64, 64), 640, 1, "im2col"),  # 88.2 vs 77.9
    ((2, 1280, 16, 16), 1280, 1, "im2col"),  # 56.3 vs 24.4
    ((2, 320, 64, 64), 320, 2, "im2col"),  # 16.6 vs 14.6
    ((2, 2560, 8, 8), 1280, 1, "im2col"),  # 85.9 vs 42.0
]


@pytest.mark.parametrize("shape,n,stride,faster", MEASURED)
def test_auto_engine_picks_the_faster_measured_engine(shape, n, stride, faster):
    args = (shape, (n, shape[1], 3, 3), (stride, stride), (1, 1), (1, 1))
    assert conv_im2col.auto_engine(*args) == faster


def test_conv_engine_switch(monkeypatch):
    """``QDIFF_CONV_ENGINE``: auto by default, one engine for every conv otherwise; columns over the memory bound take
    the direct kernel under auto and the implicit one under im2col; a bad value is named."""
    big = ((64, 1280, 64, 64), (1280, 1280, 3, 3), (1, 1), (1, 1), (1, 1))  # 2.9 GB of columns, 1280 outputs
    small = ((2, 1280, 16, 16), (1280, 1280, 3, 3), (1, 1), (1, 1), (1, 1))
    assert conv_im2col.column_bytes(*big) > conv_im2col.MAX_COLUMN_BYTES
    monkeypatch.delenv("QDIFF_CONV_ENGINE", raising=False)
    assert conv_im2col.fp8_engine() == "auto"
    assert (conv_im2col.conv_engine(*big), conv_im2col.conv_engine(*small)) == ("direct", "im2col")
    expected = {"im2col": ("implicit", "im2col"), "direct": ("direct", "direct"), "implicit": ("implicit", "implicit")}
    for engine, (on_big, on_small) in expected.items():
        monkeypatch.setenv("QDIFF_CONV_ENGINE", engine)
        assert (conv_im2col.conv_engine(*big), conv_im2col.conv_engine(*small)) == (on_big, on_small), engine
    monkeypatch.setenv("QDIFF_CONV_ENGINE", "fast")
    with pytest.raises(ValueError, match="QDIFF_CONV_ENGINE must be one of auto, im2col, implicit, direct, got 'fast'"):
        conv_im2col.conv_engine(*small)
